"""Validate a model, pack it as ``model.tar.gz`` and upload it to S3.

Takes either a TorchScript file (what the fast.ai tutorial exports), or an
``nn.Module`` factory plus a state-dict checkpoint, which it scripts (default)
or traces on an example input. Before anything is uploaded it loads the
result the way the service does (``chalicelib.torchscript_backend``): it must
load on the CPU, run on a dummy input of the manifest's crop size, and have
exactly one output per line of ``classes.txt``.

With ``--onnx`` it also exports ``model.onnx`` next to the TorchScript file
(the service's fast backend): from the module through ``torch.export`` when
given ``--module`` (the faster graph), else from the TorchScript file. It
publishes only if the two agree on random inputs and real photographs
(scikit-image's, plus any ``--check-image``).

The tool, not the input file, names the models in the archive (``model.pt``,
``model.onnx``): a valid model saved as ``model.torchscript``, ``MODEL.PT``
or ``classes.txt`` would otherwise be skipped by the service or clash with
another member. The archive, once written, is then loaded by the service
itself (``ModelHolder``), once with each backend it carries; only
an archive the service accepts reaches ``--output`` and S3.

Example::

    python -m tools.publish_model --torchscript resnet50_jit.pth --classes classes.txt \\
        --resize 256 --crop 224 --onnx --s3 s3://my-bucket/models/model.tar.gz

It prints the ``MODEL_BUCKET``/``MODEL_KEY`` lines for ``.chalice/config.json``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import torch

from chalicelib.backends import Backend
from chalicelib.errors import ModelUnavailable
from chalicelib.imaging import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing
from chalicelib.model_holder import ModelHolder
from chalicelib.model_store import parse_classes
from chalicelib.settings import Settings
from chalicelib.torchscript_backend import load_classifier
from tools.model_archive import write_archive
from tools.onnx_export import (
    ONNX_FILENAME,
    ExportRefused,
    check_agreement,
    export_module,
    export_torchscript,
    sample_photos,
)

TORCHSCRIPT_FILENAME = "model.pt"
# Each model file the archive may carry, and the MODEL_BACKEND that serves it.
SERVED_BY: dict[str, Backend] = {TORCHSCRIPT_FILENAME: "torch", ONNX_FILENAME: "onnx"}


def module_from_factory(factory: str, checkpoint: Path | None) -> torch.nn.Module:
    """Build ``package.module:callable`` and load its weights."""
    module_name, _, attribute = factory.partition(":")
    model = getattr(importlib.import_module(module_name), attribute)()
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval()


def torchscript_of(model: torch.nn.Module, crop: int, trace: bool) -> bytes:
    example = torch.zeros(1, 3, crop, crop)
    with torch.no_grad():
        scripted = torch.jit.trace(model, example) if trace else torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def validate(
    model_bytes: bytes, model_filename: str, classes: Sequence[str], preprocessing: Preprocessing
) -> None:
    """Load and run the model exactly as the service will; raise with the reason if it cannot."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / model_filename
        path.write_bytes(model_bytes)
        load_classifier(path, tuple(classes), preprocessing.crop, threads=1)


def check_served(archive: Path, served_by: Sequence[Backend]) -> None:
    """Load the archive through the service itself, once per backend; raise if it would refuse it.

    What is checked is the archive as written (member names, ``classes.txt``
    and ``manifest.json`` as the service reads them back), on the service's
    own path: its settings, model holder, store, backend choice and loaders, so the check
    cannot drift from what a deployment does.
    """
    with tempfile.TemporaryDirectory() as cache:
        for backend in served_by:
            environ = {"MODEL_PATH": str(archive), "MODEL_CACHE_DIR": cache, "MODEL_BACKEND": backend}
            try:
                ModelHolder(Settings.from_environ(environ).model).model()
            except ModelUnavailable as error:
                raise ModelUnavailable(f"the service would refuse the archive as written: {error}") from error


def write_checked_archive(
    output: Path, models: Mapping[str, bytes], classes: Sequence[str], manifest: Mapping[str, Any]
) -> None:
    """Write ``output`` only if ``check_served`` accepts the archive.

    It is written beside ``output`` and moved there after the check, so a
    refused archive never sits where it could be uploaded or deployed, and an
    earlier good one is kept.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".publish-") as scratch:
        written = Path(scratch) / output.name
        write_archive(written, models, classes, manifest)
        check_served(written, [SERVED_BY[filename] for filename in models])
        written.replace(output)


def upload(archive: Path, destination: str, endpoint_url: str | None) -> tuple[str, str]:
    parts = urlsplit(destination)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise SystemExit(f"--s3 must look like s3://bucket/key/model.tar.gz, got {destination!r}")
    bucket, key = parts.netloc, parts.path.lstrip("/")
    boto3.client("s3", endpoint_url=endpoint_url).upload_file(str(archive), bucket, key)
    return bucket, key


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--torchscript", type=Path, help="a TorchScript file (*.pt or *.pth)")
    source.add_argument("--module", help="package.module:callable that returns the nn.Module")
    parser.add_argument("--checkpoint", type=Path, help="state dict for --module")
    parser.add_argument("--trace", action="store_true", help="trace --module instead of scripting it")
    parser.add_argument("--classes", type=Path, required=True, help="classes.txt, one name per line")
    parser.add_argument("--onnx", action="store_true", help="also export model.onnx, checked against it")
    parser.add_argument(
        "--check-image", type=Path, action="append", default=[], help="a photo both backends must agree on"
    )
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default="bilinear")
    parser.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN)
    parser.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD)
    parser.add_argument("--name", default="model")
    parser.add_argument("--version", default="1")
    parser.add_argument("--output", type=Path, default=Path("build/model.tar.gz"))
    parser.add_argument("--s3", help="s3://bucket/key to upload to; without it, only --output is written")
    parser.add_argument("--endpoint-url", help="an S3-compatible endpoint (MinIO, moto, ...)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    preprocessing_section: dict[str, Any] = {
        "resize": args.resize,
        "crop": args.crop,
        "interpolation": args.interpolation,
        "mean": list(args.mean),
        "std": list(args.std),
    }
    manifest = {"name": args.name, "version": args.version, "preprocessing": preprocessing_section}
    try:
        preprocessing = Preprocessing.from_manifest(manifest)
        classes = parse_classes(args.classes.read_bytes())
        eager = None if args.module is None else module_from_factory(args.module, args.checkpoint)
        if eager is None:
            source_name, model_bytes = args.torchscript.name, args.torchscript.read_bytes()
        else:
            source_name, model_bytes = TORCHSCRIPT_FILENAME, torchscript_of(eager, args.crop, args.trace)
        validate(model_bytes, source_name, classes, preprocessing)
        models = {TORCHSCRIPT_FILENAME: model_bytes}
        if args.onnx:
            models[ONNX_FILENAME] = (
                export_torchscript(model_bytes, preprocessing.crop)
                if eager is None
                else export_module(eager, preprocessing.crop)
            )
            photos = sample_photos() + [path.read_bytes() for path in args.check_image]
            agreement = check_agreement(model_bytes, models[ONNX_FILENAME], classes, preprocessing, photos)
            print(
                f"TorchScript and ONNX agree within {agreement.max_probability_difference:.1g} on "
                f"{agreement.random_inputs_checked} random inputs and {agreement.images_checked} photos"
            )
        write_checked_archive(args.output, models, classes, manifest)
    except (ModelUnavailable, ExportRefused) as error:
        raise SystemExit(f"not published: {error}") from error
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes, {len(classes)} classes)")
    if args.s3:
        bucket, key = upload(args.output, args.s3, args.endpoint_url)
        print(f"uploaded to s3://{bucket}/{key}\n\nSet these for the stage in .chalice/config.json:")
        print(f'  "MODEL_BUCKET": "{bucket}",\n  "MODEL_KEY": "{key}"')


if __name__ == "__main__":
    sys.exit(main())
