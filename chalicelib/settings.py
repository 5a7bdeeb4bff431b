"""Configuration, read from the environment in one place.

Settings are read per request, not at import: Chalice imports ``app.py`` while
packaging, and ``chalice.test.Client`` only sets a stage's environment while a
request runs. Reading is cheap, and the service built from one ``Settings``
value is reused for as long as the environment stays the same.

A wrong value fails loudly with a ``ConfigurationError`` (503) that names the
variable, what it expected and what it got, instead of silently falling back.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from chalicelib.backends import BACKEND_SETTINGS
from chalicelib.cors import CorsPolicy
from chalicelib.errors import ConfigurationError
from chalicelib.locations import ArchiveLocation, LocalArchive, S3Archive
from chalicelib.observability import DEFAULT_LOG_LEVEL, LOG_LEVELS
from chalicelib.payload import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, BodyLimits
from chalicelib.url_policy import DEFAULT_PORTS, HostAllowList, UrlPolicy

Number = TypeVar("Number", int, float)

DEMO_ARCHIVE = Path(__file__).resolve().parent.parent / "build" / "demo-model.tar.gz"
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DEFAULT_MAX_REQUEST_PIXELS = 160_000_000
DEFAULT_MAX_DECODE_BYTES = 640 * 1024 * 1024
# Seconds for downloading and extracting the model; what is left of API
# Gateway's 29 s goes to loading it into its backend and answering.
DEFAULT_MODEL_LOAD_DEADLINE = 20.0
DEFAULT_RESULTS_PREFIX = "results/"
DEFAULT_RESULTS_TOP_K = 5


@dataclass(frozen=True)
class FetchLimits:
    """How long and how much the service will read from an image host."""

    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    # One budget for the whole download, redirects included; well under API
    # Gateway's 29 s so the caller gets our 504, not the gateway's.
    deadline: float = 10.0
    max_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class ModelSettings:
    """What the loaded model depends on: a change here loads it again, nothing else does."""

    location: ArchiveLocation
    cache_dir: Path
    backend: str
    inference_threads: int
    refresh_seconds: float | None
    load_deadline: float


@dataclass(frozen=True)
class BulkSettings:
    """Where the bulk worker writes one result per input, and how many classes each result lists."""

    results_bucket: str
    results_prefix: str
    top_k: int


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    fetch: FetchLimits
    max_image_pixels: int
    max_request_pixels: int
    max_decode_bytes: int
    url_policy: UrlPolicy
    body: BodyLimits
    cors: CorsPolicy
    log_level: str
    bulk: BulkSettings | None  # None: RESULTS_BUCKET unset, no bulk worker here

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        defaults = FetchLimits()
        max_image_bytes = _positive_int(environ, "MAX_IMAGE_BYTES", defaults.max_bytes)
        return cls(
            model=ModelSettings(
                location=_model_location(environ),
                cache_dir=Path(
                    environ.get("MODEL_CACHE_DIR") or Path(tempfile.gettempdir(), "chalice-classifier")
                ),
                backend=_choice(environ, "MODEL_BACKEND", BACKEND_SETTINGS),
                inference_threads=_positive_int(environ, "INFERENCE_THREADS", 1),
                # Unset (the default 0) means no refresh checks at all.
                refresh_seconds=_positive_float(environ, "MODEL_REFRESH_SECONDS", 0.0) or None,
                load_deadline=_positive_float(environ, "MODEL_LOAD_DEADLINE", DEFAULT_MODEL_LOAD_DEADLINE),
            ),
            fetch=FetchLimits(
                connect_timeout=_positive_float(environ, "FETCH_CONNECT_TIMEOUT", defaults.connect_timeout),
                read_timeout=_positive_float(environ, "FETCH_READ_TIMEOUT", defaults.read_timeout),
                deadline=_positive_float(environ, "FETCH_DEADLINE", defaults.deadline),
                max_bytes=max_image_bytes,
            ),
            max_image_pixels=_positive_int(environ, "MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS),
            max_request_pixels=_positive_int(environ, "MAX_REQUEST_PIXELS", DEFAULT_MAX_REQUEST_PIXELS),
            max_decode_bytes=_positive_int(environ, "MAX_DECODE_BYTES", DEFAULT_MAX_DECODE_BYTES),
            body=BodyLimits(
                max_body_bytes=_positive_int(environ, "MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
                max_image_bytes=max_image_bytes,
                max_batch=_positive_int(environ, "MAX_BATCH", DEFAULT_MAX_BATCH),
            ),
            cors=_cors(environ, "CORS_ALLOW_ORIGIN"),
            log_level=_log_level(environ, "LOG_LEVEL"),
            url_policy=UrlPolicy(
                allowed_ports=_ports(environ, "ALLOWED_PORTS"),
                allow_private=_flag(environ, "ALLOW_PRIVATE_URLS"),
                allowed_hosts=_host_allow_list(environ, "ALLOWED_URL_HOSTS"),
            ),
            bulk=_bulk(environ),
        )


def _bulk(environ: Mapping[str, str]) -> BulkSettings | None:
    bucket = environ.get("RESULTS_BUCKET", "").strip()
    if not bucket:
        return None
    prefix = environ.get("RESULTS_PREFIX", DEFAULT_RESULTS_PREFIX).strip().lstrip("/")
    return BulkSettings(
        results_bucket=bucket,
        results_prefix=prefix if not prefix or prefix.endswith("/") else prefix + "/",
        top_k=_positive_int(environ, "RESULTS_TOP_K", DEFAULT_RESULTS_TOP_K),
    )


def _model_location(environ: Mapping[str, str]) -> ArchiveLocation:
    bucket = environ.get("MODEL_BUCKET", "").strip()
    key = environ.get("MODEL_KEY", "").strip()
    if bucket and key:
        return S3Archive(bucket=bucket, key=key)
    if bucket or key:
        present, missing = ("MODEL_BUCKET", "MODEL_KEY") if bucket else ("MODEL_KEY", "MODEL_BUCKET")
        raise ConfigurationError(
            f"Config '{present}' is set but '{missing}' is not: set both to load the model "
            "from S3, or neither to use MODEL_PATH or the built-in demo model."
        )
    path = environ.get("MODEL_PATH", "").strip()
    return LocalArchive(path=Path(path) if path else DEMO_ARCHIVE)


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    return _positive(environ, name, default, int, "a positive integer")


def _positive_float(environ: Mapping[str, str], name: str, default: float) -> float:
    return _positive(environ, name, default, float, "a positive number of seconds")


def _positive(
    environ: Mapping[str, str], name: str, default: Number, parse: Callable[[str], Number], expected: str
) -> Number:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        raise ConfigurationError(f"Config '{name}' must be {expected}, got {raw!r}.")
    return value


def _flag(environ: Mapping[str, str], name: str) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"Config '{name}' must be true or false, got {environ[name]!r}.")


def _ports(environ: Mapping[str, str], name: str) -> frozenset[int] | None:
    """A comma-separated list of ports, or ``*`` for any port (development only)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return DEFAULT_PORTS
    if raw == "*":
        return None
    try:
        ports = frozenset(int(part) for part in raw.split(","))
    except ValueError:
        ports = frozenset({0})
    if not all(0 < port < 65536 for port in ports):
        raise ConfigurationError(
            f"Config '{name}' must be a comma-separated list of ports (1-65535) or *, got {raw!r}."
        )
    return ports


def _host_allow_list(environ: Mapping[str, str], name: str) -> HostAllowList | None:
    """Host names, ``*.suffix`` patterns and IP addresses; unset (or blank) allows any public host."""
    raw = environ.get(name, "")
    if not raw.strip():
        return None
    try:
        return HostAllowList.from_setting(raw)
    except ValueError as error:
        raise ConfigurationError(
            f"Config '{name}' must be a comma-separated list of host names, *.suffix patterns "
            f"and IP addresses: {error}."
        ) from error


def _cors(environ: Mapping[str, str], name: str) -> CorsPolicy:
    try:
        return CorsPolicy.from_setting(environ.get(name, ""))
    except ValueError as error:
        raise ConfigurationError(
            f"Config '{name}' must be *, or a comma-separated list of origins: {error}."
        ) from error


def _log_level(environ: Mapping[str, str], name: str) -> str:
    return _choice(environ, name, LOG_LEVELS, default=DEFAULT_LOG_LEVEL, normalise=str.upper)


def _choice(
    environ: Mapping[str, str],
    name: str,
    choices: tuple[str, ...],
    *,
    default: str | None = None,
    normalise: Callable[[str], str] = str.lower,
) -> str:
    """One of ``choices``; unset means ``default``, or the first choice."""
    value = normalise(environ.get(name, "").strip()) or (default or choices[0])
    if value not in choices:
        raise ConfigurationError(
            f"Config '{name}' must be one of {', '.join(choices)}, got {environ[name]!r}."
        )
    return value
