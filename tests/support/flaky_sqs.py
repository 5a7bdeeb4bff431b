"""An SQS on loopback that fails entries of SendMessageBatch, as SQS may: moto behind a proxy.

SQS can accept a batch and still fail some of its entries (``Failed``, with
``SenderFault: false``): the caller must send those again. moto never does,
so ``FlakySqs`` forwards every request to moto's server unchanged, except
the next ``fail_entries(n)`` SendMessageBatch calls: from each it holds back
the first entry, forwards the rest, and answers with that entry in
``Failed``, as SQS would. S3 requests pass through too, so one endpoint
serves a whole run. Every batch's entry Ids are recorded, so a test can check
they were unique and see what was held back.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from tests.support.moto_proxy import MotoProxy, Reply

SEND_MESSAGE_BATCH = "AmazonSQS.SendMessageBatch"


class FlakySqs(MotoProxy):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.batches: list[list[str]] = []  # the entry Ids of every SendMessageBatch, as sent
        self.held_back: list[str] = []  # the bodies of the entries answered as failed
        self._failures_left = 0
        self._lock = threading.Lock()

    def fail_entries(self, batches: int) -> None:
        """Fail the first entry of each of the next ``batches`` SendMessageBatch calls."""
        with self._lock:
            self._failures_left += batches

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply | None:
        if headers.get("X-Amz-Target") != SEND_MESSAGE_BATCH:
            return None
        request = json.loads(body)
        held_back = self._hold_back(request)
        body = json.dumps(request).encode()  # moto checks no signatures unless asked to
        reply = self.forward(method, path, {**headers, "Content-Length": str(len(body))}, body)
        if held_back is None:
            return reply
        answered = json.loads(reply.body)
        answered.setdefault("Failed", []).append(
            {"Id": held_back["Id"], "SenderFault": False, "Code": "InternalError", "Message": "try again"}
        )
        return Reply(reply.status, reply.headers, json.dumps(answered).encode())

    def _hold_back(self, request: dict[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            self.batches.append([entry["Id"] for entry in request["Entries"]])
            if self._failures_left == 0 or len(request["Entries"]) < 2:
                return None
            self._failures_left -= 1
            entry = request["Entries"].pop(0)
            self.held_back.append(entry["MessageBody"])
            return entry
