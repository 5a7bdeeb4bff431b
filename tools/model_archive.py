"""Write a model archive in the layout the service reads fastest, reproducibly and atomically.

Shared by ``build_demo_model.py`` and ``publish_model.py``: the model files (a
TorchScript file, ``model.onnx``, or both), ``classes.txt`` and
``manifest.json``, with fixed mtimes, modes and no file name in the gzip header
(so no build details leak into it), written under a temporary name and renamed
so an interrupted run never leaves half an archive.

The order and the manifest are for the service's cold start
(``chalicelib.model_store``): ``manifest.json`` comes first and lists every
other member's SHA-256 and size, then ``classes.txt``, then ``model.onnx``,
then the TorchScript file, so an ONNX container verifies what it needs and
stops reading half way through an archive that carries both. The gzip stream
is stored, not compressed: model weights shrink by about 8% at best, and
inflating them costs a cold start more than downloading the difference.
"""

from __future__ import annotations

import gzip
import hashlib
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
    members = {"classes.txt": "".join(f"{name}\n" for name in classes).encode()}
    members |= dict(sorted(models.items(), key=lambda item: not item[0].endswith(".onnx")))
    files = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
    }
    manifest_text = (json.dumps({**manifest, "files": files}, indent=2) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False) as tmp,
        gzip.GzipFile(filename="", fileobj=tmp, mode="wb", mtime=0, compresslevel=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        _add_member(archive, "manifest.json", manifest_text)
        for name, data in members.items():
            _add_member(archive, name, data)
    Path(tmp.name).replace(path)
