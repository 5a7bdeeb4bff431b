"""The model archive: every way it can be wrong is a 503 that names the cause.

Archives go through real S3 (moto over HTTP) and the full service, and each
failure must leave nothing half-written behind: no partial download, no
half-extracted folder, nothing outside the cache directory. Disk faults are
real filesystems (a tiny tmpfs, a read-only mount) in a private mount
namespace, slow and silent S3s are real sockets on loopback, and leftovers
come from processes that really died.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chalice.test import Client

from chalicelib.errors import ModelUnavailable
from chalicelib.locations import LocalArchive, S3Archive
from chalicelib.model_store import ROOM_HEADROOM_BYTES, STAGING_PREFIX, ModelStore
from chalicelib.s3 import Credentials, S3Client
from chalicelib.settings import DEMO_ARCHIVE
from tests.conftest import DEMO_KEY, MODEL_BUCKET
from tests.support.api import classify, error_of
from tests.support.archives import (
    COLOUR_CLASSES,
    PairOfScores,
    ScoresPerRow,
    fastai_archive,
    onnx_colour_model,
    scripted,
    tar_gz,
    traced_colour_model,
)
from tests.support.chalice_local import free_port
from tests.support.faulty_disk import ROOT, ReadOnly, Tmpfs, run_python
from tests.support.http_server import RoutedHTTPServer
from tests.support.s3 import MotoS3Server
from tests.support.slow_network import SilentServer, ThrottlingProxy

MIB = 2**20


def in_a_minute() -> float:
    """A deadline that only the deadline tests come near."""
    return time.monotonic() + 60


def reader_of(endpoint: str) -> S3Client:
    """An S3 reader of another loopback 'S3' than the test session's (which the service finds itself)."""
    return S3Client("us-east-1", Credentials("testing", "testing"), endpoint)


ABSOLUTE_MEMBER = "/tmp/chalice-classifier-test-absolute-member.txt"


def _with_bad_crc(archive: bytes) -> bytes:
    return archive[:-8] + bytes(b ^ 0xFF for b in archive[-8:-4]) + archive[-4:]


def _classes() -> bytes:
    return "\n".join(COLOUR_CLASSES).encode()


BAD_ARCHIVES = {
    "random-bytes": (b"\x00garbage" * 100, "corrupt"),
    "truncated": (fastai_archive()[:-200], "corrupt"),
    # Tar headers and data intact, gzip CRC trailer wrong: only reading to the end catches it.
    "bad-gzip-crc": (_with_bad_crc(fastai_archive()), "corrupt"),
    "not-gzipped": (gzip.decompress(fastai_archive()), "corrupt"),
    "no-classes": (tar_gz({"model.pt": traced_colour_model()}), "classes.txt"),
    "no-model": (tar_gz({"classes.txt": _classes()}), "found none"),
    "two-models": (
        tar_gz({"a.pt": traced_colour_model(), "b.pth": traced_colour_model(), "classes.txt": _classes()}),
        "a.pt, b.pth",
    ),
    "two-onnx-models": (
        tar_gz({"a.onnx": onnx_colour_model(), "b.onnx": onnx_colour_model(), "classes.txt": _classes()}),
        "a.onnx, b.onnx",
    ),
    "class-count-mismatch": (fastai_archive(classes=("cat", "dog")), "3 outputs but classes.txt lists 2"),
    "tuple-output": (
        tar_gz({"model.pt": scripted(PairOfScores()), "classes.txt": _classes()}),
        "must return a (batch, classes) tensor of scores; it returned tuple",
    ),
    "three-dimensional-output": (
        tar_gz({"model.pt": scripted(ScoresPerRow()), "classes.txt": _classes()}),
        "must return a (batch, classes) array of scores; it returned shape (1, 3, 224)",
    ),
    "onnx-class-count-mismatch": (
        tar_gz({"model.onnx": onnx_colour_model(), "classes.txt": b"cat\ndog\n"}),
        "3 outputs but classes.txt lists 2",
    ),
    "not-onnx": (
        tar_gz({"model.onnx": b"not a model", "classes.txt": _classes()}),
        "model.onnx is not a loadable ONNX model",
    ),
    "dot-dot-member": (
        tar_gz({"model.pt": traced_colour_model(), "classes.txt": _classes(), "../escaped.txt": b"x"}),
        "'../escaped.txt'",
    ),
    "absolute-member": (
        tar_gz({"model.pt": traced_colour_model(), "classes.txt": _classes(), ABSOLUTE_MEMBER: b"x"}),
        f"'{ABSOLUTE_MEMBER}'",
    ),
    "symlink-member": (
        tar_gz({"model.pt": traced_colour_model(), "classes.txt": _classes()}, symlinks={"link": "/etc"}),
        "'link' is a link",
    ),
    "not-torchscript": (tar_gz({"model.pt": b"not a model", "classes.txt": _classes()}), "not a loadable"),
    "empty-class-line": (
        tar_gz({"model.pt": traced_colour_model(), "classes.txt": b"red\n\nblue\n"}),
        "line 2 is empty",
    ),
    "bad-manifest": (
        tar_gz({"model.pt": traced_colour_model(), "classes.txt": _classes(), "manifest.json": b"{"}),
        "manifest.json is not valid JSON",
    ),
    "manifest-name-not-text": (
        tar_gz(
            {"model.pt": traced_colour_model(), "classes.txt": _classes(), "manifest.json": b'{"name": 5}'}
        ),
        "manifest.json's name must be a string, got 5",
    ),
    "crop-larger-than-resize": (
        tar_gz(
            {
                "model.pt": traced_colour_model(),
                "classes.txt": _classes(),
                "manifest.json": b'{"preprocessing": {"resize": 100, "crop": 224}}',
            }
        ),
        "crop must not exceed resize",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archive_is_503_naming_the_cause_and_leaves_nothing_behind(
    client: Client,
    image_server: RoutedHTTPServer,
    s3: object,
    tmp_path: Path,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    archive, cause = BAD_ARCHIVES[case]
    key = f"bad/{case}.tar.gz"
    s3.put_object(Bucket=MODEL_BUCKET, Key=key, Body=archive)  # type: ignore[attr-defined]
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", key)

    status, code, message = error_of(classify(client, image_server.url("/coffee.jpg")))

    assert (status, code) == (503, "ModelUnavailable")
    assert cause in message
    assert "Traceback" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    leftovers = [p.name for p in cache_dir.rglob("*") if p.name.startswith((".partial", ".staging"))]
    assert leftovers == []
    assert not any(p.name in {"escaped.txt", "link"} for p in tmp_path.rglob("*"))
    assert not Path(ABSOLUTE_MEMBER).exists()


@pytest.mark.usefixtures("cache_dir")
def test_missing_object_is_503_that_says_not_found(
    client: Client, image_server: RoutedHTTPServer, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", "no/such/model.tar.gz")

    status, code, message = error_of(classify(client, image_server.url("/coffee.jpg")))

    assert (status, code) == (503, "ModelUnavailable")
    assert "not found" in message
    assert "no/such" not in message


@pytest.mark.usefixtures("cache_dir")
def test_missing_bucket_is_503_that_says_not_found(
    client: Client, image_server: RoutedHTTPServer, s3: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_BUCKET", "no-such-bucket")
    monkeypatch.setenv("MODEL_KEY", "model.tar.gz")

    status, code, message = error_of(classify(client, image_server.url("/coffee.jpg")))

    assert (status, code) == (503, "ModelUnavailable")
    assert "not found" in message


@pytest.mark.usefixtures("cache_dir")
def test_missing_local_archive_is_503_that_says_how_to_fix_it(
    client: Client, image_server: RoutedHTTPServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "nowhere.tar.gz"))

    status, code, message = error_of(classify(client, image_server.url("/coffee.jpg")))

    assert (status, code) == (503, "ModelUnavailable")
    assert "does not exist" in message
    assert "make model" in message


class TruncatingS3:
    """A loopback 'S3' that promises the whole object and hangs up a quarter of the way through.

    That is inside the demo archive's model.onnx, which its first half holds.
    """

    def __init__(self, payload: bytes) -> None:
        self._payload = payload
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                head = (
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-gzip\r\n"
                    f'ETag: "abc"\r\nContent-Length: {len(self._payload)}\r\n\r\n'
                )
                connection.sendall(head.encode() + self._payload[: len(self._payload) // 4])

    def __enter__(self) -> TruncatingS3:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()


@pytest.fixture
def truncating_s3() -> Iterator[TruncatingS3]:
    with TruncatingS3(DEMO_ARCHIVE.read_bytes()) as server:
        yield server


def test_truncated_download_is_never_used_and_leaves_no_partial_file(
    truncating_s3: TruncatingS3, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path, s3=lambda: reader_of(truncating_s3.endpoint))

    with pytest.raises(ModelUnavailable, match="could not be downloaded"):
        store.fetch(S3Archive(bucket="models", key="model.tar.gz"), in_a_minute())

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.usefixtures("s3")
def test_extraction_is_reused_by_a_later_process_in_the_same_sandbox(
    tmp_path: Path, s3_server: MotoS3Server
) -> None:
    demo = S3Archive(bucket=MODEL_BUCKET, key=DEMO_KEY)
    first = ModelStore(tmp_path, s3=S3Client.from_environment).fetch(demo, in_a_minute())
    first_inode = first.onnx_path.stat().st_ino
    downloads = s3_server.log.count("GET", f"/{MODEL_BUCKET}/{DEMO_KEY}")

    second = ModelStore(tmp_path, s3=S3Client.from_environment).fetch(demo, in_a_minute())

    assert second.onnx_path == first.onnx_path
    assert second.onnx_path.stat().st_ino == first_inode
    # The second asked S3 for the object (its ETag names the folder) and read none of its body.
    assert s3_server.log.count("GET", f"/{MODEL_BUCKET}/{DEMO_KEY}") == downloads + 1
    assert len(first.classes) == 1000
    assert first.manifest["preprocessing"]["interpolation"] == "bicubic"


@pytest.mark.usefixtures("s3")
@pytest.mark.parametrize(
    ("formats", "model_file", "read_at_most"),
    [(("onnx", "torchscript"), "model.onnx", 0.55), (("torchscript",), "efficientnet_lite0.pt", 1.0)],
    ids=["onnx", "torchscript"],
)
def test_only_what_the_backend_needs_is_downloaded_and_extracted(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    formats: tuple[str, ...],
    model_file: str,
    read_at_most: float,
) -> None:
    """The demo archive carries both formats; an ONNX container stops reading after its half."""
    files = ModelStore(tmp_path, s3=S3Client.from_environment).fetch(
        S3Archive(MODEL_BUCKET, DEMO_KEY), in_a_minute(), formats
    )

    extracted = sorted(p.name for p in files.folder.rglob("*") if p.is_file())
    assert extracted == sorted(["manifest.json", "classes.txt", model_file])
    read = int(capsys.readouterr().out.split(" after ")[1].split(" bytes")[0])
    assert read <= read_at_most * DEMO_ARCHIVE.stat().st_size


def test_a_member_that_does_not_match_its_hash_is_refused(tmp_path: Path) -> None:
    """With a manifest of hashes the gzip CRC is not read (the download stops early): the hashes check."""
    manifest = {"files": {"classes.txt": {"sha256": "0" * 64}, "model.pt": {"sha256": "0" * 64}}}
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(
        tar_gz({"manifest.json": json.dumps(manifest).encode(), "classes.txt": _classes(), "model.pt": b"w"})
    )

    with pytest.raises(ModelUnavailable, match=r"classes\.txt does not match the SHA-256"):
        ModelStore(tmp_path / "cache", s3=_no_s3).fetch(LocalArchive(archive), in_a_minute())


def test_classes_with_a_byte_order_mark_and_crlf_read_as_plain_text(tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(
        tar_gz({"model.pt": traced_colour_model(), "classes.txt": "\ufeffred\r\ngrün\r\nblue\r\n".encode()})
    )
    store = ModelStore(tmp_path / "cache", s3=_no_s3)

    files = store.fetch(LocalArchive(archive), in_a_minute())

    assert files.classes == ("red", "grün", "blue")
    assert files.version.startswith("sha256:")


def _no_s3() -> S3Client:
    raise AssertionError("a local archive must not touch S3")


def test_an_archive_in_several_gzip_members_padded_with_zeros_reads_as_one(tmp_path: Path) -> None:
    """As ``cat a.gz b.gz`` or a copy padded to a block size leaves it: gzip itself reads those."""
    tar = gzip.decompress(fastai_archive())
    half = len(tar) // 2
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(gzip.compress(tar[:half]) + gzip.compress(tar[half:]) + bytes(4096))

    files = ModelStore(tmp_path / "cache", s3=_no_s3).fetch(LocalArchive(archive), time.monotonic() + 60)

    assert files.classes == COLOUR_CLASSES
    assert files.torchscript_path is not None


def test_macos_resource_forks_are_ignored(tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(
        tar_gz(
            {"._model.pt": b"\x00\x05\x16\x07", "model.pt": traced_colour_model(), "classes.txt": _classes()}
        )
    )

    files = ModelStore(tmp_path / "cache", s3=_no_s3).fetch(LocalArchive(archive), in_a_minute())

    assert files.torchscript_path.name == "model.pt"


def test_demo_archive_is_valid(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, s3=_no_s3)
    torchscript = store.fetch(LocalArchive(DEMO_ARCHIVE), in_a_minute(), ("torchscript",))
    onnx = store.fetch(LocalArchive(DEMO_ARCHIVE), in_a_minute(), ("onnx",))

    assert torchscript.classes[281] == onnx.classes[281] == "tabby"
    assert torchscript.manifest["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert io.BytesIO(torchscript.torchscript_path.read_bytes()).read(2) == b"PK"
    assert onnx.onnx_path.stat().st_size > 10 * MIB
    assert (torchscript.onnx_path, onnx.torchscript_path) == (None, None)


def small_archive(tmp_path: Path) -> LocalArchive:
    """An archive the store accepts; it never loads the model, so the weights can be any bytes."""
    path = tmp_path / "small.tar.gz"
    path.write_bytes(tar_gz({"model.pt": b"weights", "classes.txt": _classes()}))
    return LocalArchive(path)


def put(s3: object, key: str, archive: bytes) -> str:
    s3.put_object(Bucket=MODEL_BUCKET, Key=key, Body=archive)  # type: ignore[attr-defined]
    return f"s3://{MODEL_BUCKET}/{key}"


# Run under faulty_disk.run_python: fetch the archive at argv[2] (s3://... or a
# path) into the cache at argv[1], then report the outcome and what is left in
# the cache, while the faulty mounts still exist.
FETCH_AND_REPORT = """
import json, sys, time
from pathlib import Path
from chalicelib.errors import ModelUnavailable
from chalicelib.locations import LocalArchive, S3Archive
from chalicelib.model_store import ModelStore

cache, where = Path(sys.argv[1]), sys.argv[2]
bucket, _, key = where.removeprefix("s3://").partition("/")
location = S3Archive(bucket, key) if where.startswith("s3://") else LocalArchive(Path(where))
store = ModelStore(cache)
try:
    store.fetch(location, time.monotonic() + 60)
    outcome = "loaded"
except ModelUnavailable as error:
    outcome = str(error)
left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
print(json.dumps({"outcome": outcome, "left": left}))
"""


def assert_cache_fault(report: dict[str, object], cache: Path, cause: str) -> None:
    """A 503 that names the cache directory, the setting and the cause, not the archive, and no debris."""
    outcome = str(report["outcome"])
    assert f"cache directory {cache} (MODEL_CACHE_DIR): {cause}" in outcome
    assert "corrupt" not in outcome
    assert set(report["left"]) <= {"models"}  # type: ignore[arg-type]


@pytest.mark.usefixtures("s3_server")
def test_a_full_disk_while_downloading_is_a_503_naming_the_cache(s3: object, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    weights = random.Random(0).randbytes(2 * MIB)  # incompressible: the archive itself is too big
    archive = put(s3, "faults/too-big.tar.gz", tar_gz({"model.pt": weights, "classes.txt": _classes()}))

    report = run_python(FETCH_AND_REPORT, str(cache), archive, mounts=[Tmpfs(cache, MIB)])

    assert_cache_fault(report, cache, "no space is left on its filesystem (ENOSPC)")
    assert "ephemeral storage" in str(report["outcome"])


@pytest.mark.usefixtures("s3_server")
def test_a_full_disk_while_extracting_is_not_called_a_corrupt_archive(s3: object, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    # A few kilobytes of archive that unpack to more than the disk holds.
    archive = put(
        s3, "faults/unpacks-big.tar.gz", tar_gz({"model.pt": bytes(8 * MIB), "classes.txt": _classes()})
    )

    report = run_python(FETCH_AND_REPORT, str(cache), archive, mounts=[Tmpfs(cache, MIB)])

    assert_cache_fault(report, cache, "no space is left on its filesystem (ENOSPC)")


def test_a_read_only_cache_is_a_503_that_says_read_only(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()

    report = run_python(
        FETCH_AND_REPORT, str(cache), str(small_archive(tmp_path).path), mounts=[ReadOnly(cache)]
    )

    assert_cache_fault(report, cache, "its filesystem is read-only (EROFS)")
    assert "point MODEL_CACHE_DIR at a directory the function can write" in str(report["outcome"])


def test_a_cache_without_write_permission_is_a_503_that_says_permission(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)

    report = run_python(
        FETCH_AND_REPORT, str(cache), str(small_archive(tmp_path).path), honour_permissions=True
    )

    assert_cache_fault(report, cache, "permission is denied (EACCES)")


# Fetch the S3 key argv[2] through the endpoint argv[3] into the cache argv[1];
# the tests kill it half way.
SLOW_FETCH = """
import sys, time
from pathlib import Path
from chalicelib.locations import S3Archive
from chalicelib.model_store import ModelStore

from chalicelib.s3 import Credentials, S3Client

reader = S3Client("us-east-1", Credentials("testing", "testing"), sys.argv[3])
store = ModelStore(Path(sys.argv[1]), s3=lambda: reader)
store.fetch(S3Archive("models", sys.argv[2]), time.monotonic() + 600)
"""


def wait_for_partial_extraction(process: subprocess.Popen[str], models: Path) -> Path:
    """The scratch folder ``process`` is extracting into, once bytes have arrived in it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        for folder in models.glob(f"{STAGING_PREFIX}{process.pid}-*"):
            if any(p.is_file() and p.stat().st_size > 0 for p in folder.rglob("*")):
                return folder
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"the download never started: {process.communicate(timeout=30)}")


def test_a_download_killed_half_way_leaves_a_folder_that_the_next_fetch_removes(
    s3_server: MotoS3Server, s3: object, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with ThrottlingProxy(s3_server.endpoint, bytes_per_second=MIB) as slow_s3:
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_FETCH, str(cache), DEMO_KEY, slow_s3.endpoint],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        partial = wait_for_partial_extraction(process, cache / "models")
        process.kill()  # SIGKILL, as Lambda ends a timed-out invocation
        process.communicate(timeout=30)
    assert partial.is_dir()

    ModelStore(cache, s3=_no_s3).fetch(small_archive(tmp_path), in_a_minute())

    assert not partial.exists()


# Make a scratch entry named as the store names its own (a folder under
# models/, or a file), print its path and wait for stdin to close.
SCRATCH_OWNER = """
import sys, tempfile
from pathlib import Path
from chalicelib.model_store import owned_prefix

directory, prefix = Path(sys.argv[1]), sys.argv[2]
directory.mkdir(parents=True, exist_ok=True)
if sys.argv[3] == "file":
    path = tempfile.mkstemp(dir=directory, prefix=owned_prefix(prefix))[1]
else:
    path = tempfile.mkdtemp(dir=directory, prefix=owned_prefix(prefix))
    (Path(path) / "half.bin").write_bytes(bytes(1000))
print(path, flush=True)
sys.stdin.read()
"""


def scratch_owner(directory: Path, prefix: str, kind: str) -> tuple[subprocess.Popen[str], Path]:
    """A live process and the scratch entry it owns; closing its stdin ends it, leaving the entry behind."""
    process = subprocess.Popen(
        [sys.executable, "-c", SCRATCH_OWNER, str(directory), prefix, kind],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def end(process: subprocess.Popen[str]) -> None:
    process.communicate(timeout=30)


@pytest.mark.parametrize(("folder", "prefix", "kind"), [("models", STAGING_PREFIX, "folder")])
@pytest.mark.parametrize("start", ["fetch", "check_room"])
def test_leftovers_of_dead_processes_go_and_those_of_live_ones_stay(
    tmp_path: Path, folder: str, prefix: str, kind: str, start: str
) -> None:
    cache = tmp_path / "cache"
    dead, dead_entry = scratch_owner(cache / folder, prefix, kind)
    end(dead)
    live, live_entry = scratch_owner(cache / folder, prefix, kind)
    store = ModelStore(cache, s3=_no_s3)
    try:
        if start == "fetch":
            store.fetch(small_archive(tmp_path), in_a_minute())
        else:
            store.check_room(0)

        assert dead_entry.exists() is False
        assert live_entry.exists()
    finally:
        end(live)


@pytest.mark.usefixtures("s3_server")
def test_current_version_gives_the_version_fetch_gets_and_the_archive_size(
    s3: object, tmp_path: Path
) -> None:
    archive = tar_gz({"model.pt": b"weights", "classes.txt": _classes()})
    put(s3, "versions/model.tar.gz", archive)
    store = ModelStore(tmp_path / "cache", s3=S3Client.from_environment)
    in_s3 = S3Archive(MODEL_BUCKET, "versions/model.tar.gz")
    local = small_archive(tmp_path)

    remote_version = store.current_version(in_s3, in_a_minute())
    local_version = store.current_version(local, in_a_minute())

    assert remote_version.size == len(archive)
    assert remote_version.version == store.fetch(in_s3, in_a_minute()).version
    assert local_version.size == local.path.stat().st_size
    assert local_version.version == store.fetch(local, in_a_minute()).version
    assert remote_version.room_to_fetch == 2 * len(archive)


# Under a tmpfs of argv[2] bytes at argv[1]: try check_room for each size in
# argv[3:] and report None where it fits, else the error's message.
CHECK_ROOM = """
import json, sys
from pathlib import Path
from chalicelib.errors import ModelUnavailable
from chalicelib.model_store import ModelStore

store = ModelStore(Path(sys.argv[1]) / "cache")
outcomes = []
for needed in map(int, sys.argv[2:]):
    try:
        store.check_room(needed)
        outcomes.append(None)
    except ModelUnavailable as error:
        outcomes.append(str(error))
print(json.dumps(outcomes))
"""


def test_check_room_refuses_a_fetch_that_would_fill_the_disk_and_names_the_numbers(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    size = 32 * MIB
    fits, too_big = size - ROOM_HEADROOM_BYTES - MIB, size - ROOM_HEADROOM_BYTES + MIB

    outcomes = run_python(CHECK_ROOM, str(disk), str(fits), str(too_big), mounts=[Tmpfs(disk, size)])

    assert outcomes[0] is None
    assert outcomes[1] == (
        f"The model needs {too_big // MIB} MiB plus {ROOM_HEADROOM_BYTES // MIB} MiB of headroom in the "
        f"cache directory {disk / 'cache'} (MODEL_CACHE_DIR), but only {size // MIB} MiB are free; raise "
        "the function's ephemeral storage."
    )


# Deadlines: generous margins, all well under API Gateway's 29 s.
DEADLINE_S = 3.0
SLACK_S = 5.0


@pytest.mark.parametrize("call", ["fetch", "current_version"])
def test_a_silent_s3_is_a_503_at_the_deadline(tmp_path: Path, call: str) -> None:
    with SilentServer() as silent:
        store = ModelStore(tmp_path / "cache", s3=lambda: reader_of(silent.endpoint))
        started = time.monotonic()
        with pytest.raises(ModelUnavailable, match=r"did not finish within 3 s \(MODEL_LOAD_DEADLINE\)"):
            getattr(store, call)(S3Archive(MODEL_BUCKET, DEMO_KEY), started + DEADLINE_S)
        elapsed = time.monotonic() - started

    assert elapsed < DEADLINE_S + SLACK_S
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_an_s3_that_refuses_connections_is_a_503_that_says_so_not_a_deadline(tmp_path: Path) -> None:
    """urllib3 makes a refused connection a kind of ConnectTimeoutError: it was reported as the
    deadline passing, within a second."""
    store = ModelStore(tmp_path / "cache", s3=lambda: reader_of(f"http://127.0.0.1:{free_port()}"))

    with pytest.raises(ModelUnavailable) as refused:
        store.fetch(S3Archive(MODEL_BUCKET, DEMO_KEY), time.monotonic() + DEADLINE_S)

    assert "could not be downloaded from S3 (NewConnectionError)" in str(refused.value)
    assert "MODEL_LOAD_DEADLINE" not in str(refused.value)


def test_a_slow_download_stops_at_the_deadline_and_leaves_no_partial_file(
    s3_server: MotoS3Server, s3: object, tmp_path: Path
) -> None:
    with ThrottlingProxy(s3_server.endpoint, bytes_per_second=MIB) as slow_s3:
        store = ModelStore(tmp_path / "cache", s3=lambda: reader_of(slow_s3.endpoint))
        started = time.monotonic()
        with pytest.raises(
            ModelUnavailable, match=r"MODEL_LOAD_DEADLINE\): it was still downloading the archive"
        ):
            store.fetch(S3Archive(MODEL_BUCKET, DEMO_KEY), started + DEADLINE_S)
        elapsed = time.monotonic() - started

    assert elapsed < DEADLINE_S + SLACK_S
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_extraction_stops_at_the_deadline_and_leaves_nothing_half_done(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "cache", s3=_no_s3)

    with pytest.raises(ModelUnavailable, match=r"MODEL_LOAD_DEADLINE\): it was still extracting the archive"):
        store.fetch(LocalArchive(DEMO_ARCHIVE), time.monotonic())

    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.mark.usefixtures("cache_dir")
def test_a_cold_request_to_a_silent_s3_is_a_503_within_model_load_deadline(
    client: Client, image_server: RoutedHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SilentServer() as silent:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent.endpoint)
        monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
        monkeypatch.setenv("MODEL_KEY", DEMO_KEY)
        monkeypatch.setenv("MODEL_LOAD_DEADLINE", f"{DEADLINE_S:g}")
        started = time.monotonic()
        status, code, message = error_of(classify(client, image_server.url("/coffee.jpg")))
        elapsed = time.monotonic() - started

    assert (status, code) == (503, "ModelUnavailable")
    assert "did not finish within 3 s (MODEL_LOAD_DEADLINE)" in message
    assert elapsed < DEADLINE_S + SLACK_S
