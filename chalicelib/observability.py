"""One structured log line and one set of CloudWatch metrics per request.

aws-lambda-powertools does the formatting: its Logger writes JSON lines and
its Metrics write CloudWatch Embedded Metric Format, the field's standard on
Lambda, and both just print to stdout, so they work the same under
``chalice local`` and ``chalice.test``. The line carries the request id
(Lambda's ``aws_request_id``, also sent back as ``x-request-id``), the route,
status and error Code, the input kind and image bytes, the fetch, decode and
inference milliseconds, and the model version. It never carries the image or
the request body.

The request's record lives in a context variable; batch workers run in a
copy of the request's context, so their timings land on the same record.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit, single_metric

SERVICE = "chalice-classifier"
NAMESPACE = "ChaliceClassifier"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is now, not to the one there was at import.

    Lambda, ``chalice local`` and pytest all decide where stdout goes after
    this module is imported; EMF metrics (plain prints) follow suit the same way.
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


logger = Logger(service=SERVICE, stream=_CurrentStdout())
_current: ContextVar[RequestRecord | None] = ContextVar("request_record", default=None)
_configured = threading.Event()


@dataclass
class RequestRecord:
    request_id: str
    route: str
    method: str
    status: int = 0
    code: str | None = None
    input_kind: str | None = None
    items: int = 0
    image_bytes: int = 0
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    inference_ms: float = 0.0
    model_version: str | None = None
    started: float = field(default_factory=time.perf_counter, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: float) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)


def begin(request_id: str, route: str, method: str, level: str) -> RequestRecord:
    if not _configured.is_set():
        # chalicelib's own loggers (model downloads and the like) speak JSON too.
        copy_config_to_registered_loggers(source_logger=logger, include={"chalicelib"})
        _configured.set()
    logger.setLevel(level)
    record = RequestRecord(request_id=request_id, route=route, method=method)
    _current.set(record)
    return record


def note(**fields: object) -> None:
    """Set fields of the current request's record (no-op outside a request)."""
    record = _current.get()
    if record is not None:
        for name, value in fields.items():
            setattr(record, name, value)


def count(name: str, amount: float) -> None:
    record = _current.get()
    if record is not None:
        record.add(name, amount)


@contextmanager
def timer(name: str) -> Iterator[None]:
    """Add the block's wall time, in milliseconds, to the record's ``name``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        count(name, (time.perf_counter() - started) * 1000)


def finish(record: RequestRecord, status: int, code: str | None) -> None:
    record.status, record.code = status, code
    total_ms = (time.perf_counter() - record.started) * 1000
    logged = {f.name: getattr(record, f.name) for f in fields(record) if f.repr}
    logged = {name: value for name, value in logged.items() if value not in (None, 0, 0.0)}
    logger.info("request", extra={**logged, "status": status, "total_ms": round(total_ms, 2)})
    with single_metric(
        name="Latency", unit=MetricUnit.Milliseconds, value=total_ms, namespace=NAMESPACE
    ) as metric:
        metric.add_dimension(name="route", value=record.route)
    if code is not None:
        with single_metric(name="Errors", unit=MetricUnit.Count, value=1, namespace=NAMESPACE) as metric:
            metric.add_dimension(name="Code", value=code)
    _current.set(None)
