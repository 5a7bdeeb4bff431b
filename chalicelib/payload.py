"""Request bodies, parsed into plain values with messages a caller can act on.

``POST /invocations`` accepts:

- JSON ``{"url": ...}`` or ``{"image": "<base64>"}`` for one image;
- JSON ``{"urls": [...]}`` or ``{"images": [...]}`` for a batch of up to ``MAX_BATCH``;
- a raw image body (``image/jpeg``, ``image/png``, ``image/webp``,
  ``image/gif`` or ``application/octet-stream``);
- a body with no Content-Type at all, which Chalice lets through as JSON:
  it is read as JSON when it starts like a JSON object, and as image bytes
  otherwise, and the messages say which it was taken for;

and ``top_k`` as a query parameter or a JSON field. Chalice's own
``json_body`` answers malformed JSON with a bare "Error Parsing JSON";
parsing the raw body here lets the message say where the JSON broke and what
shape was expected. Sizes are checked before anything is decoded, and every
input carries a description of itself (``ImageInput.source``), so an image
that will not decode is named the way the caller sent it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chalicelib.errors import ImageTooLarge, InvalidRequest

EXAMPLE = '{"url": "https://example.com/cat.jpg"}'
JSON_TYPE = "application/json"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "application/octet-stream")
# Lambda refuses synchronous payloads over 6 MB (API Gateway's own cap is 10 MB),
# and a base64 or binary body grows by a third on the way in.
DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024
DEFAULT_MAX_BATCH = 8
# More than any model's class count; keeps absurd numbers out of messages.
MAX_TOP_K = 1_000_000
ASCII_DIGITS = re.compile(r"[0-9]{1,7}")
DATA_URL = re.compile(r"data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageInput:
    """One image to classify: a URL to fetch, or the bytes themselves, and how the caller sent it."""

    url: str | None = None
    data: bytes | None = None
    source: str = "The image"

    @property
    def kind(self) -> str:
        return "url" if self.url is not None else "bytes"


@dataclass(frozen=True)
class Invocation:
    inputs: tuple[ImageInput, ...]
    batch: bool
    top_k: int | None


@dataclass(frozen=True)
class BodyLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = 10 * 1024 * 1024
    max_batch: int = DEFAULT_MAX_BATCH


def parse_invocation(
    raw_body: bytes, content_type: str, query: Mapping[str, str] | None, limits: BodyLimits
) -> Invocation:
    if len(raw_body) > limits.max_body_bytes:
        raise ImageTooLarge(
            f"The request body is {len(raw_body):,} bytes; the limit is {limits.max_body_bytes:,}. "
            "Send a URL instead of the image itself."
        )
    query_top_k = _top_k((query or {}).get("top_k"), source="query parameter")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if not media_type:
        media_type = JSON_TYPE if raw_body.lstrip()[:1] == b"{" else ""
    if media_type != JSON_TYPE:
        sent_as = f"({media_type})" if media_type else "(sent without a Content-Type)"
        if not raw_body:
            raise InvalidRequest(f"The request body {sent_as} is empty; send the image bytes.")
        raw = _checked_bytes(raw_body, limits, f"The request body {sent_as}")
        return Invocation(inputs=(raw,), batch=False, top_k=query_top_k)
    body = _json_object(raw_body)
    top_k = query_top_k if query_top_k is not None else _top_k(body.get("top_k"), source="field")
    sources = [key for key in ("url", "image", "urls", "images") if key in body]
    if len(sources) != 1:
        found = f"got {', '.join(repr(s) for s in sources)}" if sources else "got none"
        raise InvalidRequest(
            f"The request body needs exactly one of 'url', 'image', 'urls' or 'images' ({found}); "
            f"expected {EXAMPLE}."
        )
    key = sources[0]
    if key in ("url", "image"):
        return Invocation(inputs=(_one_input(key, body[key], limits),), batch=False, top_k=top_k)
    items = body[key]
    if not isinstance(items, list) or not 1 <= len(items) <= limits.max_batch:
        raise InvalidRequest(
            f"'{key}' must be an array of 1 to {limits.max_batch} items (MAX_BATCH), got {_describe(items)}."
        )
    single = key[:-1]
    return Invocation(
        inputs=tuple(_one_input(single, item, limits, f"'{key}' item {number}") for number, item in
                     enumerate(items, start=1)),
        batch=True,
        top_k=top_k,
    )  # fmt: skip


def deep_check(query: Mapping[str, str] | None) -> bool:
    """``GET /ping?deep=``: ``1``/``true`` loads the model, ``0``/``false`` (or none) does not.

    Anything else is refused rather than guessed at: a health check that
    quietly did the cheap check on ``deep=yes`` would report a model it never loaded.
    """
    value = (query or {}).get("deep")
    text = (value or "").strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("", "0", "false"):
        return False
    raise InvalidRequest(f"The deep query parameter must be 1, true, 0 or false, got {_describe(value)}.")


def _json_object(raw_body: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw_body)
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"The request body is not UTF-8 JSON; expected {EXAMPLE}.") from error
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"The request body is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}); expected {EXAMPLE}."
        ) from error
    except RecursionError as error:
        raise InvalidRequest(f"The request body's JSON is nested too deeply; expected {EXAMPLE}.") from error
    except ValueError as error:  # an integer longer than Python converts (4,300 digits)
        raise InvalidRequest(f"The request body's JSON holds a number too long to read ({error}).") from error
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, got {_describe(body)}; expected {EXAMPLE}."
        )
    return body


def _one_input(field: str, value: Any, limits: BodyLimits, where: str | None = None) -> ImageInput:
    """One ``url`` or ``image`` value; ``where`` names a batch item in messages ("'urls' item 3")."""
    where = where or f"'{field}'"
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string, got {_describe(value)}; expected {EXAMPLE}.")
    if field == "url":
        return ImageInput(url=value.strip(), source=f"The body of the image URL ({where})")
    if value.startswith("data:"):
        prefix = DATA_URL.match(value)
        if prefix is None:
            raise InvalidRequest(
                f"{where} is a data: URL but not a base64 one; expected data:image/png;base64,<bytes>."
            )
        value = value[prefix.end() :]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequest(f"{where} must be base64-encoded image bytes ({error}).") from error
    if not data:
        raise InvalidRequest(f"{where} is empty; send the base64-encoded image bytes.")
    return _checked_bytes(data, limits, f"The base64 image in {where}")


def _checked_bytes(data: bytes, limits: BodyLimits, source: str) -> ImageInput:
    if len(data) > limits.max_image_bytes:
        raise ImageTooLarge(
            f"{source} is {len(data):,} bytes; the limit is {limits.max_image_bytes:,} (MAX_IMAGE_BYTES)."
        )
    return ImageInput(data=data, source=source)


def _top_k(value: Any, *, source: str) -> int | None:
    """A positive integer, from JSON or from ASCII digits; never Unicode digits int() would refuse."""
    if value is None:
        return None
    if isinstance(value, str) and ASCII_DIGITS.fullmatch(digits := value.strip()):
        value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TOP_K:
        raise InvalidRequest(
            f"The top_k {source} must be an integer from 1 to the number of classes, got {_describe(value)}."
        )
    return value


def _describe(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, int) and abs(value) > MAX_TOP_K:
        return f"a number of {len(str(abs(value)))} digits"
    return names.get(type(value), f"the number {value!r}")
