"""Publishing a model: validated, packed, uploaded to moto S3, then served by the service."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from chalicelib.backends import Backend
from chalicelib.current import get_service
from chalicelib.errors import ModelUnavailable
from tests.conftest import MODEL_BUCKET
from tests.support.api import label_of
from tests.support.archives import (
    COLOUR_CLASSES,
    BranchyColour,
    FourierColour,
    MeanColour,
    NoisyColour,
    onnx_colour_model,
    solid_png,
    tar_gz,
    traced_colour_model,
)
from tests.support.http_server import RoutedHTTPServer, serve_bytes
from tests.support.s3 import MotoS3Server
from tools.publish_model import check_served
from tools.publish_model import main as publish


@pytest.fixture
def classes_file(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(COLOUR_CLASSES) + "\n")
    return path


@pytest.fixture
def blue_image_url(image_server: RoutedHTTPServer) -> str:
    image_server.routes["/publish/blue.png"] = serve_bytes(solid_png((10, 20, 230), (300, 200)), "image/png")
    return image_server.url("/publish/blue.png")


def publish_to(s3_server: MotoS3Server, tmp_path: Path, key: str, *arguments: str) -> None:
    """Run the tool as a user would, uploading to moto S3 at ``key`` via tmp_path/m.tar.gz."""
    publish(
        [
            *arguments, "--output", str(tmp_path / "m.tar.gz"),
            "--s3", f"s3://{MODEL_BUCKET}/{key}", "--endpoint-url", s3_server.endpoint,
        ]
    )  # fmt: skip


def assert_nothing_published(s3: object, tmp_path: Path, key: str) -> None:
    """No archive written, and nothing at all in the key's S3 folder."""
    assert not (tmp_path / "m.tar.gz").exists()
    folder = key.rpartition("/")[0] + "/"
    listed = s3.list_objects_v2(Bucket=MODEL_BUCKET, Prefix=folder)  # type: ignore[attr-defined]
    assert listed.get("KeyCount", 0) == 0


def serve_from(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("MODEL_BUCKET", MODEL_BUCKET)
    monkeypatch.setenv("MODEL_KEY", key)


@pytest.mark.usefixtures("cache_dir")
def test_a_torchscript_file_round_trips_through_s3_and_the_service(
    s3_server: MotoS3Server,
    s3: object,
    tmp_path: Path,
    classes_file: Path,
    blue_image_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tmp_path / "resnet50_jit.pth"
    model.write_bytes(traced_colour_model())
    key = "published/torchscript/model.tar.gz"

    publish_to(
        s3_server, tmp_path, key,
        "--torchscript", str(model), "--classes", str(classes_file),
    )  # fmt: skip
    printed = capsys.readouterr().out
    serve_from(monkeypatch, key)

    assert f'"MODEL_BUCKET": "{MODEL_BUCKET}"' in printed
    assert f'"MODEL_KEY": "{key}"' in printed
    assert label_of(blue_image_url) == "blue"
    assert get_service().models.model().files.manifest["preprocessing"]["crop"] == 224


@pytest.mark.usefixtures("cache_dir")
@pytest.mark.parametrize("mode", ["script", "trace"])
def test_a_module_and_checkpoint_are_scripted_or_traced(
    s3_server: MotoS3Server,
    s3: object,
    tmp_path: Path,
    classes_file: Path,
    blue_image_url: str,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    checkpoint = tmp_path / "weights.pth"
    torch.save(MeanColour().state_dict(), checkpoint)
    key = f"published/{mode}/model.tar.gz"
    factory = f"{MeanColour.__module__}:{MeanColour.__name__}"

    publish_to(
        s3_server, tmp_path, key,
        "--module", factory, "--checkpoint", str(checkpoint), *(["--trace"] if mode == "trace" else []),
        "--classes", str(classes_file), "--resize", "160", "--crop", "128",
    )  # fmt: skip
    serve_from(monkeypatch, key)

    assert label_of(blue_image_url) == "blue"


@pytest.mark.parametrize(
    ("classes", "refusal"),
    [
        ("cat\ndog\n", r"3 outputs but classes\.txt lists 2"),
        ("red\n\ngreen\nblue\n", r"classes\.txt line 2 is empty"),
    ],
    ids=["two classes for three outputs", "a blank line"],
)
def test_a_classes_file_the_service_would_refuse_is_not_published(
    s3_server: MotoS3Server, s3: object, tmp_path: Path, classes: str, refusal: str
) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(traced_colour_model())
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text(classes)
    key = "published/refused-classes/model.tar.gz"

    with pytest.raises(SystemExit, match=refusal):
        publish_to(
            s3_server, tmp_path, key,
            "--torchscript", str(model), "--classes", str(classes_file),
        )  # fmt: skip

    assert_nothing_published(s3, tmp_path, key)


@pytest.mark.usefixtures("cache_dir")
def test_onnx_flag_publishes_both_formats_and_the_service_runs_onnx(
    s3_server: MotoS3Server,
    s3: object,
    tmp_path: Path,
    classes_file: Path,
    blue_image_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tmp_path / "resnet50_jit.pth"
    model.write_bytes(traced_colour_model())
    key = "published/onnx/model.tar.gz"

    publish_to(
        s3_server, tmp_path, key,
        "--torchscript", str(model), "--classes", str(classes_file), "--onnx",
        "--check-image", str(_saved(tmp_path / "red.png", (250, 5, 5))),
    )  # fmt: skip
    printed = capsys.readouterr().out
    serve_from(monkeypatch, key)

    assert "agree within" in printed
    assert "4 photos" in printed  # scikit-image's three and the --check-image
    assert label_of(blue_image_url) == "blue"
    published = s3.get_object(Bucket=MODEL_BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined]
    with tarfile.open(fileobj=io.BytesIO(published)) as archive:
        # The ONNX container reads the manifest and the ONNX model first, and stops there.
        assert archive.getnames() == ["manifest.json", "classes.txt", "model.onnx", "model.pt"]
    assert get_service().models.model().files.onnx_path.name == "model.onnx"  # type: ignore[union-attr]
    assert get_service().models.model().classifier.backend == "onnx"


@pytest.mark.usefixtures("cache_dir")
@pytest.mark.parametrize(
    ("filename", "onnx"),
    [
        ("model.torchscript", False),  # not a suffix the service reads as TorchScript
        ("MODEL.PT", False),  # nor is an upper-case one
        ("._resnet50.pth", False),  # macOS metadata files are skipped on extraction
        ("classes.txt", False),  # would sit beside the real classes.txt
        ("model.onnx", True),  # would be overwritten by the exported ONNX model
    ],
)
def test_a_torchscript_file_under_any_name_is_published_as_one_the_service_serves(
    s3_server: MotoS3Server,
    s3: object,
    tmp_path: Path,
    classes_file: Path,
    blue_image_url: str,
    monkeypatch: pytest.MonkeyPatch,
    filename: str,
    onnx: bool,
) -> None:
    model = tmp_path / "exported" / filename  # beside, not over, the classes file
    model.parent.mkdir()
    model.write_bytes(traced_colour_model())
    key = f"published/named-{filename}/model.tar.gz"

    publish_to(
        s3_server, tmp_path, key,
        "--torchscript", str(model), "--classes", str(classes_file), *(["--onnx"] if onnx else []),
    )  # fmt: skip
    serve_from(monkeypatch, key)
    monkeypatch.setenv("MODEL_BACKEND", "torch")

    assert label_of(blue_image_url) == "blue"


@pytest.mark.usefixtures("cache_dir")
def test_the_model_name_is_not_a_path_in_the_archive(
    s3_server: MotoS3Server,
    s3: object,
    tmp_path: Path,
    classes_file: Path,
    blue_image_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "published/name-with-dots/model.tar.gz"

    publish_to(
        s3_server, tmp_path, key,
        "--module", f"{MeanColour.__module__}:{MeanColour.__name__}", "--name", "../colours",
        "--classes", str(classes_file),
    )  # fmt: skip
    serve_from(monkeypatch, key)

    assert label_of(blue_image_url) == "blue"
    assert get_service().models.model().files.manifest["name"] == "../colours"


@pytest.mark.parametrize(
    ("members", "backends", "cause"),
    [
        # What publish_model wrote for a TorchScript file named model.torchscript.
        ({"model.torchscript": traced_colour_model()}, ("torch",), r"must hold one TorchScript file"),
        # What it wrote for a TorchScript file named model.onnx, with --onnx.
        ({"model.onnx": onnx_colour_model()}, ("torch", "onnx"), r"has only model\.onnx"),
        # A TorchScript file in the ONNX model's place.
        ({"model.onnx": traced_colour_model()}, ("onnx",), r"model\.onnx is not a loadable ONNX model"),
    ],
)
def test_an_archive_the_service_would_refuse_fails_the_check(
    tmp_path: Path, members: dict[str, bytes], backends: tuple[Backend, ...], cause: str
) -> None:
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(tar_gz({**members, "classes.txt": "\n".join(COLOUR_CLASSES).encode()}))

    with pytest.raises(
        ModelUnavailable, match=rf"the service would refuse the archive as written: .*{cause}"
    ):
        check_served(archive, backends)


@pytest.mark.parametrize(
    ("module", "source", "cause"),
    [
        (NoisyColour, "--module", r"probabilities differ by up to"),
        (
            BranchyColour,
            "--module",
            r"torch cannot export this model to ONNX \(Failed to export the model with torch\.export",
        ),
        (
            FourierColour,
            "--torchscript",
            r"torch cannot export this model to ONNX \(Exporting the operator 'aten::fft_rfft'",
        ),
    ],
)
def test_an_onnx_export_that_does_not_match_is_not_published(
    s3_server: MotoS3Server,
    s3: object,
    tmp_path: Path,
    classes_file: Path,
    module: type[torch.nn.Module],
    source: str,
    cause: str,
) -> None:
    key = f"published/{module.__name__}/model.tar.gz"
    if source == "--module":
        given = f"{module.__module__}:{module.__name__}"
    else:
        given = str(tmp_path / "model.pt")
        torch.jit.save(torch.jit.script(module()), given)

    with pytest.raises(SystemExit, match=cause):
        publish_to(
            s3_server, tmp_path, key,
            source, given, "--onnx",
            "--classes", str(classes_file),
        )  # fmt: skip

    assert_nothing_published(s3, tmp_path, key)


def _saved(path: Path, colour: tuple[int, int, int]) -> Path:
    path.write_bytes(solid_png(colour))
    return path
