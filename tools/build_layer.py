"""Build the PyTorch Lambda layer: CPU torch, pruned, stripped, packed into one archive.

CPU torch installs to about 700 MB; Lambda allows 250 MB unzipped for a
function and all its layers. So, as the fast.ai tutorial's layer did, the
layer holds torch as one compressed archive that ``chalicelib/torch_layer.py``
unpacks to /tmp on a cold start. This script:

1. downloads the CPU torch wheel for the Lambda runtime's Python and
   architecture (pip; ``--index-url`` / ``--find-links`` to choose where from),
   plus ``typing_extensions``, the one dependency ``import torch`` needs;
2. drops what inference never uses: C++ headers, CMake files, test binaries
   and test libraries, static libraries, type stubs, bytecode caches;
3. strips the shared objects;
4. packs the rest as ``pytorch/<name>.tar.gz`` with a ``manifest.json`` and
   zips that as the layer (Lambda mounts it at /opt, so at /opt/pytorch);
5. prints the sizes against Lambda's limits, and the newest glibc symbol the
   libraries need against the runtime's glibc.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
LAMBDA_UNZIPPED_LIMIT = 250 * MIB
LAMBDA_DIRECT_UPLOAD_LIMIT = 50 * MIB
DEFAULT_TMP = 512 * MIB
# glibc of the Amazon Linux each Lambda Python runtime runs on.
RUNTIME_GLIBC = {"3.10": (2, 26), "3.11": (2, 26), "3.12": (2, 34), "3.13": (2, 34)}

TYPING_EXTENSIONS = "4.16.0"

# Relative to the unpacked wheel. Every entry is something `import torch` and
# `torch.jit.load` were shown not to need (the Lambda simulation imports torch
# from the result and runs a model on it).
PRUNED_PATHS = (
    "torch/include",
    "torch/share",
    "torch/test",
    "torch/lib/libjitbackend_test.so",
    "torch/lib/libtorchbind_test.so",
    "torch/lib/libaoti_custom_ops.so",
    "torch/lib/libbackend_with_compiler.so",
    "functorch",
)
PRUNED_PATTERNS = ("*.a", "*.pyi", "__pycache__")
# torch/bin holds test programs and protoc; import torch checks only for this one.
KEPT_BINARIES = ("torch_shm_manager",)


@dataclass(frozen=True)
class LayerReport:
    layer_zip: int
    layer_unzipped: int
    unpacked: int
    glibc_needed: tuple[int, int]


def download(requirement: str, destination: Path, args: argparse.Namespace) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", args.python_version, "--implementation", "cp",
        "--platform", args.platform, "--dest", str(destination), requirement,
    ]  # fmt: skip
    if args.index_url:
        command += ["--index-url", args.index_url]
    for link in args.find_links:
        command += ["--find-links", link]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    name = requirement.split("==", maxsplit=1)[0].replace("-", "_")
    return next(p for p in destination.glob("*.whl") if p.name.lower().startswith(name.lower()))


def prune(site: Path) -> None:
    for relative in PRUNED_PATHS:
        path = site / relative
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for pattern in PRUNED_PATTERNS:
        for path in list(site.rglob(pattern)):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for binary in (site / "torch" / "bin").glob("*"):
        if binary.name not in KEPT_BINARIES:
            shutil.rmtree(binary) if binary.is_dir() else binary.unlink()


def strip_shared_objects(site: Path) -> None:
    for path in [*site.rglob("*.so"), *site.rglob("*.so.*"), *(site / "torch" / "bin").glob("*")]:
        subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)


def newest_glibc(site: Path) -> tuple[int, int]:
    """The newest GLIBC_x.y symbol version any shared object needs."""
    newest = (0, 0)
    for path in [*site.rglob("*.so"), *site.rglob("*.so.*")]:
        symbols = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=False)
        for token in symbols.stdout.replace("(", " ").replace(")", " ").split():
            if token.startswith("GLIBC_") and token[6:7].isdigit():
                major, minor = (int(part) for part in token[6:].split(".")[:2])
                newest = max(newest, (major, minor))
    return newest


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def pack(site: Path, name: str, output: Path) -> LayerReport:
    glibc = newest_glibc(site)
    unpacked = tree_size(site)
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / f"{name}.tar.gz"
        with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
            for path in sorted(site.iterdir()):
                tar.add(path, arcname=path.name)
        manifest = {
            "archive": archive.name,
            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
            "unpacked_bytes": unpacked,
            "glibc_needed": ".".join(map(str, glibc)),
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_suffix(".partial")
        # The archive is already compressed: store it, so the layer unzips fast.
        with zipfile.ZipFile(partial, "w") as layer:
            layer.write(archive, f"pytorch/{archive.name}", compress_type=zipfile.ZIP_STORED)
            layer.writestr("pytorch/manifest.json", json.dumps(manifest, indent=2) + "\n")
        partial.replace(output)
    with zipfile.ZipFile(output) as layer:
        layer_unzipped = sum(info.file_size for info in layer.infolist())
    return LayerReport(output.stat().st_size, layer_unzipped, unpacked, glibc)


def function_unzipped_size(deployment_zip: Path | None) -> int:
    if deployment_zip is None or not deployment_zip.is_file():
        return 0
    with zipfile.ZipFile(deployment_zip) as package:
        return sum(info.file_size for info in package.infolist())


def print_report(report: LayerReport, function_bytes: int, python_version: str, model_cache: int) -> bool:
    """Print sizes against the limits; return whether everything fits."""
    runtime_glibc = RUNTIME_GLIBC.get(python_version, (0, 0))
    total = report.layer_unzipped + function_bytes
    tmp_used = report.unpacked + model_cache
    rows = [
        ("layer zip", report.layer_zip, LAMBDA_DIRECT_UPLOAD_LIMIT, "upload through S3 when over"),
        ("layer + function, unzipped", total, LAMBDA_UNZIPPED_LIMIT, "hard limit"),
        ("torch unpacked + model cache in /tmp", tmp_used, DEFAULT_TMP, "default ephemeral storage"),
    ]
    fits = True
    print(f"{'what':40} {'MiB':>8} {'limit':>8}  status")
    for what, size, limit, note in rows:
        ok = size <= limit
        fits &= ok or what == "layer zip"
        status = "ok" if ok else f"over ({note})"
        print(f"{what:40} {size / MIB:8.1f} {limit / MIB:8.0f}  {status}")
    if function_bytes == 0:
        print("  (function package not measured: run `make package` first)")
    needed = ".".join(map(str, report.glibc_needed))
    runtime = ".".join(map(str, runtime_glibc))
    glibc_ok = report.glibc_needed <= runtime_glibc
    verdict = "ok" if glibc_ok else "TOO NEW: this torch will not load on that runtime"
    print(
        f"{'glibc needed / python' + python_version + ' runtime has':40} {needed:>8} {runtime:>8}  {verdict}"
    )
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-version", default="2.13.0")
    parser.add_argument("--python-version", default="3.11", help="the Lambda runtime's Python")
    parser.add_argument(
        "--platform", default="manylinux_2_28_x86_64", help="pip platform tag (x86_64 Lambda)"
    )
    parser.add_argument("--index-url", help="e.g. https://download.pytorch.org/whl/cpu")
    parser.add_argument("--find-links", action="append", default=[], help="extra wheel locations")
    parser.add_argument("--output", type=Path, default=Path("build/layer/pytorch-layer.zip"))
    parser.add_argument("--function-zip", type=Path, default=Path("build/package/deployment.zip"))
    parser.add_argument(
        "--model-cache-mib", type=int, default=40, help="room the model archive needs in /tmp"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        wheels, site = Path(scratch) / "wheels", Path(scratch) / "site"
        torch_wheel = download(f"torch=={args.torch_version}", wheels, args)
        typing_wheel = download(f"typing_extensions=={TYPING_EXTENSIONS}", wheels, args)
        for wheel in (torch_wheel, typing_wheel):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        print(f"{torch_wheel.name}: {tree_size(site) / MIB:.0f} MiB installed")
        prune(site)
        strip_shared_objects(site)
        name = f"torch-{args.torch_version}-cp{args.python_version.replace('.', '')}"
        report = pack(site, name, args.output)
    print(f"wrote {args.output}")
    fits = print_report(
        report, function_unzipped_size(args.function_zip), args.python_version, args.model_cache_mib * MIB
    )
    if not fits:
        raise SystemExit("the layer does not fit Lambda's limits")


if __name__ == "__main__":
    main()
