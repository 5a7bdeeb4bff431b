"""A slow, silent or held-back S3 on loopback, for deadline and ordering tests.

``ThrottlingProxy`` sits in front of the real (moto) S3 and passes its
answers on at a fixed rate, as a congested network would. ``GatedProxy``
holds each connection until a test's event is set, to show what else ran
while a download waited. ``SilentServer`` accepts connections and never
answers, as a black-holed endpoint does. All listen on 127.0.0.1 only and
stop their threads on exit.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Self
from urllib.parse import urlsplit

PIECE_BYTES = 8 * 1024


class _Listener:
    """Accepts connections on 127.0.0.1 in a thread and hands each to ``_serve``."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._stopped = threading.Event()
        self._connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._socket.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone would not
        self._socket.close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self._thread.join(timeout=10)


class SilentServer(_Listener):
    """Accepts every connection and reads the request, then says nothing until stopped."""

    def _serve(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not self._stopped.is_set() and connection.recv(65536):
                pass


class _Forwarder(_Listener):
    """Relays each connection to ``upstream``, the answers paced by ``_pause`` seconds per piece."""

    _pause = 0.0

    def __init__(self, upstream: str) -> None:
        super().__init__()
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)

    def _serve(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError), socket.create_connection(self._upstream) as upstream:
            threading.Thread(target=self._pipe, args=(connection, upstream, 0.0), daemon=True).start()
            self._pipe(upstream, connection, self._pause)

    def _pipe(self, source: socket.socket, sink: socket.socket, pause: float) -> None:
        with contextlib.suppress(OSError):
            while not self._stopped.is_set() and (piece := source.recv(PIECE_BYTES)):
                sink.sendall(piece)
                time.sleep(pause)
            sink.shutdown(socket.SHUT_WR)


class ThrottlingProxy(_Forwarder):
    """Forwards to ``upstream`` at once and sends its answers back at ``bytes_per_second``."""

    def __init__(self, upstream: str, bytes_per_second: int) -> None:
        super().__init__(upstream)
        self._pause = PIECE_BYTES / bytes_per_second


class GatedProxy(_Forwarder):
    """Forwards each connection to ``upstream`` once ``gate`` is set, or after ``patience`` seconds.

    ``opened`` records, per connection, whether the gate was set in time.
    """

    def __init__(self, upstream: str, gate: threading.Event, patience: float) -> None:
        super().__init__(upstream)
        self._gate = gate
        self._patience = patience
        self.opened: list[bool] = []

    def _serve(self, connection: socket.socket) -> None:
        self.opened.append(self._gate.wait(self._patience))
        super()._serve(connection)
