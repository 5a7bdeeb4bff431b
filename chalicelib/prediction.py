"""What every inference backend shares: the batch layout in, the scores out, top-k.

A backend (TorchScript or ONNX Runtime) only turns a batch into a
``(batch, classes)`` array of scores. Softmax, top-k and label mapping, as in
TorchServe's image classifier, happen here once in numpy, so both backends
answer in exactly the same shape and the same order, and this module (like
the ONNX path) never imports torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chalicelib.errors import ModelUnavailable, first_line


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float


class Classifier(ABC):
    """A loaded model, whichever runtime runs it: a backend implements ``scores``."""

    backend: str
    # What the runtime raises when the model cannot run an input.
    runtime_errors: tuple[type[Exception], ...] = (RuntimeError,)

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.classes = classes

    def check_against_classes(self, input_size: int) -> None:
        """Run one dummy input at load: the model must score every class in classes.txt.

        A mismatched archive then fails at load with both numbers named,
        instead of answering with a wrong label later; the pass also warms the
        model up on the layout requests use.
        """
        # A CHW view of channels-last memory, which is what imaging hands over.
        dummy = np.zeros((input_size, input_size, 3), dtype=np.float32).transpose(2, 0, 1)
        try:
            scores = self.scores([dummy])
        except ModelUnavailable:
            raise
        except self.runtime_errors as error:
            raise ModelUnavailable(
                f"The model fails on a 1x3x{input_size}x{input_size} input ({first_line(error)}); "
                "check the manifest's crop size."
            ) from error
        if scores.ndim != 2:
            raise ModelUnavailable(
                f"The model must return a (batch, classes) array of scores; it returned shape {scores.shape}."
            )
        if scores.shape[1] != len(self.classes):
            raise ModelUnavailable(
                f"The model has {scores.shape[1]} outputs but classes.txt lists {len(self.classes)} "
                "classes; they must match."
            )

    @abstractmethod
    def scores(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """The model's raw ``(batch, classes)`` scores for CHW float32 inputs, in one pass."""

    def predict(self, inputs: Sequence[np.ndarray], top_k: int = 1) -> list[list[Prediction]]:
        """The ``top_k`` best predictions for each input, best first."""
        return top_predictions(self.scores(inputs), self.classes, top_k)


def nhwc_batch(inputs: Sequence[np.ndarray]) -> np.ndarray:
    """Stack CHW inputs as one NHWC array: one copy for a batch, none for a single image.

    The inputs are CHW views of channels-last memory (see imaging), so NHWC
    is their natural layout; each backend views or copies it as it needs.
    """
    channels_last = [array.transpose(1, 2, 0) for array in inputs]
    return channels_last[0][None] if len(channels_last) == 1 else np.stack(channels_last)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities from each row of raw scores (shifted by the row maximum, so never overflowing)."""
    shifted = scores.astype(np.float32) - scores.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def top_predictions(scores: np.ndarray, classes: tuple[str, ...], top_k: int) -> list[list[Prediction]]:
    """Softmax over each row of scores, then the ``top_k`` best labels, best first."""
    probabilities = softmax(scores)
    # A stable sort keeps the lower index first on ties, as torch.topk does.
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [
        [Prediction(label=classes[int(index)], confidence=float(row[index])) for index in indices]
        for row, indices in zip(probabilities, best, strict=True)
    ]
