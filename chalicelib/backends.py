"""Which runtime runs the model: the MODEL_BACKEND rule, and importing it only when chosen.

``auto`` (the default) takes ONNX Runtime when the archive carries an ONNX
model and onnxruntime is installed, and TorchScript otherwise: a TorchScript
deployment (torch layer, no onnxruntime) keeps working with archives that
also carry ``model.onnx``, and an ONNX-only deployment (no torch) serves
them fast. ``torch`` or ``onnx`` forces one; a forced backend that cannot run
is a 503 that says why, never a silent fall back to the other.

Backends are imported here and nowhere else, lazily: importing torch costs
seconds (plus loading its libraries from the layer on Lambda), and the ONNX path must never
import it at all.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from chalicelib.errors import ModelUnavailable, TorchUnavailable, first_line

if TYPE_CHECKING:
    from chalicelib.model_store import ModelFiles
    from chalicelib.prediction import Classifier

Backend = Literal["torch", "onnx"]
BACKEND_SETTINGS = ("auto", "torch", "onnx")


def onnxruntime_installed() -> bool:
    """Whether onnxruntime is on the path, found without importing it."""
    return importlib.util.find_spec("onnxruntime") is not None


def expected_backend(setting: str) -> Backend:
    """The backend to import while the archive downloads, before its contents are known."""
    if setting == "torch" or (setting == "auto" and not onnxruntime_installed()):
        return "torch"
    return "onnx"


def model_formats(setting: str) -> tuple[str, ...]:
    """The model files worth extracting under MODEL_BACKEND, best first (see model_store.MODEL_FORMATS)."""
    if setting == "torch" or (setting == "auto" and not onnxruntime_installed()):
        return ("torchscript",)
    return ("onnx",) if setting == "onnx" else ("onnx", "torchscript")


def choose_backend(setting: str, files: ModelFiles) -> Backend:
    """The backend for this archive under MODEL_BACKEND, or a 503 that says why there is none."""
    if setting == "onnx" or (setting == "auto" and files.onnx_path is not None and onnxruntime_installed()):
        if files.onnx_path is None:
            raise ModelUnavailable(
                "MODEL_BACKEND is 'onnx' but the model archive has no model.onnx; publish the model "
                "with `tools/publish_model.py --onnx`, or set MODEL_BACKEND to 'auto' or 'torch'."
            )
        return "onnx"
    if files.torchscript_path is None:
        reason = "MODEL_BACKEND is 'torch'" if setting == "torch" else "onnxruntime is not installed here"
        raise ModelUnavailable(
            f"The model archive has only model.onnx, but {reason}: deploy the onnx stage "
            "(make package-onnx) or add a TorchScript file to the archive."
        )
    return "torch"


def import_backend(backend: Backend) -> ModuleType:
    """The backend's module, imported on first use; on Lambda torch's layer is loaded first."""
    if backend == "torch":
        importlib.import_module("chalicelib.torch_layer")
        try:
            return importlib.import_module("chalicelib.torchscript_backend")
        except ImportError as error:
            # No layer at all, or one built for another runtime (a glibc or ABI mismatch).
            raise TorchUnavailable(
                f"The model runs on TorchScript, but torch cannot be imported ({first_line(error)}); "
                "attach the PyTorch layer built for this runtime (make layer), or deploy the onnx stage."
            ) from error
    try:
        return importlib.import_module("chalicelib.onnx_backend")
    except ImportError as error:
        raise ModelUnavailable(
            f"MODEL_BACKEND asks for ONNX Runtime, but onnxruntime cannot be imported ({error}); "
            "deploy the onnx stage (make package-onnx), or set MODEL_BACKEND to 'torch'."
        ) from error


def load(backend: Backend, files: ModelFiles, input_size: int, threads: int) -> Classifier:
    model_path = files.onnx_path if backend == "onnx" else files.torchscript_path
    assert isinstance(model_path, Path)  # choose_backend picked a backend whose file exists
    classifier: Classifier = import_backend(backend).load_classifier(
        model_path, files.classes, input_size, threads
    )
    return classifier
