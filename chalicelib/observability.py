"""Logging, configured once, and one structured log line and one set of metrics per request.

Every log record of ours (``chalicelib.*``) and of the Chalice app's own
logger (which reports uncaught errors, with their traceback) goes through one
handler, as one JSON line on stdout, carrying the request id, at the level
``LOG_LEVEL`` sets. Nothing else configures them: the app is built with
``configure_logs=False`` (Chalice would add a plain-text handler to the
logger that shares its name with the service), and they do not propagate to
the root logger, where Lambda's runtime prints every record a second time.
Nothing is read from the environment at import, so a wrong ``LOG_LEVEL`` is
the documented 503, never an import that fails.

Log lines are JSON in the shape aws-lambda-powertools writes them (level,
location, message, timestamp, service, then the record's own fields), and
metrics are CloudWatch Embedded Metric Format, the field's standard on
Lambda: a JSON line that CloudWatch turns into metrics. Both are a few lines
of ``json.dumps`` here rather than powertools itself, whose import alone
cost every cold start about 40 ms. Both go to stdout through logging (the
metrics through a logger of their own, which ``LOG_LEVEL`` does not filter),
so they work the same under ``chalice local`` and ``chalice.test``. The request line
carries the request id (Lambda's ``aws_request_id``, also sent back as
``x-request-id``), the route, status and error Code, the input kind and image
bytes, the fetch, decode and inference milliseconds, and the model version.
It never carries the image or the request body.

The request's record lives in a context variable; batch workers run in a
copy of the request's context, so their timings, and their log lines' request
id, land on the same request.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from functools import cache

SERVICE = "chalice-classifier"
NAMESPACE = "ChaliceClassifier"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"
# Ours, and the Chalice app's (named after the app): the loggers this module configures.
OUR_LOGGERS = ("chalicelib", SERVICE)


class _CurrentStdout:
    """Writes to whatever ``sys.stdout`` is now, not to the one there was at import.

    Lambda, ``chalice local`` and pytest all decide where stdout goes after
    this module is imported; the log lines and the EMF metrics follow it.
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


logger = logging.getLogger(__name__)
_current: ContextVar[RequestRecord | None] = ContextVar("request_record", default=None)
_configure_once = threading.Lock()
_handler: logging.Handler | None = None


# The attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: level, location, message, timestamp, service, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "level": record.levelname,
            "location": f"{record.funcName}:{record.lineno}",
            "message": record.getMessage(),
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "service": SERVICE,
        }
        entry |= {name: value for name, value in record.__dict__.items() if name not in _RECORD_ATTRIBUTES}
        if record.exc_info:
            entry["exception_name"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def _metric(name: str, unit: str, value: float, dimension: tuple[str, str]) -> None:
    """One CloudWatch metric in Embedded Metric Format, printed as the single line CloudWatch reads."""
    key, label = dimension
    document = {
        "_aws": {
            "Timestamp": int(time.time() * 1000),
            "CloudWatchMetrics": [
                {"Namespace": NAMESPACE, "Dimensions": [[key]], "Metrics": [{"Name": name, "Unit": unit}]}
            ],
        },
        key: label,
        name: [value],
    }
    _metrics_logger().info(json.dumps(document, separators=(",", ":")))


@cache
def _metrics_logger() -> logging.Logger:
    """EMF lines exactly as CloudWatch reads them: a handler of their own, whatever ``LOG_LEVEL`` says."""
    metrics = logging.getLogger(f"{SERVICE}.metrics")
    handler = logging.StreamHandler(_CurrentStdout())
    handler.setFormatter(logging.Formatter("%(message)s"))
    metrics.handlers = [handler]
    metrics.propagate = False
    metrics.setLevel(logging.INFO)
    return metrics


class _RequestIdFilter(logging.Filter):
    """Stamps every record with the id of the request it was logged for, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current.get()
        if current is not None and not hasattr(record, "request_id"):
            record.request_id = current.request_id
        return True


def configure_logging(level: str) -> None:
    """Send our loggers' records, as JSON lines, to stdout at ``level``; the handler is made once."""
    global _handler  # noqa: PLW0603 - logging is process-wide state
    with _configure_once:
        if _handler is None:
            _handler = logging.StreamHandler(_CurrentStdout())
            _handler.setFormatter(_JsonFormatter())
            _handler.addFilter(_RequestIdFilter())
            for name in OUR_LOGGERS:
                configured = logging.getLogger(name)
                configured.handlers = [_handler]
                configured.propagate = False
        for name in OUR_LOGGERS:
            logging.getLogger(name).setLevel(level)


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
    configure_logging(level)
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


def batch_counts(counts: Mapping[str, int]) -> None:
    """The bulk worker's tally of one batch: a log line, and a metric for each count."""
    logger.info("batch", extra=dict(counts))
    for name, value in counts.items():
        _metric(name, "Count", value, ("worker", "bulk"))


def finish(record: RequestRecord, status: int, code: str | None) -> None:
    record.status, record.code = status, code
    total_ms = (time.perf_counter() - record.started) * 1000
    logged = {f.name: getattr(record, f.name) for f in fields(record) if f.repr}
    logged = {name: value for name, value in logged.items() if value not in (None, 0, 0.0)}
    logger.info("request", extra={**logged, "status": status, "total_ms": round(total_ms, 2)})
    _metric("Latency", "Milliseconds", total_ms, ("route", record.route))
    if code is not None:
        _metric("Errors", "Count", 1, ("Code", code))
    _current.set(None)
