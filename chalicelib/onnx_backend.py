"""The ONNX Runtime backend: the fast path, for archives that also carry ``model.onnx``.

It imports onnxruntime and numpy only, never torch, so an ONNX-only
deployment ships no PyTorch layer at all. The model's graph is optimised once
at load (ONNX Runtime's full level: constant folding, Conv+BatchNorm and
activation fusion, its blocked memory layout), and a dummy batch checks the
output width against classes.txt and warms the session up, as the
TorchScript backend does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from chalicelib.errors import ModelUnavailable
from chalicelib.prediction import Classifier, check_output_width, first_line, nhwc_batch

BACKEND = "onnx"
FIRST_RELEASE_FOR_NUMPY_2 = (1, 19)


def _refuse_numpy_mismatch() -> None:
    """onnxruntime before 1.19 was built for numpy 1: under numpy 2 its import only
    warns, and its first run then kills the whole process (segfault). Refusing at
    import turns that into a 503 that names the fix."""
    onnxruntime_release = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    if int(np.__version__.split(".")[0]) >= 2 and onnxruntime_release < FIRST_RELEASE_FOR_NUMPY_2:
        raise ImportError(
            f"onnxruntime {onnxruntime.__version__} was built for numpy 1 but numpy {np.__version__} "
            "is installed; pin numpy<2 as requirements-onnx.txt does"
        )


_refuse_numpy_mismatch()


class OnnxClassifier(Classifier):
    backend = BACKEND

    def __init__(self, session: onnxruntime.InferenceSession, classes: tuple[str, ...]) -> None:
        super().__init__(classes)
        self._session = session
        # An exporter that was not told the batch axis is dynamic fixes it at 1;
        # such a model still serves batches, one image per run.
        self._one_at_a_time = session.get_inputs()[0].shape[0] == 1

    def scores(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        nchw = np.ascontiguousarray(nhwc_batch(inputs).transpose(0, 3, 1, 2))
        if self._one_at_a_time and len(nchw) > 1:
            return np.concatenate([_first_output(self._session, image[None]) for image in nchw])
        return _first_output(self._session, nchw)


def load_classifier(
    model_path: Path, classes: tuple[str, ...], input_size: int, threads: int
) -> OnnxClassifier:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # An explicit count, like torch's: the default (one per core) spin-waits on busy cores.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # onnxruntime's errors derive from Exception itself
        raise ModelUnavailable(
            f"{model_path.name} is not a loadable ONNX model ({first_line(error)})."
        ) from error
    _check_signature(session, model_path.name)
    _check_output_width(session, len(classes), input_size)
    return OnnxClassifier(session, classes)


def _check_signature(session: onnxruntime.InferenceSession, filename: str) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        found = ", ".join(f"{i.name} {i.shape}" for i in inputs) or "none"
        raise ModelUnavailable(
            f"{filename} must take one (batch, 3, height, width) float input; it takes {found}."
        )
    batch_axis = inputs[0].shape[0]
    if isinstance(batch_axis, int) and batch_axis != 1:
        raise ModelUnavailable(
            f"{filename} has its batch axis fixed at {batch_axis}; export it with a dynamic batch axis."
        )


def _first_output(session: onnxruntime.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """The scores: a model's first output (exporters sometimes add auxiliary ones after it)."""
    return session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: batch})[0]


def _check_output_width(session: onnxruntime.InferenceSession, class_count: int, input_size: int) -> None:
    dummy = np.zeros((1, 3, input_size, input_size), dtype=np.float32)
    try:
        output = _first_output(session, dummy)
    except Exception as error:  # onnxruntime's errors derive from Exception itself
        raise ModelUnavailable(
            f"The model fails on a 1x3x{input_size}x{input_size} input ({first_line(error)}); "
            "check the manifest's crop size."
        ) from error
    check_output_width(tuple(output.shape), class_count)
