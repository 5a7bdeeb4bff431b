"""TorchServe for ``make bench-peers``: the demo model's TorchScript file as a model archive, and its start.

TorchServe runs from its own venv (build/peers/venv, made by
tools/torchserve_env.sh), started as its documentation starts it (``torchserve
--start``, here ``--foreground`` so that its process group stays ours to
measure and stop), with bench/torchserve/config.properties. Each start gets
a scratch folder of its own for its temporary files (where it unpacks the
model archive), its logs and its pid file, so no start finds another's
leftovers, and two TorchServes on the machine never meet.

The model archive is built for every run from the same demo archive our
server unpacks, so it always holds the file ours serves and the current
handler; it takes about a second.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from string import Template

from bench.peers_processes import Launch
from tests.support.chalice_local import free_port

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "bench" / "torchserve"
HANDLER = HERE / "handler.py"
CONFIG_TEMPLATE = HERE / "config.properties"
MODEL_NAME = "demo"
PATH = f"/predictions/{MODEL_NAME}"
# What the handler needs from the demo archive besides the TorchScript file.
EXTRA_FILES = ("classes.txt", "manifest.json")
# The ports config.properties names besides the inference port.
OTHER_PORTS = ("management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")


class TorchServeMissing(RuntimeError):
    """TorchServe's venv or the Java runtime it needs is not there."""


def check_installed(venv: Path) -> None:
    if not (venv / "bin" / "torchserve").is_file():
        raise TorchServeMissing(f"No TorchServe in {venv}: run `make bench-peers`, which builds it.")
    if shutil.which(java()) is None:
        raise TorchServeMissing(f"TorchServe needs Java; there is no {java()}: run tools/torchserve_env.sh.")


def java() -> str:
    """The java TorchServe's launcher runs: JAVA_HOME's, or the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    return str(Path(home, "bin", "java")) if home else "java"


def build_model_store(venv: Path, demo_model: Path, scratch: Path) -> Path:
    """A model store holding ``demo.mar``: the demo archive's TorchScript file, classes, manifest, handler.

    torch-model-archiver zips its inputs, and ZIP cannot record a date before
    1980; the demo archive dates its members 1970 (the epoch, for a
    reproducible build), so the extracted copies are dated now.
    """
    unpacked, store = scratch / "model", scratch / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    with tarfile.open(demo_model) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(".pt") or m.name in EXTRA_FILES]
        archive.extractall(unpacked, members=members, filter="data")
    now = time.time()
    for member in members:
        os.utime(unpacked / member.name, (now, now))
    (serialized,) = (m.name for m in members if m.name.endswith(".pt"))
    subprocess.run(
        [str(venv / "bin" / "torch-model-archiver"), "--model-name", MODEL_NAME, "--version", "1",
         "--serialized-file", str(unpacked / serialized), "--handler", str(HANDLER),
         "--extra-files", ",".join(str(unpacked / name) for name in EXTRA_FILES),
         "--export-path", str(store), "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    return store


def launch_torchserve(venv: Path, store: Path, port: int, scratch: Path) -> Launch:
    """``torchserve --start --foreground`` serving ``demo.mar`` from ``store`` on ``port``, 127.0.0.1 only."""
    temporary, logs = scratch / "tmp", scratch / "logs"
    temporary.mkdir(parents=True)
    logs.mkdir()
    config = scratch / "config.properties"
    config.write_text(
        Template(CONFIG_TEMPLATE.read_text()).substitute(
            inference_port=port, model_store=store, **{name: free_port() for name in OTHER_PORTS}
        )
    )
    command = [
        str(venv / "bin" / "torchserve"), "--start", "--foreground", "--no-config-snapshots",
        "--disable-token-auth", "--ts-config", str(config), "--model-store", str(store),
        "--models", f"{MODEL_NAME}={MODEL_NAME}.mar",
    ]  # fmt: skip
    return Launch(
        command=command,
        environment={
            **os.environ,
            # TEMP is where TorchServe's JVM unpacks archives; TMPDIR holds its launcher's pid file.
            "TEMP": str(temporary),
            "TMPDIR": str(temporary),
            "LOG_LOCATION": str(logs),
            "METRICS_LOCATION": str(logs),
        },
        cwd=scratch,
        description=f"`{shlex.join(command)}`, with {CONFIG_TEMPLATE.relative_to(ROOT)}",
    )


def versions(venv: Path) -> dict[str, str]:
    """TorchServe's, its torch's and the Java runtime's versions, for the report."""
    python = str(venv / "bin" / "python")
    script = "import torch, ts.version; print(ts.version.__version__, torch.__version__)"
    torchserve, torch = subprocess.run(
        [python, "-c", script], check=True, capture_output=True, text=True
    ).stdout.split()
    runtime = subprocess.run([java(), "-version"], check=True, capture_output=True, text=True).stderr
    return {"torchserve": torchserve, "torch": torch, "java": runtime.splitlines()[0]}
