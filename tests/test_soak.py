"""1,000 requests in a row, good and bad mixed: nothing leaks.

Open file descriptors and threads must not grow, and RSS must grow by less
than 50 MB, measured after a warm-up so that the model and first-use caches
are already in.
"""

from __future__ import annotations

import gc
import io
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chalice.test import Client
from PIL import Image

from tests.support.api import JSON, classify
from tests.support.http_server import RoutedHTTPServer, serve_bytes

REQUESTS = 1000
WARM_UP = 60


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def settled_thread_count(ceiling: int) -> int:
    """Server threads may still be finishing a response; give them a moment."""
    for _ in range(50):
        if threading.active_count() <= ceiling:
            break
        time.sleep(0.1)
    return threading.active_count()


@pytest.mark.usefixtures("demo_from_s3")
def test_a_thousand_mixed_requests_leak_nothing(client: Client, image_server: RoutedHTTPServer) -> None:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, "PNG")
    image_server.routes["/soak/too-many-pixels.png"] = serve_bytes(buffer.getvalue(), "image/png")
    image_server.routes["/soak/text.jpg"] = serve_bytes(b"plain text", "image/jpeg")
    mix: list[Callable[[], int]] = [
        lambda: classify(client, image_server.url("/coffee.jpg")).status_code,
        lambda: classify(client, image_server.url("/soak/text.jpg")).status_code,
        lambda: classify(client, image_server.url("/soak/missing.jpg")).status_code,
        lambda: classify(client, image_server.url("/soak/too-many-pixels.png")).status_code,
        lambda: client.http.post("/invocations", headers=JSON, body="{broken").status_code,
        lambda: classify(client, "ftp://example.com/x.jpg").status_code,
        lambda: client.http.post("/invocations", headers=JSON, body=json.dumps({"url": 7})).status_code,
    ]
    expected = [200, 422, 502, 413, 400, 400, 400]

    for index in range(WARM_UP):
        assert mix[index % len(mix)]() == expected[index % len(mix)]
    gc.collect()
    fds, threads, rss = open_fds(), threading.active_count(), rss_bytes()

    for index in range(REQUESTS):
        assert mix[index % len(mix)]() == expected[index % len(mix)]
    gc.collect()
    print(
        f"fds {fds}->{open_fds()}, threads {threads}->{threading.active_count()}, "
        f"RSS {rss / 2**20:.0f}->{rss_bytes() / 2**20:.0f} MiB"
    )

    assert open_fds() <= fds
    assert settled_thread_count(threads) <= threads
    assert rss_bytes() - rss < 50 * 1024 * 1024
