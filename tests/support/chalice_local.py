"""`chalice local` on the dev stage, started as `make serve` starts it (tools/dev_server.py), for tests.

The fixture hands over a server that answers ``/ping``, or fails the test
at once with the server's own output: a server that exited (a port already
taken, an import error) or never answered must not be mistaken for one
that serves. Its output is read as it comes, so a server that logs a lot
never blocks on a full pipe, and a test can read what it printed so far.
The address it hands over is a proxy that checks every response against
the OpenAPI document (tests/support/openapi_check.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.openapi_check import ContractProxy

ROOT = Path(__file__).resolve().parent.parent.parent
READY_WITHIN_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dev_server_command(port: int) -> list[str]:
    """The command of `make serve`'s recipe, with this Python and ``port``."""
    return [sys.executable, "-m", "tools.dev_server", "--host", "127.0.0.1", "--port", str(port)]


@dataclass
class LocalServer:
    base: str
    process: subprocess.Popen[str]
    _lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    def output(self) -> str:
        """Everything the server printed so far."""
        return "".join(list(self._lines))

    def stop(self) -> str:
        """Stop the whole process group and return everything it printed."""
        with contextlib.suppress(ProcessLookupError):  # it exited, or was stopped already
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
        if self._reader is not None:
            self._reader.join(timeout=30)
        return self.output()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.append(line)


@contextlib.contextmanager
def running_chalice_local(
    port: int, ready_within: float = READY_WITHIN_S, environment: Mapping[str, str] | None = None
) -> Iterator[LocalServer]:
    """The server once it answers; stopped (whole process group) afterwards."""
    process = subprocess.Popen(
        dev_server_command(port),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(environment or {})},
    )  # fmt: skip
    with ContractProxy(port) as proxy:  # checks every response against the OpenAPI document
        server = LocalServer(base=proxy.base, process=process)
        server._reader = threading.Thread(target=server._drain, daemon=True)
        server._reader.start()
        try:
            _wait_until_answering(server, ready_within)
            yield server
        finally:
            server.stop()


@pytest.fixture
def chalice_local() -> Iterator[LocalServer]:
    with running_chalice_local(free_port()) as server:
        yield server


def _wait_until_answering(server: LocalServer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"`chalice local` exited with status {server.process.returncode} before answering /ping:\n"
                f"{server.stop()[-4000:]}"
            )
        try:
            urllib.request.urlopen(f"{server.base}/ping", timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers; a 503 for a broken configuration is an answer
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"`chalice local` did not answer /ping within {seconds:g} s:\n{server.stop()[-4000:]}")
