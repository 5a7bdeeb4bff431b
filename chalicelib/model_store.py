"""Where the model archive is, and how it becomes verified files on local disk.

The archive (``model.tar.gz``) comes from S3 or from a local path. Either way
it ends up extracted under the cache directory (``/tmp`` on Lambda) in a
folder named after the archive's SHA-256, so a later process in the same
sandbox reuses the extraction and two different archives never mix.

A download goes to a scratch file of this process and is deleted once
extracted; the extraction is built in a scratch folder and published by one
atomic rename, so a download or extraction that dies half way is never
mistaken for a good one. The archive is checked in full before its
extraction is published: its length against S3's Content-Length, its gzip
CRC, and every member's name and type (no absolute paths, no ``..``, no
links); extraction itself also runs through tarfile's ``data`` filter.

Scratch names carry the process id, so the leftovers of a process killed mid
way (a Lambda timeout, an out-of-memory kill) are removed by the next one,
while a live process's are never touched.

Every failure is a ``ModelUnavailable`` (503) that says which: S3 refused or
broke off, the archive is corrupt, the cache directory's disk is full,
read-only or forbidden (naming MODEL_CACHE_DIR), or the load passed its
deadline (MODEL_LOAD_DEADLINE). The deadline is shared among botocore's
attempts and also bounds the body's reads and the extraction.

This module knows nothing of torch: it hands back paths and plain values.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError
from botocore.response import StreamingBody

from chalicelib.errors import ModelUnavailable

logger = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".pth")
ONNX_SUFFIX = ".onnx"
CLASSES_FILENAME = "classes.txt"
MANIFEST_FILENAME = "manifest.json"
CHUNK_SIZE = 1024 * 1024
# Small, so that a slow body cannot hold one read long past the deadline.
DOWNLOAD_CHUNK_SIZE = 64 * 1024
PARTIAL_PREFIX = ".partial-"
STAGING_PREFIX = ".staging-"

# botocore's timeouts bound one socket operation and it retries, so the time
# left is shared among the attempts; these cap each share when time is plenty.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 20.0
S3_ATTEMPTS = 3

# Left free after a fetch, for the model being served and the function's
# other temporary files.
ROOM_HEADROOM_BYTES = 16 * 1024 * 1024

# S3 error codes that mean "there is no such object" or "you may not read it".
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_FORBIDDEN_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}

# Disk faults in words; the first three are cured by more room, the rest by another directory.
_OUT_OF_ROOM = {errno.ENOSPC: "no space is left on its filesystem", errno.EDQUOT: "the disk quota is used up"}
_DISK_FAULTS = {
    **_OUT_OF_ROOM,
    errno.EFBIG: "a file outgrew what the filesystem allows",
    errno.EROFS: "its filesystem is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "the operation is not permitted",
    errno.EIO: "the disk reported an I/O error",
}


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


@dataclass(frozen=True)
class ArchiveVersion:
    """What ``fetch`` would get now: the archive's version and its size in bytes."""

    version: str
    size: int

    @property
    def room_to_fetch(self) -> int:
        """Disk a fetch of it needs at its peak: the archive and its extraction side by side.

        Model weights hardly compress, so the extraction is about as large as the archive.
        """
        return 2 * self.size


class S3Client(Protocol):
    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]: ...  # noqa: N803
    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]: ...  # noqa: N803


class S3ClientFactory(Protocol):
    """Builds a client with the given timeouts and retries; endpoint and credentials are its own."""

    def __call__(self, config: Config) -> S3Client: ...


class ModelStore:
    """Turns an archive location into ``ModelFiles`` under ``cache_dir``.

    The S3 client comes from a factory so that it is built only when an S3
    archive is actually fetched (importing the app or serving a local model
    must not touch AWS), and built per call, with timeouts that fit the time
    left before that call's deadline.
    """

    def __init__(self, cache_dir: Path, s3_client: S3ClientFactory) -> None:
        self._cache_dir = cache_dir
        self._s3_client = s3_client

    def fetch(self, location: ArchiveLocation, deadline: float) -> ModelFiles:
        """The archive's checked files; downloading and extracting stop at ``deadline`` (monotonic)."""
        budget = _Budget.until(deadline)
        with _cache_faults(self._cache_dir):
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            if isinstance(location, S3Archive):
                with self._downloaded(location, budget) as (archive, digest, version):
                    folder = self._extract(archive, digest, budget)
            else:
                archive, digest, version = self._local(location)
                folder = self._extract(archive, digest, budget)
            return _read_model_files(folder, source=str(location), version=version)

    def discard(self, files: ModelFiles) -> None:
        """Delete an extraction that is no longer served: /tmp holds one model beside torch, not two.

        Safe once the model is loaded, since TorchScript is read into memory.
        """
        if files.folder.parent == self._cache_dir / "models":
            shutil.rmtree(files.folder, ignore_errors=True)

    def current_version(self, location: ArchiveLocation, deadline: float) -> ArchiveVersion:
        """What ``fetch`` would get now, cheaply: S3's ETag and size from HeadObject, or a local hash."""
        if isinstance(location, LocalArchive):
            path, _, version = self._local(location)
            return ArchiveVersion(version=version, size=path.stat().st_size)
        budget = _Budget.until(deadline)
        with _s3_errors(location, budget, "S3 could not be asked for the model's version"):
            head = self._client(budget).head_object(Bucket=location.bucket, Key=location.key)
        return ArchiveVersion(version=_etag(head), size=int(head.get("ContentLength", 0)))

    def check_room(self, needed_bytes: int) -> None:
        """Refuse, before anything is written, a fetch that would fill the cache's filesystem.

        Leftovers of dead processes go first, as ``fetch`` would remove them anyway.
        """
        self._remove_leftovers()
        with _cache_faults(self._cache_dir):
            free = shutil.disk_usage(_nearest_existing(self._cache_dir)).free
        if free < needed_bytes + ROOM_HEADROOM_BYTES:
            raise ModelUnavailable(
                f"The model needs {_mib(needed_bytes)} MiB plus {_mib(ROOM_HEADROOM_BYTES)} MiB of headroom "
                f"in the cache directory {self._cache_dir} (MODEL_CACHE_DIR), but only {_mib(free)} MiB "
                "are free; raise the function's ephemeral storage."
            )

    def _remove_leftovers(self) -> None:
        remove_leftovers(self._cache_dir / "archives", PARTIAL_PREFIX)
        remove_leftovers(self._cache_dir / "models", STAGING_PREFIX)

    def _client(self, budget: _Budget) -> S3Client:
        """A client whose attempts, retries included, all end by the deadline.

        Each attempt gets an equal share of the time left, half to connect
        and half to wait for an answer, so a silent S3 costs the deadline at
        most, not botocore's attempts times its read timeout.
        """
        share = budget.check("waiting for S3") / S3_ATTEMPTS / 2
        return self._s3_client(
            Config(
                connect_timeout=min(S3_CONNECT_TIMEOUT, share),
                read_timeout=min(S3_READ_TIMEOUT, share),
                retries={"mode": "standard", "total_max_attempts": S3_ATTEMPTS},
            )
        )

    def _local(self, location: LocalArchive) -> tuple[Path, str, str]:
        if not location.path.is_file():
            raise ModelUnavailable(
                f"The model archive {location.path} does not exist. Set MODEL_BUCKET and "
                "MODEL_KEY, or MODEL_PATH, or build the demo model with `make model`."
            )
        try:
            digest = _sha256_of(location.path)
        except OSError as error:
            raise ModelUnavailable(
                f"The model archive {location.path} (MODEL_PATH) cannot be read: "
                f"{describe_disk_fault(error)}."
            ) from error
        return location.path, digest, _hash_version(digest)

    @contextmanager
    def _downloaded(self, location: S3Archive, budget: _Budget) -> Iterator[tuple[Path, str, str]]:
        """The archive in a scratch file of this process, with its digest and version, deleted afterwards.

        /tmp is small and shared with the PyTorch layer: keep only the
        extracted files, never a second copy of the archive. urllib3 raises if
        fewer bytes arrive than Content-Length promised, and the gzip CRC check
        during extraction catches bytes that arrived wrong.
        """
        failure = "The model archive could not be downloaded from S3"
        with _s3_errors(location, budget, failure):
            response = self._client(budget).get_object(Bucket=location.bucket, Key=location.key)
        digest = hashlib.sha256()
        with _scratch_file(self._cache_dir / "archives", ".tar.gz") as (path, sink):
            for chunk in _body_chunks(response["Body"], location, budget, failure):
                sink.write(chunk)
                digest.update(chunk)
            sink.flush()
            etag = _etag(response)
            logger.info("downloaded %s (%d bytes, ETag %s)", location, sink.tell(), etag)
            yield path, digest.hexdigest(), etag or _hash_version(digest.hexdigest())

    def _extract(self, archive: Path, digest: str, budget: _Budget) -> Path:
        """Extract once per distinct archive; a finished folder is never rewritten."""
        target = self._cache_dir / "models" / digest
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=owned_prefix(STAGING_PREFIX)))
            try:
                _safe_extract(archive, staging, budget)
                _publish_directory(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target


@dataclass(frozen=True)
class _Budget:
    """The model load's deadline (a ``time.monotonic()`` value) and the seconds it allowed, for messages."""

    deadline: float
    seconds: float

    @classmethod
    def until(cls, deadline: float) -> _Budget:
        return cls(deadline=deadline, seconds=max(deadline - time.monotonic(), 0.0))

    def check(self, doing: str) -> float:
        """The seconds left; the deadline error if there are none."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.exceeded(f"it was still {doing}")
        return left

    def exceeded(self, why: str) -> ModelUnavailable:
        return ModelUnavailable(
            f"The model load did not finish within {self.seconds:.3g} s (MODEL_LOAD_DEADLINE): {why}."
        )


def _body_chunks(body: StreamingBody, location: S3Archive, budget: _Budget, failure: str) -> Iterator[bytes]:
    """The object's bytes as they arrive, until the deadline.

    The deadline is checked between reads, so it is overrun by one read at
    most: a stalled stream by the client's read timeout (a share of the
    budget, see ``ModelStore._client``), a slow one by a small chunk's time.
    """
    while True:
        with _s3_errors(location, budget, failure):
            budget.check("downloading the archive")
            chunk = body.read(DOWNLOAD_CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


@contextmanager
def _s3_errors(location: S3Archive, budget: _Budget, failure: str) -> Iterator[None]:
    """S3's errors as 503s that say which; botocore's timeouts are the deadline's."""
    try:
        yield
    except ClientError as error:
        raise _s3_error(location, error) from error
    except (ConnectTimeoutError, ReadTimeoutError) as error:
        raise budget.exceeded(f"S3 did not answer in time ({type(error).__name__})") from error
    except BotoCoreError as error:
        logger.warning("%s: %s: %s", location, failure, error)
        raise ModelUnavailable(f"{failure} ({type(error).__name__}).") from error


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


def describe_disk_fault(error: OSError) -> str:
    """A disk error in words with its errno name, e.g. 'no space is left on its filesystem (ENOSPC)'."""
    number = error.errno or 0
    reason = _DISK_FAULTS.get(number, error.strerror or str(error))
    return f"{reason} ({errno.errorcode.get(number, type(error).__name__)})"


@contextmanager
def _cache_faults(cache_dir: Path) -> Iterator[None]:
    """An ``OSError`` of the cache's own I/O as a 503 naming MODEL_CACHE_DIR and the cure.

    S3's errors never get here as ``OSError`` (``_s3_errors`` turns them into
    503s first; some of botocore's timeouts are ``OSError`` subclasses), nor
    do a corrupt archive's (``_safe_extract`` reports those).
    """
    try:
        yield
    except OSError as error:
        logger.warning("model cache %s: %s", cache_dir, error)
        cure = (
            "raise the function's ephemeral storage, or free space there"
            if error.errno in _OUT_OF_ROOM
            else "point MODEL_CACHE_DIR at a directory the function can write (on Lambda, under /tmp)"
        )
        raise ModelUnavailable(
            f"The model cannot be stored in the cache directory {cache_dir} (MODEL_CACHE_DIR): "
            f"{describe_disk_fault(error)}; {cure}."
        ) from error


@contextmanager
def _scratch_file(directory: Path, suffix: str) -> Iterator[tuple[Path, IO[bytes]]]:
    """A file of this process's own under ``directory``, deleted on the way out whatever happens."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=directory, prefix=owned_prefix(PARTIAL_PREFIX), suffix=suffix
    ) as sink:
        yield Path(sink.name), sink


def owned_prefix(prefix: str) -> str:
    """``prefix`` plus this process's id: a scratch name's owner tells a leftover from work in progress."""
    return f"{prefix}{os.getpid()}-"


def remove_leftovers(directory: Path, prefix: str) -> None:
    """Delete the scratch files and folders under ``directory`` whose owning process is gone.

    A process killed mid-download or mid-extraction leaves them behind, and
    on /tmp they can take the room the next download needs. Those of a live
    process, this one included, are left alone, and so is any name that
    does not say its owner. Best effort: what cannot be deleted stays.
    """
    with contextlib.suppress(OSError):
        for entry in list(directory.iterdir()):
            owner = _owner_of(entry.name, prefix)
            if owner is not None and not _is_running(owner):
                logger.info("removing %s, left behind by process %d", entry, owner)
                _remove(entry)


def _owner_of(name: str, prefix: str) -> int | None:
    pid, dash, _ = name.removeprefix(prefix).partition("-")
    return int(pid) if name.startswith(prefix) and dash and pid.isdigit() else None


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, and another user's
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent: the filesystem it is, or will be, on."""
    return next(candidate for candidate in (path, *path.parents) if candidate.exists())


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f}"


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


def _safe_extract(archive_path: Path, destination: Path, budget: _Budget) -> None:
    """One streaming pass: check every member, extract the wanted ones, verify the gzip CRC.

    Reading through ``gzip`` to the very end makes it check the CRC and length
    trailer, which tarfile alone never reads; a corrupt body is refused even
    when its tar headers look fine. The caller publishes ``destination`` only
    if this returns. An ``OSError`` with an errno is the disk's fault, not the
    archive's (gzip's own format error has none), and is left to the caller.
    """
    extracted: list[tarfile.TarInfo] = []
    try:
        with gzip.open(archive_path) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                budget.check("extracting the archive")
                _check_member(member, destination)
                if member.isfile() and _is_wanted(member):
                    archive.extract(member, destination, filter="data")
                    extracted.append(member)
            while stream.read(CHUNK_SIZE):
                budget.check("extracting the archive")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise
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
