"""The layer loader: libraries from memory, dependencies first, per process, and a clear 503 for every fault.

The layers are written by ``tools/build_layer.py`` itself, around a miniature
of torch built with gcc (tests/support/shared_libraries.py): its package
imports only if the dynamic linker finds the in-memory libraries by their
sonames. Every load runs in a process of its own, as on Lambda; faults are
real (a truncated or damaged archive, a library needing a newer glibc,
resource limits that make ``memfd_create`` or its writes fail, a read-only
/tmp).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard

from chalicelib.errors import TorchUnavailable
from chalicelib.torch_layer import MANIFEST, PyTorchLayer, load
from tests.support.faulty_disk import ROOT, Mount, ReadOnly, run_python
from tests.support.shared_libraries import FAKE_TORCH, IN_MEMORY, FakeTorch, build_fake_torch
from tools.build_layer import LayerInfo, write_layer

MEMORY_ARCHIVE = "fake-in-memory.tar.zst"
LAMBDA_MEMORY = {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "1769"}  # the prod stage's


@pytest.fixture(scope="module")
def fake_torch(tmp_path_factory: pytest.TempPathFactory) -> FakeTorch:
    return build_fake_torch(tmp_path_factory.mktemp("fake-torch"))


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What build_layer vendors of zstandard (the C backend), from this venv's own copy."""
    folder = tmp_path_factory.mktemp("vendor")
    installed = Path(zstandard.__file__).parent
    (folder / "zstandard").mkdir()
    for part in ("__init__.py", *(p.name for p in installed.glob("backend_c.*"))):
        shutil.copy(installed / part, folder / "zstandard" / part)
    return folder


@pytest.fixture(scope="module")
def layer_zip(tmp_path_factory: pytest.TempPathFactory, fake_torch: FakeTorch, vendor: Path) -> Path:
    return write_fake_layer(tmp_path_factory.mktemp("layer") / "layer.zip", fake_torch.site, vendor)


def write_fake_layer(output: Path, site: Path, vendor: Path) -> Path:
    write_layer(
        site, vendor, "fake", output, LayerInfo("python3.11", "2.2", False), in_memory=IN_MEMORY, level=3
    )
    return output


def attach(layer_zip: Path, root: Path) -> Path:
    """The layer unzipped as Lambda mounts it; returns its /opt/pytorch."""
    with zipfile.ZipFile(layer_zip) as bundle:
        bundle.extractall(root / "opt")
    return root / "opt" / "pytorch"


@pytest.fixture
def layer(layer_zip: Path, tmp_path: Path) -> Path:
    return attach(layer_zip, tmp_path)


@pytest.fixture
def temp(tmp_path: Path) -> Path:
    """The sandbox's /tmp."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


# Run by faulty_disk.run_python: import the loader for the layer argv[1] with
# the environment in argv[2] (JSON) after the setup in argv[3] (Python), then
# import the fake package; report the outcome and the in-memory files left open.
IMPORT_AND_REPORT = """
import json, os, sys
os.environ.update(json.loads(sys.argv[2]))
os.environ["PYTORCH_LAYER_DIR"] = sys.argv[1]
exec(sys.argv[3])
from chalicelib.errors import TorchUnavailable
try:
    import chalicelib.torch_layer
    import fake_torch
    outcome = fake_torch.VALUE
except TorchUnavailable as error:
    outcome = str(error)
open_files = []
for fd in os.listdir("/proc/self/fd"):
    try:
        open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
    except FileNotFoundError:  # the listing's own descriptor
        pass
memory_files = sorted(name for name in open_files if name.startswith("/memfd:"))
with open("/proc/self/maps") as maps:
    mapped = sorted({line.split(maxsplit=5)[5].strip() for line in maps if "/memfd:" in line})
print(json.dumps({"outcome": outcome, "memory_files": memory_files, "mapped": mapped}))
"""


def import_in_a_process(
    layer: Path, *, environment: dict[str, str] = LAMBDA_MEMORY, setup: str = "", mounts: Sequence[Mount] = ()
) -> dict[str, Any]:
    report: dict[str, Any] = run_python(
        IMPORT_AND_REPORT, str(layer), json.dumps(environment), setup, mounts=mounts
    )
    return report


def test_without_a_layer_nothing_happens(tmp_path: Path) -> None:
    assert load(tmp_path / "no-layer") is None


def test_the_libraries_load_from_memory_and_the_package_from_the_layer_with_tmp_read_only(
    layer: Path, temp: Path
) -> None:
    report = import_in_a_process(
        layer,
        environment={**LAMBDA_MEMORY, "TMPDIR": str(temp)},
        mounts=[ReadOnly(temp)],
    )

    assert report["outcome"] == 42
    assert not (layer / "site" / FAKE_TORCH / "lib" / "libfake_cpu.so").exists()
    assert report["memory_files"] == ["/memfd:libfake_cpu.so (deleted)", "/memfd:libfake_python.so (deleted)"]
    assert report["mapped"] == report["memory_files"]
    assert list(temp.iterdir()) == []


def test_the_manifest_lists_the_libraries_dependencies_first(layer: Path, fake_torch: FakeTorch) -> None:
    manifest = json.loads((layer / MANIFEST).read_text())

    lib = f"{FAKE_TORCH}/lib"
    assert manifest["libraries"] == [
        f"{lib}/libfake_c10.so",
        f"{lib}/libfake_cpu.so",
        f"{lib}/libfake_shm.so",
        f"{lib}/libfake_python.so",
    ]
    assert manifest["memory_bytes"] == sum((fake_torch.site / name).stat().st_size for name in IN_MEMORY)


BAD_MANIFESTS = {
    "not JSON": ("{not json", "JSONDecodeError"),
    "not an object": (["fake.tar.zst"], "TypeError"),
    "no library list": ({"memory_archive": MEMORY_ARCHIVE, "memory_bytes": 1}, "KeyError: 'libraries'"),
    "size not a number": (
        {"memory_archive": MEMORY_ARCHIVE, "memory_bytes": "1", "libraries": []},
        "'memory_bytes': '1'",
    ),
    "archive outside the layer": (
        {"memory_archive": "../fake.tar.zst", "memory_bytes": 1, "libraries": []},
        "'memory_archive': '../fake.tar.zst'",
    ),
    "libraries not a list": (
        {"memory_archive": MEMORY_ARCHIVE, "memory_bytes": 1, "libraries": "lib/a.so"},
        "'libraries': 'lib/a.so'",
    ),
    "library outside the layer": (
        {"memory_archive": MEMORY_ARCHIVE, "memory_bytes": 1, "libraries": ["../../lib/libc.so.6"]},
        "'../../lib/libc.so.6'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_bad_manifest_is_torch_unavailable_naming_it(layer: Path, case: str) -> None:
    manifest, detail = BAD_MANIFESTS[case]
    (layer / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))

    with pytest.raises(TorchUnavailable) as raised:
        PyTorchLayer.find(layer)

    assert f"The PyTorch layer's {layer / MANIFEST} is not the manifest" in str(raised.value)
    assert detail in str(raised.value)
    assert "make layer" in str(raised.value)


def cut_in_half(packed: bytes) -> bytes:
    return packed[: len(packed) // 2]


def without_its_checksum(packed: bytes) -> bytes:
    """Every byte of the tarball is there; only the frame's last four bytes, its checksum, are not."""
    return packed[:-4]


def with_a_byte_flipped(packed: bytes) -> bytes:
    damaged = bytearray(packed)
    damaged[len(packed) // 2] ^= 0x40
    return bytes(damaged)


@pytest.mark.parametrize("damage", [cut_in_half, without_its_checksum, with_a_byte_flipped])
def test_a_corrupt_archive_is_torch_unavailable_and_leaves_no_memory_file(layer: Path, damage: Any) -> None:
    archive = layer / MEMORY_ARCHIVE
    archive.write_bytes(damage(archive.read_bytes()))

    report = import_in_a_process(layer)

    assert report["outcome"].startswith(f"The PyTorch layer's archive {archive} is missing or corrupt")
    assert "make layer" in report["outcome"]
    assert report["memory_files"] == []


def test_a_missing_archive_is_torch_unavailable(layer: Path) -> None:
    (layer / MEMORY_ARCHIVE).unlink()

    report = import_in_a_process(layer)

    assert report["outcome"].startswith(f"The PyTorch layer's archive {layer / MEMORY_ARCHIVE} is missing")
    assert "FileNotFoundError" in report["outcome"]


def test_a_layer_without_its_zstandard_is_torch_unavailable(layer: Path) -> None:
    shutil.rmtree(layer / "vendor")

    report = import_in_a_process(layer)

    assert report["outcome"].startswith(f"The PyTorch layer has no zstandard in {layer / 'vendor'}; rebuild")


def test_too_little_memory_is_torch_unavailable_before_anything_is_decompressed(layer: Path) -> None:
    report = import_in_a_process(layer, environment={"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256"})

    assert report["outcome"].startswith("PyTorch needs 0 MiB of memory for its libraries plus 384 MiB")
    assert "the function has 256 MB" in report["outcome"]
    assert report["outcome"].endswith("raise its memory size.")
    assert report["memory_files"] == []


# No descriptor left to create an in-memory file with, once the loader opened the archive.
NO_DESCRIPTOR_LEFT = """
import resource, zstandard
import chalicelib.model_store
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
spare = []
while True:
    try:
        spare.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
os.close(spare.pop())  # one at a time, for the manifest, then /proc/self/statm, then the archive
"""


def test_an_in_memory_file_that_cannot_be_made_is_torch_unavailable(layer: Path) -> None:
    report = import_in_a_process(layer, setup=NO_DESCRIPTOR_LEFT)

    assert report["outcome"].startswith(
        "The PyTorch layer's libfake_cpu.so cannot be put in an in-memory file: "
    )
    assert "(EMFILE)" in report["outcome"]
    assert "memfd_create" in report["outcome"]


# Files, in-memory ones too, may not grow past 4 KiB (EFBIG rather than SIGXFSZ).
FILES_CAPPED = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
"""


def test_an_in_memory_file_that_cannot_be_filled_is_torch_unavailable_and_closed(layer: Path) -> None:
    report = import_in_a_process(layer, setup=FILES_CAPPED)

    assert report["outcome"].startswith(
        "The PyTorch layer's libfake_cpu.so cannot be put in an in-memory file: "
        "a file outgrew what the filesystem allows (EFBIG)"
    )
    assert report["memory_files"] == []


def test_a_library_for_a_newer_glibc_is_torch_unavailable_naming_it(
    fake_torch: FakeTorch, vendor: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    shutil.copytree(fake_torch.site, site)
    shutil.copy(fake_torch.future_glibc_cpu, site / FAKE_TORCH / "lib" / "libfake_cpu.so")
    layer = attach(write_fake_layer(tmp_path / "layer.zip", site, vendor), tmp_path)

    report = import_in_a_process(layer)

    assert report["outcome"].startswith(
        f"The PyTorch layer's {FAKE_TORCH}/lib/libfake_cpu.so cannot be loaded ("
    )
    assert "version `GLIBC_2.99' not found" in report["outcome"]
    assert "attach the layer built for this function's runtime" in report["outcome"]
    assert report["memory_files"] == []


# One racer: wait for the start signal (argv[3] appears), note whether any
# racer had already finished, then load the layer and import the package.
RACER = """
import json, os, sys, time
from pathlib import Path
os.environ["PYTORCH_LAYER_DIR"] = sys.argv[1]
ready, start = Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not start.exists():
    time.sleep(0.001)
late = any(start.parent.glob("done-*"))
import chalicelib.torch_layer, fake_torch
from chalicelib.torch_layer import IN_MEMORY_FILES
(start.parent / f"done-{os.getpid()}").touch()
inodes = [os.fstat(descriptor).st_ino for descriptor in IN_MEMORY_FILES]
print(json.dumps({"value": fake_torch.VALUE, "late": late, "inodes": inodes}))
"""


def test_racing_processes_each_load_their_own_copy(layer: Path, tmp_path: Path) -> None:
    signals = tmp_path / "signals"
    signals.mkdir()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(layer), str(signals / f"ready-{n}"), str(signals / "go")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    deadline = time.monotonic() + 60
    while len(list(signals.glob("ready-*"))) < len(racers) and time.monotonic() < deadline:
        time.sleep(0.01)
    (signals / "go").touch()
    results = [racer.communicate(timeout=60) for racer in racers]

    assert all(racer.returncode == 0 for racer in racers), [err for _, err in results]
    reports = [json.loads(out) for out, _ in results]
    assert [report["value"] for report in reports] == [42] * 4
    assert not any(report["late"] for report in reports), "the racers did not start together"
    inodes = [inode for report in reports for inode in report["inodes"]]
    assert len(inodes) == len(set(inodes)) == 2 * len(racers)


def test_importing_the_module_with_a_broken_layer_raises_torch_unavailable(layer: Path) -> None:
    (layer / MANIFEST).write_text("{not json")

    report = import_in_a_process(layer)

    assert report["outcome"].startswith("The PyTorch layer's")
