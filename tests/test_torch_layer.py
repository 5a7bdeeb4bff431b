"""The layer loader: unpack once, atomically, safely when raced, and only when it fits.

Whatever is wrong with the layer or with /tmp is a ``TorchUnavailable`` (503)
that says which, raised by the import itself, and leaves nothing half
unpacked. Full and read-only disks are real filesystems in a private mount
namespace (tests/support/faulty_disk.py); racers and leftovers are real
processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from chalicelib.errors import TorchUnavailable
from chalicelib.torch_layer import COMPLETE_MARKER, HEADROOM_BYTES, UNPACKING_PREFIX, unpack
from tests.support.faulty_disk import ROOT, ReadOnly, Tmpfs, run_python

MIB = 2**20
SMALL_PACKAGE = {"fake_torch/__init__.py": b"VALUE = 42\n"}


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def fake_layer(
    root: Path,
    *,
    unpacked_bytes: int | None = None,
    files: dict[str, bytes] = SMALL_PACKAGE,
    archive: bytes | None = None,
    manifest: Any = None,
) -> Path:
    """A layer shaped like tools/build_layer.py's, carrying a tiny package instead of torch.

    ``archive`` replaces the packed ``files`` (to corrupt it), ``manifest``
    replaces the manifest's JSON value, and ``unpacked_bytes`` what it claims.
    """
    packed = tar_gz(files) if archive is None else archive
    layer = root / "opt" / "pytorch"
    layer.mkdir(parents=True)
    (layer / "fake.tar.gz").write_bytes(packed)
    if manifest is None:
        manifest = {
            "archive": "fake.tar.gz",
            "sha256": hashlib.sha256(packed).hexdigest(),
            "unpacked_bytes": unpacked_bytes if unpacked_bytes is not None else sum(map(len, files.values())),
        }
    (layer / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return layer


@pytest.fixture
def temp(tmp_path: Path) -> Path:
    """The sandbox's /tmp."""
    path = tmp_path / "tmp"
    path.mkdir()
    return path


def test_without_a_layer_nothing_happens(tmp_path: Path) -> None:
    assert unpack(tmp_path / "no-layer", tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_unpacks_once_and_reuses_the_result(tmp_path: Path, temp: Path) -> None:
    layer = fake_layer(tmp_path)

    first = unpack(layer, temp)
    marker_time = (first / COMPLETE_MARKER).stat().st_mtime_ns
    second = unpack(layer, temp)

    assert first == second
    assert (first / "fake_torch" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (second / COMPLETE_MARKER).stat().st_mtime_ns == marker_time
    assert [p.name for p in temp.iterdir()] == [first.name]


def test_refuses_to_unpack_without_enough_free_space(tmp_path: Path, temp: Path) -> None:
    layer = fake_layer(tmp_path, unpacked_bytes=10**16)

    with pytest.raises(TorchUnavailable, match="ephemeral storage"):
        unpack(layer, temp)
    assert list(temp.iterdir()) == []


VALID_SHA256 = "0" * 64
BAD_MANIFESTS = {
    "not JSON": ("{not json", "JSONDecodeError"),
    "not an object": (["fake.tar.gz"], "TypeError"),
    "no sha256": ({"archive": "fake.tar.gz", "unpacked_bytes": 11}, "KeyError: 'sha256'"),
    "sha256 not a digest": ({"archive": "fake.tar.gz", "sha256": 7, "unpacked_bytes": 11}, "'sha256': 7"),
    "size not a number": (
        {"archive": "fake.tar.gz", "sha256": VALID_SHA256, "unpacked_bytes": "11"},
        "'unpacked_bytes': '11'",
    ),
    "archive outside the layer": (
        {"archive": "../fake.tar.gz", "sha256": VALID_SHA256, "unpacked_bytes": 11},
        "'archive': '../fake.tar.gz'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_bad_manifest_is_torch_unavailable_naming_it(tmp_path: Path, temp: Path, case: str) -> None:
    manifest, detail = BAD_MANIFESTS[case]
    layer = fake_layer(tmp_path, manifest=manifest)

    with pytest.raises(TorchUnavailable) as raised:
        unpack(layer, temp)

    assert f"The PyTorch layer's {layer / 'manifest.json'} is not the manifest" in str(raised.value)
    assert detail in str(raised.value)
    assert "make layer" in str(raised.value)
    assert list(temp.iterdir()) == []


def test_a_corrupt_archive_is_torch_unavailable_and_leaves_nothing_half_unpacked(
    tmp_path: Path, temp: Path
) -> None:
    whole = tar_gz({"fake_torch/a.py": random.Random(0).randbytes(MIB), "fake_torch/b.py": b"B = 1\n"})
    layer = fake_layer(tmp_path, archive=whole[: len(whole) // 2])

    with pytest.raises(TorchUnavailable, match=r"archive .*fake\.tar\.gz is missing or corrupt"):
        unpack(layer, temp)
    assert list(temp.iterdir()) == []


def test_a_missing_archive_is_torch_unavailable(tmp_path: Path, temp: Path) -> None:
    layer = fake_layer(tmp_path)
    (layer / "fake.tar.gz").unlink()

    with pytest.raises(TorchUnavailable, match="is missing or corrupt"):
        unpack(layer, temp)
    assert list(temp.iterdir()) == []


# Run under faulty_disk.run_python: unpack the layer argv[1] into argv[2] and
# report the outcome and what is left there, while the mounts still exist.
UNPACK_AND_REPORT = """
import json, sys
from pathlib import Path
from chalicelib.errors import TorchUnavailable
from chalicelib.torch_layer import unpack

layer, temp = Path(sys.argv[1]), Path(sys.argv[2])
try:
    outcome = str(unpack(layer, temp))
except TorchUnavailable as error:
    outcome = str(error)
print(json.dumps({"outcome": outcome, "left": sorted(p.name for p in temp.iterdir())}))
"""


def test_a_disk_that_fills_while_unpacking_is_torch_unavailable_and_leaves_nothing(
    tmp_path: Path, temp: Path
) -> None:
    # The free-space check passes (the manifest understates the size, as when
    # something else fills /tmp meanwhile); the disk fills part way through.
    disk = HEADROOM_BYTES + 8 * MIB
    layer = fake_layer(tmp_path, files={"fake_torch/weights.bin": bytes(disk + MIB)}, unpacked_bytes=MIB)

    report = run_python(UNPACK_AND_REPORT, str(layer), str(temp), mounts=[Tmpfs(temp, disk)])

    assert report["outcome"].startswith(f"PyTorch cannot be unpacked into {temp}: no space is left")
    assert "(ENOSPC)" in report["outcome"]
    assert report["left"] == []


def test_a_read_only_tmp_is_torch_unavailable_that_says_read_only(tmp_path: Path, temp: Path) -> None:
    layer = fake_layer(tmp_path)

    report = run_python(UNPACK_AND_REPORT, str(layer), str(temp), mounts=[ReadOnly(temp)])

    assert report["outcome"].startswith(
        f"PyTorch cannot be unpacked into {temp}: its filesystem is read-only (EROFS)"
    )
    assert report["left"] == []


# Make a scratch folder named as the loader names its own, print its path,
# and wait for stdin to close.
SCRATCH_OWNER = """
import sys, tempfile
from pathlib import Path
from chalicelib.model_store import owned_prefix
from chalicelib.torch_layer import UNPACKING_PREFIX

path = Path(tempfile.mkdtemp(dir=sys.argv[1], prefix=owned_prefix(UNPACKING_PREFIX)))
(path / "half.py").write_bytes(bytes(1000))
print(path, flush=True)
sys.stdin.read()
"""


def scratch_owner(temp: Path) -> tuple[subprocess.Popen[str], Path]:
    """A live process and the half-unpacked folder it owns; closing its stdin ends it, leaving the folder."""
    process = subprocess.Popen(
        [sys.executable, "-c", SCRATCH_OWNER, str(temp)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_half_unpacked_folders_of_dead_processes_go_and_those_of_live_ones_stay(
    tmp_path: Path, temp: Path
) -> None:
    dead, dead_folder = scratch_owner(temp)
    dead.communicate(timeout=30)
    live, live_folder = scratch_owner(temp)
    try:
        unpack(fake_layer(tmp_path), temp)

        assert dead_folder.exists() is False
        assert live_folder.exists()
        assert live_folder.name.startswith(f"{UNPACKING_PREFIX}{live.pid}-")
    finally:
        live.communicate(timeout=30)


# One racer: wait for the start signal (argv[4] appears), note whether any
# racer had already published, then unpack.
RACER = """
import json, sys, time
from pathlib import Path
from chalicelib.torch_layer import unpack

layer, temp, ready, start = map(Path, sys.argv[1:5])
ready.touch()
while not start.exists():
    time.sleep(0.001)
late = any(temp.glob("pytorch-*"))
print(json.dumps({"folder": str(unpack(layer, temp)), "late": late}))
"""


def test_racing_processes_end_with_one_complete_copy(tmp_path: Path, temp: Path) -> None:
    # Large enough that unpacking takes far longer than the racers take to start together.
    files = {f"fake_torch/part{n}.bin": random.Random(n).randbytes(8 * MIB) for n in range(4)}
    layer, signals = fake_layer(tmp_path, files=files), tmp_path / "signals"
    signals.mkdir()
    command = [sys.executable, "-c", RACER, str(layer), str(temp)]
    racers = [
        subprocess.Popen(
            [*command, str(signals / f"ready-{n}"), str(signals / "go")],
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
    assert not any(report["late"] for report in reports), "the racers did not start together"
    assert len({report["folder"] for report in reports}) == 1
    folder = Path(reports[0]["folder"])
    assert [p.name for p in temp.iterdir()] == [folder.name]
    assert sorted(p.name for p in (folder / "fake_torch").iterdir()) == sorted(Path(n).name for n in files)


def import_loader(layer: Path, temp: Path, probe: str) -> subprocess.CompletedProcess[str]:
    """Run ``probe`` in a process with ``layer`` attached and ``temp`` as /tmp."""
    return subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={"PYTORCH_LAYER_DIR": str(layer), "TMPDIR": str(temp), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )


def test_importing_the_module_puts_the_unpacked_folder_on_sys_path(tmp_path: Path, temp: Path) -> None:
    result = import_loader(
        fake_layer(tmp_path), temp, "import chalicelib.torch_layer, fake_torch; print(fake_torch.VALUE)"
    )

    assert result.stdout.strip() == "42", result.stderr


def test_importing_the_module_with_a_broken_layer_raises_torch_unavailable(
    tmp_path: Path, temp: Path
) -> None:
    probe = (
        "from chalicelib.errors import TorchUnavailable\n"
        "try:\n    import chalicelib.torch_layer\n"
        "except TorchUnavailable as error:\n    print('503', error)\n"
    )

    result = import_loader(fake_layer(tmp_path, manifest="{not json"), temp, probe)

    assert result.stdout.startswith("503 The PyTorch layer's"), result.stderr
