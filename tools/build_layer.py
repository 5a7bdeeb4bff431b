"""Build the PyTorch Lambda layer: CPU torch, pruned, stripped, its core libraries compressed.

CPU torch installs to about 700 MB; Lambda allows 250 MB unzipped for a
function and all its layers. Most of that is two libraries,
``libtorch_cpu.so`` and ``libtorch_python.so``: the layer carries those as
one Zstandard tarball, which ``chalicelib/torch_layer.py`` decompresses into
in-memory files and loads on a cold start, and the rest of torch as plain
files it imports in place (Lambda mounts the layer at /opt, so at
/opt/pytorch/site). Nothing is written to /tmp, and only the files
``import torch`` reads are read. This script:

1. downloads the CPU torch wheel (``torch==X+cpu``, never PyPI's CUDA build)
   for the Lambda runtime's Python and architecture, plus
   ``typing_extensions``, the one dependency ``import torch`` needs, and
   ``zstandard``, which the loader decompresses with: from the wheels pip
   already finds on this machine (its ``find-links``) if it has them, else
   from PyTorch's CPU index for torch (``--index-url`` to choose another)
   and PyPI for the others;
2. drops what inference never uses: C++ headers, CMake files, test binaries
   and test libraries, static libraries, type stubs, bytecode caches;
3. strips the shared objects, and runs the glibc and ABI gate
   (``runtime_gate``) over what is left: a torch that cannot load on the
   runtime is an error, not a layer;
4. runs what the service runs (``import torch``, ``torch.jit.load``, freeze,
   a forward pass) with the runtime's own Python (``--python``), and
   compiles the modules that imported, as unchecked-hash bytecode, so a cold
   start compiles none of them; a torch pruned too far fails here;
5. zips the layer: ``pytorch/site`` (torch without the in-memory
   libraries), ``pytorch/<name>-in-memory.tar.zst``, ``pytorch/vendor``
   (zstandard) and ``pytorch/manifest.json``, which lists the libraries the
   loader opens, dependencies first;
6. prints the sizes against Lambda's limits.

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
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import zstandard
from elftools.elf.elffile import ELFFile

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

TORCH_VERSION = "2.13.0"
TYPING_EXTENSIONS = "4.16.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Decompresses about as fast as the fastest levels, and packs torch smallest.
ZSTD_LEVEL = 19

# Relative to the unpacked wheel. Every entry is something `import torch` and
# `torch.jit.load` were shown not to need (the build runs a model on what is
# left, and the Lambda simulation imports torch from the layer): C++ headers
# and build files, test code, torch.compile's compiler (_dynamo, _inductor)
# and ONNX export, which a TorchScript model never calls.
PRUNED_PATHS = (
    "torch/include",
    "torch/share",
    "torch/test",
    "torch/lib/libjitbackend_test.so",
    "torch/lib/libtorchbind_test.so",
    "torch/lib/libaoti_custom_ops.so",
    "torch/lib/libbackend_with_compiler.so",
    "torch/_dynamo",
    "torch/_inductor",
    "torch/onnx",
    "functorch",
)
PRUNED_PATTERNS = ("*.a", "*.pyi", "__pycache__")
# torch/bin holds test programs and protoc; import torch checks only for this one.
KEPT_BINARIES = ("torch_shm_manager",)
# Most of torch's size: compressed in the layer, decompressed into memory, never to disk.
IN_MEMORY = ("torch/lib/libtorch_cpu.so", "torch/lib/libtorch_python.so")
# What the loader needs of the zstandard wheel: its C backend, not the cffi one.
VENDORED = ("zstandard/__init__.py", "zstandard/backend_c.*", "zstandard-*.dist-info/*")

# Run by the runtime's Python with the site and vendor folders as arguments:
# what the loader and the service do (chalicelib/torch_layer.py and
# torchscript_backend.py), then every module imported from those folders is
# compiled, and counted.
IMPORT_AND_COMPILE = r"""
import importlib.util, io, py_compile, sys
folders = tuple(sys.argv[1:])
sys.path[:0] = folders
import zstandard
import torch
torch.set_num_threads(1)
layers = [torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5)]
scripted = torch.jit.script(torch.nn.Sequential(*layers))
buffer = io.BytesIO()
torch.jit.save(scripted, buffer)
buffer.seek(0)
model = torch.jit.freeze(torch.jit.load(buffer, map_location="cpu").eval())
with torch.inference_mode():
    model(torch.ones(1, 3, 8, 8)).softmax(1).topk(2)
sources = {getattr(module, "__file__", None) or "" for module in list(sys.modules.values())}
imported = sorted(source for source in sources if source.startswith(folders) and source.endswith(".py"))
for source in imported:
    py_compile.compile(source, importlib.util.cache_from_source(source), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
print(len(imported))
"""


@dataclass(frozen=True)
class LayerSizes:
    layer_zip: int
    layer_unzipped: int
    in_memory: int  # decompressed into memory by every process that imports torch


@dataclass(frozen=True)
class LayerInfo:
    """What the manifest says of the layer besides its contents."""

    runtime: str
    glibc_needed: str
    simulation_only: bool


def pip_platforms(platform: str) -> list[str]:
    """``platform`` and the older manylinux tags it runs: pip takes ``--platform`` literally."""
    manylinux = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if manylinux is None:
        return [platform]
    return [f"manylinux_2_{minor}_{manylinux[2]}" for minor in range(int(manylinux[1]), 16, -1)]


def download(
    requirement: str, destination: Path, runtime: LambdaRuntime, args: argparse.Namespace, *index: str
) -> Path:
    """A wheel for the runtime; by default from pip's own configuration (PyPI, and its find-links)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", runtime.python_version, "--implementation", "cp",
        "--dest", str(destination), *index, requirement,
    ]  # fmt: skip
    for platform in pip_platforms(args.platform):
        command += ["--platform", platform]
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


def vendor(wheel: Path, destination: Path) -> None:
    """The parts of a wheel the loader imports, for ``pytorch/vendor``."""
    with zipfile.ZipFile(wheel) as archive:
        wanted = [name for name in archive.namelist() if any(fnmatchcase(name, p) for p in VENDORED)]
        archive.extractall(destination, wanted)


def strip_shared_objects(root: Path) -> None:
    for path in [*root.rglob("*.so"), *root.rglob("*.so.*"), *root.glob("torch/bin/*")]:
        subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)


def gate_layer(trees: Sequence[Path], runtime: LambdaRuntime) -> Report:
    """The gate's verdict on everything the layer will carry."""
    combined = Report(name="layer")
    for tree in trees:
        report = check_tree(tree, Target(runtime))
        combined.newest_glibc = max(combined.newest_glibc, report.newest_glibc)
        combined.problems += report.problems
    return combined


def import_and_compile(folders: Sequence[Path], python: Sequence[str], runtime: LambdaRuntime) -> int:
    """Run torch as the service does with the runtime's Python; compile what it imported.

    Unchecked-hash bytecode is used without comparing time stamps with the
    source, which unzipping does not keep exactly; the layer never changes.
    A module that did not import keeps only its source: compiled on the rare
    import that needs it. Returns how many were compiled.
    """
    version = subprocess.run(
        [*python, "-I", "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if version != runtime.python_version:
        raise SystemExit(
            f"{shlex.join(python)} is Python {version}, but {runtime.name}'s bytecode needs "
            f"{runtime.python_version}: pass its interpreter with --python"
        )
    # -B: importing must not leave bytecode of its own (checked against time stamps) behind.
    run = subprocess.run(
        [*python, "-I", "-S", "-B", "-c", IMPORT_AND_COMPILE, *map(str, folders)],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise SystemExit(f"the pruned torch does not run a TorchScript model:\n{run.stderr[-4000:]}")
    return int(run.stdout.split()[-1])


def shared_libraries_needed(library: Path) -> list[str]:
    """The sonames in a shared object's DT_NEEDED entries."""
    with library.open("rb") as stream:
        dynamic = ELFFile(stream).get_section_by_name(".dynamic")
        return [tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]


def load_order(site: Path, in_memory: Sequence[str]) -> list[str]:
    """The in-memory libraries and those they need from beside them, dependencies first.

    The dynamic linker looks for a library's dependencies in its RUNPATH,
    ``$ORIGIN``; one loaded from an in-memory file has no origin. So the
    loader opens them all itself in this order, and the linker finds each
    dependency already loaded, by its soname.
    """
    order: list[str] = []
    seen: set[str] = set()

    def visit(relative: str) -> None:
        seen.add(relative)
        library = site / relative
        for soname in shared_libraries_needed(library):
            dependency = (library.parent / soname).relative_to(site).as_posix()
            if dependency not in seen and (site / dependency).is_file():
                visit(dependency)
        order.append(relative)

    for relative in in_memory:
        if relative not in seen:
            visit(relative)
    return order


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def tar_zst(site: Path, members: Sequence[str], archive: Path, level: int) -> None:
    """``members`` of ``site`` as a ustar tarball (no extended headers: the loader reads it block by
    block) in one Zstandard frame, with its checksum."""
    compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
    with (
        archive.open("wb") as raw,
        compressor.stream_writer(raw, closefd=False) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for member in members:
            tar.add(site / member, arcname=member, recursive=False)


def write_layer(
    site: Path,
    vendor_dir: Path,
    name: str,
    output: Path,
    info: LayerInfo,
    *,
    in_memory: Sequence[str] = IN_MEMORY,
    level: int = ZSTD_LEVEL,
) -> LayerSizes:
    """Zip ``site`` as the layer, with ``in_memory`` (paths in ``site``) in one compressed tarball."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / f"{name}-in-memory.tar.zst"
        tar_zst(site, in_memory, archive, level)
        manifest = {
            "memory_archive": archive.name,
            "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
            "memory_bytes": sum((site / member).stat().st_size for member in in_memory),
            "libraries": load_order(site, in_memory),
            "runtime": info.runtime,
            "glibc_needed": info.glibc_needed,
            "simulation_only": info.simulation_only,
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as layer:
            for path in sorted(p for p in site.rglob("*") if p.is_file()):
                relative = path.relative_to(site).as_posix()
                if relative not in in_memory:
                    layer.write(path, f"pytorch/site/{relative}")
            # Already compressed: stored, it unzips fast.
            layer.write(archive, f"pytorch/{archive.name}", compress_type=zipfile.ZIP_STORED)
            for path in sorted(p for p in vendor_dir.rglob("*") if p.is_file()):
                layer.write(path, f"pytorch/vendor/{path.relative_to(vendor_dir).as_posix()}")
            layer.writestr("pytorch/manifest.json", json.dumps(manifest, indent=2) + "\n")
        partial.replace(output)
    with zipfile.ZipFile(output) as layer:
        layer_unzipped = sum(member.file_size for member in layer.infolist())
    return LayerSizes(output.stat().st_size, layer_unzipped, manifest["memory_bytes"])


def function_unzipped_size(deployment_zip: Path | None) -> int:
    if deployment_zip is None or not deployment_zip.is_file():
        return 0
    with zipfile.ZipFile(deployment_zip) as package:
        return sum(info.file_size for info in package.infolist())


def print_report(sizes: LayerSizes, function_bytes: int) -> bool:
    """Print sizes against the limits; return whether the layer and function fit Lambda's."""
    total = sizes.layer_unzipped + function_bytes
    print(f"{'what':40} {'MiB':>8} {'limit':>8}  status")
    for what, size, limit, over in (
        ("layer zip", sizes.layer_zip, DIRECT_UPLOAD_LIMIT, "over (upload through S3)"),
        ("layer + function, unzipped", total, UNZIPPED_LIMIT, "OVER Lambda's hard limit"),
    ):
        print(f"{what:40} {size / MIB:8.1f} {limit / MIB:8.0f}  {'ok' if size <= limit else over}")
    in_memory = f"{sizes.in_memory / MIB:8.1f} {'':>8}"
    print(f"{'in memory, per process':40} {in_memory}  counts against the function's memory")
    if function_bytes == 0:
        print("  (function package not measured: run `make package` first)")
    return total <= UNZIPPED_LIMIT


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
        "--python",
        default=shlex.join([sys.executable]),
        help="command that starts the runtime's Python, to run torch and compile it (default: this one)",
    )
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
    args = parser.parse_args()
    runtime = RUNTIMES[args.runtime]

    with tempfile.TemporaryDirectory() as scratch:
        wheels, site, vendor_dir = (Path(scratch) / name for name in ("wheels", "site", "vendor"))
        torch_wheel = download_torch(wheels, runtime, args)
        typing_wheel = download(f"typing_extensions=={TYPING_EXTENSIONS}", wheels, runtime, args)
        for wheel in (torch_wheel, typing_wheel):
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(site)
        # The zstandard that packs the archive (requirements-dev.txt's) is the one that unpacks it.
        vendor(download(f"zstandard=={zstandard.__version__}", wheels, runtime, args), vendor_dir)
        print(f"{torch_wheel.name}: {tree_size(site) / MIB:.0f} MiB installed")
        prune(site)
        strip_shared_objects(site)
        strip_shared_objects(vendor_dir)
        gate = gate_layer([site, vendor_dir], runtime)
        print_gate(gate, runtime, simulation_only=args.simulation_only)
        if gate.problems and not args.simulation_only:
            raise SystemExit(
                f"torch {args.torch_version} cannot load on {runtime.name}: no layer written "
                "(--simulation-only builds one for make lambda-sim anyway)"
            )
        compiled = import_and_compile([site, vendor_dir], shlex.split(args.python), runtime)
        print(f"torch ran a TorchScript model on {runtime.name}'s Python; {compiled} modules compiled")
        info = LayerInfo(runtime.name, format_version(gate.newest_glibc), bool(gate.problems))
        sizes = write_layer(site, vendor_dir, f"torch-{args.torch_version}-{runtime.abi}", args.output, info)
    print(f"wrote {args.output}")
    if not print_report(sizes, function_unzipped_size(args.function_zip)):
        raise SystemExit("the layer and the function do not fit Lambda's limits")


if __name__ == "__main__":
    main()
