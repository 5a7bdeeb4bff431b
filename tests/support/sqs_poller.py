"""What Lambda's SQS event source mapping does, on loopback: for running the bulk worker for real.

``SqsEventSource`` receives up to a batch of messages from a (moto) queue,
invokes the handler with the event Lambda would build, deletes the messages
the handler did not list in ``batchItemFailures``, and leaves the others to
reappear once their visibility timeout ends. The queue's own redrive policy
moves a message to its dead-letter queue after ``maxReceiveCount`` receives,
as SQS does on AWS. A handler that raises fails its whole batch, as an
invocation error does with the real mapping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tools.lambda_sim import sqs_event

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]


class Context:
    """The parts of Lambda's context object the worker reads."""

    aws_request_id = "poller"
    function_name = "bulk_worker"
    memory_limit_in_mb = 1769

    def __init__(self, timeout_seconds: float) -> None:
        self._ends = time.monotonic() + timeout_seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(int((self._ends - time.monotonic()) * 1000), 0)


@dataclass
class Tally:
    invocations: int = 0
    deleted: int = 0
    returned: int = 0  # listed in batchItemFailures, or in a batch whose invocation raised
    invocation_errors: list[str] = field(default_factory=list)


class SqsEventSource:
    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        handler: Handler,
        *,
        batch_size: int = 10,
        function_timeout: float = 60.0,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._handler = handler
        self._batch_size = batch_size
        self._function_timeout = function_timeout
        self._queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]
        self.tally = Tally()

    def drain(self, give_up_after: float) -> Tally:
        """Poll until the queue holds nothing, visible or in flight, or ``give_up_after`` seconds pass."""
        ends = time.monotonic() + give_up_after
        while time.monotonic() < ends:
            if not self.poll_once() and self._queue_is_empty():
                return self.tally
        raise TimeoutError(f"the queue still held messages after {give_up_after:g} s: {self.tally}")

    def poll_once(self) -> int:
        """One receive and, if it got anything, one invocation; how many messages it got."""
        received = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=self._batch_size,
            WaitTimeSeconds=1,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if received:
            self._invoke(received)
        return len(received)

    def _invoke(self, received: list[dict[str, Any]]) -> None:
        event = sqs_event(received, self._queue_arn)
        self.tally.invocations += 1
        try:
            answer = self._handler(event, Context(self._function_timeout))
            failed = {entry["itemIdentifier"] for entry in answer.get("batchItemFailures", [])}
        except Exception as error:  # an invocation error: the whole batch comes back
            self.tally.invocation_errors.append(f"{type(error).__name__}: {error}")
            failed = {message["MessageId"] for message in received}
        done = [m for m in received if m["MessageId"] not in failed]
        self.tally.returned += len(received) - len(done)
        for start in range(0, len(done), 10):
            entries = [
                {"Id": str(number), "ReceiptHandle": message["ReceiptHandle"]}
                for number, message in enumerate(done[start : start + 10])
            ]
            self._sqs.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
        self.tally.deleted += len(done)

    def _queue_is_empty(self) -> bool:
        attributes = self._sqs.get_queue_attributes(
            QueueUrl=self._queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"])
            + int(attributes["ApproximateNumberOfMessagesNotVisible"])
            == 0
        )
