"""Where the model archive is, and how it becomes verified files on local disk.

The archive (``model.tar.gz``) comes from S3 or from a local path. Either way
it ends up extracted under the cache directory (``/tmp`` on Lambda) in a
folder named after the archive's SHA-256, so a later process in the same
sandbox reuses the extraction and two different archives never mix.

Every write is atomic (temporary name, then ``os.replace``), so a download or
extraction that dies half way is never mistaken for a good one. The archive is
checked in full before its extraction is published: its length against S3's
Content-Length, its gzip CRC, and every member's name and type (no absolute
paths, no ``..``, no links); extraction itself also runs through tarfile's
``data`` filter.

This module knows nothing of torch: it hands back paths and plain values.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import ModelUnavailable

logger = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".pth")
ONNX_SUFFIX = ".onnx"
CLASSES_FILENAME = "classes.txt"
MANIFEST_FILENAME = "manifest.json"
CHUNK_SIZE = 1024 * 1024

# S3 error codes that mean "there is no such object" or "you may not read it".
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_FORBIDDEN_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}


@dataclass(frozen=True)
class S3Archive:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class LocalArchive:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


ArchiveLocation = S3Archive | LocalArchive


@dataclass(frozen=True)
class ModelFiles:
    """An extracted, checked archive: what a backend needs to load.

    It holds a TorchScript file, an ONNX model, or both (see backends).
    """

    folder: Path
    torchscript_path: Path | None
    onnx_path: Path | None
    classes: tuple[str, ...]
    manifest: Mapping[str, Any]
    source: str
    version: str


class S3Client(Protocol):
    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]: ...  # noqa: N803
    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]: ...  # noqa: N803


class ModelStore:
    """Turns an archive location into ``ModelFiles`` under ``cache_dir``.

    The S3 client comes from a factory so that it is built only when an S3
    archive is actually fetched: importing the app or serving a local model
    must not touch AWS.
    """

    def __init__(self, cache_dir: Path, s3_client: Callable[[], S3Client]) -> None:
        self._cache_dir = cache_dir
        self._s3_client = s3_client

    def fetch(self, location: ArchiveLocation) -> ModelFiles:
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(location, S3Archive):
            archive, digest, version = self._download(location)
            try:
                folder = self._extract(archive, digest)
            finally:
                # /tmp is small and shared with the PyTorch layer: keep only
                # the extracted files, never a second copy of the archive.
                archive.unlink(missing_ok=True)
        else:
            archive, digest, version = self._local(location)
            folder = self._extract(archive, digest)
        return _read_model_files(folder, source=str(location), version=version)

    def discard(self, files: ModelFiles) -> None:
        """Delete an extraction that is no longer served: /tmp holds one model beside torch, not two.

        Safe once the model is loaded, since TorchScript is read into memory.
        """
        if files.folder.parent == self._cache_dir / "models":
            shutil.rmtree(files.folder, ignore_errors=True)

    def current_version(self, location: ArchiveLocation) -> str:
        """The version ``fetch`` would get now, cheaply: S3's ETag from HeadObject, or a local hash."""
        if isinstance(location, LocalArchive):
            return self._local(location)[2]
        try:
            head = self._s3_client().head_object(Bucket=location.bucket, Key=location.key)
        except ClientError as error:
            raise _s3_error(location, error) from error
        except BotoCoreError as error:
            raise ModelUnavailable(
                f"S3 could not be asked for the model's version ({type(error).__name__})."
            ) from error
        return _etag(head)

    def _local(self, location: LocalArchive) -> tuple[Path, str, str]:
        if not location.path.is_file():
            raise ModelUnavailable(
                f"The model archive {location.path} does not exist. Set MODEL_BUCKET and "
                "MODEL_KEY, or MODEL_PATH, or build the demo model with `make model`."
            )
        digest = _sha256_of(location.path)
        return location.path, digest, _hash_version(digest)

    def _download(self, location: S3Archive) -> tuple[Path, str, str]:
        digest = hashlib.sha256()
        try:
            response = self._s3_client().get_object(Bucket=location.bucket, Key=location.key)
            # urllib3 raises if fewer bytes arrive than Content-Length promised,
            # and the gzip CRC check before extraction catches bytes that arrived wrong.
            with _atomic_file(self._cache_dir / "archives", ".tar.gz") as sink:
                written = 0
                for chunk in response["Body"].iter_chunks(CHUNK_SIZE):
                    sink.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                path = sink.commit(self._cache_dir / "archives" / f"{digest.hexdigest()}.tar.gz")
        except ClientError as error:
            raise _s3_error(location, error) from error
        except BotoCoreError as error:
            logger.warning("could not download %s: %s", location, error)
            raise ModelUnavailable(
                f"The model archive could not be downloaded from S3 ({type(error).__name__})."
            ) from error
        etag = _etag(response)
        logger.info("downloaded %s (%d bytes, ETag %s)", location, written, etag)
        return path, digest.hexdigest(), etag or _hash_version(digest.hexdigest())

    def _extract(self, archive: Path, digest: str) -> Path:
        """Extract once per distinct archive; a finished folder is never rewritten."""
        target = self._cache_dir / "models" / digest
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
            try:
                _safe_extract(archive, staging)
                _publish_directory(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target


class _PendingFile:
    """A temporary file that only gets its real name on ``commit``."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.committed = False

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def commit(self, path: Path) -> Path:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        Path(self._handle.name).replace(path)
        self.committed = True
        return path


@contextmanager
def _atomic_file(directory: Path, suffix: str) -> Iterator[_PendingFile]:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=directory, prefix=".partial-", suffix=suffix, delete=False
    ) as handle:
        pending = _PendingFile(handle)
        try:
            yield pending
        finally:
            if not pending.committed:
                Path(handle.name).unlink(missing_ok=True)


def _s3_error(location: S3Archive, error: ClientError) -> ModelUnavailable:
    code = str(error.response.get("Error", {}).get("Code", ""))
    logger.warning("could not read %s: %s", location, error)
    if code in _MISSING_CODES:
        return ModelUnavailable(
            f"The model archive was not found in S3: MODEL_BUCKET/MODEL_KEY name no object ({code})."
        )
    if code in _FORBIDDEN_CODES:
        return ModelUnavailable(
            f"No permission to read the model archive from S3 ({code}): the function's role "
            "needs s3:GetObject on MODEL_BUCKET/MODEL_KEY."
        )
    return ModelUnavailable(f"S3 refused the model archive download ({code or 'unknown error'}).")


def _etag(response: Mapping[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"')


def _hash_version(digest: str) -> str:
    """The version of an archive S3 gave no ETag for, or of a local one."""
    return f"sha256:{digest[:16]}"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for chunk in iter(lambda: source.read(CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_member(member: tarfile.TarInfo, destination: Path) -> None:
    """Refuse the whole archive if a member could escape or is not a plain file."""
    if not (member.isfile() or member.isdir()):
        raise ModelUnavailable(
            f"The model archive is refused: member {member.name!r} is a link or special "
            "file; only regular files and folders are allowed."
        )
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise ModelUnavailable(
            f"The model archive is refused: member {member.name!r} has an absolute path or "
            "'..'; members must be relative paths inside the archive."
        )
    try:
        tarfile.data_filter(member, str(destination))
    except tarfile.FilterError as error:
        raise ModelUnavailable(
            f"The model archive is refused: member {member.name!r} would be written "
            f"outside the model folder ({type(error).__name__})."
        ) from error


def _safe_extract(archive_path: Path, destination: Path) -> None:
    """One streaming pass: check every member, extract the wanted ones, verify the gzip CRC.

    Reading through ``gzip`` to the very end makes it check the CRC and length
    trailer, which tarfile alone never reads; a corrupt body is refused even
    when its tar headers look fine. The caller publishes ``destination`` only
    if this returns.
    """
    extracted: list[tarfile.TarInfo] = []
    try:
        with gzip.open(archive_path) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                _check_member(member, destination)
                if member.isfile() and _is_wanted(member):
                    archive.extract(member, destination, filter="data")
                    extracted.append(member)
            while stream.read(CHUNK_SIZE):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise ModelUnavailable(f"The model archive is corrupt: {error}.") from error
    _check_contents(extracted)


def _is_wanted(member: tarfile.TarInfo) -> bool:
    name = PurePosixPath(member.name).name
    return not name.startswith("._") and (
        name.endswith((*TORCHSCRIPT_SUFFIXES, ONNX_SUFFIX)) or name in (CLASSES_FILENAME, MANIFEST_FILENAME)
    )


def _check_contents(extracted: list[tarfile.TarInfo]) -> None:
    """A TorchScript file, an ONNX model or both, exactly one classes.txt, at most one manifest.json."""
    torchscript = [m for m in extracted if m.name.endswith(TORCHSCRIPT_SUFFIXES)]
    onnx = [m for m in extracted if m.name.endswith(ONNX_SUFFIX)]
    if len(torchscript) > 1 or len(onnx) > 1 or not (torchscript or onnx):
        found = ", ".join(m.name for m in torchscript + onnx) or "none"
        raise ModelUnavailable(
            "The model archive must hold one TorchScript file (*.pt or *.pth), one ONNX model "
            f"(model.onnx), or one of each; found {found}."
        )
    _named(extracted, CLASSES_FILENAME, required=True)
    _named(extracted, MANIFEST_FILENAME, required=False)


def _named(files: list[tarfile.TarInfo], filename: str, *, required: bool) -> None:
    matches = [m for m in files if PurePosixPath(m.name).name == filename]
    if len(matches) > 1 or (required and not matches):
        found = ", ".join(m.name for m in matches) or "none"
        raise ModelUnavailable(
            f"The model archive must hold {'exactly' if required else 'at most'} one "
            f"{filename}; found {found}."
        )


def _publish_directory(staging: Path, target: Path) -> None:
    try:
        staging.replace(target)
    except OSError:
        # Another process published the same archive first; its copy is as good.
        if not target.is_dir():
            raise


def _read_model_files(folder: Path, *, source: str, version: str) -> ModelFiles:
    files = [p for p in folder.rglob("*") if p.is_file()]
    classes_path = next(p for p in files if p.name == CLASSES_FILENAME)
    manifest_path = next((p for p in files if p.name == MANIFEST_FILENAME), None)
    return ModelFiles(
        folder=folder,
        torchscript_path=next((p for p in files if p.suffix in TORCHSCRIPT_SUFFIXES), None),
        onnx_path=next((p for p in files if p.suffix == ONNX_SUFFIX), None),
        classes=parse_classes(classes_path.read_bytes()),
        manifest=_parse_manifest(manifest_path.read_bytes()) if manifest_path else {},
        source=source,
        version=version,
    )


def parse_classes(raw: bytes) -> tuple[str, ...]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ModelUnavailable(f"classes.txt is not UTF-8 text ({error}).") from error
    names = [line.strip() for line in text.rstrip().splitlines()]
    if not names or not names[0]:
        raise ModelUnavailable("classes.txt is empty: it must list one class name per line.")
    for number, name in enumerate(names, start=1):
        if not name:
            raise ModelUnavailable(
                f"classes.txt line {number} is empty: every line must name a class, in the "
                "order of the model's outputs."
            )
    return tuple(names)


def _parse_manifest(raw: bytes) -> Mapping[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        raise ModelUnavailable(f"manifest.json is not valid JSON ({error}).") from error
    if not isinstance(manifest, dict):
        raise ModelUnavailable(f"manifest.json must hold a JSON object, got {type(manifest).__name__}.")
    return manifest
