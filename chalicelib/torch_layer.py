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
  the model cache. Half-unpacked folders that a killed process left behind
  (their names carry its id) are removed before that check; a live
  process's never are.
- Whatever goes wrong (a manifest that is not the one ``build_layer`` writes,
  a corrupt archive, a full or read-only /tmp) raises ``TorchUnavailable``, a
  503 that says which, from the import itself; nothing half-unpacked is left.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePath

from chalicelib.errors import TorchUnavailable
from chalicelib.model_store import describe_disk_fault, owned_prefix, remove_leftovers

LAYER_DIR = Path(os.environ.get("PYTORCH_LAYER_DIR", "/opt/pytorch"))
MANIFEST = "manifest.json"
COMPLETE_MARKER = ".complete"
UNPACKING_PREFIX = ".pytorch-unpacking-"
# Room left on /tmp after unpacking, for the model archive and its extraction.
HEADROOM_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LayerManifest:
    """What ``tools/build_layer.py`` writes beside the archive."""

    archive: str
    sha256: str
    unpacked_bytes: int

    @classmethod
    def read(cls, path: Path) -> LayerManifest:
        try:
            fields = json.loads(path.read_bytes())
            manifest = cls(
                archive=fields["archive"], sha256=fields["sha256"], unpacked_bytes=fields["unpacked_bytes"]
            )
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise _bad_manifest(path, f"{type(error).__name__}: {error}") from error
        if not (
            isinstance(manifest.archive, str)
            and PurePath(manifest.archive).name == manifest.archive
            and isinstance(manifest.sha256, str)
            and len(manifest.sha256) == 64
            and isinstance(manifest.unpacked_bytes, int)
            and manifest.unpacked_bytes >= 0
        ):
            raise _bad_manifest(path, f"got {fields!r}")
        return manifest


def unpack(layer_dir: Path, temp_dir: Path) -> Path | None:
    """Unpack the layer's torch archive once and return its folder, or None without a layer."""
    manifest_path = layer_dir / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = LayerManifest.read(manifest_path)
    target = temp_dir / f"pytorch-{manifest.sha256[:16]}"
    if not (target / COMPLETE_MARKER).is_file():
        remove_leftovers(temp_dir, UNPACKING_PREFIX)
        try:
            _check_free_space(temp_dir, manifest.unpacked_bytes)
            _unpack_archive(layer_dir / manifest.archive, temp_dir, target)
        except OSError as error:
            raise TorchUnavailable(
                f"PyTorch cannot be unpacked into {temp_dir}: {describe_disk_fault(error)}; give the "
                "function a writable /tmp with room for it (its ephemeral storage)."
            ) from error
    return target


def _unpack_archive(archive_path: Path, temp_dir: Path, target: Path) -> None:
    """Unpack into a scratch folder of this process, then publish it whole or not at all."""
    staging = Path(tempfile.mkdtemp(dir=temp_dir, prefix=owned_prefix(UNPACKING_PREFIX)))
    try:
        _extract(archive_path, staging)
        (staging / COMPLETE_MARKER).touch()
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive_path: Path, destination: Path) -> None:
    """Extract the whole archive; a missing or corrupt one is the layer's fault, a disk error the caller's.

    Stream mode reads the archive once, front to back: about twice as fast as
    random access, which decompresses again to seek. An ``OSError`` with an
    errno is the disk's unless the archive itself is missing; gzip's format
    error has none.
    """
    try:
        with tarfile.open(archive_path, mode="r|gz") as archive:
            archive.extractall(destination, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        if isinstance(error, OSError) and error.errno is not None and archive_path.is_file():
            raise
        raise TorchUnavailable(
            f"The PyTorch layer's archive {archive_path} is missing or corrupt "
            f"({type(error).__name__}: {error}); rebuild and republish the layer (make layer)."
        ) from error


def _bad_manifest(path: Path, problem: str) -> TorchUnavailable:
    return TorchUnavailable(
        f"The PyTorch layer's {path} is not the manifest tools/build_layer.py writes (archive, sha256, "
        f"unpacked_bytes): {problem[:200]}. Rebuild and republish the layer (make layer)."
    )


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
