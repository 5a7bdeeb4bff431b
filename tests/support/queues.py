"""A work queue and its dead-letter queue on moto's SQS, as the deployed worker has them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3


@dataclass
class Queues:
    sqs: Any
    url: str
    dead_letters: str

    def drain(self, url: str) -> list[str]:
        """Every message's body, received once (and kept invisible)."""
        bodies = []
        while messages := self.sqs.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=300
        ).get("Messages"):
            bodies += [message["Body"] for message in messages]
        return bodies


@contextlib.contextmanager
def queue_with_dead_letters(endpoint: str, name: str, max_receives: int) -> Iterator[Queues]:
    """A queue whose messages move to its dead-letter queue on receive ``max_receives + 1``.

    Its visibility timeout is one second, so a failed message comes back soon; both are deleted after.
    """
    sqs = boto3.client("sqs", endpoint_url=endpoint)
    dead_letters = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dead_letters, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    redrive = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receives)})
    attributes = {"RedrivePolicy": redrive, "VisibilityTimeout": "1"}
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    try:
        yield Queues(sqs, url, dead_letters)
    finally:
        for queue in (url, dead_letters):
            sqs.delete_queue(QueueUrl=queue)
