"""Every response the test suite receives, checked against the OpenAPI document (chalicelib/openapi.py).

Two hooks feed one checker, so the document cannot drift from the code:

- ``CheckedClient`` is ``chalice.test.Client`` whose ``http`` checks each
  response before the test sees it, and raises ``AssertionError`` at once;
- ``ContractProxy`` stands on loopback in front of `chalice local`
  (tests/support/chalice_local.py hands out its address as the server's),
  reads each response whole, checks it and only then forwards it, byte for
  byte. A mismatch is recorded in ``LIVE_DRIFT`` before the client has the
  answer, and this module's ``pytest_runtest_call`` hook (a plugin named in
  tests/conftest.py) fails the test that was running.

The checker finds the operation the way Chalice routes (its own
``RouteMatcher``), then the response by status, and checks the media type,
the required headers and every header and body against their schemas with
jsonschema (Draft 2020-12, OpenAPI 3.1's dialect, formats included). A path
the document lacks must get the ``UnknownRoute`` answer, a method a path
lacks the ``MethodNotAllowed`` one.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import socketserver
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import urlencode

import pytest
from chalice.app import Chalice
from chalice.config import Config
from chalice.local import RouteMatcher
from chalice.test import Client, HTTPResponse, TestHTTPClient
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from chalicelib.openapi import METHOD_NOT_ALLOWED, UNKNOWN_ROUTE
from tests.support.http_server import InBackground

DOCUMENT_URI = "urn:chalice-classifier:openapi"
BODY_EXCERPT = 300


@dataclass(frozen=True)
class Exchange:
    """One request (as much of it as the check needs) and the response it got."""

    method: str
    target: str  # path and query, as sent
    status: int
    headers: Mapping[str, str]
    body: bytes

    def __str__(self) -> str:
        return f"{self.method} {self.target} -> {self.status} {self.body[:BODY_EXCERPT]!r}"


class ContractChecker:
    """What is wrong with an exchange, according to one OpenAPI 3.1 document."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self._routes = RouteMatcher(list(document["paths"]))
        self._registry: Registry = Registry().with_resource(
            DOCUMENT_URI, Resource.from_contents(document, default_specification=DRAFT202012)
        )
        self._validators: dict[str, Draft202012Validator] = {}

    def problems(self, exchange: Exchange) -> list[str]:
        """Every way the response breaks the document; empty when it conforms."""
        pointer, problem = self._response_pointer(exchange)
        if pointer is None:
            return [f"{exchange}: {problem}"]
        headers = {name.lower(): value for name, value in exchange.headers.items()}
        found = self._header_problems(pointer, headers)
        if exchange.method != "HEAD":
            found += self._body_problems(pointer, headers, exchange.body)
        return [f"{exchange}: {problem} (documented at {pointer})" for problem in found]

    def _response_pointer(self, exchange: Exchange) -> tuple[str | None, str]:
        """Where the document describes this response, or why it describes none."""
        try:
            path = self._routes.match_route(exchange.target).route
        except ValueError:
            return self._component(UNKNOWN_ROUTE, exchange.status)
        operation = self.document["paths"][path].get(exchange.method.lower())
        if operation is None:
            return self._component(METHOD_NOT_ALLOWED, exchange.status)
        responses = operation["responses"]
        for key in (str(exchange.status), f"{exchange.status // 100}XX", "default"):
            if key in responses:
                return _pointer("paths", path, exchange.method.lower(), "responses", key), ""
        return None, f"status {exchange.status} is not documented for {exchange.method} {path}"

    def _component(self, name: str, status: int) -> tuple[str | None, str]:
        expected = self.document["components"]["responses"][name]["x-status"]
        if status != expected:
            return None, f"outside the documented operations, expected {name} ({expected})"
        return _pointer("components", "responses", name), ""

    def _header_problems(self, pointer: str, headers: Mapping[str, str]) -> list[str]:
        found = []
        for name, header in self._resolve(pointer).get("headers", {}).items():
            where = _target(header, f"{pointer}/headers/{_escape(name)}")
            value = headers.get(name.lower())
            if value is None:
                if self._resolve(where).get("required"):
                    found.append(f"the required header {name} is missing")
                continue
            found += [f"header {name}: {error}" for error in self._errors(f"{where}/schema", value)]
        return found

    def _body_problems(self, pointer: str, headers: Mapping[str, str], body: bytes) -> list[str]:
        content = self._resolve(pointer).get("content")
        if content is None:
            return [] if not body else [f"a body of {len(body)} bytes where none is documented"]
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type not in content:
            return [f"Content-Type {media_type or '(none)'} is not one of {sorted(content)}"]
        schema = f"{pointer}/content/{_escape(media_type)}/schema"
        if media_type != "application/json":
            try:
                return [f"body: {error}" for error in self._errors(schema, body.decode("utf-8"))]
            except UnicodeDecodeError:
                return ["the body is not UTF-8 text"]
        try:
            instance = json.loads(body)
        except ValueError:
            return ["the body is not JSON"]
        return [f"body: {error}" for error in self._errors(schema, instance)]

    def _errors(self, pointer: str, instance: object) -> list[str]:
        validator = self._validators.get(pointer)
        if validator is None:
            validator = Draft202012Validator(
                {"$ref": f"{DOCUMENT_URI}#{pointer}"},
                registry=self._registry,
                format_checker=Draft202012Validator.FORMAT_CHECKER,
            )
            self._validators[pointer] = validator
        return [f"{error.message} at {error.json_path}" for error in validator.iter_errors(instance)]

    def _resolve(self, pointer: str) -> Any:
        node: Any = self.document
        for part in pointer.strip("/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node


def _target(node: Mapping[str, Any], pointer: str) -> str:
    """The pointer of what the node at ``pointer`` stands for: its own, or the one its $ref names."""
    return node["$ref"].removeprefix("#") if "$ref" in node else pointer


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _pointer(*parts: str) -> str:
    return "/" + "/".join(_escape(part) for part in parts)


@cache
def contract() -> ContractChecker:
    """The checker for the app's own document, built once."""
    from app import app
    from chalicelib.openapi import document

    return ContractChecker(document(app.routes))


def assert_conforms(exchange: Exchange, checker: ContractChecker | None = None) -> None:
    problems = (checker or contract()).problems(exchange)
    assert not problems, "The response does not match the OpenAPI document:\n" + "\n".join(problems)


def assert_lambda_response_conforms(request: Mapping[str, Any], response: Mapping[str, Any]) -> None:
    """A Lambda proxy response to ``request`` (its ``httpMethod``, ``path``, ``queryStringParameters``),
    as the Lambda simulations report them: what API Gateway would send on."""
    body = response.get("body") or ""
    data = base64.b64decode(body) if response.get("isBase64Encoded") else body.encode()
    sent = {"Content-Type": "application/json"} if data else {}
    sent.update(response.get("headers") or {})
    query = request.get("queryStringParameters")
    target = request["path"] + (f"?{urlencode(query)}" if query else "")
    assert_conforms(Exchange(request["httpMethod"], target, response["statusCode"], sent, data))


# --- chalice.test.Client ------------------------------------------------------------------------


class CheckedHTTPClient(TestHTTPClient):
    def __init__(self, app: Chalice, config: Config, checker: ContractChecker | None) -> None:
        super().__init__(app, config)
        self._checker = checker

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> HTTPResponse:
        response = super().request(method, path, headers=headers, body=body)
        # As `chalice local` and API Gateway send it: a body without a Content-Type goes out as JSON.
        sent = {"Content-Type": "application/json"} if response.body else {}
        sent.update(response.headers)
        exchange = Exchange(method.upper(), path, response.status_code, sent, response.body)
        assert_conforms(exchange, self._checker)
        return response


class CheckedClient(Client):
    """chalice.test.Client whose every HTTP response is checked against the document."""

    def __init__(self, *args: Any, checker: ContractChecker | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._checker = checker

    @property
    def http(self) -> TestHTTPClient:
        if self._http_client is None:
            self._http_client = CheckedHTTPClient(self._app, self._chalice_config, self._checker)
        return self._http_client


# --- chalice local ----------------------------------------------------------------------------


@dataclass
class Drift:
    """Mismatches seen by proxies, until the test hook takes them."""

    _problems: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, problems: list[str]) -> None:
        with self._lock:
            self._problems.extend(problems)

    def take(self) -> list[str]:
        with self._lock:
            taken, self._problems = self._problems, []
        return taken


LIVE_DRIFT = Drift()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call() -> Iterator[None]:
    """A live response that breaks the document fails the test that got it (fixtures' ones included)."""
    try:
        result = yield
    except BaseException as failure:
        for problem in LIVE_DRIFT.take():
            failure.add_note(problem)
        raise
    if drift := LIVE_DRIFT.take():
        pytest.fail("Responses that do not match the OpenAPI document:\n" + "\n".join(drift), pytrace=False)
    return result


class ContractProxy(InBackground):
    """A store-and-forward HTTP proxy on 127.0.0.1 that checks each response before forwarding it."""

    def __init__(
        self, upstream_port: int, checker: ContractChecker | None = None, drift: Drift = LIVE_DRIFT
    ) -> None:
        upstream = ("127.0.0.1", upstream_port)
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    with socket.create_connection(upstream) as server:
                        owner._relay(self.request, server)
                except OSError:
                    pass  # a side hung up, or the server is not up yet: as it would without the proxy
                except Exception as error:
                    drift.record([f"The contract proxy could not relay or check an exchange: {error!r}"])

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._checker = checker
        self._drift = drift
        super().__init__(Server(("127.0.0.1", 0), Handler))
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        """Request after request on one connection, until either side closes it."""
        from_client, from_server = _Reader(client), _Reader(server)
        while (request := _read_message(from_client, request_method=None)) is not None:
            server.sendall(request.raw)
            response = _read_message(from_server, request_method=request.method)
            if response is None:
                return
            exchange = Exchange(
                request.method, request.target, response.status, response.headers, response.body
            )
            self._drift.record((self._checker or contract()).problems(exchange))
            client.sendall(response.raw)


@dataclass(frozen=True)
class _Message:
    raw: bytes
    start: list[str]
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def method(self) -> str:
        return self.start[0]

    @property
    def target(self) -> str:
        # `chalice local`'s http.server folds a leading '//' into one '/' before routing.
        target = self.start[1]
        return "/" + target.lstrip("/") if target.startswith("//") else target

    @property
    def status(self) -> int:
        return int(self.start[1])


class _Reader:
    """Bytes from a socket, buffered, read as far as one HTTP message needs."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self._buffer:
            if not self._fill():
                return None
        head, self._buffer = self._buffer.split(marker, 1)
        return head + marker

    def exactly(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not self._fill():
                return None
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def rest(self) -> bytes:
        while self._fill():
            pass
        data, self._buffer = self._buffer, b""
        return data

    def _fill(self) -> bool:
        chunk = self._sock.recv(65536)
        self._buffer += chunk
        return bool(chunk)


def _read_message(reader: _Reader, *, request_method: str | None) -> _Message | None:
    """One request (``request_method`` None) or response, framed as `chalice local` frames them.

    Requests carry their body by Content-Length, as `chalice local` reads
    them; its responses always say Content-Length, even to HEAD, where it
    writes the body all the same; without one the body runs to the close.
    """
    head = reader.until(b"\r\n\r\n")
    if head is None:
        return None
    start_line, _, header_block = head.partition(b"\r\n")
    headers = http.client.parse_headers(io.BytesIO(header_block))
    length = headers.get("Content-Length")
    if length is not None:
        body = reader.exactly(int(length))
    else:
        body = b"" if request_method is None else reader.rest()
    if body is None:
        return None
    return _Message(head + body, start_line.decode("latin-1").split(" ", 2), headers, body)
