"""The one client of ``make bench-peers``: the same requests, the same clock, for every server.

A request is a JPEG ``POST``ed as the body (``Content-Type: image/jpeg``),
which both our ``/invocations`` and TorchServe's ``/predictions/<model>``
take, and the answer is read as ``{"class": ..., "confidence": ...}``. The
clock runs from sending the request to having parsed the answer, on
``http.client`` (what requests and urllib3 are built on, with their
``TCP_NODELAY``), in one of two ways:

- keep-alive: one connection for every request, as a browser or a
  ``requests.Session`` does; a server that closes it fails the run, since
  the figure would silently be the other mode's;
- new connection: connect, send, read, close, for every request.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

KEEP_ALIVE, NEW_CONNECTION = "keep-alive", "new connection"
MODES = (KEEP_ALIVE, NEW_CONNECTION)
REQUEST_TIMEOUT_S = 120.0
POLL_EVERY_S = 0.05


class PeerError(RuntimeError):
    """A server answered something other than a classification, or not at all."""


@dataclass(frozen=True)
class Answer:
    label: str
    confidence: float


@dataclass(frozen=True)
class Endpoint:
    port: int
    path: str

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)


def classify(connection: http.client.HTTPConnection, path: str, jpeg: bytes, *, keep_alive: bool) -> Answer:
    """One request on ``connection``; a non-200 answer or a body of another shape raises ``PeerError``."""
    connection.request("POST", path, body=jpeg, headers={"Content-Type": "image/jpeg"})
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise PeerError(f"POST {path} answered {response.status}: {body[:300]!r}")
    if keep_alive and response.will_close:
        raise PeerError(f"POST {path} closed a kept-alive connection; keep-alive figures would be wrong")
    try:
        answer = json.loads(body)
        return Answer(label=str(answer["class"]), confidence=float(answer["confidence"]))
    except (ValueError, KeyError, TypeError) as error:
        raise PeerError(f"POST {path} answered 200 with {body[:300]!r}, not a class") from error


@contextmanager
def requester(endpoint: Endpoint, *, keep_alive: bool) -> Iterator[Callable[[bytes], Answer]]:
    """A function that sends one image in this mode; a kept-alive connection is closed afterwards."""
    if keep_alive:
        connection = endpoint.connect()
        try:
            yield lambda jpeg: classify(connection, endpoint.path, jpeg, keep_alive=True)
        finally:
            connection.close()
        return

    def once(jpeg: bytes) -> Answer:
        connection = endpoint.connect()
        try:
            return classify(connection, endpoint.path, jpeg, keep_alive=False)
        finally:
            connection.close()

    yield once


def latencies(endpoint: Endpoint, jpeg: bytes, *, keep_alive: bool, count: int, warm_up: int) -> list[float]:
    """Seconds per request for ``count`` requests, after ``warm_up`` untimed ones on the same terms."""
    with requester(endpoint, keep_alive=keep_alive) as send:
        for _ in range(warm_up):
            send(jpeg)
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            send(jpeg)
            samples.append(time.perf_counter() - started)
    return samples


def throughput(endpoint: Endpoint, jpeg: bytes, *, keep_alive: bool, clients: int, per_client: int) -> float:
    """Requests per second with ``clients`` clients sending back to back, from a common start."""
    start = threading.Barrier(clients + 1)
    errors: list[Exception] = []

    def client() -> None:
        try:
            with requester(endpoint, keep_alive=keep_alive) as send:
                send(jpeg)  # its connection is open and warm before the clock starts
                start.wait()
                for _ in range(per_client):
                    send(jpeg)
        except Exception as error:  # handed to the main thread, which raises it
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    with suppress(threading.BrokenBarrierError):  # a client failed: its error is raised below
        start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise PeerError(f"a throughput client failed: {errors[0]}") from errors[0]
    return clients * per_client / elapsed


def first_answer(
    endpoint: Endpoint, jpeg: bytes, *, started: float, alive: Callable[[], bool], within_s: float
) -> tuple[float, Answer]:
    """Seconds from ``started`` (``time.monotonic()``) to the server's first classification.

    Until then a server may refuse the connection or answer an error (TorchServe
    answers while its worker still loads); each try is a new connection. A
    server that exits, or has not answered within ``within_s``, raises.
    """
    last_error: Exception | None = None
    while time.monotonic() - started < within_s:
        if not alive():
            raise PeerError(f"the server exited before it answered (last: {last_error})")
        try:
            with requester(endpoint, keep_alive=False) as send:
                answer = send(jpeg)
            return time.monotonic() - started, answer
        except (OSError, PeerError, http.client.HTTPException) as error:
            last_error = error
            time.sleep(POLL_EVERY_S)
    raise PeerError(f"no answer within {within_s:g} s (last: {last_error})")
