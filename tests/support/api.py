"""Calls to the app through chalice.test.Client, as a web client would make them."""

from __future__ import annotations

import json
from typing import Any

from chalice.test import Client

JSON = {"Content-Type": "application/json"}


def classify(client: Client, url: Any) -> Any:
    return client.http.post("/invocations", headers=JSON, body=json.dumps({"url": url}))


def error_of(response: Any) -> tuple[int, str, str]:
    """(status, Code, Message) of an error response, checking it is the contract's JSON shape."""
    body = json.loads(response.body)
    assert set(body) == {"Code", "Message"}, body
    return response.status_code, body["Code"], body["Message"]


def label_of(url: str) -> str:
    """Classify straight through the service, as the routes do, for tests that need no HTTP."""
    from chalicelib.current import get_service
    from chalicelib.payload import ImageInput, Invocation

    outcome = get_service().classify(Invocation(inputs=(ImageInput(url=url),), batch=False, top_k=None))[0]
    assert outcome.predictions is not None
    return outcome.predictions[0].label
