"""What serves this process now: the settings in the environment, and the service built for them.

Both are built on first use, never at import: Chalice imports ``app.py``
while packaging, and ``chalice.test.Client`` sets a stage's environment only
while a request runs. This module is all ``app.py`` needs to import; the
service, and numpy, Pillow and urllib3 with it, is imported by the first
request, where a cold start overlaps it with the model's download.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from chalicelib.errors import ConfigurationError
from chalicelib.model_holder import ModelHolder
from chalicelib.settings import ModelSettings, Settings

if TYPE_CHECKING:
    from chalicelib.service import ClassificationService


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
