"""Make PyTorch importable on Lambda by unpacking the layer's archive into /tmp.

CPU PyTorch is about 420 MB even pruned and stripped, while Lambda allows
250 MB unzipped for a function and its layers. So the PyTorch layer built by
``tools/build_layer.py`` carries torch as one compressed archive plus a
``manifest.json``, and on the first import in a sandbox this module unpacks it
into /tmp and puts it on ``sys.path`` (the fast.ai tutorial's approach, for
today's torch).

- Importing this module does the work; ``service`` imports it just before the
  first ``import torch``, never at app import.
- Without the layer (local development, tests) it does nothing: torch is
  simply installed there.
- The unpacked folder is named after the archive's SHA-256 and published by an
  atomic rename, so a half-unpacked tree is never used, a second import in
  the same sandbox reuses it, and two processes racing both end up with one
  complete copy.
- Free space is checked first: /tmp is 512 MB by default and is shared with
  the model cache.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from chalicelib.errors import TorchUnavailable

LAYER_DIR = Path(os.environ.get("PYTORCH_LAYER_DIR", "/opt/pytorch"))
MANIFEST = "manifest.json"
COMPLETE_MARKER = ".complete"
# Room left on /tmp after unpacking, for the model archive and its extraction.
HEADROOM_BYTES = 64 * 1024 * 1024


def unpack(layer_dir: Path, temp_dir: Path) -> Path | None:
    """Unpack the layer's torch archive once and return its folder, or None without a layer."""
    manifest_path = layer_dir / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    target = temp_dir / f"pytorch-{manifest['sha256'][:16]}"
    if not (target / COMPLETE_MARKER).is_file():
        _check_free_space(temp_dir, int(manifest["unpacked_bytes"]))
        staging = Path(tempfile.mkdtemp(dir=temp_dir, prefix=".pytorch-unpacking-"))
        try:
            # Stream mode reads the archive once, front to back: about twice as
            # fast as random access, which decompresses again to seek.
            with tarfile.open(layer_dir / manifest["archive"], mode="r|gz") as archive:
                archive.extractall(staging, filter="data")
            (staging / COMPLETE_MARKER).touch()
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_free_space(temp_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(temp_dir).free
    if free < needed + HEADROOM_BYTES:
        raise TorchUnavailable(
            f"PyTorch needs {needed / 2**20:.0f} MiB plus {HEADROOM_BYTES / 2**20:.0f} MiB of headroom "
            f"in {temp_dir}, but only {free / 2**20:.0f} MiB are free; raise the function's "
            "ephemeral storage."
        )


def _publish(staging: Path, target: Path) -> None:
    try:
        staging.replace(target)
    except OSError:
        # Another process won the race; use its copy if it finished.
        if not (target / COMPLETE_MARKER).is_file():
            raise


def _activate() -> None:
    folder = unpack(LAYER_DIR, Path(tempfile.gettempdir()))
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


_activate()
