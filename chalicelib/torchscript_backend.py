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

from chalicelib.errors import ModelUnavailable, first_line
from chalicelib.prediction import Classifier, nhwc_batch

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
            output = self._module(batch)
        if not isinstance(output, torch.Tensor):
            raise ModelUnavailable(
                "The model must return a (batch, classes) tensor of scores; "
                f"it returned {type(output).__name__}."
            )
        return output.numpy()


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
    classifier = TorchScriptClassifier(_frozen(module), classes)
    classifier.check_against_classes(input_size)
    return classifier


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
