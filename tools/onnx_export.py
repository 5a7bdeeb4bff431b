"""Export a model to ONNX, and refuse the export unless both backends agree.

Used by ``build_demo_model.py`` and ``publish_model.py --onnx``. The export
is of the same model as the TorchScript file in the same archive: from the
eager module through ``torch.export`` when there is one, else from the
TorchScript file itself. Either way the weights live inside the one ``.onnx``
file and the batch axis is dynamic.

Agreement is checked through the service's own loaders and preprocessing:
both backends must give probabilities within ``TOLERANCE`` on random inputs
and on real photographs, and the same top-1 on the photographs.
"""

from __future__ import annotations

import io
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data

from chalicelib import onnx_backend, torchscript_backend
from chalicelib.decoding import decode_image
from chalicelib.errors import first_line
from chalicelib.imaging import Preprocessing, to_model_input
from chalicelib.prediction import Classifier, softmax
from chalicelib.settings import DEFAULT_MAX_IMAGE_PIXELS

ONNX_FILENAME = "model.onnx"
DYNAMO_OPSET = 18  # torch.export's exporter writes 18 whatever it is asked
TORCHSCRIPT_OPSET = 17
ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;]*m")
TOLERANCE = 1e-4
RANDOM_INPUTS = 4


@dataclass(frozen=True)
class Agreement:
    max_probability_difference: float
    images_checked: int
    random_inputs_checked: int


class ExportRefused(RuntimeError):
    pass


def export_module(module: torch.nn.Module, crop: int) -> bytes:
    """Export an eager module through ``torch.export`` (torch's current exporter).

    Its graph is the cleaner one: the legacy exporter leaves shape arithmetic
    in models with TensorFlow-style "SAME" padding (timm's EfficientNets),
    which made ONNX Runtime about 18% slower on the demo model here.
    """
    batch = torch.export.Dim("batch", min=1, max=1024)

    def export(path: Path) -> None:
        torch.onnx.export(
            module.eval(),
            (torch.zeros(1, 3, crop, crop),),
            str(path),
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=["input"],
            output_names=["scores"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )

    return _exported(export)


def export_torchscript(torchscript_bytes: bytes, crop: int) -> bytes:
    """Export a TorchScript file, scripted or traced: what the tutorial's users have.

    Only torch's TorchScript-based exporter (``dynamo=False``) reads TorchScript.
    """
    module = torch.jit.load(io.BytesIO(torchscript_bytes), map_location="cpu").eval()

    def export(path: Path) -> None:
        with warnings.catch_warnings():
            # That exporter is deprecated, and a ScriptModule has no Python
            # signature to read input names from (ours are given): both warnings are noise here.
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
            torch.onnx.export(
                module,
                (torch.zeros(1, 3, crop, crop),),
                str(path),
                dynamo=False,
                opset_version=TORCHSCRIPT_OPSET,
                input_names=["input"],
                output_names=["scores"],
                dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}},
            )

    return _exported(export)


def _exported(export: Callable[[Path], None]) -> bytes:
    """Run an export into a scratch folder; one self-contained file, loadable by the Lambda onnxruntime."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / ONNX_FILENAME
        try:
            export(path)
        except RuntimeError as error:  # torch.onnx.OnnxExporterError and the tracer's own
            reason = ANSI_ESCAPES.sub("", first_line(error))
            raise ExportRefused(f"torch cannot export this model to ONNX ({reason})") from error
        leftovers = sorted(p.name for p in Path(scratch).iterdir() if p != path)
        if leftovers:
            raise ExportRefused(f"the export wrote external data files {leftovers}; it must be one file")
        return path.read_bytes()


def check_agreement(
    torchscript_bytes: bytes,
    onnx_bytes: bytes,
    classes: Sequence[str],
    preprocessing: Preprocessing,
    photos: Sequence[bytes],
) -> Agreement:
    """Run both models as the service would; raise ``ExportRefused`` unless they match."""
    with tempfile.TemporaryDirectory() as scratch:
        torchscript_path = Path(scratch) / "model.pt"
        onnx_path = Path(scratch) / ONNX_FILENAME
        torchscript_path.write_bytes(torchscript_bytes)
        onnx_path.write_bytes(onnx_bytes)
        names = tuple(classes)
        torchscript = torchscript_backend.load_classifier(torchscript_path, names, preprocessing.crop, 1)
        onnx = onnx_backend.load_classifier(onnx_path, names, preprocessing.crop, 1)
    generator = np.random.default_rng(0)
    shape = (3, preprocessing.crop, preprocessing.crop)
    random_inputs = [generator.standard_normal(shape, dtype=np.float32) for _ in range(RANDOM_INPUTS)]
    photo_inputs = [
        to_model_input(decode_image(photo, max_pixels=DEFAULT_MAX_IMAGE_PIXELS), preprocessing)
        for photo in photos
    ]
    difference = _max_difference(torchscript, onnx, random_inputs, check_top1=False)
    if photo_inputs:
        difference = max(difference, _max_difference(torchscript, onnx, photo_inputs, check_top1=True))
    return Agreement(difference, len(photo_inputs), len(random_inputs))


def _max_difference(
    first: Classifier, second: Classifier, inputs: list[np.ndarray], *, check_top1: bool
) -> float:
    expected, actual = softmax(first.scores(inputs)), softmax(second.scores(inputs))
    if check_top1:
        for index, (left, right) in enumerate(zip(expected.argmax(1), actual.argmax(1), strict=True)):
            if left != right:
                raise ExportRefused(
                    f"photo {index}: TorchScript says {first.classes[left]!r}, "
                    f"ONNX says {second.classes[right]!r}"
                )
    difference = float(np.abs(expected - actual).max())
    if difference > TOLERANCE:
        raise ExportRefused(
            f"probabilities differ by up to {difference:.2g} between TorchScript and ONNX "
            f"(allowed {TOLERANCE:g})"
        )
    return difference


def sample_photos() -> list[bytes]:
    """Real photographs from scikit-image, encoded as PNG, as a client would send them."""
    encoded = []
    for photo in (skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut()):
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded
