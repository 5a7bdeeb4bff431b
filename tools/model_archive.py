"""Write a model archive in the layout the service reads, reproducibly and atomically.

Shared by ``build_demo_model.py`` and ``publish_model.py``: the model files (a
TorchScript file, ``model.onnx``, or both), ``classes.txt`` and
``manifest.json``, with fixed mtimes, modes and no file name in the gzip header
(so no build details leak into it), written under a temporary name and renamed
so an interrupted run never leaves half an archive.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    archive.addfile(info, io.BytesIO(data))


def write_archive(
    path: Path, models: Mapping[str, bytes], classes: Sequence[str], manifest: Mapping[str, Any]
) -> None:
    """``models`` maps each model file's name in the archive to its bytes."""
    classes_text = "".join(f"{name}\n" for name in classes).encode()
    manifest_text = (json.dumps(manifest, indent=2) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False) as tmp,
        gzip.GzipFile(filename="", fileobj=tmp, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for filename, model_bytes in models.items():
            _add_member(archive, filename, model_bytes)
        _add_member(archive, "classes.txt", classes_text)
        _add_member(archive, "manifest.json", manifest_text)
    Path(tmp.name).replace(path)
