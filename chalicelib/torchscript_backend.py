"""The TorchScript backend: the format the fast.ai tutorial exports, run by torch.

Imported only when a model is loaded with this backend, never with app.py, so
the ONNX path and requests that never reach a model do not pay for torch.
Loading freezes the module (``torch.jit.freeze``: weights inlined, constants
folded, about 10% faster here with the same outputs) and runs one dummy batch
that checks the output width against classes.txt and warms the model up.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from chalicelib.errors import ModelUnavailable
from chalicelib.prediction import Classifier, check_output_width, first_line, nhwc_batch

BACKEND = "torchscript"


class TorchScriptClassifier(Classifier):
    backend = BACKEND

    def __init__(self, module: torch.jit.ScriptModule, classes: tuple[str, ...]) -> None:
        super().__init__(classes)
        self._module = module

    def scores(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        # The NHWC batch seen as NCHW is exactly torch's channels-last layout: no copy.
        batch = torch.from_numpy(nhwc_batch(inputs)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            return self._module(batch).numpy()


def load_classifier(
    model_path: Path, classes: tuple[str, ...], input_size: int, threads: int
) -> TorchScriptClassifier:
    _set_thread_count(threads)
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; it is still the format the
            # fast.ai tutorial's users export, and it loads without Python code.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            module = torch.jit.load(str(model_path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        raise ModelUnavailable(
            f"{model_path.name} is not a loadable TorchScript model ({first_line(error)})."
        ) from error
    module.eval()
    frozen = _frozen(module)
    _check_output_width(frozen, len(classes), input_size)
    return TorchScriptClassifier(frozen, classes)


def _set_thread_count(threads: int) -> None:
    """Pin intra-op threads: torch's default (one per core) spin-waits on busy cores.

    On two shared cores a forward pass with the default can stall for over a
    second; an explicit count keeps latency flat. The count is per process.
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _frozen(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A model that cannot be frozen (some exotic TorchScript can't) runs as it is."""
    try:
        return torch.jit.freeze(module)
    except RuntimeError:
        return module


def _check_output_width(module: torch.jit.ScriptModule, class_count: int, input_size: int) -> None:
    # Channels-last like real inputs, so this pass also warms up the path requests take.
    dummy = torch.zeros(1, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            output = module(dummy)
    except RuntimeError as error:
        raise ModelUnavailable(
            f"The model fails on a 1x3x{input_size}x{input_size} input ({first_line(error)}); "
            "check the manifest's crop size."
        ) from error
    if not isinstance(output, torch.Tensor):
        raise ModelUnavailable(
            f"The model must return a (batch, classes) tensor of scores; it returned {type(output).__name__}."
        )
    check_output_width(tuple(output.shape), class_count)
