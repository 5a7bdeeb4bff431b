"""Request bodies, parsed into plain values with messages a caller can act on.

Chalice's own ``json_body`` answers malformed JSON with a bare
"Error Parsing JSON"; parsing the raw body here lets the message say where
the JSON broke and what shape was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chalicelib.errors import InvalidRequest

EXAMPLE = '{"url": "https://example.com/cat.jpg"}'


@dataclass(frozen=True)
class InvocationRequest:
    url: str


def parse_invocation(raw_body: bytes) -> InvocationRequest:
    try:
        body = json.loads(raw_body)
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"The request body is not UTF-8 JSON; expected {EXAMPLE}.") from error
    except json.JSONDecodeError as error:
        raise InvalidRequest(
            f"The request body is not valid JSON ({error.msg} at line {error.lineno} column "
            f"{error.colno}); expected {EXAMPLE}."
        ) from error
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, got {_json_type(body)}; expected {EXAMPLE}."
        )
    if "url" not in body:
        raise InvalidRequest(f"The request body has no 'url' field; expected {EXAMPLE}.")
    url = body["url"]
    if not isinstance(url, str):
        raise InvalidRequest(f"The 'url' field must be a string, got {_json_type(url)}; expected {EXAMPLE}.")
    return InvocationRequest(url=url.strip())


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
