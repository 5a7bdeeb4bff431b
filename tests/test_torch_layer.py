"""The layer loader: unpack once, atomically, safely when raced, and only when it fits."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from chalicelib.errors import TorchUnavailable
from chalicelib.torch_layer import COMPLETE_MARKER, unpack


def fake_layer(root: Path, *, unpacked_bytes: int | None = None) -> Path:
    """A layer shaped like tools/build_layer.py's, carrying a tiny package instead of torch."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        source = b"VALUE = 42\n"
        info = tarfile.TarInfo("fake_torch/__init__.py")
        info.size = len(source)
        archive.addfile(info, io.BytesIO(source))
    layer = root / "opt" / "pytorch"
    layer.mkdir(parents=True)
    (layer / "fake.tar.gz").write_bytes(buffer.getvalue())
    manifest = {
        "archive": "fake.tar.gz",
        "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        "unpacked_bytes": unpacked_bytes if unpacked_bytes is not None else 11,
    }
    (layer / "manifest.json").write_text(json.dumps(manifest))
    return layer


def test_without_a_layer_nothing_happens(tmp_path: Path) -> None:
    assert unpack(tmp_path / "no-layer", tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_unpacks_once_and_reuses_the_result(tmp_path: Path) -> None:
    layer, temp = fake_layer(tmp_path), tmp_path / "tmp"
    temp.mkdir()

    first = unpack(layer, temp)
    marker_time = (first / COMPLETE_MARKER).stat().st_mtime_ns
    second = unpack(layer, temp)

    assert first == second
    assert (first / "fake_torch" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (second / COMPLETE_MARKER).stat().st_mtime_ns == marker_time
    assert [p.name for p in temp.iterdir()] == [first.name]


def test_refuses_to_unpack_without_enough_free_space(tmp_path: Path) -> None:
    layer, temp = fake_layer(tmp_path, unpacked_bytes=10**16), tmp_path / "tmp"
    temp.mkdir()

    with pytest.raises(TorchUnavailable, match="ephemeral storage"):
        unpack(layer, temp)
    assert list(temp.iterdir()) == []


def test_racing_processes_end_with_one_complete_copy(tmp_path: Path) -> None:
    layer, temp = fake_layer(tmp_path), tmp_path / "tmp"
    temp.mkdir()
    script = (
        "import sys; from pathlib import Path; from chalicelib.torch_layer import unpack; "
        "print(unpack(Path(sys.argv[1]), Path(sys.argv[2])))"
    )
    root = Path(__file__).resolve().parent.parent
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(layer), str(temp)], cwd=root, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outputs = {racer.communicate(timeout=60)[0].strip() for racer in racers}

    assert all(racer.returncode == 0 for racer in racers)
    assert len(outputs) == 1
    assert [p.name for p in temp.iterdir()] == [Path(outputs.pop()).name]


def test_importing_the_module_puts_the_unpacked_folder_on_sys_path(tmp_path: Path) -> None:
    layer, temp = fake_layer(tmp_path), tmp_path / "tmp"
    temp.mkdir()
    root = Path(__file__).resolve().parent.parent
    probe = "import chalicelib.torch_layer, fake_torch; print(fake_torch.VALUE)"

    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=root,
        env={"PYTORCH_LAYER_DIR": str(layer), "TMPDIR": str(temp), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.stdout.strip() == "42", result.stderr
