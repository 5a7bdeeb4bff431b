"""Two backends, one answer: MODEL_BACKEND's rules, and TorchScript and ONNX Runtime agreeing.

The demo archive carries both formats of the same EfficientNet-Lite0; the
selection rules run on the small colour model in every combination of files
and settings, through the real app. The TorchScript backend's forward passes
are also watched for page faults: a pass that faults its working memory in
again costs more than its convolutions, and only the kernel's count shows it
without timing anything.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import resource
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chalice.test import Client

from chalicelib.backends import import_backend
from chalicelib.current import get_service
from chalicelib.decoding import decode_image
from chalicelib.imaging import to_model_input
from chalicelib.model_store import parse_classes
from chalicelib.settings import DEMO_ARCHIVE
from tests.support.api import JSON, classify, error_of
from tests.support.archives import (
    COLOUR_CLASSES,
    onnx_colour_model,
    solid_png,
    tar_gz,
    traced_colour_model,
)
from tests.support.http_server import RoutedHTTPServer

ROOT = Path(__file__).resolve().parent.parent
# A pass of the demo model writes tens of megabytes of outputs; a warm one
# may fault in at most this much fresh memory (a megabyte of 4 KiB pages).
WARM_PASS_PAGE_FAULTS = 256
CLASSES = "\n".join(COLOUR_CLASSES).encode()
ARCHIVES = {
    "both": {"model.pt": traced_colour_model(), "model.onnx": onnx_colour_model(), "classes.txt": CLASSES},
    "torchscript": {"model.pt": traced_colour_model(), "classes.txt": CLASSES},
    "onnx": {"model.onnx": onnx_colour_model(), "classes.txt": CLASSES},
    "onnx-fixed-batch": {"model.onnx": onnx_colour_model(fixed_batch=True), "classes.txt": CLASSES},
}


def _serve(archive: str, setting: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / f"{archive}.tar.gz"
    path.write_bytes(tar_gz(ARCHIVES[archive]))
    monkeypatch.setenv("MODEL_PATH", str(path))
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MODEL_BACKEND", setting)


def _classify_colours(client: Client, *colours: tuple[int, int, int]) -> Any:
    images = [base64.b64encode(solid_png(colour)).decode() for colour in colours]
    body = {"images": images} if len(images) > 1 else {"image": images[0]}
    return client.http.post("/invocations", headers=JSON, body=json.dumps(body))


@pytest.mark.parametrize(
    ("archive", "setting", "backend"),
    [
        ("both", "auto", "onnx"),
        ("both", "torch", "torchscript"),
        ("both", "onnx", "onnx"),
        ("torchscript", "auto", "torchscript"),
        ("onnx", "auto", "onnx"),
    ],
)
def test_the_setting_and_the_archive_pick_the_backend(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, archive: str, setting: str, backend: str
) -> None:
    _serve(archive, setting, tmp_path, monkeypatch)

    response = _classify_colours(client, (0, 0, 255))

    assert (response.status_code, response.json_body["class"]) == (200, "blue")
    assert client.http.get("/model").json_body["backend"] == backend


def _without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process look like the TorchScript deployment, which ships no onnxruntime.

    ``sys.modules[name] = None`` is Python's own way to make a module unimportable.
    """
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "chalicelib.onnx_backend", raising=False)


def test_auto_without_onnxruntime_serves_the_torchscript_file(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_onnxruntime(monkeypatch)
    _serve("both", "auto", tmp_path, monkeypatch)

    assert _classify_colours(client, (0, 255, 0)).json_body["class"] == "green"
    assert client.http.get("/model").json_body["backend"] == "torchscript"


@pytest.mark.parametrize(
    ("archive", "setting", "onnxruntime", "cause"),
    [
        ("torchscript", "onnx", True, "MODEL_BACKEND is 'onnx' but the model archive has no model.onnx"),
        ("onnx", "torch", True, "The model archive has only model.onnx, but MODEL_BACKEND is 'torch'"),
        ("onnx", "auto", False, "has only model.onnx, but onnxruntime is not installed here"),
        ("both", "onnx", False, "onnxruntime cannot be imported"),
    ],
)
def test_a_backend_that_cannot_run_is_503_saying_why(
    client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    archive: str,
    setting: str,
    onnxruntime: bool,
    cause: str,
) -> None:
    if not onnxruntime:
        _without_onnxruntime(monkeypatch)
    _serve(archive, setting, tmp_path, monkeypatch)

    status, code, message = error_of(_classify_colours(client, (255, 0, 0)))

    assert (status, code) == (503, "ModelUnavailable")
    assert cause in message


def test_a_model_exported_with_batch_fixed_at_one_still_serves_batches(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve("onnx-fixed-batch", "onnx", tmp_path, monkeypatch)

    response = _classify_colours(client, (255, 0, 0), (0, 255, 0), (0, 0, 255))

    assert response.status_code == 200
    assert [item["class"] for item in response.json_body["predictions"]] == ["red", "green", "blue"]


def test_both_backends_give_the_same_answers_on_real_photos(
    client: Client,
    image_server: RoutedHTTPServer,
    photos: dict[str, bytes],
    demo_from_s3: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers = {}
    for setting, backend in (("torch", "torchscript"), ("onnx", "onnx")):
        monkeypatch.setenv("MODEL_BACKEND", setting)
        answers[setting] = [
            client.http.post(
                "/invocations?top_k=5",
                headers=JSON,
                body=json.dumps({"url": image_server.url(f"/{name}.jpg")}),
            ).json_body
            for name in sorted(photos)
        ]
        assert client.http.get("/model").json_body["backend"] == backend

    for torchscript, onnx in zip(answers["torch"], answers["onnx"], strict=True):
        assert onnx["class"] == torchscript["class"]
        onnx_top = {item["class"]: item["confidence"] for item in onnx["top_k"]}
        for item in torchscript["top_k"]:
            assert onnx_top[item["class"]] == pytest.approx(item["confidence"], abs=1e-4)


def test_the_onnx_path_never_imports_torch(tmp_path: Path, photos: dict[str, bytes]) -> None:
    """A fresh interpreter: import the app, classify a photo on ONNX, then look for torch."""
    script = """
import base64, json, sys
from tests.support.openapi_check import CheckedClient as Client
from app import app
with Client(app) as client:
    body = json.dumps({"image": base64.b64encode(sys.stdin.buffer.read()).decode()})
    answer = client.http.post("/invocations", headers={"Content-Type": "application/json"}, body=body)
    backend = client.http.get("/model").json_body["backend"]
print(json.dumps({"answer": answer.json_body, "backend": backend,
                  "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}))
"""
    environment = {
        **os.environ,
        "MODEL_PATH": str(DEMO_ARCHIVE),
        "MODEL_BACKEND": "onnx",
        "MODEL_CACHE_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=photos["coffee"],
        capture_output=True,
        cwd=ROOT,
        env=environment,
        check=True,
        timeout=120,
    )
    report = json.loads(result.stdout.splitlines()[-1])

    assert report["backend"] == "onnx"
    assert report["answer"]["class"] == "espresso"
    assert report["torch"] == []


def test_an_archive_with_both_files_is_what_make_model_builds() -> None:
    with tarfile.open(DEMO_ARCHIVE) as archive:
        names = sorted(archive.getnames())

    assert names == ["classes.txt", "efficientnet_lite0.pt", "manifest.json", "model.onnx"]


def test_the_url_path_classifies_on_onnx_too(
    client: Client, image_server: RoutedHTTPServer, demo_from_s3: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_BACKEND", "onnx")

    assert classify(client, image_server.url("/chelsea.jpg")).json_body["class"] == "Egyptian cat"


def test_a_warm_torchscript_pass_faults_in_no_fresh_memory_whichever_thread_asks(
    client: Client,
    image_server: RoutedHTTPServer,
    photos: dict[str, bytes],
    demo_from_s3: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the dev server asks, a new thread per connection, and as Lambda does, the same thread each time.

    Loaded through the app, so the process's allocator settings are the
    service's (chalicelib.budgets sets one).
    """
    monkeypatch.setenv("MODEL_BACKEND", "torch")
    assert classify(client, image_server.url("/coffee.jpg")).json_body["class"] == "espresso"
    loaded = get_service().models.model()
    image = to_model_input(decode_image(photos["coffee"], max_pixels=10**8), loaded.preprocessing)

    def one_pass() -> None:
        loaded.classifier.scores([image])

    for _ in range(3):
        one_pass()
        _on_a_new_thread(one_pass)
    # The fewest of a few tries: the count is the whole process's, and another thread may fault meanwhile.
    faults = [
        min(_page_faults_of(one_pass) for _ in range(5)),
        min(_page_faults_of(lambda: _on_a_new_thread(one_pass)) for _ in range(5)),
    ]

    assert max(faults) < WARM_PASS_PAGE_FAULTS, faults


def test_a_dropped_torchscript_classifier_takes_its_threads_with_it(tmp_path: Path) -> None:
    """A model refresh drops the old classifier: its forward threads (and their memory) must not stay."""
    with tarfile.open(DEMO_ARCHIVE) as archive:
        archive.extractall(tmp_path, filter="data")
    classes = parse_classes((tmp_path / "classes.txt").read_bytes())
    before = set(threading.enumerate())
    classifier = import_backend("torch").load_classifier(tmp_path / "efficientnet_lite0.pt", classes, 224, 1)
    started = set(threading.enumerate()) - before
    assert started, "the classifier runs its passes on threads of its own"

    del classifier
    gc.collect()
    deadline = time.monotonic() + 30
    while any(thread.is_alive() for thread in started) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert not any(thread.is_alive() for thread in started)


def _page_faults_of(call: Callable[[], object]) -> int:
    """The page faults the whole process took while ``call`` ran (minor ones: fresh memory)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _on_a_new_thread(call: Callable[[], object]) -> None:
    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
