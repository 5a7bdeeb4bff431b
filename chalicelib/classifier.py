"""The loaded TorchScript model: input arrays -> probabilities -> top-k (class, confidence).

Preprocess, inference and postprocess stay separate small steps, as in
TorchServe's image classifier. Loading checks the model against its class
list with one forward pass on a dummy input, so a mismatched archive fails at
load with both numbers named, not later with a wrong label; that pass also
warms the model up before the first real request. The model is frozen
(``torch.jit.freeze``) at load.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chalicelib.errors import ModelUnavailable


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float


class Classifier:
    def __init__(self, module: torch.jit.ScriptModule, classes: tuple[str, ...]) -> None:
        self._module = module
        self.classes = classes

    def predict(self, inputs: Sequence[np.ndarray], top_k: int = 1) -> list[list[Prediction]]:
        """Classify CHW float32 arrays in one forward pass; the ``top_k`` best for each, best first.

        The arrays are CHW views of channels-last memory (see imaging), so the
        batch is stacked as NHWC and handed to the model as a channels-last
        NCHW view: one copy for a batch, none for a single image.
        """
        channels_last = [array.transpose(1, 2, 0) for array in inputs]
        nhwc = channels_last[0][None] if len(channels_last) == 1 else np.stack(channels_last)
        batch = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
        with torch.inference_mode():
            probabilities = torch.softmax(self._module(batch), dim=1)
            confidences, indices = probabilities.topk(top_k, dim=1)
        return [
            [
                Prediction(label=self.classes[int(i)], confidence=float(c))
                for c, i in zip(row_c, row_i, strict=True)
            ]
            for row_c, row_i in zip(confidences, indices, strict=True)
        ]


def set_thread_count(threads: int) -> None:
    """Pin intra-op threads: torch's default (one per core) spin-waits on busy cores.

    On two shared cores a forward pass with the default can stall for over a
    second; an explicit count keeps latency flat.
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def load_classifier(model_path: Path, classes: tuple[str, ...], input_size: int) -> Classifier:
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; it is still the format the
            # fast.ai tutorial's users export, and it loads without Python code.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            module = torch.jit.load(str(model_path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        raise ModelUnavailable(
            f"{model_path.name} is not a loadable TorchScript model ({_first_line(error)})."
        ) from error
    module.eval()
    frozen = _frozen(module)
    _check_output_width(frozen, len(classes), input_size)
    return Classifier(frozen, classes)


def _frozen(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Inline weights and fold constants: about 10% faster here, the same outputs.

    A model that cannot be frozen (some exotic TorchScript can't) runs as it is.
    """
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
            f"The model fails on a 1x3x{input_size}x{input_size} input ({_first_line(error)}); "
            "check the manifest's crop size."
        ) from error
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelUnavailable(
            f"The model must return a (batch, classes) tensor of scores; it returned {shape}."
        )
    if output.shape[1] != class_count:
        raise ModelUnavailable(
            f"The model has {output.shape[1]} outputs but classes.txt lists {class_count} "
            "classes; they must match."
        )


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
