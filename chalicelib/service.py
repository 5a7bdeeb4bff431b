"""The request path, wired together: URL -> image bytes -> input -> prediction.

One ``ClassificationService`` exists per distinct ``Settings``; it holds the
loaded model for the life of the process (the Lambda container), so the
archive is downloaded and loaded once. The first requests to arrive on a cold
container may race; a lock makes the first one load and the others wait for
its result instead of downloading the archive again. A failed load is not
cached: the next request tries again, so a model published late still comes up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass
from datetime import UTC, datetime

import boto3
import numpy as np
from botocore.config import Config

from chalicelib import backends, observability
from chalicelib.errors import ClassifierError, ConfigurationError, InvalidRequest
from chalicelib.fetch import ImageFetcher
from chalicelib.imaging import Preprocessing, decode_image, to_model_input
from chalicelib.model_store import ModelFiles, ModelStore, S3Client
from chalicelib.payload import BodyLimits, ImageInput, Invocation
from chalicelib.prediction import Classifier, Prediction
from chalicelib.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    classifier: Classifier
    preprocessing: Preprocessing
    files: ModelFiles
    loaded_at: datetime


@dataclass(frozen=True)
class Outcome:
    """What became of one input: its predictions, or the error that stopped it."""

    predictions: list[Prediction] | None = None
    error: ClassifierError | None = None


class ClassificationService:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._fetcher = ImageFetcher(settings.fetch, settings.url_policy)
        self._store = ModelStore(settings.cache_dir, s3_client=_s3_client)
        self._load_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._last_check = 0.0

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    def model(self) -> LoadedModel:
        """The loaded model; loads it on first use, and starts a refresh check when one is due."""
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
                    self._last_check = time.monotonic()
        elif self._refresh_due():
            self._start_refresh()
        return self._model

    def _refresh_due(self) -> bool:
        interval = self._settings.model_refresh_seconds
        return interval is not None and time.monotonic() - self._last_check >= interval

    def _start_refresh(self) -> None:
        """Check and reload in the background; this request and those in flight keep the old model."""
        if not self._refresh_lock.acquire(blocking=False):
            return  # a refresh is already running
        self._last_check = time.monotonic()
        threading.Thread(target=self._refresh, name="model-refresh", daemon=True).start()

    def _refresh(self) -> None:
        current = self._model
        try:
            if current is None or self._store.current_version(self._settings.model) == current.files.version:
                return
            fresh = self._load()
            # One reference assignment: each request holds the model it started with.
            self._model = fresh
            if fresh.files.folder != current.files.folder:
                self._store.discard(current.files)
            logger.info("model refreshed from version %s to %s", current.files.version, fresh.files.version)
        except ClassifierError as error:
            logger.warning("model refresh failed, still serving version %s: %s", current.files.version, error)
        finally:
            self._refresh_lock.release()

    @property
    def body_limits(self) -> BodyLimits:
        return self._settings.body

    def classify(self, invocation: Invocation) -> list[Outcome]:
        """Top-k predictions per input, in input order.

        A single input's error is raised, so it becomes the response. In a
        batch each input fails on its own and its error takes its place;
        the inputs are fetched and decoded concurrently within one shared
        deadline, then classified in one forward pass.
        """
        model = self.model()
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
        deadline = time.monotonic() + self._settings.fetch.deadline
        if not invocation.batch:
            prepared: list[np.ndarray | ClassifierError] = [
                self._prepare(invocation.inputs[0], model, deadline)
            ]
        else:
            with ThreadPoolExecutor(max_workers=len(invocation.inputs), thread_name_prefix="prepare") as pool:
                # Each worker runs in its own copy of this request's context, so its timings are logged.
                futures = [
                    pool.submit(copy_context().run, self._prepare_or_error, item, model, deadline)
                    for item in invocation.inputs
                ]
                prepared = [future.result() for future in futures]
        arrays = [item for item in prepared if isinstance(item, np.ndarray)]
        with observability.timer("inference_ms"):
            predictions = iter(model.classifier.predict(arrays, top_k) if arrays else [])
        return [
            Outcome(error=item)
            if isinstance(item, ClassifierError)
            else Outcome(predictions=next(predictions))
            for item in prepared
        ]

    def _prepare(self, item: ImageInput, model: LoadedModel, deadline: float) -> np.ndarray:
        if item.data is not None:
            data = item.data
        else:
            with observability.timer("fetch_ms"):
                data = self._fetcher.fetch(item.url or "", deadline)
        observability.count("image_bytes", len(data))
        with observability.timer("decode_ms"):
            image = decode_image(
                data, max_pixels=self._settings.max_image_pixels, min_short_side=model.preprocessing.resize
            )
            return to_model_input(image, model.preprocessing)

    def _prepare_or_error(
        self, item: ImageInput, model: LoadedModel, deadline: float
    ) -> np.ndarray | ClassifierError:
        try:
            return self._prepare(item, model, deadline)
        except ClassifierError as error:
            return error

    def _load(self) -> LoadedModel:
        # The backend this setting most likely needs is imported in a thread
        # while this one downloads and extracts the archive (import torch is
        # about 1.5 s here, plus unpacking its layer on Lambda), so a cold
        # start pays for the slower of the two rather than both. A failed or
        # unneeded import here is harmless: loading imports what it needs and
        # reports that failure itself.
        setting = self._settings.model_backend
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-backend") as pool:
            pool.submit(backends.import_backend, backends.expected_backend(setting))
            files = self._store.fetch(self._settings.model)
            preprocessing = Preprocessing.from_manifest(files.manifest)
        backend = backends.choose_backend(setting, files)
        classifier = backends.load(backend, files, preprocessing.crop, self._settings.inference_threads)
        return LoadedModel(
            classifier=classifier, preprocessing=preprocessing, files=files, loaded_at=datetime.now(UTC)
        )


def _s3_client() -> S3Client:
    # boto3 honours AWS_ENDPOINT_URL_S3 itself, so moto or another S3-compatible
    # store needs no code here. Bounded timeouts keep a stuck S3 from eating
    # the whole Lambda timeout.
    config = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("s3", config=config)


class _ServiceCache:
    """Holds the service for the current settings; a new environment gets a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: tuple[Settings, ClassificationService] | None = None

    def get(self, settings: Settings) -> ClassificationService:
        with self._lock:
            if self._entry is None or self._entry[0] != settings:
                self._entry = (settings, ClassificationService(settings))
            return self._entry[1]


_services = _ServiceCache()


def get_service() -> ClassificationService:
    """The service for the current environment, built on first use (never at import)."""
    return _services.get(Settings.from_environ(os.environ))


def settings_or_none() -> Settings | None:
    """The current settings, or None while the configuration is broken.

    For the per-request middleware: it must still log and answer with CORS
    headers when the view is about to report the broken configuration.
    """
    try:
        return Settings.from_environ(os.environ)
    except ConfigurationError:
        return None
