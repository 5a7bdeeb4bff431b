"""Where the model archive is, and how the files a backend needs become verified files on local disk.

The archive (``model.tar.gz``) comes from S3 (through ``chalicelib.s3``, not
boto3) or from a local path, and is extracted as it streams in, under the
cache directory (``/tmp`` on Lambda), into a folder named after the archive's
identity (S3's ETag, or a local file's SHA-256) and the model formats asked
for: a later process in the same sandbox reuses the extraction without
downloading anything, and two different archives never mix.

Only what the chosen backend needs is extracted: ``classes.txt``,
``manifest.json`` and one model file. An archive written by
``tools/model_archive.py`` puts its manifest first, with the SHA-256 of every
other member, and its ONNX model before its TorchScript file; each member is
checked against its hash as it is written, and the download stops as soon as
the wanted members are in, so an ONNX container downloads about half of an
archive that carries both formats. An archive without those hashes (the
fast.ai tutorial's) is read to its end instead, where the gzip CRC checks it.

The extraction is built in a scratch folder and published by one atomic
rename, so one that dies half way is never mistaken for a good one. Every
member's name and type is checked (no absolute paths, no ``..``, no links).
Scratch names carry the process id, so the leftovers of a process killed mid
way (a Lambda timeout, an out-of-memory kill) are removed by the next one,
while a live process's are never touched.

Every failure is a ``ModelUnavailable`` (503) that says which: S3 refused or
broke off, the archive is corrupt, the cache directory's disk is full,
read-only or forbidden (naming MODEL_CACHE_DIR), or the load passed its
deadline (MODEL_LOAD_DEADLINE). The deadline is shared among the S3
attempts and also bounds every read of the body and the extraction.

This module knows nothing of torch or ONNX Runtime: it hands back paths and plain values.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from chalicelib.errors import ModelUnavailable
from chalicelib.locations import ArchiveLocation, LocalArchive, S3Archive

if TYPE_CHECKING:
    import urllib3

    from chalicelib.s3 import S3Client

logger = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".pth")
ONNX_SUFFIX = ".onnx"
# Model formats by name, as the backends ask for them, and the file suffixes of each.
MODEL_FORMATS: Mapping[str, tuple[str, ...]] = {"onnx": (ONNX_SUFFIX,), "torchscript": TORCHSCRIPT_SUFFIXES}
CLASSES_FILENAME = "classes.txt"
MANIFEST_FILENAME = "manifest.json"
# Below the 1 MiB from which budgets.py has glibc map (and fault in) each allocation afresh.
CHUNK_SIZE = 256 * 1024
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads (and checks) the gzip header and trailer
STAGING_PREFIX = ".staging-"

# A socket timeout bounds one read and S3 calls are retried, so the time left
# is shared among the attempts; these cap each share when time is plenty.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 20.0
S3_ATTEMPTS = 3
# Statuses worth another attempt: S3's throttling and its own failures.
S3_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

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
        """Disk a fetch of it needs at its peak: its extraction, with room for one that compresses well.

        Model weights hardly compress, so an extraction is about as large as its archive.
        """
        return 2 * self.size


class ModelStore:
    """Turns an archive location into ``ModelFiles`` under ``cache_dir``.

    The S3 reader is built only when an S3 archive is actually fetched:
    importing the app or serving a local model must not touch AWS.
    """

    def __init__(self, cache_dir: Path, s3: Callable[[], S3Client] | None = None) -> None:
        self._cache_dir = cache_dir
        self._s3 = s3 or _reader_from_environment

    def fetch(
        self, location: ArchiveLocation, deadline: float, formats: Sequence[str] = tuple(MODEL_FORMATS)
    ) -> ModelFiles:
        """The archive's checked files, with one model file of the first of ``formats`` it has.

        Downloading and extracting stop at ``deadline`` (a ``time.monotonic()`` value).
        """
        budget = _Budget.until(deadline)
        with _cache_faults(self._cache_dir):
            (self._cache_dir / "models").mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            if isinstance(location, S3Archive):
                folder, version = self._fetch_s3(location, budget, formats)
            else:
                folder, version = self._fetch_local(location, budget, formats)
            return _read_model_files(folder, source=str(location), version=version)

    def discard(self, files: ModelFiles) -> None:
        """Delete an extraction that is no longer served: /tmp holds one model, not two.

        Safe once the model is loaded, since both backends read their file into memory.
        """
        if files.folder.parent == self._cache_dir / "models":
            shutil.rmtree(files.folder, ignore_errors=True)

    def current_version(self, location: ArchiveLocation, deadline: float) -> ArchiveVersion:
        """What ``fetch`` would get now, cheaply: S3's ETag and size from HeadObject, or a local hash."""
        if isinstance(location, LocalArchive):
            digest = self._local_digest(location)
            return ArchiveVersion(version=_hash_version(digest), size=location.path.stat().st_size)
        budget = _Budget.until(deadline)
        failure = "S3 could not be asked for the model's version"
        headers = self._attempts(location, budget, failure, lambda reader, timeout: reader.head(
            location.bucket, location.key, timeout))  # fmt: skip
        return ArchiveVersion(version=_etag(headers), size=int(headers.get("Content-Length", 0)))

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
        remove_leftovers(self._cache_dir / "models", STAGING_PREFIX)

    def _fetch_s3(self, location: S3Archive, budget: _Budget, formats: Sequence[str]) -> tuple[Path, str]:
        failure = "The model archive could not be downloaded from S3"
        response = self._attempts(location, budget, failure, lambda reader, timeout: reader.get(
            location.bucket, location.key, timeout))  # fmt: skip
        try:
            etag = _etag(response.headers)
            target = self._target(f"{location} {etag}", formats)
            if target.is_dir():  # extracted already, by this process or an earlier one in the sandbox
                return target, etag
            stream = _DownloadStream(response, location, budget, failure)
            self._extract(stream, target, budget, formats)
            logger.info("extracted %s (ETag %s) after %d bytes", location, etag, stream.received)
            return target, etag
        finally:
            response.release_conn() if response.isclosed() else response.close()

    def _fetch_local(
        self, location: LocalArchive, budget: _Budget, formats: Sequence[str]
    ) -> tuple[Path, str]:
        digest = self._local_digest(location)
        target = self._target(digest, formats)
        if not target.is_dir():
            with location.path.open("rb") as stream:
                self._extract(stream, target, budget, formats)
        return target, _hash_version(digest)

    def _local_digest(self, location: LocalArchive) -> str:
        if not location.path.is_file():
            raise ModelUnavailable(
                f"The model archive {location.path} does not exist. Set MODEL_BUCKET and "
                "MODEL_KEY, or MODEL_PATH, or build the demo model with `make model`."
            )
        try:
            return _sha256_of(location.path)
        except OSError as error:
            raise ModelUnavailable(
                f"The model archive {location.path} (MODEL_PATH) cannot be read: "
                f"{describe_disk_fault(error)}."
            ) from error

    def _target(self, identity: str, formats: Sequence[str]) -> Path:
        """The extraction's folder: one per archive and per formats asked for."""
        name = hashlib.sha256(identity.encode()).hexdigest()[:32]
        return self._cache_dir / "models" / f"{name}-{'-'.join(formats)}"

    def _extract(self, stream: IO[bytes], target: Path, budget: _Budget, formats: Sequence[str]) -> None:
        """Extract into a scratch folder and publish it; a finished folder is never rewritten."""
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=owned_prefix(STAGING_PREFIX)))
        try:
            _extract_wanted(stream, staging, budget, formats)
            _publish_directory(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _attempts(
        self,
        location: S3Archive,
        budget: _Budget,
        failure: str,
        call: Callable[[S3Client, urllib3.Timeout], Any],
    ) -> Any:
        """``call`` until S3 answers, at most ``S3_ATTEMPTS`` times, all within the deadline.

        Each attempt gets an equal share of the time left, half to connect and
        half to wait for an answer, so a silent S3 costs the deadline at most.
        """
        import urllib3  # noqa: PLC0415 - the S3 path only; a local model never needs it

        from chalicelib.s3 import S3Error  # noqa: PLC0415

        reader = self._s3()
        for attempt in range(1, S3_ATTEMPTS + 1):
            share = budget.check("waiting for S3") / (S3_ATTEMPTS - attempt + 1) / 2
            timeout = urllib3.Timeout(
                connect=min(S3_CONNECT_TIMEOUT, share), read=min(S3_READ_TIMEOUT, share)
            )
            try:
                return call(reader, timeout)
            except S3Error as error:
                if error.status not in S3_RETRY_STATUSES or attempt == S3_ATTEMPTS:
                    raise _s3_error(location, error.code) from error
            except urllib3.exceptions.TimeoutError as error:
                # urllib3 makes a refused connection a kind of ConnectTimeoutError: not a deadline.
                refused = isinstance(error, urllib3.exceptions.NewConnectionError)
                if attempt == S3_ATTEMPTS and not refused:
                    raise budget.exceeded(f"S3 did not answer in time ({type(error).__name__})") from error
                if attempt == S3_ATTEMPTS:
                    logger.warning("%s: %s: %s", location, failure, error)
                    raise ModelUnavailable(f"{failure} ({type(error).__name__}).") from error
            except (urllib3.exceptions.HTTPError, OSError) as error:
                if attempt == S3_ATTEMPTS:
                    logger.warning("%s: %s: %s", location, failure, error)
                    raise ModelUnavailable(f"{failure} ({type(error).__name__}).") from error
        raise AssertionError("unreachable: the last attempt returns or raises")


def _reader_from_environment() -> S3Client:
    from chalicelib.s3 import S3Client  # noqa: PLC0415 - the S3 path only

    return S3Client.from_environment()


class _DownloadStream:
    """An S3 object's body as a file for gzip: each read bounded by the deadline, errors as 503s."""

    def __init__(
        self, response: urllib3.BaseHTTPResponse, location: S3Archive, budget: _Budget, failure: str
    ) -> None:
        self._response = response
        self._location = location
        self._budget = budget
        self._failure = failure
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        import urllib3  # noqa: PLC0415 - already imported by the S3 reader

        self._budget.check("downloading the archive")
        try:
            # read1: what has arrived, so the deadline is checked between every few packets.
            chunk = self._response.read1(size if size > 0 else CHUNK_SIZE)
        except urllib3.exceptions.TimeoutError as error:
            raise self._budget.exceeded(f"S3 did not answer in time ({type(error).__name__})") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            logger.warning("%s: %s: %s", self._location, self._failure, error)
            raise ModelUnavailable(f"{self._failure} ({type(error).__name__}).") from error
        self.received += len(chunk)
        return chunk


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


def _s3_error(location: S3Archive, code: str) -> ModelUnavailable:
    logger.warning("could not read %s: %s", location, code)
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

    S3's errors never get here as ``OSError`` (``_DownloadStream`` and
    ``ModelStore._attempts`` turn them into 503s first), nor do a corrupt
    archive's (``_extract_wanted`` reports those).
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


def _etag(headers: Mapping[str, str]) -> str:
    return str(headers.get("ETag", "")).strip('"')


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


@dataclass
class _Plan:
    """What to extract, from a manifest that lists the SHA-256 of the archive's members.

    ``wanted`` starts as classes.txt and the one model file of the first
    format asked for that the archive has (every model file if it has none of
    them, so that the backend can say what is missing); each is checked
    against its hash and struck off as it is written.
    """

    hashes: Mapping[str, str]
    wanted: set[str] = field(default_factory=set)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], formats: Sequence[str]) -> _Plan | None:
        files = manifest.get("files")
        if not isinstance(files, Mapping):
            return None
        hashes = {
            name: entry["sha256"]
            for name, entry in files.items()
            if isinstance(entry, Mapping) and isinstance(entry.get("sha256"), str)
        }
        if CLASSES_FILENAME not in hashes:
            return None
        models = [name for name in hashes if _format_of(name) is not None]
        chosen = next((name for wanted in formats for name in models if _format_of(name) == wanted), None)
        return cls(hashes, {CLASSES_FILENAME, *([chosen] if chosen else models)})


def _format_of(name: str) -> str | None:
    return next((label for label, suffixes in MODEL_FORMATS.items() if name.endswith(suffixes)), None)


def _extract_wanted(stream: IO[bytes], destination: Path, budget: _Budget, formats: Sequence[str]) -> None:
    """One streaming pass: check every member, write the wanted ones, verify them, stop when done.

    With a manifest that lists hashes (and comes first, as ours do), other
    formats' model files are skipped and the reading stops once the wanted
    members are written and match their hashes. Otherwise every model file is
    written and the stream is read to its very end, which makes zlib check
    the gzip CRC and length trailer (tarfile alone never reads it). An
    ``OSError`` with an errno is the disk's fault, not the archive's, and is
    left to the caller.
    """
    written: dict[str, str] = {}  # member name -> its SHA-256
    plan: _Plan | None = None
    try:
        with (
            _Gunzip(stream) as unzipped,
            tarfile.open(fileobj=unzipped, mode="r|", bufsize=CHUNK_SIZE) as archive,
        ):
            for member in archive:
                budget.check("extracting the archive")
                _check_member(member, destination)
                name = PurePosixPath(member.name).name
                if not (member.isfile() and _is_wanted(member)) or (plan and name not in plan.wanted):
                    continue
                written[member.name] = _write_member(archive, member, destination, budget)
                if name == MANIFEST_FILENAME and plan is None:
                    plan = _Plan.from_manifest(
                        _parse_manifest((destination / member.name).read_bytes()), formats
                    )
                if plan is not None:
                    _verify(written, plan)
                    if not plan.wanted:
                        break
            else:
                while unzipped.read(CHUNK_SIZE):
                    budget.check("extracting the archive")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise
        raise ModelUnavailable(f"The model archive is corrupt: {error}.") from error
    _check_contents(list(written))


class _Gunzip(io.RawIOBase):
    """A gzip stream's content, inflated a CHUNK_SIZE at a time.

    Python 3.11's GzipFile pulls 8 KiB from its source per call, which on a
    download costs a urllib3 read each: a third of the extraction's time.
    zlib checks each member's CRC and length as it reaches its end; members
    follow one another (as ``cat a.gz b.gz`` makes them), and zero bytes
    after the last one are padding, as gzip itself takes them.
    """

    def __init__(self, compressed: IO[bytes]) -> None:
        self._compressed = compressed
        self._inflater = zlib.decompressobj(wbits=GZIP_WBITS)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                data = (self._inflater.unused_data or self._compressed.read(CHUNK_SIZE)).lstrip(b"\0")
                while not data and (more := self._compressed.read(CHUNK_SIZE)):
                    data = more.lstrip(b"\0")
                if not data:
                    return 0
                self._inflater = zlib.decompressobj(wbits=GZIP_WBITS)
            data = data or self._compressed.read(CHUNK_SIZE)
            if not data:
                raise EOFError("the archive ends in the middle of its gzip stream")
            self._pending = memoryview(self._inflater.decompress(data, CHUNK_SIZE))
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def _write_member(
    archive: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, budget: _Budget
) -> str:
    """Copy one member out of the stream, hashing it on the way; its SHA-256."""
    source = archive.extractfile(member)
    assert source is not None  # a regular file, checked by the caller
    path = destination / member.name
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as sink:
        while chunk := source.read(CHUNK_SIZE):
            budget.check("extracting the archive")
            digest.update(chunk)
            sink.write(chunk)
    return digest.hexdigest()


def _verify(written: Mapping[str, str], plan: _Plan) -> None:
    """Every member written so far that the manifest lists must match its hash; strike it off."""
    for member_name, digest in written.items():
        name = PurePosixPath(member_name).name
        expected = plan.hashes.get(name)
        if expected is not None and expected != digest:
            raise ModelUnavailable(
                f"The model archive is corrupt: {name} does not match the SHA-256 its manifest.json lists."
            )
        plan.wanted.discard(name)


def _is_wanted(member: tarfile.TarInfo) -> bool:
    name = PurePosixPath(member.name).name
    return not name.startswith("._") and (
        name.endswith((*TORCHSCRIPT_SUFFIXES, ONNX_SUFFIX)) or name in (CLASSES_FILENAME, MANIFEST_FILENAME)
    )


def _check_contents(written: list[str]) -> None:
    """A TorchScript file, an ONNX model or both, exactly one classes.txt, at most one manifest.json."""
    torchscript = [name for name in written if name.endswith(TORCHSCRIPT_SUFFIXES)]
    onnx = [name for name in written if name.endswith(ONNX_SUFFIX)]
    if len(torchscript) > 1 or len(onnx) > 1 or not (torchscript or onnx):
        found = ", ".join(torchscript + onnx) or "none"
        raise ModelUnavailable(
            "The model archive must hold one TorchScript file (*.pt or *.pth), one ONNX model "
            f"(model.onnx), or one of each; found {found}."
        )
    _named(written, CLASSES_FILENAME, required=True)
    _named(written, MANIFEST_FILENAME, required=False)


def _named(written: list[str], filename: str, *, required: bool) -> None:
    matches = [name for name in written if PurePosixPath(name).name == filename]
    if len(matches) > 1 or (required and not matches):
        found = ", ".join(matches) or "none"
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
    name = manifest.get("name")
    if name is not None and not isinstance(name, str):  # GET /model and every bulk result show it
        raise ModelUnavailable(f"manifest.json's name must be a string, got {json.dumps(name)[:60]}.")
    return manifest
