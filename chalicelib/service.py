"""The request path, wired together: URL -> image bytes -> input -> prediction.

One ``ClassificationService`` exists per distinct ``Settings`` (see
``current``), around the ``ModelHolder`` for the settings the model depends
on; the holder keeps the loaded model for the life of the process (see
model_holder). This module imports numpy, Pillow and urllib3, so it is
imported on the first request, never with ``app.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from chalicelib import observability
from chalicelib.budgets import MemoryBudget, PixelAllowance
from chalicelib.decoding import EncodedImage, decode, decoding_bytes, open_image, plan_shrink
from chalicelib.errors import ClassifierError, InternalError, InvalidRequest
from chalicelib.fetch import ImageFetcher
from chalicelib.imaging import Preprocessing, to_model_input
from chalicelib.model_holder import ModelHolder
from chalicelib.payload import ImageInput, Invocation
from chalicelib.prediction import Prediction
from chalicelib.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Fetched:
    data: bytes
    source: str  # how the caller sent it, for messages (payload.ImageInput.source)


@dataclass(frozen=True)
class Outcome:
    """What became of one input: its predictions, or the error that stopped it."""

    predictions: list[Prediction] | None = None
    error: ClassifierError | None = None


class ClassificationService:
    def __init__(self, settings: Settings, holder: ModelHolder) -> None:
        self.settings = settings
        self.models = holder
        self._fetcher = ImageFetcher(settings.fetch, settings.url_policy)
        self._decode_budget = MemoryBudget(settings.max_decode_bytes)

    def classify(self, invocation: Invocation) -> list[Outcome]:
        """Top-k predictions per input, in input order.

        On a cold container the model loads in the background while the
        inputs are fetched and their headers read; an input's error waits
        for the load too, so a broken model is reported first (as a 503) and
        no load is left running once the response is sent (Lambda freezes a
        container between requests).

        A single input's error is raised, so it becomes the response. In a
        batch each input fails on its own and its error takes its place: the
        inputs are fetched concurrently within one shared deadline, their
        headers read in input order against the request's pixel allowance,
        decoded side by side as far as the decoding memory budget allows, and
        classified in one forward pass.
        """
        self.models.prepare()
        opened = self._open_all(invocation)
        model = self.models.model()
        top_k = invocation.top_k or 1
        if top_k > len(model.classifier.classes):
            raise InvalidRequest(
                f"top_k must be between 1 and {len(model.classifier.classes)} (the number of classes), "
                f"got {top_k}."
            )
        observability.note(
            input_kind=("batch of " if invocation.batch else "") + invocation.inputs[0].kind,
            items=len(invocation.inputs),
            model_version=model.files.version,
        )

        def decode_input(image: EncodedImage) -> np.ndarray:
            return self._decode(image, model.preprocessing)

        if not invocation.batch:
            if isinstance(opened[0], ClassifierError):
                raise opened[0]
            prepared: list[np.ndarray | ClassifierError] = [decode_input(opened[0])]
        else:
            with ThreadPoolExecutor(max_workers=len(opened), thread_name_prefix="decode") as pool:
                prepared = _each_item(pool, decode_input, opened)
        arrays = [item for item in prepared if isinstance(item, np.ndarray)]
        with observability.timer("inference_ms"):
            predictions = iter(model.classifier.predict(arrays, top_k) if arrays else [])
        return [
            Outcome(error=item)
            if isinstance(item, ClassifierError)
            else Outcome(predictions=next(predictions))
            for item in prepared
        ]

    def _open_all(self, invocation: Invocation) -> list[EncodedImage | ClassifierError]:
        """Each input fetched and its header read, or its error; a batch's fetches run side by side."""
        deadline = time.monotonic() + self.settings.fetch.deadline
        allowance = PixelAllowance(self.settings.max_request_pixels)

        def fetch(item: ImageInput) -> _Fetched:
            return _Fetched(self._fetch(item, deadline), item.source)

        def open_header(fetched: _Fetched) -> EncodedImage:
            image = open_image(fetched.data, max_pixels=self.settings.max_image_pixels, source=fetched.source)
            allowance.spend(image.pixels)
            return image

        if not invocation.batch:
            return [_item_outcome(open_header, _item_outcome(fetch, invocation.inputs[0]))]
        with ThreadPoolExecutor(max_workers=len(invocation.inputs), thread_name_prefix="fetch") as pool:
            fetched = _each_item(pool, fetch, invocation.inputs)
        # In input order, so which inputs the pixel allowance admits does not depend on timing.
        return [_item_outcome(open_header, item) for item in fetched]

    def _fetch(self, item: ImageInput, deadline: float) -> bytes:
        if item.data is not None:
            data = item.data
        else:
            with observability.timer("fetch_ms"):
                data = self._fetcher.fetch(item.url or "", deadline)
        observability.count("image_bytes", len(data))
        return data

    def _decode(self, image: EncodedImage, preprocessing: Preprocessing) -> np.ndarray:
        plan_shrink(image, preprocessing.resize)
        with self._decode_budget.reserve(decoding_bytes(image)), observability.timer("decode_ms"):
            return to_model_input(decode(image, preprocessing.resize), preprocessing)


Item = TypeVar("Item")
Result = TypeVar("Result")


def _each_item(
    pool: ThreadPoolExecutor, function: Callable[[Item], Result], items: Sequence[Item | ClassifierError]
) -> list[Result | ClassifierError]:
    """``function`` over a batch's items side by side; an item that already failed stays failed."""
    # Each worker runs in its own copy of this request's context, so its timings are logged.
    futures = [pool.submit(copy_context().run, _item_outcome, function, item) for item in items]
    return [future.result() for future in futures]


def _item_outcome(
    function: Callable[[Item], Result], item: Item | ClassifierError
) -> Result | ClassifierError:
    """One input's result or its error: in a batch nothing one item does may fail the others."""
    if isinstance(item, ClassifierError):
        return item
    try:
        return function(item)
    except ClassifierError as error:
        # Kept without its traceback and causes: they reach back into this
        # request's frames, decoded images included, in a cycle only the
        # garbage collector would break, long after the request.
        return type(error)(str(error))
    except Exception:
        logger.exception("an input failed unexpectedly")
        return InternalError(
            "This input could not be processed because of an error in the service; it has been logged."
        )
