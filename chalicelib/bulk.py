"""Classifying S3 objects named by queue messages: the worker behind ``@app.on_sqs_message``.

Each SQS message names S3 objects, in one of two shapes, so that backfills
and live uploads flow through the same worker:

- ours, ``{"bucket": ..., "key": ..., "etag": ...}`` (``etag`` optional: the
  version the sender listed), as ``tools/classify_bucket.py`` sends them;
- an S3 event notification delivered to the queue (``{"Records": [...]}``,
  keys URL-encoded); S3's ``s3:TestEvent`` and events other than
  ``ObjectCreated:*`` name nothing to classify.

A batch of messages becomes one forward pass: the images are read from S3
side by side, with the API's limits (``MAX_IMAGE_BYTES`` before a byte is
read, then the pixel, format and decoding limits of the request path), and
classified together. Each input gets one result object,
``<RESULTS_PREFIX><input key>.json`` in ``RESULTS_BUCKET``: the top
``RESULTS_TOP_K`` classes, or the ``{Code, Message}`` the API would answer,
with the model's name and version, the input's ETag and the time. Its
metadata (``x-amz-meta-input-etag``, ``-model-version``, ``-status``) lets a
HEAD tell whether it is current.

Idempotent: an input whose result names its current ETag and the loaded
model's version is not classified again, so a duplicate delivery or a re-run
costs a HEAD (and a GET when the message carries no ETag). Results are
written conditionally (``If-None-Match: *`` for a new one, ``If-Match`` with
the outdated one's ETag to replace it), so two copies of one message racing
each other write it once.

What fails how:

- permanent (not an image, too large, unsupported, missing, forbidden):
  written as an error result; the message is done;
- transient (S3 throttling, 5xx, timeouts, a model that cannot load now, a
  bug of ours): the message is reported in ``batchItemFailures`` and comes
  back after its visibility timeout; after the queue's ``maxReceiveCount``
  receives it goes to the dead-letter queue;
- a message that names no object we can read (not JSON, no bucket or key):
  the same, so it ends in the dead-letter queue, where it can be looked at.

Objects under the results prefix of the results bucket are never classified:
a bucket notification that covers both would otherwise feed on itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import urllib3

from chalicelib import observability
from chalicelib.errors import ClassifierError, ImageTooLarge, InternalError, ObjectUnavailable
from chalicelib.model_holder import LoadedModel
from chalicelib.payload import ImageInput, Invocation
from chalicelib.s3 import S3Client, S3Error
from chalicelib.service import ClassificationService, Outcome
from chalicelib.settings import BulkSettings

logger = logging.getLogger(__name__)

# Side-by-side S3 requests per batch, and inputs per forward pass: an SQS
# batch is at most 10 messages (an S3 notification names one object).
S3_CONCURRENCY = 10
INPUTS_PER_PASS = 10
S3_CONNECT_TIMEOUT = 3.0
S3_READ_TIMEOUT = 10.0
# S3 answers worth another try: throttling and its own failures.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# A result's metadata, which a HEAD reads to tell whether the result is current.
INPUT_ETAG = "x-amz-meta-input-etag"
MODEL_VERSION = "x-amz-meta-model-version"
STATUS = "x-amz-meta-status"


@dataclass(frozen=True)
class Message:
    """One SQS message: its id (what ``batchItemFailures`` names) and body."""

    id: str
    body: str


@dataclass(frozen=True)
class ObjectRef:
    bucket: str
    key: str
    etag: str | None = None  # the version the sender meant, when it says

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class MalformedMessage(ValueError):
    """A message that names no object: retried until the dead-letter queue takes it."""


class _Transient(Exception):
    """Worth another delivery: S3 throttled, failed or was too slow."""


def parse_message(body: str) -> list[ObjectRef]:
    """The objects a message names (none for S3's test event and for non-creation events)."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise MalformedMessage(f"the message is not JSON ({error})") from error
    if not isinstance(document, dict):
        raise MalformedMessage("the message must be a JSON object")
    if document.get("Event") == "s3:TestEvent":
        return []
    if "Records" in document:
        return _event_records(document["Records"])
    return [_ref(document.get("bucket"), document.get("key"), document.get("etag"))]


def _event_records(records: Any) -> list[ObjectRef]:
    if not isinstance(records, list):
        raise MalformedMessage("'Records' must be a list")
    refs = []
    for record in records:
        if not isinstance(record, dict) or record.get("eventSource") != "aws:s3":
            raise MalformedMessage("every record must be an S3 event ('eventSource': 'aws:s3')")
        if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        s3 = record.get("s3") or {}
        bucket = (s3.get("bucket") or {}).get("name")
        found = s3.get("object") or {}
        # S3 sends keys form-encoded: a space arrives as '+'.
        key = unquote_plus(found["key"]) if isinstance(found.get("key"), str) else None
        refs.append(_ref(bucket, key, found.get("eTag")))
    return refs


def _ref(bucket: Any, key: Any, etag: Any) -> ObjectRef:
    if not (isinstance(bucket, str) and bucket and isinstance(key, str) and key):
        raise MalformedMessage("the message must name a 'bucket' and a 'key'")
    return ObjectRef(bucket, key, _bare_etag(etag) if isinstance(etag, str) and etag else None)


def _bare_etag(etag: str) -> str:
    return etag.strip().strip('"')


@dataclass
class _Input:
    """One object of the batch, as it goes through: read, maybe classified, its result written."""

    message_id: str
    ref: ObjectRef
    result_key: str
    existing: Mapping[str, str] | None = None  # the current result's headers, if there is one
    etag: str | None = None
    data: bytes | None = None
    outcome: Outcome | None = None
    skipped: bool = False
    transient: str | None = None  # why it must be delivered again


class BulkWorker:
    """Classifies the objects a batch of messages names and writes one result for each."""

    def __init__(self, service: ClassificationService, settings: BulkSettings, s3: S3Client) -> None:
        self._service = service
        self._settings = settings
        self._s3 = s3

    def handle(self, messages: Sequence[Message], deadline: float) -> list[str]:
        """The ids of the messages to deliver again; everything else is done, a result for each input.

        ``deadline`` (a ``time.monotonic()`` value) is when the invocation
        must have answered: S3 calls are cut short by it, and inputs not
        finished by then are delivered again rather than lost.
        """
        failed: set[str] = set()
        inputs: list[_Input] = []
        for message in messages:
            try:
                refs = parse_message(message.body)
            except MalformedMessage as error:
                logger.warning("message %s names nothing to classify: %s", message.id, error)
                failed.add(message.id)
                continue
            inputs += [self._input(message.id, ref) for ref in refs if not self._is_a_result(ref)]
        if inputs:
            self._process(inputs, deadline)
        failed |= {item.message_id for item in inputs if item.transient}
        self._log(messages, inputs, failed)
        return [message.id for message in messages if message.id in failed]

    def _input(self, message_id: str, ref: ObjectRef) -> _Input:
        return _Input(message_id, ref, result_key=f"{self._settings.results_prefix}{ref.key}.json")

    def _is_a_result(self, ref: ObjectRef) -> bool:
        ours = ref.bucket == self._settings.results_bucket and ref.key.startswith(
            self._settings.results_prefix
        )
        if ours:
            logger.info("skipped %s: it is under the results prefix", ref.uri)
        return ours

    def _process(self, inputs: list[_Input], deadline: float) -> None:
        try:
            model = self._service.models.model()
        except ClassifierError as error:
            for item in inputs:
                item.transient = f"the model is not available: {error}"
            return
        with ThreadPoolExecutor(max_workers=S3_CONCURRENCY, thread_name_prefix="bulk-s3") as pool:
            _each(pool, lambda item: self._read(item, model, deadline), inputs)
            self._classify([item for item in inputs if item.data is not None], model)
            _each(pool, lambda item: self._write(item, model, deadline), inputs)

    def _read(self, item: _Input, model: LoadedModel, deadline: float) -> None:
        """The existing result, then (unless it is current) the image; errors kept on the item.

        Currency is checked as soon as the input's ETag is known, before its
        body is read or refused: a second delivery of an input that was too
        large, or missing, must not write its error result again.
        """
        item.existing = self._head_result(item, deadline)
        if item.ref.etag and self._is_current(item, item.ref.etag, model):
            item.skipped = True
            return
        try:
            response = self._get(item.ref, deadline)
        except ObjectUnavailable as error:
            item.etag = ""  # what a missing input's result records
            item.skipped = self._is_current(item, item.etag, model)
            item.outcome = Outcome(error=error)
            return
        try:
            item.etag = _bare_etag(response.headers.get("ETag", ""))
            item.skipped = self._is_current(item, item.etag, model)
            if not item.skipped:
                item.data = self._body(item.ref, response)
        except ImageTooLarge as error:
            item.outcome = Outcome(error=error)
        finally:
            # A body left unread must not be the next request's answer on this connection.
            response.release_conn() if response.isclosed() else response.close()

    def _head_result(self, item: _Input, deadline: float) -> Mapping[str, str] | None:
        """The result's headers, or None if there is none yet.

        Any answer but 404 is a retry: without s3:ListBucket on the results
        bucket S3 answers a missing object with 403, so the worker's role
        must be allowed to list the results prefix, and a role that is not
        must not be mistaken for results that are all absent.
        """
        try:
            return self._s3.head(self._settings.results_bucket, item.result_key, _timeout(deadline))
        except S3Error as error:
            if error.status == 404:
                return None
            raise _Transient(f"the result {item.result_key} could not be checked: {error}") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _Transient(f"the result {item.result_key} could not be checked ({error})") from error

    def _is_current(self, item: _Input, etag: str, model: LoadedModel) -> bool:
        existing = item.existing or {}
        return (existing.get(INPUT_ETAG), existing.get(MODEL_VERSION)) == (etag, model.files.version)

    def _get(self, ref: ObjectRef, deadline: float) -> urllib3.BaseHTTPResponse:
        try:
            return self._s3.get(ref.bucket, ref.key, _timeout(deadline))
        except S3Error as error:
            raise _transient_or(error, f"{ref.uri} could not be read") from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _Transient(f"{ref.uri} could not be read ({error})") from error

    def _body(self, ref: ObjectRef, response: urllib3.BaseHTTPResponse) -> bytes:
        """The image's bytes, refused unread when the object declares more than MAX_IMAGE_BYTES."""
        limit = self._service.settings.fetch.max_bytes
        declared = int(response.headers.get("Content-Length", "0"))
        if declared > limit:
            raise ImageTooLarge(
                f"The object is {declared} bytes; the limit is {limit} bytes (MAX_IMAGE_BYTES)."
            )
        try:
            data = response.read(limit + 1)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise _Transient(f"{ref.uri} could not be read ({error})") from error
        if len(data) > limit:
            raise ImageTooLarge(f"The object is over the limit of {limit} bytes (MAX_IMAGE_BYTES).")
        return data

    def _classify(self, items: list[_Input], model: LoadedModel) -> None:
        pending = [item for item in items if not item.skipped]
        for start in range(0, len(pending), INPUTS_PER_PASS):
            self._classify_pass(pending[start : start + INPUTS_PER_PASS], model)

    def _classify_pass(self, pending: list[_Input], model: LoadedModel) -> None:
        """One forward pass; an input's own error becomes its result."""
        invocation = Invocation(
            inputs=tuple(ImageInput(data=item.data, source=item.ref.uri) for item in pending),
            batch=True,
            top_k=min(self._settings.top_k, len(model.classifier.classes)),
        )
        try:
            outcomes = self._service.classify(invocation)
        except ClassifierError as error:
            for item in pending:
                item.transient = f"the batch could not be classified: {error}"
            return
        for item, outcome in zip(pending, outcomes, strict=True):
            item.data = None  # the decoded batch is done with; keep the memory
            error = outcome.error
            if error is not None and error.STATUS_CODE >= 500:
                item.transient = f"{type(error).__name__}: {error}"
            else:
                item.outcome = outcome

    def _write(self, item: _Input, model: LoadedModel, deadline: float) -> None:
        if item.transient or item.skipped or item.outcome is None:
            return
        body = json.dumps(_result(item, model), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            INPUT_ETAG: item.etag or item.ref.etag or "",
            MODEL_VERSION: model.files.version,
            STATUS: "error" if item.outcome.error else "ok",
        }
        # Create only, or replace only the outdated result we read: a duplicate racing us writes once.
        if item.existing is None:
            headers["If-None-Match"] = "*"
        else:
            headers["If-Match"] = item.existing.get("ETag", "")
        try:
            self._s3.put(self._settings.results_bucket, item.result_key, body, _timeout(deadline), headers)
        except S3Error as error:
            if error.status == 412:
                item.skipped = True  # another delivery of the same input wrote it first
                return
            item.transient = str(_transient_or(error, f"the result {item.result_key} could not be written"))
        except (urllib3.exceptions.HTTPError, OSError) as error:
            item.transient = f"the result {item.result_key} could not be written ({error})"

    def _log(self, messages: Sequence[Message], inputs: list[_Input], failed: set[str]) -> None:
        counts = {
            "messages": len(messages),
            "inputs": len(inputs),
            "classified": sum(1 for i in inputs if i.outcome and not i.outcome.error and not i.skipped),
            "error_results": sum(1 for i in inputs if i.outcome and i.outcome.error and not i.skipped),
            "already_current": sum(1 for i in inputs if i.skipped),
            "retried_messages": len(failed),
        }
        observability.note(items=len(inputs))
        observability.batch_counts(counts)
        for item in inputs:
            if item.transient:
                logger.warning("%s will be delivered again: %s", item.ref.uri, item.transient)


def _result(item: _Input, model: LoadedModel) -> dict[str, Any]:
    outcome = item.outcome
    assert outcome is not None  # only inputs with an outcome are written
    result: dict[str, Any] = {
        "input": {"bucket": item.ref.bucket, "key": item.ref.key, "etag": item.etag or item.ref.etag},
        "status": "error" if outcome.error else "ok",
    }
    if outcome.error is not None:
        result["error"] = {"Code": type(outcome.error).__name__, "Message": str(outcome.error)}
    else:
        assert outcome.predictions is not None
        best = outcome.predictions[0]
        result |= {
            "class": best.label,
            "confidence": best.confidence,
            "top_k": [{"class": p.label, "confidence": p.confidence} for p in outcome.predictions],
        }
    return result | {
        "model": {"name": model.files.manifest.get("name"), "version": model.files.version},
        "classified_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _transient_or(error: S3Error, doing: str) -> Exception:
    """S3's answer as a retry (throttling, its own failures) or as the input's permanent error."""
    if error.status in TRANSIENT_STATUSES:
        return _Transient(f"{doing}: {error}")
    if error.status == 404:
        return ObjectUnavailable(f"The object does not exist (S3: {error.code}).")
    if error.status == 403:
        # Without s3:ListBucket on the input bucket, a deleted input is a 403 too.
        return ObjectUnavailable(
            f"S3 refused the object (S3: {error.code}): it does not exist, or the worker may not read it."
        )
    return ObjectUnavailable(f"S3 refused to read the object (S3: {error}).")


def _timeout(deadline: float) -> urllib3.Timeout:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Transient("the invocation's time ran out first")
    return urllib3.Timeout(connect=min(S3_CONNECT_TIMEOUT, left), read=min(S3_READ_TIMEOUT, left))


def _each(pool: ThreadPoolExecutor, work: Any, items: list[_Input]) -> None:
    """``work`` on every input side by side; an error of ours becomes that input's retry, logged."""

    def guarded(item: _Input) -> None:
        try:
            work(item)
        except _Transient as error:
            item.transient = str(error)
        except Exception:
            logger.exception("%s failed unexpectedly", item.ref.uri)
            item.transient = InternalError.__name__

    for future in [pool.submit(copy_context().run, guarded, item) for item in items]:
        future.result()
