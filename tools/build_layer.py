"""Build the PyTorch Lambda layer: CPU torch, pruned, stripped, packed into one archive.

CPU torch installs to about 700 MB; Lambda allows 250 MB unzipped for a
function and all its layers. So, as the fast.ai tutorial's layer did, the
layer holds torch as one compressed archive that ``chalicelib/torch_layer.py``
unpacks to /tmp on a cold start. This script:

1. downloads the CPU torch wheel (``torch==X+cpu``, never PyPI's CUDA build)
   for the Lambda runtime's Python and architecture, plus
   ``typing_extensions``, the one dependency ``import torch`` needs: from the
   wheels pip already finds on this machine (its ``find-links``) if it has
   them, else from PyTorch's CPU index (``--index-url`` to choose another);
2. drops what inference never uses: C++ headers, CMake files, test binaries
   and test libraries, static libraries, type stubs, bytecode caches;
3. strips the shared objects;
4. packs the rest as ``pytorch/<name>.tar.gz`` with a ``manifest.json`` and
   zips that as the layer (Lambda mounts it at /opt, so at /opt/pytorch);
5. prints the sizes against Lambda's limits, and runs the glibc and ABI
   gate (``runtime_gate``) over what it packed: a torch that cannot load on
   the runtime is an error, not a layer.

``--simulation-only`` builds a layer for a runtime it cannot load on, for
``make lambda-sim``: this machine has only a cp311 CPU torch, which needs
glibc 2.28, so on Lambda's python3.11 (glibc 2.26) it would fail, but the
simulation (python3.11 on this machine's newer glibc) can still exercise the
torch code path with it. The layer's manifest and file name say so.
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

from tools.runtime_gate import (
    DIRECT_UPLOAD_LIMIT,
    MIB,
    RUNTIMES,
    UNZIPPED_LIMIT,
    LambdaRuntime,
    Report,
    Target,
    check_tree,
    format_version,
)

DEFAULT_TMP = 512 * MIB
TORCH_VERSION = "2.13.0"
TYPING_EXTENSIONS = "4.16.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

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
class LayerSizes:
    layer_zip: int
    layer_unzipped: int
    unpacked: int


def download(
    requirement: str, destination: Path, runtime: LambdaRuntime, args: argparse.Namespace, *index: str
) -> Path:
    """A wheel for the runtime; by default from pip's own configuration (PyPI, and its find-links)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", runtime.python_version, "--implementation", "cp",
        "--platform", args.platform, "--dest", str(destination), *index, requirement,
    ]  # fmt: skip
    for link in args.find_links:
        command += ["--find-links", link]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    name = requirement.split("==", maxsplit=1)[0].replace("-", "_")
    return next(p for p in destination.glob("*.whl") if p.name.lower().startswith(name.lower()))


def download_torch(destination: Path, runtime: LambdaRuntime, args: argparse.Namespace) -> Path:
    """The CPU build: PyPI has only CUDA builds of torch for Linux. From the wheels this machine
    keeps (pip's find-links, asking no index) when it has it, else from the CPU index."""
    requirement = f"torch=={args.torch_version}+cpu"
    try:
        return download(requirement, destination, runtime, args, "--no-index")
    except subprocess.CalledProcessError:
        try:
            return download(requirement, destination, runtime, args, "--index-url", args.index_url)
        except subprocess.CalledProcessError as error:
            raise SystemExit(
                f"could not download {requirement} for {runtime.name}:\n{error.stderr}"
            ) from error


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


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def pack(site: Path, name: str, output: Path, gate: Report, runtime: LambdaRuntime) -> LayerSizes:
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
            "runtime": runtime.name,
            "glibc_needed": format_version(gate.newest_glibc),
            "simulation_only": bool(gate.problems),
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
    return LayerSizes(output.stat().st_size, layer_unzipped, unpacked)


def function_unzipped_size(deployment_zip: Path | None) -> int:
    if deployment_zip is None or not deployment_zip.is_file():
        return 0
    with zipfile.ZipFile(deployment_zip) as package:
        return sum(info.file_size for info in package.infolist())


def print_report(sizes: LayerSizes, function_bytes: int, model_cache: int) -> bool:
    """Print sizes against the limits; return whether everything fits."""
    total = sizes.layer_unzipped + function_bytes
    tmp_used = sizes.unpacked + model_cache
    rows = [
        ("layer zip", sizes.layer_zip, DIRECT_UPLOAD_LIMIT, "upload through S3 when over"),
        ("layer + function, unzipped", total, UNZIPPED_LIMIT, "hard limit"),
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
    return fits


def print_gate(gate: Report, runtime: LambdaRuntime, *, simulation_only: bool) -> None:
    print(
        f"glibc: the libraries need {format_version(gate.newest_glibc)}; {runtime.name} "
        f"({runtime.system}) has {format_version(runtime.glibc)}"
    )
    for problem in gate.problems:
        print(f"  {problem}", file=sys.stderr)
    if gate.problems and simulation_only:
        print(f"SIMULATION ONLY: this layer cannot load on Lambda's {runtime.name}; it is for lambda-sim.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-version", default=TORCH_VERSION, help="a release with a +cpu build")
    parser.add_argument("--runtime", default="python3.13", choices=sorted(RUNTIMES), help="Lambda runtime")
    parser.add_argument(
        "--platform", default="manylinux_2_28_x86_64", help="pip platform tag (x86_64 Lambda)"
    )
    parser.add_argument("--index-url", default=CPU_INDEX, help="where torch's CPU wheels are")
    parser.add_argument("--find-links", action="append", default=[], help="extra wheel locations")
    parser.add_argument(
        "--simulation-only",
        action="store_true",
        help="build even if torch cannot load on the runtime: for make lambda-sim, never for deploying",
    )
    parser.add_argument("--output", type=Path, default=Path("build/layer/pytorch-layer.zip"))
    parser.add_argument("--function-zip", type=Path, default=Path("build/package/deployment.zip"))
    parser.add_argument(
        "--model-cache-mib", type=int, default=40, help="room the model archive needs in /tmp"
    )
    args = parser.parse_args()
    runtime = RUNTIMES[args.runtime]

    with tempfile.TemporaryDirectory() as scratch:
        wheels, site = Path(scratch) / "wheels", Path(scratch) / "site"
        torch_wheel = download_torch(wheels, runtime, args)
        typing_wheel = download(f"typing_extensions=={TYPING_EXTENSIONS}", wheels, runtime, args)
        for wheel in (torch_wheel, typing_wheel):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        print(f"{torch_wheel.name}: {tree_size(site) / MIB:.0f} MiB installed")
        prune(site)
        strip_shared_objects(site)
        gate = check_tree(site, Target(runtime))
        print_gate(gate, runtime, simulation_only=args.simulation_only)
        if gate.problems and not args.simulation_only:
            raise SystemExit(
                f"torch {args.torch_version} cannot load on {runtime.name}: no layer written "
                "(--simulation-only builds one for make lambda-sim anyway)"
            )
        name = f"torch-{args.torch_version}-{runtime.abi}"
        sizes = pack(site, name, args.output, gate, runtime)
    print(f"wrote {args.output}")
    fits = print_report(sizes, function_unzipped_size(args.function_zip), args.model_cache_mib * MIB)
    if not fits:
        raise SystemExit("the layer does not fit Lambda's limits")


if __name__ == "__main__":
    main()
