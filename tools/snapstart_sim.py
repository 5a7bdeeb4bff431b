"""Run the packaged function the way Lambda SnapStart runs it: init and snapshot once, then restored copies.

The sandbox is tools/lambda_sim.py's (its pieces are imported from there):
the package unzipped as /var/task and its layers as /opt, the runtime's own
interpreter (``--python``; ``make lambda-sim`` gives CPython 3.13) started
bare with only those and boto3 on ``sys.path``, moto S3 and a photo on
loopback, in a loopback-only network. On top, what Lambda gives a SnapStart
function and nothing else does:

- ``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start``, and the role's credentials
  from a local endpoint (``AWS_CONTAINER_CREDENTIALS_FULL_URI``) rather than
  in the environment, where they would be frozen into the snapshot (AWS:
  "Using SnapStart with AWS SDKs"); here an HTTP server on loopback hands out
  fake ones and counts who asks;
- ``snapshot_restore_py`` in the runtime's folder. Lambda's runtime carries
  the real library; a stand-in with the same four functions takes its place,
  and is the only thing faked.

S3 is moto, reached through a relay that keeps connections open between
requests as S3 does (moto's server closes each one), so that a connection
pooled before the snapshot is still there after it; the relay numbers the
connections and notes which one carried each request.

The process then does what Lambda's runtime does with SnapStart on: it
imports the handler (init), runs the before-snapshot hooks in reverse order
of registration, and waits to be restored. The "snapshot" is a fork: for
each restored copy the process forks, and the child, with its parent's
memory, runs the after-restore hooks in order of registration and then its
first requests. The copies run one after the other, each on its own, as
sandboxes on different hosts would. (They share the parent's /tmp, where a
restored sandbox has a copy of the snapshot's; the model's files there are
only read.)

It prints one JSON line: each copy's restore path (fork to first answer)
beside ordinary cold starts of the same package (``lambda_sim.simulate``:
process start to first answer), the lifecycle as it ran, and per copy the
sockets of the snapshot it still held after its hooks (none), the S3
requests it made and the credentials it fetched.

What a fork cannot show is Lambda's side: restoring a microVM snapshot, and
paging its memory in from the snapshot cache as the first request touches
it. Only AWS can measure those (README: SnapStart).

Run it through ``tools/isolated_network.sh`` (``make lambda-sim`` does).
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import secrets
import shlex
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tools.lambda_sim import (
    RESULT_MARKER,
    SANDBOX_FLAGS,
    THIS_INTERPRETER,
    Interpreter,
    function_properties,
    image_host,
    photo_jpeg,
    proxy_event,
    s3_with_model,
    serving,
    simulate,
    unpacked,
)

# Lambda's snapshot_restore_py keeps the hooks for the runtime to run; so does this.
STAND_IN = r'''
"""Stand-in for Lambda's snapshot_restore_py, written by tools/snapstart_sim.py."""
_before_snapshot = []
_after_restore = []


def register_before_snapshot(func, *args, **kwargs):
    _before_snapshot.append((func, args, kwargs))
    return func


def register_after_restore(func, *args, **kwargs):
    _after_restore.append((func, args, kwargs))
    return func


def get_before_snapshot():
    return _before_snapshot


def get_after_restore():
    return _after_restore
'''

# The runtime's part, in the simulated sandbox: only the standard library is
# importable until sys.path is set from argv. Each restore waits for a line on
# stdin, so the simulation can count what each copy alone asks of its servers.
BOOTSTRAP = r"""
import json, os, sys, threading, time, traceback
config = json.loads(sys.argv[1])
sys.path[:0] = config["path"]
started = time.monotonic()

class Context:
    function_name = "chalice-classifier-sim"
    memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")  # a string, as on Lambda
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:chalice-classifier-sim:live"
    def __init__(self, request_id):
        self.aws_request_id = request_id
    def get_remaining_time_in_millis(self):
        return 29000

def report(**fields):
    print(config["marker"] + json.dumps(fields), flush=True)

def hook_name(function):
    return f"{function.__module__}.{function.__qualname__}"

def open_sockets():
    # This process's sockets, by inode: a fork shares its parent's.
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes

def wait_for_threads():
    # fork keeps only the calling thread (a microVM snapshot keeps them all),
    # and a copy must finish what its requests started before it reports.
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(60)
            if thread.is_alive():
                raise RuntimeError(f"thread {thread.name} still runs after 60 s")

def restored(number, forked):
    lifecycle = []
    for function, args, kwargs in hooks.get_after_restore():
        lifecycle.append("after_restore " + hook_name(function))
        function(*args, **kwargs)
    after_restore_seconds = time.monotonic() - forked
    inherited = open_sockets() & at_snapshot
    lifecycle.append("invoke")
    responses, request_seconds = [], []
    for index, event in enumerate(config["events"]):
        began = time.monotonic()
        responses.append(handler(event, Context(f"restored-{number}-{index}")))
        request_seconds.append(time.monotonic() - began)
    wait_for_threads()
    report(kind="restored", lifecycle=lifecycle, after_restore_seconds=after_restore_seconds,
           request_seconds=request_seconds, responses=responses, inherited_sockets=len(inherited))

module_name, _, attribute = config["handler"].rpartition(".")
handler = getattr(__import__(module_name), attribute)
import snapshot_restore_py as hooks
lifecycle = ["init"]
before = hooks.get_before_snapshot()
registered = {"before_snapshot": len(before), "after_restore": len(hooks.get_after_restore())}
while before:  # Lambda's runtime pops them: the last registered runs first
    function, args, kwargs = before.pop()
    lifecycle.append("before_snapshot " + hook_name(function))
    function(*args, **kwargs)
wait_for_threads()
at_snapshot = open_sockets()
lifecycle.append("snapshot")
report(kind="snapshot", lifecycle=lifecycle, registered=registered, seconds=time.monotonic() - started,
       sockets=len(at_snapshot))
for number, _ in enumerate(iter(sys.stdin.readline, "")):
    sys.stdout.flush()
    sys.stderr.flush()
    forked = time.monotonic()
    child = os.fork()
    if child == 0:
        status = 0
        try:
            restored(number, forked)
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _, status = os.waitpid(child, 0)
    if status:
        sys.exit(f"restored copy {number} failed")
"""

SNAPSHOT_MODULE = "snapshot_restore_py"
FUNCTION_NAME = "chalice-classifier-sim"
# Headers about one hop's connection, which the relay sets for itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class CredentialsEndpoint:
    """Lambda's container credentials endpoint, on loopback: fake credentials, and a count of fetches."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)
        self.fetches = 0
        lock = threading.Lock()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.headers.get("Authorization") != endpoint.token:
                    self.send_error(403)
                    return
                with lock:
                    endpoint.fetches += 1
                expires = datetime.now(UTC) + timedelta(hours=1)
                body = json.dumps({
                    "AccessKeyId": "sim", "SecretAccessKey": "sim", "Token": "sim-session",
                    "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def uri(self) -> str:
        """botocore's container provider fetches whatever URI it is given."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/credentials"


class KeepAliveS3:
    """moto's S3 as the function meets S3: each connection kept open between requests, and numbered.

    moto's server (werkzeug's) closes every connection after one answer, so
    the function's connection pool (``chalicelib.s3``) would never hold one
    across the snapshot, as it does against S3. This relay on loopback keeps
    the function's connections open, forwards each request to moto, and notes
    which connection carried it.
    """

    def __init__(self, moto_endpoint: str) -> None:
        moto = urlsplit(moto_endpoint)
        self.connections = 0
        self.requests: list[tuple[int, str]] = []  # (connection number, method), in order
        lock = threading.Lock()
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # what keeps a connection open
            number = 0

            def setup(self) -> None:
                super().setup()
                with lock:
                    relay.connections += 1
                    self.number = relay.connections

            def do_GET(self) -> None:
                self.forward()

            def do_HEAD(self) -> None:
                self.forward()

            def forward(self) -> None:
                """The function reads S3 with GET and HEAD only, so no request has a body."""
                with lock:
                    relay.requests.append((self.number, self.command))
                upstream = http.client.HTTPConnection(moto.hostname or "127.0.0.1", moto.port, timeout=60)
                try:
                    upstream.request(self.command, self.path, headers=dict(self.headers))
                    answer = upstream.getresponse()
                    body = answer.read()
                finally:
                    upstream.close()
                self.send_response_only(answer.status, answer.reason)
                for name, value in answer.getheaders():
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                # A HEAD answer says how long the object is, with no body.
                length_sent = answer.getheader("Content-Length", "0") if self.command == "HEAD" else len(body)
                self.send_header("Content-Length", str(length_sent))
                self.end_headers()
                if self.command == "HEAD":
                    return
                try:
                    self.wfile.write(body)
                except ConnectionError:
                    # The model store hangs up once it has the members it needs.
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@dataclass(frozen=True)
class RestoredCopy:
    lifecycle: list[str]
    after_restore_seconds: float  # from the fork to the end of the after-restore hooks
    request_seconds: list[float]  # each request's own time: the first, the same again warm, then /model
    responses: list[dict[str, Any]]
    inherited_sockets: int  # the snapshot's sockets still open after the after-restore hooks
    s3_requests: int  # made by this copy
    s3_requests_on_older_connections: int  # of those, on a connection this copy did not open
    credential_fetches: int  # by this copy, from the credentials endpoint

    @property
    def restore_path_seconds(self) -> float:
        """From the restore (the fork) to the first answer."""
        return self.after_restore_seconds + self.request_seconds[0]


@dataclass(frozen=True)
class SnapStartRun:
    snapshot: dict[
        str, Any
    ]  # what the snapshot process reported: lifecycle, hooks registered, seconds, sockets
    copies: list[RestoredCopy]
    log: list[str]  # what the function printed besides the reports: its log lines and metrics


@dataclass(frozen=True)
class _Servers:
    """What the sandbox talks to, with what each has counted."""

    s3: KeepAliveS3
    credentials: CredentialsEndpoint


def run_snapstart(
    package_dir: Path,
    layers: list[Path],
    model_archive: Path,
    interpreter: Interpreter,
    *,
    copies: int = 2,
    environment: Mapping[str, str] | None = None,
) -> SnapStartRun:
    """Init and snapshot the function once, then restore ``copies`` copies, each sending its first requests.

    ``environment`` is laid over the function's own (its stage's variables and Lambda's).
    """
    template = json.loads((package_dir / "sam.json").read_text())
    function = function_properties(template)
    with unpacked(package_dir, layers, "snapstart-sim-") as sandbox:
        (sandbox.runtime / f"{SNAPSHOT_MODULE}.py").write_text(STAND_IN)
        with s3_with_model(model_archive) as moto_endpoint, image_host(photo_jpeg()) as image_url:
            servers = _Servers(KeepAliveS3(moto_endpoint), CredentialsEndpoint())
            function_environment = {
                **sandbox.environment(function, FUNCTION_NAME),
                "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": servers.credentials.uri,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": servers.credentials.token,
                "AWS_ENDPOINT_URL_S3": servers.s3.endpoint,
                **(environment or {}),
            }
            config = {
                "path": sandbox.path(interpreter),
                "handler": function["Handler"],
                "marker": RESULT_MARKER,
                "events": [
                    # The first request of a restored copy, then the same again, warm, to compare.
                    *[proxy_event(json.dumps({"url": image_url}))] * 2,
                    proxy_event(None, method="GET", path="/model"),
                ],
            }
            with serving(servers.s3.server), serving(servers.credentials.server):
                process = subprocess.Popen(
                    [*interpreter.command, *SANDBOX_FLAGS, "-c", BOOTSTRAP, json.dumps(config)],
                    cwd=sandbox.task, env=function_environment, text=True,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                return _restore_copies(process, copies, servers)


def _restore_copies(sandbox: subprocess.Popen[str], copies: int, servers: _Servers) -> SnapStartRun:
    """Wait for the snapshot, then restore the copies one by one, noting what each alone asked of S3."""
    stdin, stdout = sandbox.stdin, sandbox.stdout
    assert stdin is not None
    assert stdout is not None
    log: list[str] = []

    def next_report() -> dict[str, Any]:
        for line in iter(stdout.readline, ""):
            if line.startswith(RESULT_MARKER):
                return json.loads(line.removeprefix(RESULT_MARKER))
            log.append(line.rstrip("\n"))
        _, stderr = sandbox.communicate(timeout=60)
        raise SystemExit(f"the simulated function failed (exit {sandbox.returncode}):\n{stderr[-4000:]}")

    snapshot = next_report()
    restored = []
    for _ in range(copies):
        connections, requests, fetches = (
            servers.s3.connections, len(servers.s3.requests), servers.credentials.fetches
        )  # fmt: skip
        stdin.write("restore\n")
        stdin.flush()
        report = next_report()
        made = servers.s3.requests[requests:]
        restored.append(
            RestoredCopy(
                lifecycle=report["lifecycle"],
                after_restore_seconds=report["after_restore_seconds"],
                request_seconds=report["request_seconds"],
                responses=report["responses"],
                inherited_sockets=report["inherited_sockets"],
                s3_requests=len(made),
                s3_requests_on_older_connections=sum(1 for number, _ in made if number <= connections),
                credential_fetches=servers.credentials.fetches - fetches,
            )
        )
    rest, stderr = sandbox.communicate(timeout=60)
    log += rest.splitlines()
    if sandbox.returncode != 0:
        raise SystemExit(f"the simulated function failed (exit {sandbox.returncode}):\n{stderr[-4000:]}")
    return SnapStartRun(snapshot=snapshot, copies=restored, log=log)


def answers(responses: list[dict[str, Any]]) -> list[str]:
    """``200 espresso`` for each classification among the responses."""
    return [f"{r['statusCode']} {json.loads(r['body']).get('class')}" for r in responses]


def compare(
    package_dir: Path,
    layers: list[Path],
    model_archive: Path,
    interpreter: Interpreter,
    *,
    copies: int,
    cold_starts: int,
) -> dict[str, object]:
    """The SnapStart run beside ``cold_starts`` ordinary cold starts of the same package, as one summary."""
    run = run_snapstart(package_dir, layers, model_archive, interpreter, copies=copies)
    ordinary = [simulate(package_dir, layers, model_archive, 3, interpreter) for _ in range(cold_starts)]
    classified = [response for copy in run.copies for response in copy.responses[:2]]
    return {
        "interpreter": interpreter.label,
        "runtime": interpreter.runtime,
        "simulation": "SnapStart, the snapshot a fork: Lambda's own restore time is not in these figures",
        "answers": sorted(set(answers(classified))),
        "backend": json.loads(run.copies[0].responses[-1]["body"]).get("backend"),
        "lifecycle": run.snapshot["lifecycle"] + run.copies[0].lifecycle,
        "init_to_snapshot_seconds": round(run.snapshot["seconds"], 3),
        "restore_path_seconds": [round(copy.restore_path_seconds, 4) for copy in run.copies],
        "cold_start_seconds": [result["cold_start_seconds"] for result in ordinary],
        "warm_p50_seconds": [result["warm_p50_seconds"] for result in ordinary],
        "restored_copies": [
            {
                "after_restore_hooks_ms": round(copy.after_restore_seconds * 1000, 2),
                "first_and_second_request_ms": [round(s * 1000, 1) for s in copy.request_seconds[:2]],
                "inherited_sockets": copy.inherited_sockets,
                "s3_requests": copy.s3_requests,
                "credential_fetches": copy.credential_fetches,
            }
            for copy in run.copies
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=Path("build/package-onnx-snapstart"))
    parser.add_argument("--layer", type=Path, action="append", default=None)
    parser.add_argument("--model", type=Path, default=Path("build/demo-model.tar.gz"))
    parser.add_argument("--copies", type=int, default=3, help="restored copies, one after the other")
    parser.add_argument("--cold-starts", type=int, default=3, help="ordinary cold starts to compare with")
    parser.add_argument(
        "--python",
        default=shlex.join(THIS_INTERPRETER),
        help="command that starts the runtime's Python (make lambda-sim: build/toolchain/python)",
    )
    args = parser.parse_args()
    interpreter = Interpreter.from_command(shlex.split(args.python))
    layers = args.layer or []
    summary = compare(
        args.package, layers, args.model, interpreter, copies=args.copies, cold_starts=args.cold_starts
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
