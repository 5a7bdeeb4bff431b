"""The loaded model, one per container: loaded once, within a deadline, and refreshed safely.

The archive is downloaded and loaded on first use, for the life of the
process (the Lambda container), in a thread of its own: a cold request calls
``prepare`` first and fetches its image while the model loads, then waits
for it with ``model``. The first requests to arrive on a cold container share
that one load, each waiting no longer than its own deadline, instead of
downloading the archive again. A failed load is not cached: the next request
tries again, so a model published late still comes up.

With ``MODEL_REFRESH_SECONDS`` a request that finds a check due starts one in
the background: a new version is fetched beside the old model (if the cache
has room for both), loaded, and swapped in with one reference assignment, so
requests in flight finish on the model they started with. A version that
fails to load is remembered and not fetched again; its files are deleted.

A holder depends only on ``ModelSettings``: changing a request-level setting
(CORS, the log level, fetch limits) builds a new service around the same
holder, never a second copy of the model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import copy_context
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from chalicelib import backends
from chalicelib.errors import ClassifierError, InternalError, ModelUnavailable
from chalicelib.model_store import ArchiveVersion, ModelFiles, ModelStore
from chalicelib.settings import ModelSettings

if TYPE_CHECKING:
    from chalicelib.imaging import Preprocessing
    from chalicelib.prediction import Classifier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    classifier: Classifier
    preprocessing: Preprocessing
    files: ModelFiles
    loaded_at: datetime


class ModelHolder:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        self._store = ModelStore(settings.cache_dir)
        self._loading_lock = threading.Lock()
        self._loading: Future[LoadedModel] | None = None
        self._refresh_lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._failed_version: str | None = None
        self._last_check = 0.0

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def prepare(self) -> None:
        """Start loading the model in the background unless it is loaded or loading already."""
        if self._model is None:
            self._current_load()

    def model(self) -> LoadedModel:
        """The loaded model; loads it on first use, and starts a refresh check when one is due."""
        model = self._model
        if model is None:
            return self._wait(self._current_load(), deadline=self._deadline())
        if self._refresh_due():
            self._start_refresh()
        return model

    def check_on_next_request(self) -> None:
        """With MODEL_REFRESH_SECONDS, make the next request check S3 for a newer version.

        For a sandbox restored from a SnapStart snapshot: the snapshot may
        have been cached for longer than the refresh interval.
        """
        self._last_check = -math.inf

    def _deadline(self) -> float:
        return time.monotonic() + self.settings.load_deadline

    def _current_load(self) -> Future[LoadedModel]:
        """The load in progress, or a new one started in a thread of its own."""
        with self._loading_lock:
            if self._model is not None:  # loaded since the caller looked
                done: Future[LoadedModel] = Future()
                done.set_result(self._model)
                return done
            if self._loading is None:
                self._loading = Future()
                # The copied context keeps the starting request's id on the load's log lines.
                threading.Thread(
                    target=copy_context().run,
                    args=(self._load_into, self._loading, self._deadline()),
                    name="model-load",
                    daemon=True,
                ).start()
            return self._loading

    def _load_into(self, loading: Future[LoadedModel], deadline: float) -> None:
        try:
            model = self._load(deadline)
        except Exception as error:
            if not isinstance(error, ClassifierError):
                logger.exception("loading the model failed unexpectedly")
            with self._loading_lock:
                self._loading = None  # the next request tries again
            loading.set_exception(error)
        else:
            with self._loading_lock:
                self._model = model
                self._last_check = time.monotonic()
                self._loading = None
            loading.set_result(model)

    def _wait(self, loading: Future[LoadedModel], deadline: float) -> LoadedModel:
        try:
            return loading.result(timeout=max(deadline - time.monotonic(), 0))
        except FutureTimeout:
            raise ModelUnavailable(
                f"The model is still being loaded and did not finish within "
                f"{self.settings.load_deadline:g} s (MODEL_LOAD_DEADLINE); retry shortly."
            ) from None
        except ClassifierError as error:
            # A copy per waiter: one exception raised in several threads would
            # share (and keep growing) one traceback.
            raise type(error)(str(error)) from None
        except Exception:
            raise InternalError(
                "The model could not be loaded because of an error in the service; it has been logged."
            ) from None

    def _refresh_due(self) -> bool:
        interval = self.settings.refresh_seconds
        return interval is not None and time.monotonic() - self._last_check >= interval

    def _start_refresh(self) -> None:
        """Check and reload in the background; this request and those in flight keep the old model."""
        if not self._refresh_lock.acquire(blocking=False):
            return  # a refresh is already running
        self._last_check = time.monotonic()
        threading.Thread(target=self._refresh, name="model-refresh", daemon=True).start()

    def _refresh(self) -> None:
        current = self._model
        assert current is not None  # refreshes start only once a model is loaded
        try:
            latest = self._store.current_version(self.settings.location, self._deadline())
            if latest.version in (current.files.version, self._failed_version):
                return
            # The served model stays on disk until the new one is loaded: refuse
            # a second one that would fill /tmp rather than fail half way.
            self._store.check_room(latest.room_to_fetch)
            self._swap_in(current, latest)
        except ClassifierError as error:
            logger.warning("model refresh failed, still serving version %s: %s", current.files.version, error)
        except Exception:
            # A background thread has no caller to tell: log it all, keep serving.
            logger.exception("model refresh failed, still serving version %s", current.files.version)
        finally:
            self._refresh_lock.release()

    def _swap_in(self, current: LoadedModel, latest: ArchiveVersion) -> None:
        try:
            fresh = self._load(self._deadline())
        except ClassifierError:
            self._failed_version = latest.version
            raise
        # One reference assignment: each request holds the model it started with.
        self._model = fresh
        if fresh.files.folder != current.files.folder:
            self._store.discard(current.files)
        logger.info("model refreshed from version %s to %s", current.files.version, fresh.files.version)

    def _load(self, deadline: float) -> LoadedModel:
        # The backend this setting most likely needs is imported in a thread
        # while this one downloads and extracts the archive (import torch
        # takes seconds, plus loading its layer on Lambda), so a cold start
        # pays for the slower of the two rather than both. A failed or
        # unneeded import here is harmless: loading imports what it needs and
        # reports that failure itself.
        setting = self.settings.backend
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-backend") as pool:
            pool.submit(backends.import_backend, backends.expected_backend(setting))
            files = self._store.fetch(self.settings.location, deadline, backends.model_formats(setting))
        # Here, not at the top: this module is imported before numpy and
        # Pillow, so that a cold start's download begins without them.
        from chalicelib.imaging import Preprocessing  # noqa: PLC0415

        try:
            preprocessing = Preprocessing.from_manifest(files.manifest)
            backend = backends.choose_backend(setting, files)
            classifier = backends.load(backend, files, preprocessing.crop, self.settings.inference_threads)
        except ClassifierError:
            # Keep /tmp for a model that loads; the one being served keeps its files.
            if self._model is None or self._model.files.folder != files.folder:
                self._store.discard(files)
            raise
        return LoadedModel(
            classifier=classifier, preprocessing=preprocessing, files=files, loaded_at=datetime.now(UTC)
        )
