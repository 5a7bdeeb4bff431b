"""The TorchScript backend: the format the fast.ai tutorial exports, run by torch.

Imported only when a model is loaded with this backend, never with app.py, so
the ONNX path and requests that never reach a model do not pay for torch.
Loading freezes the module (``torch.jit.freeze``: weights inlined, constants
folded, about 10% faster here with the same outputs) and runs one dummy batch
that checks the output width against classes.txt and warms the model up.

Forward passes run on the classifier's own threads, each with a reserve of
memory on its heap that the passes' outputs are carved from and that stays
(see ``_ForwardMemory``). Without it, every pass has glibc map fresh memory
for most of its outputs, then hand it back: the pass faults in and zeroes
its working memory again each time, which was most of this backend's time
outside the model, and more on some threads than others (the dev server's
thread per connection made it look like a cost per new thread). ONNX
Runtime needs none of this: it keeps an arena of its own between runs.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from chalicelib.errors import ModelUnavailable, first_line
from chalicelib.prediction import Classifier, nhwc_batch

BACKEND = "torchscript"
# Room for an ImageNet-sized model's pass at batch 4 (EfficientNet-Lite0, ResNet-50);
# a larger pass takes the rest from fresh memory, as it did without a reserve.
WORKING_MEMORY_BYTES = 128 * 1024 * 1024
# Below glibc's lowest mmap threshold (128 KiB), so each block comes from the thread's heap.
RESERVE_BLOCK_BYTES = 120 * 1024


class TorchScriptClassifier(Classifier):
    backend = BACKEND

    def __init__(self, module: torch.jit.ScriptModule, classes: tuple[str, ...], threads: int) -> None:
        super().__init__(classes)
        self._module = module
        # Started when first needed and then kept; they end when the
        # classifier is dropped (a model refresh), and their reserves with them.
        self._forward_threads = ThreadPoolExecutor(
            max_workers=_concurrent_passes(threads),
            thread_name_prefix="torchscript-forward",
            initializer=_ForwardMemory.reserve_for_this_thread,
        )

    def scores(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        # The NHWC batch seen as NCHW is exactly torch's channels-last layout: no copy.
        batch = torch.from_numpy(nhwc_batch(inputs)).permute(0, 3, 1, 2)
        output = self._forward_threads.submit(self._forward, batch).result()
        if not isinstance(output, torch.Tensor):
            raise ModelUnavailable(
                "The model must return a (batch, classes) tensor of scores; "
                f"it returned {type(output).__name__}."
            )
        return output.numpy()

    def _forward(self, batch: torch.Tensor) -> object:
        with torch.inference_mode():  # a per-thread mode: entered on the thread that runs the pass
            return self._module(batch)


class _ForwardMemory:
    """A free region on this thread's heap that forward passes reuse, held while the thread lives.

    It rests on two documented glibc rules (mallopt(3)): a request at or
    above the mmap threshold is served from the free list when a free chunk
    fits, and only mapped when none does; and free memory goes back to the
    kernel only from the top of the heap (or by malloc_trim, which nothing
    here calls). Blocks allocated one after another
    grow this thread's heap; the last stays allocated, so once the others
    are freed they form one free region that is never the top. The passes'
    outputs are carved from it and return to it, so after the first pass
    they touch no fresh memory. Pages no pass touches cost nothing.
    """

    _of_this_thread = threading.local()

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._free = libc.free
        blocks = [
            libc.malloc(RESERVE_BLOCK_BYTES) for _ in range(WORKING_MEMORY_BYTES // RESERVE_BLOCK_BYTES)
        ]
        self._guard = blocks.pop()  # keeps the region below it off the top of the heap
        for block in blocks:
            self._free(block)

    def __del__(self) -> None:
        # At the thread's end: the region becomes the top, and glibc trims it.
        self._free(self._guard)

    @classmethod
    def reserve_for_this_thread(cls) -> None:
        """Reserve on this thread's heap; a no-op where the C library is not glibc."""
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        cls._of_this_thread.reserve = cls(libc)


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
    classifier = TorchScriptClassifier(_frozen(module), classes, threads)
    classifier.check_against_classes(input_size)
    return classifier


def _set_thread_count(threads: int) -> None:
    """Pin intra-op threads: torch's default (one per core) spin-waits on busy cores.

    On two shared cores a forward pass with the default can stall for over a
    second; an explicit count keeps latency flat. The count is per process.
    """
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _concurrent_passes(threads: int) -> int:
    """As many forward passes at once as the cores can run with ``threads`` each."""
    return max(1, (os.cpu_count() or 1) // threads)


def _frozen(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A model that cannot be frozen (some exotic TorchScript can't) runs as it is."""
    try:
        return torch.jit.freeze(module)
    except RuntimeError:
        return module
