"""tools/classify_bucket.py as a user runs it, over moto's S3 and SQS on loopback, with the real worker.

``--local`` runs the worker in this process on the demo model. The queue
runs start the tool in a process of its own, as a user does, while the test
plays Lambda: tests/support/sqs_poller.py hands the app's handler the events
Lambda's SQS mapping would, through chalice.test.Client. Photographs come
from scikit-image; faults are real HTTP answers from proxies in front of moto.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from chalice.test import Client
from PIL import Image

from chalicelib.current import get_holder, get_service
from chalicelib.payload import ImageInput, Invocation
from chalicelib.settings import DEMO_ARCHIVE
from tests.conftest import DEMO_KEY, MODEL_BUCKET
from tests.support.faulty_s3 import FaultyS3
from tests.support.flaky_sqs import FlakySqs
from tests.support.queues import Queues, queue_with_dead_letters
from tests.support.s3 import MotoS3Server
from tests.support.sqs_poller import SqsEventSource
from tools.classify_bucket import Progress, Tally, main

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "classify-bucket"
RESULTS = "results/"
CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}


# --- A prefix of inputs, and the tool run over it ------------------------------------------------


@dataclass
class Inputs:
    """A prefix of this test's own in the bucket; its results under RESULTS; the report in tmp_path."""

    s3: Any
    server: MotoS3Server
    prefix: str
    report: Path

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def put(self, name: str, data: bytes) -> str:
        key = f"{self.prefix}{name}"
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        return key

    def arguments(self, *options: str, endpoint: str | None = None) -> list[str]:
        return [
            self.url, "--results", f"s3://{BUCKET}/{RESULTS}", "--report", str(self.report),
            "--endpoint-url", endpoint or self.server.endpoint, *options,
        ]  # fmt: skip

    def classify(self, *options: str, endpoint: str | None = None) -> int:
        """The tool, in this process: its exit status."""
        return main(self.arguments(*options, endpoint=endpoint))

    def rows(self) -> dict[str, dict[str, Any]]:
        """The report, by key."""
        text = self.report.read_text(encoding="utf-8")
        if self.report.suffix == ".csv":
            return {row["key"]: row for row in csv.DictReader(io.StringIO(text))}
        return {row["key"]: row for row in map(json.loads, text.splitlines())}

    def statuses(self) -> dict[str, str]:
        return {key: row["status"] for key, row in self.rows().items()}

    def result_metadata(self, key: str) -> dict[str, str]:
        return self.s3.head_object(Bucket=BUCKET, Key=f"{RESULTS}{key}.json")["Metadata"]

    def reads_of(self, key: str) -> int:
        """How often the worker has read the image (GetObject: a check of its result is a HEAD)."""
        return self.server.log.count("GET", f"/{BUCKET}/{key}")

    def result_writes(self, key: str) -> int:
        return self.server.log.count_answered("PUT", f"/{BUCKET}/{RESULTS}{key}.json", 200)


@pytest.fixture
def inputs(
    s3: Any,
    s3_server: MotoS3Server,
    shared_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Inputs:
    if BUCKET not in {bucket["Name"] for bucket in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(shared_cache))
    return Inputs(s3, s3_server, prefix=f"in/{request.node.name[:40]}/", report=tmp_path / "report.jsonl")


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def generated(count: int) -> dict[str, bytes]:
    """Small noise images: any class will do, as long as each is classified."""
    rng = np.random.default_rng(14)
    return {
        f"generated/{n:03}.jpg": jpeg(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for n in range(count)
    }


def api_label(data: bytes) -> str:
    """What the API answers for the same bytes."""
    outcome = get_service().classify(Invocation(inputs=(ImageInput(data=data),), batch=False, top_k=None))[0]
    assert outcome.predictions is not None
    return outcome.predictions[0].label


# --- --local --------------------------------------------------------------------------------------


def test_a_local_run_classifies_every_image_under_the_prefix_and_reports_each(
    inputs: Inputs, photos: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    keys = {inputs.put(f"{name}.jpg", data): data for name, data in photos.items()}
    keys |= {inputs.put(name, data): data for name, data in generated(20).items()}
    corrupt = inputs.put("corrupt.jpg", photos["coffee"][:300])
    inputs.put("folder/", b"")  # a console "folder": not an input
    inputs.s3.put_object(
        Bucket=BUCKET, Key=f"{inputs.prefix.rstrip('/')}-beside/x.jpg", Body=photos["coffee"]
    )

    assert inputs.classify("--local") == 0

    rows = inputs.rows()
    assert set(rows) == {*keys, corrupt}
    assert {key: rows[key]["class"] for key in keys} == {key: api_label(data) for key, data in keys.items()}
    assert rows[f"{inputs.prefix}chelsea.jpg"]["class"] in CAT_CLASSES
    assert rows[f"{inputs.prefix}coffee.jpg"]["class"] == "espresso"
    assert all(rows[key]["status"] == "ok" and 0 < rows[key]["confidence"] <= 1 for key in keys)
    assert (rows[corrupt]["status"], rows[corrupt]["error_code"]) == ("error", "UnsupportedImage")
    assert rows[corrupt]["class"] is None
    assert rows[corrupt]["error_message"].startswith(f"s3://{BUCKET}/{corrupt} is truncated or corrupt")
    for key in [*keys, corrupt]:  # a result beside each image, for the version the listing saw
        etag = inputs.s3.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
        assert inputs.result_metadata(key)["input-etag"] == etag
    out, err = capsys.readouterr()
    assert f"{len(keys) + 1} inputs, 0 with a current result already, {len(keys) + 1} classified here" in out
    assert f"{len(keys)} ok, 1 failed (error results), 0 in the dead-letter queue, 0 pending" in out
    assert f"{len(keys) + 1}/{len(keys) + 1} done ({len(keys)} ok, 1 failed)" in err
    assert not list(inputs.report.parent.glob(".*.sqlite"))  # the scratch catalogue is gone


def test_a_second_run_classifies_nothing_and_a_changed_image_is_classified_again(
    inputs: Inputs, photos: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    keys = [inputs.put(f"{name}.jpg", data) for name, data in photos.items()]
    keys += [inputs.put(name, data) for name, data in generated(12).items()]
    keys.append(inputs.put("corrupt.jpg", b"GIF89a, then nothing"))
    inputs.report = inputs.report.with_suffix(".csv")
    assert inputs.classify("--local") == 0
    first = inputs.rows()
    reads = {key: inputs.reads_of(key) for key in keys}
    capsys.readouterr()

    assert inputs.classify("--local") == 0

    assert inputs.rows() == first  # error results count as results
    assert {key: inputs.reads_of(key) for key in keys} == reads
    assert f"{len(keys)} with a current result already, 0 classified here" in capsys.readouterr().out
    # The cat becomes a cup of coffee: a new ETag, so a new result, and only for it.
    cat = f"{inputs.prefix}chelsea.jpg"
    inputs.put("chelsea.jpg", photos["coffee"])

    assert inputs.classify("--local") == 0

    assert {key: inputs.reads_of(key) - reads[key] for key in keys} == {key: int(key == cat) for key in keys}
    assert first[cat]["class"] in CAT_CLASSES
    assert inputs.rows()[cat]["class"] == "espresso"
    assert inputs.rows().keys() == first.keys()


def test_a_new_model_version_classifies_every_image_again(inputs: Inputs, photos: dict[str, bytes]) -> None:
    keys = [inputs.put(f"{name}.jpg", data) for name, data in photos.items()]
    from_s3 = ("--local", "--model", f"s3://{MODEL_BUCKET}/{DEMO_KEY}")
    assert inputs.classify(*from_s3) == 0
    s3_version = inputs.s3.head_object(Bucket=MODEL_BUCKET, Key=DEMO_KEY)["ETag"].strip('"')
    assert {inputs.result_metadata(key)["model-version"] for key in keys} == {s3_version}
    assert inputs.classify(*from_s3) == 0
    assert [inputs.reads_of(key) for key in keys] == [1, 1, 1]

    # The same model from a local file has a version of its own (its hash), so the results are outdated.
    assert inputs.classify("--local", "--model", str(DEMO_ARCHIVE)) == 0

    assert [inputs.reads_of(key) for key in keys] == [2, 2, 2]
    assert {inputs.result_metadata(key)["model-version"] for key in keys} == {
        get_holder().model().files.version
    }
    assert set(inputs.statuses().values()) == {"ok"}


def test_retry_failed_classifies_the_error_results_again(
    inputs: Inputs, photos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image refused under a limit since raised: kept as it was, until --retry-failed."""
    big = inputs.put("astronaut.jpg", photos["astronaut"])
    small = [inputs.put(name, data) for name, data in generated(5).items()]
    monkeypatch.setenv("MAX_IMAGE_BYTES", str(len(photos["astronaut"]) - 1))
    assert inputs.classify("--local") == 0
    assert inputs.rows()[big]["error_code"] == "ImageTooLarge"
    monkeypatch.delenv("MAX_IMAGE_BYTES")

    assert inputs.classify("--local") == 0
    assert inputs.rows()[big]["error_code"] == "ImageTooLarge"
    assert inputs.result_writes(big) == 1

    assert inputs.classify("--local", "--retry-failed") == 0

    assert inputs.rows()[big]["status"] == "ok"
    assert inputs.result_writes(big) == 2
    assert [inputs.result_writes(key) for key in small] == [1] * len(small)


def test_a_local_run_tries_transient_failures_again_then_gives_up_on_them(
    inputs: Inputs, s3_server: MotoS3Server, photos: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    throttled = inputs.put("coffee.jpg", photos["coffee"])
    unreadable = inputs.put("chelsea.jpg", photos["chelsea"])
    fine = [inputs.put(name, data) for name, data in generated(3).items()]

    with FaultyS3(s3_server.endpoint) as faulty:
        faulty.refuse("GET", f"/{BUCKET}/{throttled}", times=2)
        faulty.refuse("GET", f"/{BUCKET}/{unreadable}", times=1000)
        code = inputs.classify("--local", endpoint=faulty.endpoint)

    assert code == 1
    assert faulty.refused[("GET", f"/{BUCKET}/{throttled}")] == 2
    assert faulty.refused[("GET", f"/{BUCKET}/{unreadable}")] == 4  # every attempt, then no more
    assert inputs.statuses() == {throttled: "ok", unreadable: "dlq", **dict.fromkeys(fine, "ok")}
    out = capsys.readouterr().out
    assert "1 in the dead-letter queue, 0 pending" in out
    log = inputs.report.with_suffix(".worker.log")
    assert str(log) in out
    assert f"s3://{BUCKET}/{unreadable} will be delivered again" in log.read_text()
    # Once S3 answers again, the same command finishes the job.
    assert inputs.classify("--local") == 0
    assert inputs.statuses()[unreadable] == "ok"


# --- Refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs_url", "results_url", "says"),
    [
        (
            "classify-bucket/in/",
            f"s3://{BUCKET}/{RESULTS}",
            "the input prefix must look like s3://bucket/prefix/",
        ),
        ("s3://", f"s3://{BUCKET}/{RESULTS}", "must look like s3://bucket/prefix/"),
        (f"s3://{BUCKET}/in/", "results/", "--results must look like s3://bucket/prefix/"),
        (f"s3://{BUCKET}/in/", f"s3://{BUCKET}/in/results/", "would be asked to classify its own results"),
        (f"s3://{BUCKET}/results/old/", f"s3://{BUCKET}/results", "overlap"),
        (f"s3://{BUCKET}", f"s3://{BUCKET}/{RESULTS}", "overlap"),
        ("s3://no-such-bucket/in/", f"s3://{BUCKET}/{RESULTS}", "the bucket 'no-such-bucket' does not exist"),
        (f"s3://{BUCKET}/in/", "s3://no-such-bucket/results/", "the bucket 'no-such-bucket' does not exist"),
    ],
)
def test_bad_locations_are_refused_before_anything_is_done(
    inputs: Inputs, inputs_url: str, results_url: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = [inputs_url, "--results", results_url, "--local", "--report", str(inputs.report)]

    assert main([*arguments, "--endpoint-url", inputs.server.endpoint]) == 2

    assert_refused(capsys.readouterr().err, says)
    assert not inputs.report.exists()


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--queue-url", "http://127.0.0.1:9/queue", "--local"], "not allowed with argument"),
        ([], "one of the arguments --queue-url --local is required"),
    ],
)
def test_exactly_one_of_the_queue_and_local_is_required(
    inputs: Inputs, options: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(inputs.arguments(*options))
    assert exit_status.value.code == 2
    assert says in capsys.readouterr().err


def test_missing_credentials_a_missing_queue_and_no_model_are_refused(
    inputs: Inputs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs.put("coffee.jpg", b"\xff\xd8")
    missing_queue = f"{inputs.server.endpoint}/123456789012/no-such-queue"
    model = ("--model", str(DEMO_ARCHIVE))
    assert inputs.classify("--queue-url", missing_queue, *model) == 2
    assert_refused(capsys.readouterr().err, f"the queue {missing_queue} does not exist")
    assert inputs.classify("--queue-url", missing_queue) == 2
    assert_refused(capsys.readouterr().err, "name the worker's model with --model s3://bucket/key")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    assert inputs.classify("--local") == 2

    assert_refused(capsys.readouterr().err, "no AWS credentials")
    assert not inputs.report.exists()


def test_the_command_refuses_in_one_line(inputs: Inputs, tmp_path: Path) -> None:
    """As a user sees it: one line on stderr and status 2, no traceback."""
    arguments = inputs.arguments("--local")
    arguments[0] = "s3://no-such-bucket/photos/"

    finished = subprocess.run(
        [sys.executable, "-m", "tools.classify_bucket", *arguments],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert finished.returncode == 2
    assert finished.stderr.splitlines() == [
        "classify_bucket: the input prefix: the bucket 'no-such-bucket' does not exist"
    ]


def assert_refused(stderr: str, says: str) -> None:
    assert says in stderr
    assert stderr.startswith("classify_bucket: "), stderr
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr


# --- Through the queue -------------------------------------------------------------------------


@pytest.fixture
def queues(s3_server: MotoS3Server, request: pytest.FixtureRequest) -> Iterator[Queues]:
    """Messages go to the dead-letter queue on their second receive."""
    with queue_with_dead_letters(s3_server.endpoint, request.node.name[:60], max_receives=2) as queues:
        yield queues


@dataclass
class Command:
    """The tool in a process of its own, its output in files (a pipe nobody reads could fill up)."""

    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @classmethod
    def start(cls, arguments: list[str], folder: Path) -> Command:
        stdout, stderr = folder / "stdout.txt", folder / "stderr.txt"
        environment = {name: value for name, value in os.environ.items() if name != "AWS_ENDPOINT_URL_S3"}
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "tools.classify_bucket", *arguments],
                cwd=ROOT, env=environment, stdout=out, stderr=err,
            )  # fmt: skip
        return cls(process, stdout, stderr)

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(), self.stderr.read_text()

    def wait_for(self, text: str, within: float = 60) -> None:
        ends = time.monotonic() + within
        while text not in self.stderr.read_text():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < ends, self.output()
            time.sleep(0.05)


def run_with_lambda(command: Command, event_source: SqsEventSource, within: float = 300) -> int:
    """Play Lambda's SQS mapping until the command exits; its exit status."""
    ends = time.monotonic() + within
    while command.process.poll() is None:
        if time.monotonic() > ends:
            command.process.kill()
            pytest.fail(f"the command did not finish in {within:g} s: {command.output()}")
        event_source.poll_once()
    return command.process.wait()


@pytest.fixture
def worker_for(client: Client, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app's bulk_worker behind Lambda's SQS mapping, writing where the tool looks, on the demo model."""

    def event_source(queues: Queues, s3_endpoint: str) -> SqsEventSource:
        monkeypatch.setenv("RESULTS_BUCKET", BUCKET)
        monkeypatch.setenv("RESULTS_PREFIX", RESULTS)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
        get_holder().model()  # warm: a first invocation would spend its few seconds loading it

        def invoke(event: dict[str, Any], _context: object) -> dict[str, Any]:
            return client.lambda_.invoke("bulk_worker", event).payload

        return SqsEventSource(queues.sqs, queues.url, invoke)

    return event_source


def test_through_the_queue_each_input_ends_with_a_result_or_in_the_dead_letter_queue(
    inputs: Inputs,
    queues: Queues,
    worker_for: Any,
    s3_server: MotoS3Server,
    photos: dict[str, bytes],
    tmp_path: Path,
) -> None:
    keys = {inputs.put(f"{name}.jpg", data): data for name, data in photos.items()}
    keys |= {inputs.put(name, data): data for name, data in generated(70).items()}
    corrupt = inputs.put("corrupt.png", b"\x89PNG\r\n\x1a\n and no more")
    poison = inputs.put("unreadable.jpg", photos["chelsea"])  # S3 fails every read: a poison message
    inputs.report = inputs.report.with_suffix(".csv")
    arguments = inputs.arguments(
        "--queue-url", queues.url, "--model", str(DEMO_ARCHIVE), "--poll-seconds", "0.2"
    )

    with FaultyS3(s3_server.endpoint) as faulty:
        faulty.refuse("GET", f"/{BUCKET}/{poison}", times=1000)
        event_source = worker_for(queues, faulty.endpoint)
        command = Command.start(arguments, tmp_path)
        assert run_with_lambda(command, event_source) == 1

    out, err = command.output()
    rows = inputs.rows()
    assert {key: (rows[key]["status"], rows[key]["class"]) for key in keys} == {
        key: ("ok", api_label(data)) for key, data in keys.items()
    }
    assert (rows[corrupt]["status"], rows[corrupt]["error_code"]) == ("error", "UnsupportedImage")
    assert rows[poison]["status"] == "dlq"
    assert [json.loads(body)["key"] for body in queues.drain(queues.dead_letters)] == [poison]
    assert f"{len(keys) + 2} inputs, 0 with a current result already, {len(keys) + 2} sent" in out
    assert f"1 in the dead-letter queue, 0 pending\nreport: {inputs.report}" in out
    assert f"dead letters: the messages are in {queues.dead_letters}" in out
    # While many are pending, results are found by listing them; each is read once, when it appears.
    reads = {
        key: inputs.server.log.count("GET", f"/{BUCKET}/{RESULTS}{key}.json") for key in [*keys, corrupt]
    }
    assert set(reads.values()) == {1}
    assert "waiting" in err
    assert "in DLQ" in err
    assert "ETA" in err
    assert event_source.tally.invocation_errors == []

    # S3 reads the image again: the same command sends that one input, and nothing else.
    event_source = worker_for(queues, s3_server.endpoint)
    listings = s3_server.log.count("GET", f"/{BUCKET}")
    command = Command.start(arguments, tmp_path)
    assert run_with_lambda(command, event_source) == 0

    assert f"{len(keys) + 1} with a current result already, 1 sent" in command.output()[0]
    assert inputs.rows()[poison]["status"] == "ok"
    assert event_source.tally.deleted == 1
    # The inputs and the results, listed once each: one result pending among many is read, not listed for.
    assert s3_server.log.count("GET", f"/{BUCKET}") - listings == 2


def test_entries_sqs_fails_are_sent_again_and_an_interrupted_run_reports_them_pending(
    inputs: Inputs, queues: Queues, s3_server: MotoS3Server, tmp_path: Path
) -> None:
    """No worker runs: every input is sent exactly once, with the ETag listed, then Ctrl-C."""
    etags = {}
    for n in range(25):
        key = inputs.put(f"{n:02}.jpg", b"%d" % n)
        etags[key] = inputs.s3.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')

    with FlakySqs(s3_server.endpoint) as flaky:
        flaky.fail_entries(3)
        command = Command.start(
            [
                *inputs.arguments(
                    "--queue-url", queues.url, "--model", str(DEMO_ARCHIVE), endpoint=flaky.endpoint
                )
            ],
            tmp_path,
        )
        command.wait_for("waiting")
        command.process.send_signal(signal.SIGINT)
        assert command.process.wait(timeout=60) == 130

    sent = [json.loads(body) for body in queues.drain(queues.url)]
    assert sorted(sent, key=lambda body: body["key"]) == [
        {"bucket": BUCKET, "key": key, "etag": etag} for key, etag in sorted(etags.items())
    ]
    assert len(flaky.held_back) == 3  # each sent again, and only once
    assert all(len(ids) == len(set(ids)) <= 10 for ids in flaky.batches)
    assert inputs.statuses() == dict.fromkeys(etags, "pending")
    out, err = command.output()
    assert "interrupted" in err
    assert "Traceback" not in err
    assert "0 ok, 0 failed (error results), 0 in the dead-letter queue, 25 pending" in out


def test_a_timeout_ends_the_wait_and_says_what_is_pending(
    inputs: Inputs, queues: Queues, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = [inputs.put(name, data) for name, data in generated(3).items()]

    assert inputs.classify("--queue-url", queues.url, "--model", str(DEMO_ARCHIVE), "--timeout", "0") == 1

    assert inputs.statuses() == dict.fromkeys(keys, "pending")
    assert "--timeout: 3 inputs have no result yet; the queue keeps working" in capsys.readouterr().out


# --- Memory -----------------------------------------------------------------------------------------


CATALOGUE_WALK = """
import sys, tracemalloc
from pathlib import Path
from tools.classify_bucket import LISTED, SENT, Catalogue

count = int(sys.argv[2])
keys = (f"photos/2024/{n // 1000:04}/{n % 1000:04}-product-image.jpg" for n in range(count))
tracemalloc.start()
catalogue = Catalogue(Path(sys.argv[1]))
catalogue.add((key, "d41d8cd98f00b204e9800998ecf8427e") for key in keys)
walked = 0
for chunk in catalogue.in_state(LISTED, 160):
    catalogue.move((key for key, _ in chunk), SENT)
    walked += len(chunk)
rows = sum(1 for _ in catalogue.report_rows("bucket"))
catalogue.close()
print(walked, rows, tracemalloc.get_traced_memory()[1])
"""


def test_the_catalogue_holds_a_chunk_of_keys_at_a_time_never_the_listing(tmp_path: Path) -> None:
    """200,000 keys in and out again: held in memory, the keys alone would be over 20 MB.

    In a process of its own, where nothing else allocates while Python's allocations are traced.
    """
    count = 200_000
    walk = [sys.executable, "-c", CATALOGUE_WALK, str(tmp_path / "catalogue.sqlite"), str(count)]

    finished = subprocess.run(walk, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)

    walked, rows, peak = map(int, finished.stdout.split())
    assert walked == rows == count
    assert peak < 2_000_000


# --- Progress ---------------------------------------------------------------------------------------


def test_progress_is_redrawn_in_place_on_a_terminal_and_printed_as_lines_elsewhere() -> None:
    tally = Tally(inputs=10)
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w", encoding="utf-8") as terminal:
        on_terminal = Progress(terminal)
        on_terminal.start_clock(tally)
        for done in (2, 5):
            tally.ok = done
            on_terminal.show("waiting", tally, in_dlq=1, now=True)
        on_terminal.end_line()
    drawn = _read_all(leader)

    frames = drawn.rstrip("\r\n").split("\r")
    assert len(frames) == 3
    assert frames[0] == ""
    assert "\n" not in drawn.rstrip("\r\n")
    assert all(frame.endswith("\x1b[K") for frame in frames[1:])
    assert "5/10 done (5 ok, 0 failed)  4 pending  1 in DLQ" in frames[2]
    assert "ETA 0:00:00" in frames[2]

    log = io.StringIO()
    in_a_log = Progress(log)
    for phase in ("listing", "listing", "sending"):
        in_a_log.show(phase, tally)
    lines = log.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["listing", "sending"]  # at most every few seconds


def _read_all(leader: int) -> str:
    """What was written to a pty whose other end is closed: one read may return only part of it."""
    chunks = []
    try:
        while chunk := os.read(leader, 65536):
            chunks.append(chunk)
    except OSError:  # EIO: the other end is closed and everything has been read
        pass
    finally:
        os.close(leader)
    return b"".join(chunks).decode()
