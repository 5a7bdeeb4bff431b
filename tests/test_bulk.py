"""The bulk worker: S3 objects named by queue messages, one result each, failures kept, none doubled.

Everything is real but AWS: moto's S3 and SQS over HTTP on loopback, the
demo model, photographs from scikit-image, and Lambda's SQS event source
played by tests/support/sqs_poller.py around the app's own handler.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

from app import bulk_worker
from chalicelib.bulk import MalformedMessage, ObjectRef, parse_message
from chalicelib.current import get_service
from chalicelib.payload import ImageInput, Invocation
from tests.conftest import jpeg
from tests.support.faulty_s3 import FaultyS3
from tests.support.queues import Queues, queue_with_dead_letters
from tests.support.s3 import MotoS3Server
from tests.support.sqs_poller import Context, SqsEventSource

BUCKET = "photos"
RESULTS = "results/"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat", "hubble_deep_field")
MAX_IMAGE_BYTES = 60_000
ROOT = Path(__file__).resolve().parent.parent


# --- Messages -------------------------------------------------------------------------------------


def s3_event(key: str, event: str = "ObjectCreated:Put", etag: str = "0123") -> str:
    record = {
        "eventSource": "aws:s3",
        "eventName": event,
        "s3": {"bucket": {"name": BUCKET}, "object": {"key": key, "size": 10, "eTag": etag}},
    }
    return json.dumps({"Records": [record]})


@pytest.mark.parametrize(
    ("body", "refs"),
    [
        ('{"bucket": "b", "key": "a/b.jpg"}', [ObjectRef("b", "a/b.jpg")]),
        ('{"bucket": "b", "key": "k", "etag": "\\"abc\\""}', [ObjectRef("b", "k", "abc")]),
        # S3 form-encodes keys: '+' is a space, %2B a plus.
        (s3_event("my+photo%2B1.jpg"), [ObjectRef(BUCKET, "my photo+1.jpg", "0123")]),
        (s3_event("gone.jpg", event="ObjectRemoved:Delete"), []),
        ('{"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos"}', []),
    ],
)
def test_messages_name_objects_in_our_shape_or_s3s(body: str, refs: list[ObjectRef]) -> None:
    assert parse_message(body) == refs


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        '{"bucket": "b"}',
        '{"bucket": "", "key": "k"}',
        '{"bucket": "b", "key": 7}',
        '{"Records": "x"}',
        '{"Records": [{"eventSource": "aws:sns"}]}',
    ],
)
def test_a_message_that_names_no_object_is_malformed(body: str) -> None:
    with pytest.raises(MalformedMessage):
        parse_message(body)


# --- One batch through the handler -----------------------------------------------------------------


@dataclass
class Bucket:
    s3: Any
    prefix: str

    def put(self, name: str, data: bytes) -> str:
        key = f"{self.prefix}{name}"
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        return key

    def result(self, key: str) -> dict[str, Any]:
        return json.loads(self.s3.get_object(Bucket=BUCKET, Key=f"{RESULTS}{key}.json")["Body"].read())

    def result_metadata(self, key: str) -> dict[str, str]:
        return self.s3.head_object(Bucket=BUCKET, Key=f"{RESULTS}{key}.json")["Metadata"]

    def result_keys(self) -> set[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{RESULTS}{self.prefix}"
        )
        return {item["Key"] for page in pages for item in page.get("Contents", [])}


@pytest.fixture
def bucket(
    s3: Any, demo_from_s3: None, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Bucket:
    """Inputs under a prefix of this test's own in the photos bucket; results beside them."""
    s3.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("RESULTS_BUCKET", BUCKET)
    monkeypatch.setenv("RESULTS_PREFIX", RESULTS)
    monkeypatch.setenv("MAX_IMAGE_BYTES", str(MAX_IMAGE_BYTES))
    return Bucket(s3, prefix=f"in/{request.node.name}/")


def deliver(*bodies: str) -> list[str]:
    """One invocation, as Lambda's mapping makes it; the ids of the messages to deliver again."""
    event = {
        "Records": [{"messageId": f"m{n}", "receiptHandle": f"r{n}", "body": b} for n, b in enumerate(bodies)]
    }
    answer = bulk_worker(event, Context(timeout_seconds=60))
    return [failure["itemIdentifier"] for failure in answer["batchItemFailures"]]


def ours(key: str, etag: str | None = None) -> str:
    return json.dumps({"bucket": BUCKET, "key": key, **({"etag": etag} if etag else {})})


def expected_label(data: bytes) -> str:
    """What the API answers for the same bytes."""
    outcome = get_service().classify(Invocation(inputs=(ImageInput(data=data),), batch=False, top_k=None))[0]
    assert outcome.predictions is not None
    return outcome.predictions[0].label


def photo(name: str) -> bytes:
    return jpeg(np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((320, 240))))


def noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_batch_gets_one_result_per_input_errors_included(bucket: Bucket) -> None:
    photos = {bucket.put(f"{name}.jpg", photo(name)): photo(name) for name in ("chelsea", "coffee")}
    corrupt = bucket.put("corrupt.jpg", b"\xff\xd8\xff\xe0 not really a JPEG")
    oversized = bucket.put("huge.png", noise_png(256, seed=1))
    missing = f"{bucket.prefix}never-uploaded.jpg"

    retry = deliver(*(ours(key) for key in [*photos, corrupt, oversized, missing]), s3_event(missing))

    assert retry == []
    for key, data in photos.items():
        result = bucket.result(key)
        assert (result["status"], result["class"]) == ("ok", expected_label(data))
        assert [entry["class"] for entry in result["top_k"]][:1] == [result["class"]]
        assert len(result["top_k"]) == 5
        assert result["input"] == {"bucket": BUCKET, "key": key, "etag": result["input"]["etag"]}
        assert result["model"]["version"]
        assert result["classified_at"].endswith("+00:00")
    errors = {key: bucket.result(key)["error"]["Code"] for key in (corrupt, oversized, missing)}
    assert errors == {corrupt: "UnsupportedImage", oversized: "ImageTooLarge", missing: "ObjectUnavailable"}
    assert bucket.result_metadata(corrupt)["status"] == "error"


def test_a_second_delivery_writes_nothing_and_a_new_model_version_classifies_again(
    bucket: Bucket, s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = bucket.put("chelsea.jpg", photo("chelsea"))
    result_path = f"/{BUCKET}/{RESULTS}{key}.json"
    etag = bucket.s3.head_object(Bucket=BUCKET, Key=key)["ETag"]
    assert deliver(ours(key, etag)) == []
    written = bucket.s3.head_object(Bucket=BUCKET, Key=f"{RESULTS}{key}.json")["ETag"]
    gets = s3_server.log.count("GET", f"/{BUCKET}/{key}")

    # SQS delivers at least once: the same message again, and one without the ETag.
    assert deliver(ours(key, etag), ours(key)) == []

    assert s3_server.log.count_answered("PUT", result_path, 200) == 1
    assert s3_server.log.count("GET", f"/{BUCKET}/{key}") == gets + 1  # only the message without an ETag
    # The same model, published again: a new version (an ETag of its own) classifies again.
    archive = bucket.s3.get_object(Bucket=os.environ["MODEL_BUCKET"], Key=os.environ["MODEL_KEY"])[
        "Body"
    ].read()
    bucket.s3.put_object(
        Bucket=os.environ["MODEL_BUCKET"], Key="bulk/republished.tar.gz", Body=archive + bytes(512)
    )
    monkeypatch.setenv("MODEL_KEY", "bulk/republished.tar.gz")
    assert deliver(ours(key, etag)) == []
    assert s3_server.log.count_answered("PUT", result_path, 200) == 2
    assert bucket.s3.head_object(Bucket=BUCKET, Key=f"{RESULTS}{key}.json")["ETag"] != written


def test_two_copies_of_a_message_in_one_batch_write_one_result(
    bucket: Bucket, s3_server: MotoS3Server
) -> None:
    key = bucket.put("coffee.jpg", photo("coffee"))

    assert deliver(ours(key), ours(key), s3_event(key)) == []

    assert s3_server.log.count_answered("PUT", f"/{BUCKET}/{RESULTS}{key}.json", 200) == 1
    assert bucket.result(key)["status"] == "ok"


def test_results_and_malformed_messages_are_never_classified(bucket: Bucket, s3_server: MotoS3Server) -> None:
    """A notification on the whole bucket would otherwise classify the results it writes, forever."""
    key = bucket.put("coffee.jpg", photo("coffee"))
    assert deliver(ours(key)) == []
    result_key = f"{RESULTS}{key}.json"

    retry = deliver(s3_event(result_key), "{not json")

    assert retry == ["m1"]  # the malformed one comes back, and ends in the dead-letter queue
    assert s3_server.log.count("GET", f"/{BUCKET}/{result_key}") == 0
    assert bucket.result_keys() == {result_key}


def test_throttling_and_a_missing_configuration_send_messages_back(
    bucket: Bucket, s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    throttled, fine = (bucket.put(f"{name}.jpg", photo(name)) for name in ("chelsea", "coffee"))
    with FaultyS3(s3_server.endpoint) as faulty:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faulty.endpoint)
        faulty.refuse("GET", f"/{BUCKET}/{throttled}")

        assert deliver(ours(throttled), ours(fine)) == ["m0"]
        assert deliver(ours(throttled)) == []

    assert bucket.result(throttled)["status"] == "ok"
    monkeypatch.delenv("RESULTS_BUCKET")
    assert deliver(ours(fine), ours(throttled)) == ["m0", "m1"]


# --- Live uploads, through the bucket's notification -----------------------------------------------


def notification_configuration(stack: str, queue_arn: str, input_prefix: str) -> dict[str, Any]:
    """The document the README has users apply, as the stack's output renders it."""
    template = json.loads((ROOT / ".chalice" / "merge-template-bulk.json").read_text())
    document = template["Outputs"]["BulkNotificationConfiguration"]["Value"]["Fn::Sub"]
    values = {"AWS::StackName": stack, "BulkQueue.Arn": queue_arn, "InputPrefix": input_prefix}
    return json.loads(re.sub(r"\$\{([^}]+)\}", lambda found: values[found.group(1)], document))


def test_uploads_reach_the_worker_through_the_bucket_notification_the_stack_outputs(
    bucket: Bucket, queues: Queues
) -> None:
    """moto's S3 sends the notification to its SQS as S3 does: its test event, then one per upload."""
    arn = queues.sqs.get_queue_attributes(QueueUrl=queues.url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    bucket.s3.put_bucket_notification_configuration(
        Bucket=BUCKET, NotificationConfiguration=notification_configuration("stack", arn, bucket.prefix)
    )
    uploads = {bucket.put("a cat+1.jpg", photo("chelsea")): photo("chelsea")}  # S3 encodes the space and +
    uploads[bucket.put("cup.jpg", photo("coffee"))] = photo("coffee")
    bucket.s3.put_object(Bucket=BUCKET, Key="elsewhere/cup.jpg", Body=photo("coffee"))  # not under the prefix

    tally = SqsEventSource(queues.sqs, queues.url, bulk_worker, batch_size=10).drain(give_up_after=120)

    assert tally.invocation_errors == []
    assert {key: bucket.result(key)["class"] for key in uploads} == {
        key: expected_label(data) for key, data in uploads.items()
    }
    # The results, written under results/ in the same bucket, set off no notification of their own.
    assert bucket.result_keys() == {f"{RESULTS}{key}.json" for key in uploads}
    assert tally.deleted == 3  # the test event and the two uploads
    assert queues.drain(queues.dead_letters) == []


# --- A thousand images through the queue ------------------------------------------------------------


@pytest.fixture
def queues(s3_server: MotoS3Server, request: pytest.FixtureRequest) -> Iterator[Queues]:
    """Messages go to the dead-letter queue on their fourth receive."""
    with queue_with_dead_letters(s3_server.endpoint, request.node.name[:60], max_receives=3) as queues:
        yield queues


def send(queues: Queues, bodies: list[str]) -> None:
    for start in range(0, len(bodies), 10):
        entries = [{"Id": str(n), "MessageBody": body} for n, body in enumerate(bodies[start : start + 10])]
        answer = queues.sqs.send_message_batch(QueueUrl=queues.url, Entries=entries)
        assert not answer.get("Failed"), answer["Failed"]


def test_a_thousand_images_each_end_with_exactly_one_result_or_in_the_dead_letter_queue(
    bucket: Bucket, queues: Queues, s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faults of every kind at once: corrupt and oversized images (error results, not retried),
    throttled reads and result checks (retried, then done), poison messages (dead-letter queue),
    and duplicate deliveries (never a second write). None lost, none doubled."""
    shuffle = random.Random(14)
    keys = {bucket.put(f"photo-{n:03}-{name}.jpg", photo(name)): "ok" for n, name in enumerate(PHOTOS * 5)}
    for n in range(940):
        side = shuffle.choice((32, 48, 64))
        keys[bucket.put(f"generated-{n:04}.png", noise_png(side, seed=n))] = "ok"
    for n in range(20):
        keys[bucket.put(f"corrupt-{n:02}.jpg", photo("coffee")[: 200 + n * 50])] = "UnsupportedImage"
    for n in range(10):
        keys[bucket.put(f"oversized-{n:02}.png", noise_png(256, seed=10_000 + n))] = "ImageTooLarge"
    assert len(keys) == 1000
    poison = ["{truncated", '{"bucket": "photos"}', "[]", '{"Records": [{"eventSource": "aws:sns"}]}', ""]
    poison[-1] = " "  # SQS refuses an empty body; a blank one is as malformed
    duplicated = shuffle.sample(sorted(keys), 25)
    bodies = [ours(key) for key in keys] + [ours(key) for key in duplicated] + poison
    shuffle.shuffle(bodies)

    with FaultyS3(s3_server.endpoint) as faulty:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", faulty.endpoint)
        throttled = shuffle.sample(sorted(k for k, status in keys.items() if status == "ok"), 40)
        for key in throttled[:30]:
            faulty.refuse("GET", f"/{BUCKET}/{key}")
        for key in throttled[30:]:
            faulty.refuse("HEAD", f"/{BUCKET}/{RESULTS}{key}.json")
        send(queues, bodies)
        event_source = SqsEventSource(queues.sqs, queues.url, bulk_worker, batch_size=10)
        tally = event_source.drain(give_up_after=600)

    assert tally.invocation_errors == []
    assert sum(faulty.refused.values()) == 40  # every fault was met, and retried past
    assert bucket.result_keys() == {f"{RESULTS}{key}.json" for key in keys}
    outcomes = {key: bucket.result(key) for key in keys}
    assert {
        key: r["status"] if r["status"] == "ok" else r["error"]["Code"] for key, r in outcomes.items()
    } == keys
    for key in keys:  # one write each, duplicates and retries included
        assert s3_server.log.count_answered("PUT", f"/{BUCKET}/{RESULTS}{key}.json", 200) == 1, key
    assert sorted(queues.drain(queues.dead_letters)) == sorted(poison)
    print(json.dumps({"inputs": len(keys), "messages": len(bodies), **vars(tally)}))
