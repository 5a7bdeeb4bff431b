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

from chalicelib.errors import ModelUnavailable, first_line
from chalicelib.prediction import Classifier, nhwc_batch

BACKEND = "onnx"


class OnnxClassifier(Classifier):
    backend = BACKEND
    runtime_errors = (Exception,)  # onnxruntime's errors derive from Exception itself

    def __init__(self, session: onnxruntime.InferenceSession, classes: tuple[str, ...]) -> None:
        super().__init__(classes)
        self._session = session
        (model_input,) = session.get_inputs()
        self._input_name = model_input.name
        # The scores are the first output; exporters sometimes add auxiliary ones after it.
        self._output_names = [session.get_outputs()[0].name]
        # An exporter that was not told the batch axis is dynamic fixes it at 1;
        # such a model still serves batches, one image per run.
        self._one_at_a_time = model_input.shape[0] == 1

    def scores(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        nchw = np.ascontiguousarray(nhwc_batch(inputs).transpose(0, 3, 1, 2))
        if self._one_at_a_time and len(nchw) > 1:
            return np.concatenate([self._run(image[None]) for image in nchw])
        return self._run(nchw)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run(self._output_names, {self._input_name: batch})[0]


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
    classifier = OnnxClassifier(session, classes)
    classifier.check_against_classes(input_size)
    return classifier


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
