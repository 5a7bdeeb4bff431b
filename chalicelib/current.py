"""What serves this process now: the settings in the environment, and the service built for them.

Both are built on first use, never at import: Chalice imports ``app.py``
while packaging, and ``chalice.test.Client`` sets a stage's environment only
while a request runs. This module is all ``app.py`` needs to import; the
service, and numpy, Pillow and urllib3 with it, is imported by the first
request, where a cold start overlaps it with the model's download.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from chalicelib.errors import ClassifierError, ConfigurationError
from chalicelib.model_holder import ModelHolder
from chalicelib.settings import ModelSettings, Settings

if TYPE_CHECKING:
    from chalicelib.bulk import BulkWorker
    from chalicelib.service import ClassificationService

logger = logging.getLogger(__name__)

# Kept back from the invocation's time for answering (at most a quarter of
# it): an input not done by then is delivered again rather than cut off by
# Lambda's timeout, which would send the whole batch back.
BULK_ANSWER_MARGIN_S = 5.0


class _ServiceCache:
    """The service for the current settings, around the model holder for the current model settings.

    A new environment gets a new service, which is cheap; only a change the
    model depends on gets a new holder, and so loads the model again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: ModelHolder | None = None
        self._service: ClassificationService | None = None

    def holder(self, settings: ModelSettings) -> ModelHolder:
        with self._lock:
            if self._holder is None or self._holder.settings != settings:
                self._holder = ModelHolder(settings)
            return self._holder

    def service(self, settings: Settings) -> ClassificationService:
        holder = self.holder(settings.model)
        # Every caller is about to need the model: on a cold start it loads
        # while the service's own imports (numpy, Pillow, urllib3) run.
        holder.prepare()
        from chalicelib.service import ClassificationService  # noqa: PLC0415 - see the module's docstring

        with self._lock:
            service = self._service
            if service is None or service.settings != settings or service.models is not holder:
                service = ClassificationService(settings, holder)
                self._service = service
            return service


_services = _ServiceCache()


def get_settings() -> Settings:
    return Settings.from_environ(os.environ)


def get_holder() -> ModelHolder:
    """The model holder for the current environment; it loads nothing until asked."""
    return _services.holder(get_settings().model)


def get_service() -> ClassificationService:
    """The service for the current environment; its model starts loading now if it has not yet."""
    return _services.service(get_settings())


def settings_or_none() -> Settings | None:
    """The current settings, or None while the configuration is broken.

    For the per-request middleware: it must still log and answer with CORS
    headers when the view is about to report the broken configuration.
    """
    try:
        return get_settings()
    except ConfigurationError:
        return None


def get_worker() -> BulkWorker:
    """The bulk worker for the current environment, around the same model as the API."""
    settings = get_settings()
    if settings.bulk is None:
        raise ConfigurationError(
            "Config 'RESULTS_BUCKET' is not set: the bulk worker has nowhere to write its results."
        )
    from chalicelib.bulk import INPUTS_PER_PASS, BulkWorker  # noqa: PLC0415 - see the module's docstring
    from chalicelib.s3 import S3Client  # noqa: PLC0415

    # One pass is one batch of up to INPUTS_PER_PASS images, each within its own
    # limits: a request's pixel allowance must not fail an image for its neighbours.
    per_pass = settings.max_image_pixels * INPUTS_PER_PASS
    widened = dataclasses.replace(settings, max_request_pixels=max(settings.max_request_pixels, per_pass))
    return BulkWorker(_services.service(widened), settings.bulk, S3Client.from_environment())


def run_bulk_batch(messages: Iterable[tuple[str, str]], remaining_seconds: float) -> list[str]:
    """The ids of the (id, body) messages to deliver again, after the bulk worker has done the rest.

    A configuration the worker cannot run under sends every message back:
    the queue's redrive policy ends it in the dead-letter queue, not in silence.
    """
    from chalicelib.bulk import Message  # noqa: PLC0415 - see the module's docstring

    batch = [Message(id=message_id, body=body) for message_id, body in messages]
    try:
        worker = get_worker()
    except ClassifierError as error:
        logger.error("the bulk worker cannot run, every message will be delivered again: %s", error)
        return [message.id for message in batch]
    margin = min(BULK_ANSWER_MARGIN_S, remaining_seconds / 4)
    return worker.handle(batch, deadline=time.monotonic() + remaining_seconds - margin)
