"""Classify every image under an S3 prefix with the bulk worker, and report what became of each.

Through the deployed queue (the worker runs on Lambda, scaled out by SQS)::

    python -m tools.classify_bucket s3://my-photos/2024/ --results s3://my-photos/results/ \\
        --queue-url https://sqs.us-east-1.amazonaws.com/123456789012/chalice-classifier-bulk \\
        --model s3://my-model-bucket/models/model.tar.gz --report report.csv

or in this process, with no queue and no Lambda (small jobs, or no AWS
account: any S3-compatible store, moto or MinIO, through ``--endpoint-url``)::

    python -m tools.classify_bucket s3://photos/in/ --results s3://photos/results/ --local \\
        --endpoint-url http://127.0.0.1:5000

What a run does:

1. lists the prefix, a page of ListObjectsV2 at a time, into a scratch
   SQLite file beside the report (deleted at the end): millions of keys are
   never held in memory. Keys ending in ``/`` (console folders) are skipped;
2. reads the results already under ``--results`` (one listing, then a GET
   of each result found, side by side). An input's result is *current* when
   its ``x-amz-meta-input-etag`` is the ETag just listed and its
   ``x-amz-meta-model-version`` is the version of the worker's model (the
   archive's S3 ETag, or ``sha256:...`` of a local one). Inputs with a current
   result are done; error results count, unless ``--retry-failed``, which
   deletes them so the worker classifies those inputs again;
3. sends one message per remaining input (``{"bucket", "key", "etag"}``,
   SendMessageBatch, 10 at a time; entries SQS fails are sent again), or with
   ``--local`` runs the worker itself on them, 10 at a time, trying each
   batch's transient failures again a few times;
4. waits, with a progress bar on stderr (done, failed, pending, in the
   dead-letter queue, ETA), until every input has a result, or the queue has
   drained and the rest sit in the dead-letter queue, or ``--timeout``;
5. writes the report (JSON Lines, or CSV by the file's extension), one line
   per input: bucket, key, status (ok | error | dlq | pending), class,
   confidence, error_code, error_message; and prints a summary.

Running the same command again sends only what has no current result: an
interrupted or timed-out run resumes, a changed image or a new model version
is classified again, and a finished run sends nothing.

``--results`` must be where the worker writes (its ``RESULTS_BUCKET`` and
``RESULTS_PREFIX``) and ``--model`` the archive it serves (its
``MODEL_BUCKET``/``MODEL_KEY``); ``--local`` hands both to the worker it
runs, which logs to ``<report>.worker.log``. The results may not lie inside
the inputs, or the inputs inside the results: the worker would be asked to
classify its own results.

Exit status: 0 every input has a result (error results included: see the
report); 1 some inputs are in the dead-letter queue or still pending;
2 nothing was done (a bad argument, a missing bucket or queue, no
credentials); 130 interrupted (the report lists what was done so far).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import boto3
import botocore.exceptions
from botocore.config import Config

from chalicelib.errors import ClassifierError
from chalicelib.locations import ArchiveLocation, LocalArchive, S3Archive
from chalicelib.settings import DEMO_ARCHIVE

RESULT_SUFFIX = ".json"
MESSAGES_PER_BATCH = 10  # SendMessageBatch's limit, and the worker's batch size
LIST_PAGE_SIZE = 1000  # ListObjectsV2's largest page
S3_THREADS = 16  # result reads side by side
SQS_THREADS = 8  # SendMessageBatch calls side by side
SEND_ATTEMPTS = 5  # tries of an entry SQS failed before the run gives up (and can be resumed)
LOCAL_ATTEMPTS = 4  # tries of a --local batch's transient failures; then they count as dead letters
BACKOFF_S = 0.5  # the first wait before trying again; it doubles each time
LOCAL_BATCH_SECONDS = 120.0  # what one in-process "invocation" may take
DRAINED_POLLS = 3  # checks in a row that must find the queue empty: its counts are approximate
# While waiting, the pending results are read directly rather than found by listing every result
# when there are this many times fewer of them: a LIST costs 12.5 GETs and reads one page after
# another, while GETs run S3_THREADS at a time.
DIRECT_READS_BELOW = 64
REDRAW_EVERY_S = 0.25  # progress on a terminal
PRINT_EVERY_S = 5.0  # progress in a log
BAR_WIDTH = 24
REPORT_FIELDS = ("bucket", "key", "status", "class", "confidence", "error_code", "error_message")
# A queue URL names its region; the client must call that region's endpoint.
_QUEUE_REGION = re.compile(r"^https://(?:sqs\.([a-z0-9-]+)|([a-z0-9-]+)\.queue)\.amazonaws\.com/")
_BUCKET_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}$")

# What an input is at: listed but not sent yet, sent, or settled one of three ways.
LISTED, SENT, OK, ERROR, DLQ = "listed", "sent", "ok", "error", "dlq"


class Refused(Exception):
    """Something the user must fix before anything is done: said plainly, with no traceback."""


# --- What the user asked for ---------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str, what: str, *, folder: bool = False) -> S3Location:
        """``s3://bucket/prefix``; a ``folder`` prefix ends in ``/``, as the worker's RESULTS_PREFIX does."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not url.startswith("s3://") or not _BUCKET_NAME.match(bucket):
            raise Refused(f"{what} must look like s3://bucket/prefix/, got {url!r}")
        if folder and prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def overlaps(self, other: S3Location) -> bool:
        """Whether a listing of one would include keys of the other."""
        return self.bucket == other.bucket and (
            self.prefix.startswith(other.prefix) or other.prefix.startswith(self.prefix)
        )


@dataclass(frozen=True)
class Job:
    inputs: S3Location
    results: S3Location
    local: bool
    queue_url: str | None
    dlq_url: str | None
    model: ArchiveLocation | None  # None: as the environment names it (MODEL_BUCKET/MODEL_KEY, MODEL_PATH)
    endpoint_url: str | None
    report: Path
    retry_failed: bool
    timeout: float | None
    poll_seconds: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Job:
        inputs = S3Location.parse(args.inputs, "the input prefix")
        results = S3Location.parse(args.results, "--results", folder=True)
        if results.overlaps(inputs):
            raise Refused(
                f"the results ({results}) and the inputs ({inputs}) overlap: the worker would be asked "
                "to classify its own results. Put the results under a prefix of their own."
            )
        if args.dlq_url and args.local:
            raise Refused("--dlq-url goes with --queue-url: --local has no queue")
        if args.report.suffix not in (".csv", ".jsonl"):
            raise Refused(f"--report must end in .jsonl (JSON Lines) or .csv, got {str(args.report)!r}")
        model = _archive(args.model) if args.model else None
        if model is None and not args.local and not _model_in_environment():
            raise Refused(
                "name the worker's model with --model s3://bucket/key (its MODEL_BUCKET and MODEL_KEY): "
                "a result is current only for the version of the model that wrote it"
            )
        return cls(
            inputs=inputs,
            results=results,
            local=args.local,
            queue_url=args.queue_url,
            dlq_url=args.dlq_url,
            model=model,
            endpoint_url=args.endpoint_url,
            report=args.report,
            retry_failed=args.retry_failed,
            timeout=args.timeout,
            poll_seconds=args.poll_seconds,
        )

    def message(self, key: str, etag: str) -> str:
        """The contract's message body: the listed ETag lets the worker skip a current input with a HEAD."""
        return json.dumps({"bucket": self.inputs.bucket, "key": key, "etag": etag})


def _archive(argument: str) -> ArchiveLocation:
    if argument.startswith("s3://"):
        bucket, _, key = argument.removeprefix("s3://").partition("/")
        if not _BUCKET_NAME.match(bucket) or not key or key.endswith("/"):
            raise Refused(f"--model must be s3://bucket/key/model.tar.gz or a file, got {argument!r}")
        return S3Archive(bucket, key)
    return LocalArchive(Path(argument))


def _model_in_environment() -> bool:
    return bool(os.environ.get("MODEL_BUCKET") or os.environ.get("MODEL_PATH"))


# --- The inputs, on disk ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What a result object says, as far as the currency check and the report need."""

    etag: str  # the result object's own ETag: a new one means it was written again
    input_etag: str
    model_version: str
    status: str
    label: str | None = None
    confidence: float | None = None
    error_code: str | None = None
    error_message: str | None = None


class Catalogue:
    """Every input of the run and what became of it, in a scratch SQLite file.

    A listing of millions of keys must not be held in memory, and neither may
    the keys still waiting for a result. Only the main thread uses it.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path)
        self._db.executescript(
            """
            PRAGMA journal_mode = OFF;  -- scratch data: a crash loses nothing that S3 does not hold
            PRAGMA synchronous = OFF;
            CREATE TABLE inputs (
                key TEXT PRIMARY KEY,
                etag TEXT NOT NULL,
                state TEXT NOT NULL,
                seen TEXT,  -- the ETag of the result last read for it: read it again only once it changes
                class TEXT, confidence REAL, error_code TEXT, error_message TEXT
            ) WITHOUT ROWID;
            """
        )

    def close(self) -> None:
        self._db.close()

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        self._db.executemany("INSERT INTO inputs (key, etag, state) VALUES (?, ?, 'listed')", rows)
        self._db.commit()

    def waiting(self, state: str, keys: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """Of ``keys``, those in ``state``: their listed ETag and the ETag of the result last read."""
        found: dict[str, tuple[str, str | None]] = {}
        for start in range(0, len(keys), 500):  # within SQLite's limit on parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, etag, seen FROM inputs WHERE state = ? AND key IN ({marks})"
            found |= {key: (etag, seen) for key, etag, seen in self._db.execute(query, (state, *chunk))}
        return found

    def in_state(self, state: str, chunk: int) -> Iterator[list[tuple[str, str]]]:
        """(key, ETag) of the inputs in ``state``, in key order, ``chunk`` at a time.

        Each chunk is read after the caller has handled the one before, so it may move them on.
        """
        after = ""
        while rows := self._db.execute(
            "SELECT key, etag FROM inputs WHERE state = ? AND key > ? ORDER BY key LIMIT ?",
            (state, after, chunk),
        ).fetchall():
            yield rows
            after = rows[-1][0]

    def move(self, keys: Iterable[str], state: str) -> None:
        self._db.executemany("UPDATE inputs SET state = ? WHERE key = ?", ((state, key) for key in keys))
        self._db.commit()

    def saw(self, key: str, result_etag: str | None) -> None:
        self._db.execute("UPDATE inputs SET seen = ? WHERE key = ?", (result_etag, key))

    def settle(self, key: str, result: Result) -> None:
        self._db.execute(
            "UPDATE inputs SET state = ?, seen = ?, class = ?, confidence = ?, error_code = ?,"
            " error_message = ? WHERE key = ?",
            (
                OK if result.status == "ok" else ERROR,
                result.etag,
                result.label,
                result.confidence,
                result.error_code,
                result.error_message,
                key,
            ),
        )

    def commit(self) -> None:
        self._db.commit()

    def report_rows(self, bucket: str) -> Iterator[dict[str, Any]]:
        query = "SELECT key, state, class, confidence, error_code, error_message FROM inputs ORDER BY key"
        for key, state, label, confidence, code, message in self._db.execute(query):
            status = "pending" if state in (LISTED, SENT) else state
            yield dict(
                zip(REPORT_FIELDS, (bucket, key, status, label, confidence, code, message), strict=True)
            )


@contextlib.contextmanager
def scratch_catalogue(beside: Path) -> Iterator[Catalogue]:
    """A catalogue in a file of its own beside the report (on the user's disk, not a tmpfs), removed after."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=beside.parent, prefix=f".{beside.name}.", suffix=".sqlite")
    os.close(handle)
    catalogue = Catalogue(Path(name))
    try:
        yield catalogue
    finally:
        catalogue.close()
        Path(name).unlink(missing_ok=True)


# --- S3 ---------------------------------------------------------------------------------------------


def s3_client(session: boto3.session.Session, endpoint_url: str | None) -> Any:
    config = Config(
        max_pool_connections=S3_THREADS,
        retries={"mode": "standard", "max_attempts": 5},
        # Path-style, as S3-compatible stores expect (and as the worker addresses them).
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def check_bucket(s3: Any, location: S3Location, what: str) -> None:
    try:
        s3.head_bucket(Bucket=location.bucket)
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise Refused(f"{what}: the bucket {location.bucket!r} does not exist") from error
        if code in ("403", "AccessDenied"):
            raise Refused(
                f"{what}: these credentials may not list the bucket {location.bucket!r} (s3:ListBucket)"
            ) from error
        raise


def list_pages(s3: Any, bucket: str, prefix: str) -> Iterator[list[dict[str, Any]]]:
    """ListObjectsV2 a page at a time: only one page is ever in memory."""
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
    )
    for page in pages:
        yield page.get("Contents", [])


class ResultStore:
    """The worker's results for the inputs of one run: listed, read side by side, deleted for a retry."""

    def __init__(self, s3: Any, job: Job, pool: ThreadPoolExecutor) -> None:
        self._s3 = s3
        self._location = job.results
        self._inputs_prefix = job.inputs.prefix
        self._pool = pool

    def key_of(self, input_key: str) -> str:
        return f"{self._location.prefix}{input_key}{RESULT_SUFFIX}"

    def listed(self) -> Iterator[list[tuple[str, str]]]:
        """Pages of (input key, result ETag) for the results that exist now."""
        start = len(self._location.prefix)
        prefix = self._location.prefix + self._inputs_prefix
        for page in list_pages(self._s3, self._location.bucket, prefix):
            yield [
                (item["Key"][start : -len(RESULT_SUFFIX)], item["ETag"].strip('"'))
                for item in page
                if item["Key"].endswith(RESULT_SUFFIX)
            ]

    def read(self, input_keys: Sequence[str]) -> list[Result | None]:
        return list(self._pool.map(self._read_one, input_keys))

    def delete(self, input_keys: Sequence[str]) -> None:
        for start in range(0, len(input_keys), 1000):  # DeleteObjects' limit
            objects = [{"Key": self.key_of(key)} for key in input_keys[start : start + 1000]]
            answer = self._s3.delete_objects(
                Bucket=self._location.bucket, Delete={"Objects": objects, "Quiet": True}
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise Refused(
                    f"--retry-failed could not delete the error result s3://{self._location.bucket}/"
                    f"{first['Key']} ({first.get('Code')}: {first.get('Message')})"
                )

    def _read_one(self, input_key: str) -> Result | None:
        try:
            answer = self._s3.get_object(Bucket=self._location.bucket, Key=self.key_of(input_key))
        except self._s3.exceptions.NoSuchKey:
            return None
        metadata = answer.get("Metadata", {})
        try:
            body = json.loads(answer["Body"].read())
        except ValueError:
            body = {}  # not one of ours: the worker replaces it unless its metadata says current
        error = body.get("error") or {}
        return Result(
            etag=answer["ETag"].strip('"'),
            input_etag=metadata.get("input-etag", ""),
            model_version=metadata.get("model-version", ""),
            status=metadata.get("status") or str(body.get("status", "")),
            label=body.get("class"),
            confidence=body.get("confidence"),
            error_code=error.get("Code"),
            error_message=error.get("Message"),
        )


# --- SQS --------------------------------------------------------------------------------------------


class Queue:
    """The worker's queue: messages sent 10 at a time; what is left in it, and in its dead-letter queue."""

    def __init__(self, session: boto3.session.Session, job: Job) -> None:
        assert job.queue_url is not None
        found = _QUEUE_REGION.match(job.queue_url)
        region = (found.group(1) or found.group(2)) if found else None
        self._sqs = session.client(
            "sqs",
            endpoint_url=job.endpoint_url,
            region_name=region,
            config=Config(max_pool_connections=SQS_THREADS, retries={"mode": "standard"}),
        )
        self.url = job.queue_url
        self.dead_letters = job.dlq_url or self._dead_letter_queue(
            self._attributes(self.url, "RedrivePolicy")
        )
        if job.dlq_url:
            self._attributes(job.dlq_url, "QueueArn")  # it exists

    def _dead_letter_queue(self, attributes: Mapping[str, str]) -> str | None:
        """The queue its redrive policy names, if it has one."""
        policy = attributes.get("RedrivePolicy")
        if not policy:
            return None
        _, _, _, _, account, name = json.loads(policy)["deadLetterTargetArn"].split(":")
        return self._sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account)["QueueUrl"]

    def _attributes(self, url: str, *names: str) -> Mapping[str, str]:
        try:
            return self._sqs.get_queue_attributes(QueueUrl=url, AttributeNames=list(names)).get(
                "Attributes", {}
            )
        except botocore.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                raise Refused(f"the queue {url} does not exist") from error
            raise

    def send(self, bodies: Sequence[str]) -> None:
        """One SendMessageBatch; the entries SQS fails (its fault, not ours) are sent again."""
        entries = {str(number): body for number, body in enumerate(bodies)}  # Ids unique in the batch
        for attempt in range(SEND_ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            answer = self._sqs.send_message_batch(
                QueueUrl=self.url, Entries=[{"Id": id_, "MessageBody": body} for id_, body in entries.items()]
            )
            failed = answer.get("Failed", [])
            refused = [entry for entry in failed if entry.get("SenderFault")]
            if refused:
                raise Refused(f"SQS refused a message: {refused[0]['Code']}: {refused[0].get('Message', '')}")
            entries = {entry["Id"]: entries[entry["Id"]] for entry in failed}
            if not entries:
                return
        raise Refused(
            f"SQS failed {len(entries)} messages {SEND_ATTEMPTS} times ({failed[0]['Code']}); "
            "run the same command again to send what has no result"
        )

    def drained(self) -> bool:
        """Nothing waiting, in flight or delayed: every message is done or dead-lettered."""
        counts = self._counts(
            self.url,
            "ApproximateNumberOfMessages",
            "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed",
        )
        return sum(counts) == 0

    def dead_letter_count(self) -> int:
        if self.dead_letters is None:
            return 0
        return sum(self._counts(self.dead_letters, "ApproximateNumberOfMessages"))

    def _counts(self, url: str, *names: str) -> list[int]:
        attributes = self._attributes(url, *names)
        return [int(attributes.get(name, 0)) for name in names]


# --- The worker in this process (--local) ----------------------------------------------------------


@contextlib.contextmanager
def environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """The process environment with ``changes`` (None: unset), as it was again afterwards."""
    saved = {name: os.environ.get(name) for name in changes}

    def apply(values: Mapping[str, str | None]) -> None:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(changes)
    try:
        yield
    finally:
        apply(saved)


def worker_environment(job: Job) -> dict[str, str | None]:
    """What the worker reads from its environment, as on Lambda: where to write, which model, the endpoint."""
    changes: dict[str, str | None] = {
        "RESULTS_BUCKET": job.results.bucket,
        "RESULTS_PREFIX": job.results.prefix,
    }
    if job.endpoint_url:
        changes["AWS_ENDPOINT_URL_S3"] = job.endpoint_url
    if isinstance(job.model, S3Archive):
        changes |= {"MODEL_BUCKET": job.model.bucket, "MODEL_KEY": job.model.key, "MODEL_PATH": None}
    elif isinstance(job.model, LocalArchive):
        changes |= {"MODEL_BUCKET": None, "MODEL_KEY": None, "MODEL_PATH": str(job.model.path)}
    return changes


class LocalWorker:
    """The bulk worker run here, as Lambda's SQS mapping would run it, logging to a file.

    The worker logs, and prints its metrics, to stdout as it does on Lambda
    (where CloudWatch reads them); here they go to ``<report>.worker.log``, so
    the terminal keeps the progress bar and the summary.
    """

    def __init__(self, job: Job) -> None:
        self._job = job
        self.log_path = job.report.with_suffix(".worker.log")
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> LocalWorker:
        from chalicelib import observability  # noqa: PLC0415 - --local only
        from chalicelib.current import get_settings  # noqa: PLC0415

        self._stack.enter_context(environment(worker_environment(self._job)))
        log = self._stack.enter_context(self.log_path.open("a", encoding="utf-8"))
        self._stack.enter_context(contextlib.redirect_stdout(log))
        try:
            observability.configure_logging(get_settings().log_level)
        except ClassifierError as error:
            self._stack.close()
            raise Refused(f"the worker cannot run: {error}") from error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def model_version(self) -> str:
        """The version of the worker's model, loaded now: a model that cannot load stops the run here."""
        from chalicelib.current import get_holder, get_worker  # noqa: PLC0415 - --local only
        from chalicelib.s3 import S3Error  # noqa: PLC0415

        try:
            get_worker()  # refuses a configuration it cannot run under
            return get_holder().model().files.version
        except (ClassifierError, S3Error) as error:
            raise Refused(f"the worker cannot run: {error}") from error

    def classify(self, batch: Sequence[tuple[str, str]]) -> list[str]:
        """Run the worker on (key, ETag) inputs; the keys it still failed on after every attempt."""
        from chalicelib.current import run_bulk_batch  # noqa: PLC0415 - --local only

        waiting = {str(number): item for number, item in enumerate(batch)}
        for attempt in range(LOCAL_ATTEMPTS):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            messages = [(id_, self._job.message(key, etag)) for id_, (key, etag) in waiting.items()]
            retry = run_bulk_batch(messages, LOCAL_BATCH_SECONDS)
            waiting = {id_: waiting[id_] for id_ in retry}
            if not waiting:
                break
        return [key for key, _ in waiting.values()]


def archive_version(location: ArchiveLocation, endpoint_url: str | None) -> str:
    """The version the worker gives its results for this archive: its S3 ETag, or a local file's hash.

    Asked of the model store itself, so it is the worker's own notion of a version.
    """
    from chalicelib.model_store import ModelStore  # noqa: PLC0415 - queue mode only
    from chalicelib.s3 import S3Client, S3Error  # noqa: PLC0415

    environ = {**os.environ, **({"AWS_ENDPOINT_URL_S3": endpoint_url} if endpoint_url else {})}
    store = ModelStore(Path(tempfile.gettempdir()), s3=lambda: S3Client.from_environment(environ))
    try:
        return store.current_version(location, deadline=time.monotonic() + 30).version
    except (ClassifierError, S3Error) as error:
        raise Refused(f"the model's version cannot be read ({location}): {error}") from error


# --- Progress ----------------------------------------------------------------------------------------


@dataclass
class Tally:
    inputs: int = 0
    current: int = 0  # had a current result before this run: nothing to do
    sent: int = 0
    ok: int = 0
    failed: int = 0  # error results
    dead: int = 0  # dead-lettered (or, with --local, given up on)

    @property
    def finished(self) -> int:
        return self.ok + self.failed + self.dead

    @property
    def pending(self) -> int:
        return self.inputs - self.finished


class Progress:
    """One status line on stderr: redrawn in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._shown_at = -float("inf")
        self._phase = ""
        self._drawn = False
        self._clock: tuple[float, int] | None = None  # when results started to come, and how many there were

    def start_clock(self, tally: Tally) -> None:
        self._clock = (time.monotonic(), tally.finished)

    def show(self, phase: str, tally: Tally, in_dlq: int = 0, *, now: bool = False) -> None:
        """Show the counts, unless shown a moment ago in the same phase (``now``: regardless)."""
        at = time.monotonic()
        interval = REDRAW_EVERY_S if self._tty else PRINT_EVERY_S
        if not now and phase == self._phase and at - self._shown_at < interval:
            return
        self._shown_at, self._phase = at, phase
        line = self.line(phase, tally, in_dlq, at)
        if self._tty:
            self._stream.write(f"\r{line}\033[K")
            self._drawn = True
        else:
            self._stream.write(f"{line}\n")
        self._stream.flush()

    def say(self, text: str) -> None:
        """A line of its own, above the bar."""
        self.end_line()
        self._stream.write(f"{text}\n")
        self._stream.flush()

    def end_line(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._drawn = False

    def line(self, phase: str, tally: Tally, in_dlq: int, at: float) -> str:
        share = tally.finished / tally.inputs if tally.inputs else 0.0
        filled = int(share * BAR_WIDTH)  # rounded down: full only when all is done
        waiting = max(tally.pending - in_dlq, 0)
        return (
            f"{phase:<11} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {int(share * 100):3}%  "
            f"{tally.finished:,}/{tally.inputs:,} done ({tally.ok:,} ok, {tally.failed:,} failed)  "
            f"{waiting:,} pending  {in_dlq + tally.dead:,} in DLQ  {self._speed(tally, waiting, at)}"
        )

    def _speed(self, tally: Tally, waiting: int, at: float) -> str:
        if self._clock is None:
            return ""
        started, finished_then = self._clock
        rate = (tally.finished - finished_then) / max(at - started, 1e-9)
        if rate <= 0:
            return "ETA --" if waiting else ""
        return f"{rate:,.1f}/s" + (f"  ETA {_clock_time(waiting / rate)}" if waiting else "")


def _clock_time(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02}:{whole % 60:02}"


# --- The run -----------------------------------------------------------------------------------------


class Run:
    """One pass over the prefix: list, check, classify or send, wait, report."""

    def __init__(
        self,
        job: Job,
        *,
        version: str,
        s3: Any,
        catalogue: Catalogue,
        progress: Progress,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.job = job
        self.version = version  # of the worker's model: what makes a result current
        self.tally = Tally()
        self._results_listed = 0  # in the last listing of the results
        self._s3 = s3
        self._catalogue = catalogue
        self._progress = progress
        self._pool = pool
        self._results = ResultStore(s3, job, pool)
        self.other_versions: Counter[str] = Counter()  # of results the worker wrote with another model

    def go(self, worker: LocalWorker | None, queue: Queue | None) -> str:
        """The whole run; how it ended: done, drained (the rest is dead-lettered), timeout or interrupted."""
        try:
            self.list_inputs()
            self.check_existing()
            if worker is not None:
                self.classify_locally(worker)
                return "done"
            assert queue is not None
            dead_letters_before = queue.dead_letter_count()
            self.send(queue)
            return self.wait(queue, dead_letters_before)
        except KeyboardInterrupt:
            self._progress.say("interrupted: writing the report of what is done so far")
            return "interrupted"

    def list_inputs(self) -> None:
        for page in list_pages(self._s3, self.job.inputs.bucket, self.job.inputs.prefix):
            rows = [(item["Key"], item["ETag"].strip('"')) for item in page if not item["Key"].endswith("/")]
            self._catalogue.add(rows)
            self.tally.inputs += len(rows)
            self._progress.show("listing", self.tally)

    def check_existing(self) -> None:
        """Settle the inputs whose result is current; delete the error results --retry-failed redoes."""
        for page in self._listed_results():
            redo: list[str] = []
            for key, etag, result in self._read_changed(page, LISTED):
                if not self._is_current(result, etag, written_now=False):
                    continue
                if result.status == "error" and self.job.retry_failed:
                    redo.append(key)
                    self._catalogue.saw(key, None)  # gone: whatever is written next is new
                else:
                    self._settle(key, result)
                    self.tally.current += 1
            self._catalogue.commit()
            self._results.delete(redo)
            self._progress.show("checking", self.tally)

    def classify_locally(self, worker: LocalWorker) -> None:
        self._progress.start_clock(self.tally)
        for batch in self._catalogue.in_state(LISTED, MESSAGES_PER_BATCH):
            given_up = set(worker.classify(batch))
            self._catalogue.move(given_up, DLQ)
            self.tally.sent += len(batch)
            self.tally.dead += len(given_up)
            done = [(key, etag) for key, etag in batch if key not in given_up]
            for (key, etag), result in zip(done, self._results.read([key for key, _ in done]), strict=True):
                if self._is_current(result, etag, written_now=True):
                    self._settle(key, result)
            self._catalogue.commit()
            self._progress.show("classifying", self.tally)

    def send(self, queue: Queue) -> None:
        self._progress.start_clock(self.tally)
        with ThreadPoolExecutor(SQS_THREADS, thread_name_prefix="send") as senders:
            for chunk in self._catalogue.in_state(LISTED, MESSAGES_PER_BATCH * SQS_THREADS * 2):
                batches = [chunk[start : start + MESSAGES_PER_BATCH] for start in range(0, len(chunk), 10)]
                bodies = [[self.job.message(key, etag) for key, etag in batch] for batch in batches]
                list(senders.map(queue.send, bodies))
                self._catalogue.move((key for key, _ in chunk), SENT)
                self.tally.sent += len(chunk)
                self._progress.show("sending", self.tally)

    def wait(self, queue: Queue, dead_letters_before: int) -> str:
        """Collect results until none is pending, or the queue has drained, or time is up; which it was."""
        ends = time.monotonic() + self.job.timeout if self.job.timeout is not None else float("inf")
        drained_polls = 0
        while True:
            drained_polls = drained_polls + 1 if queue.drained() else 0
            self._collect()
            in_dlq = min(max(queue.dead_letter_count() - dead_letters_before, 0), self.tally.pending)
            self._progress.show("waiting", self.tally, in_dlq)
            if self.tally.pending == 0:
                return "done"
            if drained_polls >= DRAINED_POLLS:
                self._dead_lettered(in_dlq)
                return "drained"
            if time.monotonic() >= ends:
                return "timeout"
            time.sleep(self.job.poll_seconds)

    def _collect(self) -> None:
        """Settle the sent inputs whose result has been written since it was last read."""
        few = self.tally.pending * DIRECT_READS_BELOW < self._results_listed
        for page in self._pending_results() if few else self._listed_results():
            for key, etag, result in self._read_changed(page, SENT):
                if self._is_current(result, etag, written_now=True):
                    self._settle(key, result)
            self._catalogue.commit()

    def _listed_results(self) -> Iterator[list[tuple[str, str | None]]]:
        """Pages of (input key, result ETag) of the results there are, counted as they go."""
        self._results_listed = 0
        for page in self._results.listed():
            self._results_listed += len(page)
            yield list(page)

    def _pending_results(self) -> Iterator[list[tuple[str, str | None]]]:
        """Pages of (input key, None: read it) of the inputs sent and still without a result."""
        for chunk in self._catalogue.in_state(SENT, LIST_PAGE_SIZE):
            yield [(key, None) for key, _ in chunk]

    def _dead_lettered(self, in_dlq: int) -> None:
        """The queue has drained: what has no result is in the dead-letter queue, if it holds that many."""
        if 0 < self.tally.pending <= in_dlq:
            for chunk in self._catalogue.in_state(SENT, 1000):
                self._catalogue.move((key for key, _ in chunk), DLQ)
            self.tally.dead += self.tally.pending

    def _read_changed(
        self, page: Sequence[tuple[str, str | None]], state: str
    ) -> Iterator[tuple[str, str, Result | None]]:
        """(key, listed ETag, result) of the inputs in ``state`` whose result changed since last read
        (a result ETag of None: not known, read it)."""
        waiting = self._catalogue.waiting(state, [key for key, _ in page])
        changed = [
            key
            for key, result_etag in page
            if key in waiting and (result_etag is None or waiting[key][1] != result_etag)
        ]
        for key, result in zip(changed, self._results.read(changed), strict=True):
            self._catalogue.saw(key, result.etag if result else None)
            yield key, waiting[key][0], result

    def _is_current(self, result: Result | None, etag: str, *, written_now: bool) -> bool:
        """Whether ``result`` is the outcome for the input as listed.

        One found before anything was sent counts only for the model's current
        version (an older one is classified again). One written since was
        written by the worker for this run: if its model is not the one
        ``--model`` names, the summary says so, and the next run would redo it.
        """
        if result is None or result.input_etag != etag:
            return False
        if result.model_version != self.version:
            if written_now:
                self.other_versions[result.model_version] += 1
            return written_now
        return True

    def _settle(self, key: str, result: Result) -> None:
        self._catalogue.settle(key, result)
        if result.status == "ok":
            self.tally.ok += 1
        else:
            self.tally.failed += 1


# --- Report and summary ------------------------------------------------------------------------------


def write_report(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """JSON Lines or CSV by the extension, written a row at a time and moved into place when whole."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8", newline="") as stream:
        if path.suffix == ".csv":
            writer = csv.DictWriter(stream, fieldnames=REPORT_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        else:
            stream.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    partial.replace(path)


def summary(run: Run, ending: str, dead_letters: str) -> list[str]:
    """What became of the inputs, and what to do about what is left; ``dead_letters`` says where those are."""
    tally, job = run.tally, run.job
    lines = [
        f"{job.inputs}: {tally.inputs:,} inputs, {tally.current:,} with a current result already, "
        f"{tally.sent:,} {'classified here' if job.local else 'sent'}",
        f"  {tally.ok:,} ok, {tally.failed:,} failed (error results), "
        f"{tally.dead:,} in the dead-letter queue, {tally.pending:,} pending",
        f"report: {job.report}",
    ]
    if tally.dead:
        lines.append(f"  dead letters: {dead_letters}")
    if ending == "timeout":
        lines.append(f"  --timeout: {tally.pending:,} inputs have no result yet; the queue keeps working")
    if ending == "drained" and tally.pending:
        lines.append(
            f"  the queue has drained but {tally.pending:,} inputs have no current result under "
            f"{job.results}: is that the worker's RESULTS_BUCKET/RESULTS_PREFIX, and --model its model?"
        )
    for version, count in run.other_versions.most_common():
        lines.append(
            f"  {count:,} results were written by model version {version!r}, not {run.version!r} "
            "(--model): pass --model the archive the worker serves"
        )
    if tally.pending or tally.dead:
        lines.append("  run the same command again to send what has no result")
    return lines


# --- The command --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.classify_bucket",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Exit status: 0 every input has a result (error results included); 1 some are in the "
        "dead-letter queue or pending; 2 refused, nothing done; 130 interrupted. README: Classify a bucket.",
    )
    parser.add_argument("inputs", metavar="s3://bucket/prefix", help="the images to classify")
    parser.add_argument(
        "--results",
        required=True,
        metavar="s3://bucket/prefix/",
        help="where the worker writes one <input key>.json per input (its RESULTS_BUCKET/RESULTS_PREFIX)",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--queue-url", metavar="URL", help="the worker's SQS queue: send it the inputs")
    mode.add_argument(
        "--local", action="store_true", help="run the worker in this process instead: no SQS, no Lambda"
    )
    parser.add_argument(
        "--dlq-url",
        metavar="URL",
        help="the queue's dead-letter queue (default: the one its redrive policy names)",
    )
    parser.add_argument(
        "--model",
        metavar="s3://bucket/key | PATH",
        help="the archive the worker serves, whose version makes a result current (default: "
        f"MODEL_BUCKET/MODEL_KEY, else MODEL_PATH; with --local, else the demo model {DEMO_ARCHIVE.name})",
    )
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="an S3-compatible endpoint (moto, MinIO, LocalStack), for S3 and SQS; --local hands it "
        "to the worker as AWS_ENDPOINT_URL_S3",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path("classify-report.jsonl"),
        help="one line per input, JSON Lines (.jsonl) or CSV (.csv) (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="classify inputs with a current error result again (their error results are deleted)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="stop waiting for results this long after the last message is sent (default: no limit)",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often to look for new results while waiting; each look lists the results (default: 5)",
    )
    return parser.parse_args(argv)


def execute(job: Job) -> int:
    # A session of its own: it reads the environment (credentials, region) as it is now.
    session = boto3.session.Session()
    s3 = s3_client(session, job.endpoint_url)
    check_bucket(s3, job.inputs, "the input prefix")
    check_bucket(s3, job.results, "--results")
    queue = None if job.local else Queue(session, job)
    progress = Progress(sys.stderr)
    with (
        scratch_catalogue(job.report) as catalogue,
        ThreadPoolExecutor(S3_THREADS, thread_name_prefix="results") as pool,
        LocalWorker(job) if job.local else contextlib.nullcontext() as worker,
    ):
        version = worker.model_version() if worker else archive_version(_model_of(job), job.endpoint_url)
        run = Run(job, version=version, s3=s3, catalogue=catalogue, progress=progress, pool=pool)
        ending = run.go(worker, queue)
        progress.show("finished", run.tally, now=True)
        progress.end_line()
        write_report(job.report, catalogue.report_rows(job.inputs.bucket))
    print("\n".join(summary(run, ending, _dead_letters(worker, queue))))
    if ending == "interrupted":
        return 130
    return 0 if run.tally.pending == 0 and run.tally.dead == 0 else 1


def _dead_letters(worker: LocalWorker | None, queue: Queue | None) -> str:
    if worker is not None:
        return f"no result after {LOCAL_ATTEMPTS} attempts; the worker's log says why: {worker.log_path}"
    assert queue is not None
    return f"the messages are in {queue.dead_letters}"


def _model_of(job: Job) -> ArchiveLocation:
    """--model, else the archive the environment names, as the worker reads it."""
    if job.model is not None:
        return job.model
    from chalicelib.current import get_settings  # noqa: PLC0415

    try:
        return get_settings().model.location
    except ClassifierError as error:
        raise Refused(str(error)) from error


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return execute(Job.from_args(args))
    except KeyboardInterrupt:
        print("classify_bucket: interrupted before anything was sent", file=sys.stderr)
        return 130
    except Refused as error:
        message = str(error)
    except botocore.exceptions.NoCredentialsError:
        message = (
            "no AWS credentials: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(against moto or MinIO, any values will do)"
        )
    except botocore.exceptions.EndpointConnectionError as error:
        message = f"cannot connect to {error.kwargs.get('endpoint_url', 'the endpoint')}"
    except botocore.exceptions.ClientError as error:
        details = error.response.get("Error", {})
        message = f"{error.operation_name} was refused: {details.get('Code')}: {details.get('Message')}"
    print(f"classify_bucket: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
