"""The model archive: every way it can be wrong is a 503 that names the cause.

Archives go through real S3 (moto over HTTP) and the full service, and each
failure must leave nothing half-written behind: no partial download, no
half-extracted folder, nothing outside the cache directory.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from chalice.test import Client

from chalicelib.errors import ModelUnavailable
from chalicelib.model_store import LocalArchive, ModelStore, S3Archive
from chalicelib.settings import DEMO_ARCHIVE
from tests.conftest import MODEL_BUCKET
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
from tests.support.http_server import RoutedHTTPServer

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
    """A loopback 'S3' that promises the whole object and hangs up half way."""

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
                connection.sendall(head.encode() + self._payload[: len(self._payload) // 2])

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
    client = boto3.client(
        "s3",
        endpoint_url=truncating_s3.endpoint,
        config=boto3.session.Config(retries={"max_attempts": 1}),
    )
    store = ModelStore(tmp_path, s3_client=lambda: client)

    with pytest.raises(ModelUnavailable, match="could not be downloaded"):
        store.fetch(S3Archive(bucket="models", key="model.tar.gz"))

    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_extraction_is_reused_by_a_later_process_in_the_same_sandbox(s3: object, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, s3_client=lambda: s3)  # type: ignore[arg-type, return-value]
    first = store.fetch(S3Archive(bucket=MODEL_BUCKET, key="demo/model.tar.gz"))
    first_inode = first.torchscript_path.stat().st_ino

    second = ModelStore(tmp_path, s3_client=lambda: s3).fetch(  # type: ignore[arg-type, return-value]
        S3Archive(bucket=MODEL_BUCKET, key="demo/model.tar.gz")
    )

    assert second.torchscript_path == first.torchscript_path
    assert second.torchscript_path.stat().st_ino == first_inode
    assert len(first.classes) == 1000
    assert first.manifest["preprocessing"]["interpolation"] == "bicubic"


def test_classes_with_a_byte_order_mark_and_crlf_read_as_plain_text(tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(
        tar_gz({"model.pt": traced_colour_model(), "classes.txt": "\ufeffred\r\ngrün\r\nblue\r\n".encode()})
    )
    store = ModelStore(tmp_path / "cache", s3_client=_no_s3)  # type: ignore[arg-type]

    files = store.fetch(LocalArchive(archive))

    assert files.classes == ("red", "grün", "blue")
    assert files.version.startswith("sha256:")


def _no_s3() -> object:
    raise AssertionError("a local archive must not touch S3")


def test_macos_resource_forks_are_ignored(tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(
        tar_gz(
            {"._model.pt": b"\x00\x05\x16\x07", "model.pt": traced_colour_model(), "classes.txt": _classes()}
        )
    )

    files = ModelStore(tmp_path / "cache", s3_client=_no_s3).fetch(LocalArchive(archive))  # type: ignore[arg-type]

    assert files.torchscript_path.name == "model.pt"


def test_demo_archive_is_valid(tmp_path: Path) -> None:
    files = ModelStore(tmp_path, s3_client=_no_s3).fetch(LocalArchive(DEMO_ARCHIVE))  # type: ignore[arg-type]

    assert files.classes[281] == "tabby"
    assert files.manifest["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert io.BytesIO(files.torchscript_path.read_bytes()).read(2) == b"PK"
