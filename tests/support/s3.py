"""moto's S3 in server mode on 127.0.0.1, with a log of the requests it served.

The log lets a test see what really crossed the wire (for example, that two
cold requests made one GetObject) without touching the code under test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from tests.support.http_server import InBackground


class RequestLog:
    """WSGI middleware that records (method, path) of every request, and its answer's status."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.answered: list[tuple[str, str, int]] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = (environ["REQUEST_METHOD"], environ["PATH_INFO"])
        with self._lock:
            self.requests.append(request)

        def recording_start_response(status: str, *rest: Any) -> Any:
            with self._lock:
                self.answered.append((*request, int(status.split(maxsplit=1)[0])))
            return start_response(status, *rest)

        return self._app(environ, recording_start_response)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return self.requests.count((method, path))

    def count_answered(self, method: str, path: str, status: int) -> int:
        with self._lock:
            return self.answered.count((method, path, status))


class MotoS3Server(InBackground):
    def __init__(self) -> None:
        self.log = RequestLog(DomainDispatcherApplication(create_backend_app))
        super().__init__(
            make_server("127.0.0.1", 0, self.log, threaded=True, request_handler=MotoRequestHandler)
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"
