"""An S3 on loopback that fails on purpose: moto behind a proxy that throttles chosen requests.

``FaultyS3`` forwards every request to the real (moto) server, except that
the first ``times`` requests matching a fault are answered as S3 answers
when it throttles (``503 SlowDown``, with its XML error body), without
reaching moto at all. What it answered is recorded, so a test can see that a
request really was refused before it was retried.
"""

from __future__ import annotations

import threading
from collections import Counter

from tests.support.moto_proxy import MotoProxy, Reply

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyS3(MotoProxy):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.faults: Counter[tuple[str, str]] = Counter()  # (method, path) -> refusals still to give
        self.refused: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def refuse(self, method: str, path: str, times: int = 1) -> None:
        with self._lock:
            self.faults[(method, path)] += times

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply | None:
        fault = (method, path.split("?", 1)[0])
        with self._lock:
            if self.faults[fault] <= 0:
                return None
            self.faults[fault] -= 1
            self.refused[fault] += 1
        return Reply(503, [("Content-Type", "application/xml")], SLOW_DOWN)
