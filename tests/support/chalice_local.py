"""`chalice local` on the dev stage, as `make serve` runs it, for tests that need a real server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def chalice_local() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The server's base URL and process; stopped (whole process group) afterwards."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "chalice"), "local", "--no-autoreload", "--stage", "dev",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2).read()
                break
            except OSError:
                time.sleep(0.25)
        yield base, server
    finally:
        with contextlib.suppress(ProcessLookupError):  # the test may have stopped it already
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
