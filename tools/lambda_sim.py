"""Run the packaged function the way Lambda runs it, with nothing from this venv.

Nothing here can reach AWS, so this is the proof that the deployment
artefacts are complete:

1. ``chalice package`` output (``deployment.zip``) is unzipped as /var/task
   would be, and the layer zips as /opt would be;
2. the runtime's own interpreter (``--python``: by default this one; ``make
   lambda-sim`` gives ``build/toolchain/python``, CPython 3.13 in a Debian 13
   root) starts bare, ``-I -S``, writing no bytecode (``-B``: those folders
   are read-only on Lambda), with only those folders and a folder of
   boto3/botocore (which Lambda's runtime provides) on ``sys.path``, with HOME
   and TMPDIR pointing at empty folders;
3. it imports the handler named in ``sam.json`` and invokes it with API
   Gateway proxy events (the shape of the fast.ai tutorial's ``event.json``)
   for ``POST /invocations``, against moto S3 and an image on loopback, then
   asks ``GET /model`` which backend served;
4. or, with ``--function BulkWorker``, it runs the bulk worker the way the
   template deploys it (``simulate_bulk``): the queue and its dead-letter
   queue made in moto with the template's settings, the input bucket's
   notification put from the template's ``BulkNotificationConfiguration``
   output, photos (and a corrupt image) uploaded under the input prefix so
   that moto's S3 queues an event for each, then what Lambda's SQS mapping
   does: receive batches of the mapping's ``BatchSize``, invoke the handler
   with SQS events, delete the messages its ``batchItemFailures`` does not
   name. It reports the result objects written.

Anything the handler needs that the package or the layer lacks makes the
import or the request fail, and the simulation with it. It prints one JSON
line: which interpreter ran it, the responses (for the worker: each batch's
``batchItemFailures`` and the results), the cold start (process start to
first response), the warm latencies, the peak RSS and the /tmp used.

The template's parameters (the worker's buckets and prefixes) take the
values of ``SIM_PARAMETERS``; ``resolve`` fills in what CloudFormation
would (``Ref``, ``Fn::GetAtt``, ``Fn::Sub``).

A layer built with ``--simulation-only`` (the cp311 torch layer: it cannot
load on Lambda's python3.11) makes the run a code-path simulation, and the
output says so: it shows the torch code path works, not that a runtime loads it.

Run it through ``tools/isolated_network.sh`` (``make lambda-sim`` does).
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import logging
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer
from PIL import Image
from skimage import data as photos

# Runs inside the simulated sandbox: only the standard library is importable
# until sys.path is set from argv.
BOOTSTRAP = r"""
import json, os, sys, time
config = json.loads(sys.argv[1])
sys.path[:0] = config["path"]
module_name, _, attribute = config["handler"].rpartition(".")
handler = getattr(__import__(module_name), attribute)

class Context:
    function_name = "chalice-classifier-sim"
    memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")  # a string, as on Lambda
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:chalice-classifier-sim"
    def __init__(self, request_id):
        self.aws_request_id = request_id
        self._ends = time.monotonic() + config["timeout_seconds"]
    def get_remaining_time_in_millis(self):
        return max(int((self._ends - time.monotonic()) * 1000), 0)

def memory_kib():
    # VmHWM: the process's own high-water mark (getrusage's ru_maxrss survives
    # exec, so it would report the larger parent that started this process).
    # In-memory files (memfd_create: the PyTorch layer's libraries) count
    # against Lambda's memory whole, mapped or not.
    with open("/proc/self/status") as status:
        peak = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    files = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                files += os.fstat(int(fd)).st_size
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return {"peak_rss_kib": peak, "memory_files_kib": files // 1024}

for number, event in enumerate(config["events"]):
    started = time.monotonic()
    response = handler(event, Context(f"sim-{number}"))
    request = {name: event.get(name) for name in ("httpMethod", "path", "queryStringParameters")}
    result = {"request": request, "response": response, "seconds": time.monotonic() - started, **memory_kib()}
    print(config["marker"] + json.dumps(result), flush=True)
"""

# What the interpreter says of itself: Lambda's runtime name, and a label for the output.
DESCRIBE = r"""
import json, os, platform, sys
system = "unknown system"
if os.path.isfile("/etc/os-release"):
    fields = dict(line.rstrip().split("=", 1) for line in open("/etc/os-release") if "=" in line)
    system = fields.get("PRETTY_NAME", system).strip('"')
print(json.dumps({
    "runtime": f"python{sys.version_info[0]}.{sys.version_info[1]}",
    "label": f"CPython {platform.python_version()}, glibc {platform.libc_ver()[1]}, {system}",
}))
"""

RESULT_MARKER = "SIM-RESULT "
# Bare (-I -S), and -B because /var/task and /opt are read-only on Lambda:
# Python can cache no bytecode there, so each cold start compiles whatever
# the zips do not carry compiled (tools/compile_bytecode.py).
SANDBOX_FLAGS = ("-I", "-S", "-B")
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "six.py", "urllib3")
# The template's functions, by the logical ids Chalice gives them.
API_FUNCTION = "APIHandler"
BULK_FUNCTION = "BulkWorker"
SIM_MODEL_BUCKET = "sim-models"
SIM_MODEL_KEY = "model.tar.gz"
# What a deployer passes as the template's parameters, and what CloudFormation itself would fill in.
SIM_PARAMETERS = {
    "InputBucket": "sim-inputs",
    "InputPrefix": "photos/",
    "ResultsBucket": "sim-results",
    "ResultsPrefix": "results/",
}
PSEUDO_PARAMETERS = {
    "AWS::Partition": "aws",
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::StackName": "chalice-classifier-sim",
    "AWS::URLSuffix": "amazonaws.com",
}
# The longest a simulated function may run, all its events together, before it is killed.
SIM_TIMEOUT_S = 300.0
SUB_VARIABLE = re.compile(r"\$\{([^}]+)\}")
CORRUPT_JPEG = b"\xff\xd8\xff\xe0 a JPEG's first bytes, and then nothing of the kind"


@dataclass(frozen=True)
class Interpreter:
    """The command that starts the runtime's Python, and what it is."""

    command: tuple[str, ...]
    runtime: str  # Lambda's name for it: python3.13
    label: str

    @classmethod
    def from_command(cls, command: Sequence[str]) -> Interpreter:
        program, *arguments = command
        if "/" in program:  # the function runs in another directory: a relative path would break
            command = [str(Path(program).absolute()), *arguments]
        described = subprocess.run(
            [*command, "-I", "-S", "-c", DESCRIBE], capture_output=True, text=True, check=True, timeout=60
        )
        facts = json.loads(described.stdout)
        return cls(command=tuple(command), runtime=facts["runtime"], label=facts["label"])

    @property
    def layer_site_packages(self) -> str:
        """Where Lambda puts a layer's packages for this runtime, under /opt."""
        return f"python/lib/{self.runtime}/site-packages"


THIS_INTERPRETER = (sys.executable,)


def proxy_event(
    body: str | None, *, method: str = "POST", path: str = "/invocations", query: dict[str, str] | None = None
) -> dict[str, object]:
    """An API Gateway REST proxy event; by default POST /invocations with a JSON body."""
    headers = {"Content-Type": "application/json", "Host": "sim.execute-api.us-east-1.amazonaws.com"}
    return {
        "resource": path,
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {key: [value] for key, value in headers.items()},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {key: [value] for key, value in query.items()} if query else None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": path,
            "httpMethod": method,
            "path": f"/api{path}",
            "stage": "api",
            "requestId": "sim-request",
            "identity": {"sourceIp": "127.0.0.1"},
        },
        "body": body,
        "isBase64Encoded": False,
    }


def unzip(archive: Path, destination: Path) -> None:
    """Unzip keeping the executable bits, as Lambda does (zipfile alone drops them)."""
    with zipfile.ZipFile(archive) as bundle:
        for info in bundle.infolist():
            path = Path(bundle.extract(info, destination))
            mode = info.external_attr >> 16
            if mode:
                path.chmod(mode & 0o777)


@dataclass(frozen=True)
class Sandbox:
    """One function's folders as Lambda lays them out: /var/task, /opt, HOME, TMPDIR and the runtime's own."""

    task: Path
    opt: Path
    home: Path
    tmp: Path
    runtime: Path

    def path(self, interpreter: Interpreter) -> list[str]:
        """sys.path in Lambda's own order: the function, then the layers' two folders, then the runtime."""
        layer_site = self.opt / interpreter.layer_site_packages
        return [str(self.task), str(layer_site), str(self.opt / "python"), str(self.runtime)]

    def environment(self, properties: Mapping[str, Any], function_name: str) -> dict[str, str]:
        """What Lambda sets for the template's function ``properties``, its own variables first; the image
        is served from loopback, which production refuses, and the metadata service is never asked."""
        return {
            **resolve(properties.get("Environment", {}).get("Variables", {}), template_names()),
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.home),
            "TMPDIR": str(self.tmp),
            "LAMBDA_TASK_ROOT": str(self.task),
            "AWS_LAMBDA_FUNCTION_NAME": function_name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(properties.get("MemorySize", 128)),
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "MODEL_BUCKET": SIM_MODEL_BUCKET,
            "MODEL_KEY": SIM_MODEL_KEY,
            "ALLOW_PRIVATE_URLS": "true",
            "ALLOWED_PORTS": "*",
        }


@contextmanager
def unpacked(package_dir: Path, layers: Sequence[Path], prefix: str) -> Iterator[Sandbox]:
    """The package's function and ``layers`` unzipped into a scratch sandbox, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        root = Path(scratch)
        task, opt, home, tmp = (root / name for name in ("var-task", "opt", "home", "tmp"))
        for folder in (task, opt, home, tmp):
            folder.mkdir()
        unzip(package_dir / "deployment.zip", task)
        for layer in layers:
            unzip(layer, opt)
        yield Sandbox(task, opt, home, tmp, lambda_runtime_dir(root))


def lambda_runtime_dir(root: Path) -> Path:
    """boto3 and its dependencies, which the Lambda Python runtime provides."""
    runtime = root / "runtime"
    runtime.mkdir()
    site = Path(boto3.__file__).resolve().parent.parent
    for name in RUNTIME_PACKAGES:
        source = site / name
        (runtime / name).symlink_to(source, target_is_directory=source.is_dir())
    return runtime


@contextmanager
def image_host(image: bytes) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}/cat.jpg"


@contextmanager
def serving(server: http.server.ThreadingHTTPServer) -> Iterator[None]:
    """``server`` answering in a thread of its own for the length of the block."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def s3_with_model(model_archive: Path) -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="sim", aws_secret_access_key="sim",
        )  # fmt: skip
        s3.create_bucket(Bucket=SIM_MODEL_BUCKET)
        s3.put_object(Bucket=SIM_MODEL_BUCKET, Key=SIM_MODEL_KEY, Body=model_archive.read_bytes())
        yield endpoint
    finally:
        server.stop()


def photo_jpeg(name: str = "coffee") -> bytes:
    """One of scikit-image's photos as a JPEG: by default the coffee cup the demo model calls espresso."""
    buffer = io.BytesIO()
    Image.fromarray(getattr(photos, name)()).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def simulation_only_layers(layers: Sequence[Path]) -> list[str]:
    """The layers whose manifest says they cannot load on a real runtime (see build_layer)."""
    flagged = []
    for layer in layers:
        with zipfile.ZipFile(layer) as bundle:
            for name in bundle.namelist():
                if name.endswith("/manifest.json") and json.loads(bundle.read(name)).get("simulation_only"):
                    flagged.append(layer.name)
    return flagged


def simulate(
    package_dir: Path,
    layers: list[Path],
    model_archive: Path,
    warm_requests: int,
    interpreter: Interpreter | None = None,
) -> dict[str, object]:
    """Classify a photo cold, then warm, then ask which backend served; report the figures."""
    interpreter = interpreter or Interpreter.from_command(THIS_INTERPRETER)
    code_path_only = simulation_only_layers(layers)
    run = invoke(
        package_dir,
        layers,
        model_archive,
        interpreter,
        lambda image_url: [
            *[proxy_event(json.dumps({"url": image_url}))] * (1 + warm_requests),
            proxy_event(None, method="GET", path="/model"),
        ],
    )
    *results, model = run.results
    warm = sorted(r["seconds"] for r in results[1:])
    return {
        "interpreter": interpreter.label,
        "runtime": interpreter.runtime,
        "simulation": (
            f"code path only: {', '.join(code_path_only)} cannot load on Lambda's {interpreter.runtime}"
            if code_path_only
            else f"the {interpreter.runtime} package on a real CPython {interpreter.runtime[6:]}"
        ),
        "responses": [r["response"] for r in results],
        # Every API Gateway request with its answer, the /model one included.
        "exchanges": [{"request": r["request"], "response": r["response"]} for r in run.results],
        "backend": json.loads(model["response"]["body"]).get("backend"),
        "cold_start_seconds": round(run.cold_start, 3),
        "warm_p50_seconds": round(warm[len(warm) // 2], 4) if warm else None,
        "peak_rss_mib": round(model["peak_rss_kib"] / 1024),
        "memory_files_mib": round(model["memory_files_kib"] / 1024),
        # An upper bound: the files' pages that are mapped and touched are in the RSS too.
        "peak_memory_mib": round((model["peak_rss_kib"] + model["memory_files_kib"]) / 1024),
        "tmp_used_mib": round(run.tmp_used / 2**20),
    }


@dataclass(frozen=True)
class Run:
    results: list[dict[str, object]]
    cold_start: float
    tmp_used: int
    log: list[str]  # what the function printed besides its results: its log lines and metrics


def invoke(
    package_dir: Path,
    layers: Sequence[Path],
    model_archive: Path,
    interpreter: Interpreter,
    events_for: Callable[[str], list[dict[str, object]]],
    *,
    environment: Mapping[str, str] | None = None,
) -> Run:
    """Start the API function cold in a fresh sandbox and send it ``events_for(image_url)``, in order.

    ``environment`` is laid over the function's own (its stage's variables and Lambda's).
    """
    with s3_with_model(model_archive) as endpoint, image_host(photo_jpeg()) as image_url:
        return run_function(
            package_dir, layers, interpreter, events_for(image_url), endpoint, environment=environment
        )


def run_function(
    package_dir: Path,
    layers: Sequence[Path],
    interpreter: Interpreter,
    events: list[dict[str, object]],
    s3_endpoint: str,
    *,
    function: str = API_FUNCTION,
    environment: Mapping[str, str] | None = None,
) -> Run:
    """Start the template's ``function`` cold in a fresh sandbox, against the S3 at ``s3_endpoint``
    (holding the model as ``s3_with_model`` puts it), and send it ``events`` in order."""
    template = json.loads((package_dir / "sam.json").read_text())
    properties = function_properties(template, function)
    with unpacked(package_dir, layers, "lambda-sim-") as sandbox:
        function_environment = {
            **sandbox.environment(properties, "chalice-classifier-sim"),
            "AWS_ACCESS_KEY_ID": "sim",
            "AWS_SECRET_ACCESS_KEY": "sim",
            "AWS_ENDPOINT_URL_S3": s3_endpoint,
            "PYTORCH_LAYER_DIR": str(sandbox.opt / "pytorch"),
            **(environment or {}),
        }
        config = {
            "path": sandbox.path(interpreter),
            "handler": properties["Handler"],
            "timeout_seconds": properties.get("Timeout", 3),
            "marker": RESULT_MARKER,
            "events": events,
        }
        started = time.monotonic()
        child = subprocess.Popen(
            [*interpreter.command, *SANDBOX_FLAGS, "-c", BOOTSTRAP, json.dumps(config)],
            cwd=sandbox.task, env=function_environment, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        printed, cold_start, stderr = collect_output(child, started, SIM_TIMEOUT_S)
        tmp_used = sum(p.stat().st_size for p in sandbox.tmp.rglob("*") if p.is_file())
    results = [
        json.loads(line.removeprefix(RESULT_MARKER)) for line in printed if line.startswith(RESULT_MARKER)
    ]
    if child.returncode != 0 or cold_start is None:
        raise SystemExit(f"the simulated function failed (exit {child.returncode}):\n{stderr[-4000:]}")
    log = [line.rstrip("\n") for line in printed if not line.startswith(RESULT_MARKER)]
    return Run(results=results, cold_start=cold_start, tmp_used=tmp_used, log=log)


def collect_output(
    child: subprocess.Popen[str], started: float, timeout: float
) -> tuple[list[str], float | None, str]:
    """What ``child`` prints on stdout, line by line (the function's logs, and its results with
    their marker), the seconds from ``started`` to its first result (None without one), and its stderr.

    Both pipes are read to their end as the child writes (stderr on a thread of its own, so that
    neither can fill up and stall it), and a child still running after ``timeout`` seconds is
    killed: a simulation reports a hung function, it does not hang with it.
    """
    assert child.stdout is not None
    assert child.stderr is not None
    errors: list[str] = []
    drain = threading.Thread(target=lambda: errors.extend(child.stderr), daemon=True)
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        child.kill()

    watchdog = threading.Timer(timeout, stop)
    drain.start()
    watchdog.start()
    printed, first_result = [], None
    try:
        for line in child.stdout:
            printed.append(line)
            if first_result is None and line.startswith(RESULT_MARKER):
                first_result = time.monotonic() - started
        child.wait()
    finally:
        watchdog.cancel()
    drain.join()
    if timed_out.is_set():
        raise SystemExit(f"the simulated function was still running after {timeout:g} s, and was stopped")
    return printed, first_result, "".join(errors)


def function_properties(template: Mapping[str, Any], logical_id: str = API_FUNCTION) -> dict[str, Any]:
    """The properties of the template's function ``logical_id`` (Chalice's names: APIHandler, BulkWorker)."""
    resource = template["Resources"].get(logical_id)
    if resource is None or resource["Type"] != "AWS::Serverless::Function":
        raise SystemExit(f"the template has no function {logical_id!r}")
    return resource["Properties"]


def template_names(**attributes: str) -> dict[str, str]:
    """What ``resolve`` may fill in: the simulation's parameters, pseudo parameters, and ``attributes``
    (``{"BulkQueue.Arn": ...}``: resources this simulation made)."""
    return {**PSEUDO_PARAMETERS, **SIM_PARAMETERS, **attributes}


def resolve(value: Any, names: Mapping[str, str]) -> Any:
    """``value`` with ``Ref``, ``Fn::GetAtt`` and ``Fn::Sub`` (its one-string form) filled in from ``names``,
    as CloudFormation does on deployment; a name without a value is an error."""
    if isinstance(value, list):
        return [resolve(item, names) for item in value]
    if not isinstance(value, dict):
        return value
    if value.keys() == {"Ref"}:
        return _named(names, value["Ref"])
    if value.keys() == {"Fn::GetAtt"}:
        return _named(names, ".".join(value["Fn::GetAtt"]))
    if value.keys() == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        return SUB_VARIABLE.sub(lambda variable: _named(names, variable[1]), value["Fn::Sub"])
    return {key: resolve(item, names) for key, item in value.items()}


def _named(names: Mapping[str, str], name: str) -> str:
    if name not in names:
        raise ValueError(f"{name!r} has no value in this simulation")
    return names[name]


def bulk_images() -> dict[str, bytes]:
    """Real photos, and one file that only claims to be a JPEG, under the input prefix, by key:
    what the simulation uploads by default."""
    prefix = SIM_PARAMETERS["InputPrefix"]
    images = {f"{prefix}{name}.jpg": photo_jpeg(name) for name in ("coffee", "chelsea", "astronaut")}
    return images | {f"{prefix}corrupt.jpg": CORRUPT_JPEG}


def simulate_bulk(
    package_dir: Path,
    layers: list[Path],
    model_archive: Path,
    interpreter: Interpreter | None = None,
    *,
    images: Mapping[str, bytes] | None = None,
    more_messages: Sequence[str] = (),
) -> dict[str, Any]:
    """Upload ``images`` (by key) to the input bucket, with the template's queue and bucket notification,
    and run the packaged worker over the queue as Lambda's SQS mapping would; report the results.

    ``more_messages`` are bodies sent to the queue as they are (``{"bucket", "key"}`` ones, as
    tools/classify_bucket.py sends), after the notifications.
    """
    interpreter = interpreter or Interpreter.from_command(THIS_INTERPRETER)
    template = json.loads((package_dir / "sam.json").read_text())
    worker = function_properties(template, BULK_FUNCTION)
    batch_size = worker["Events"]["BulkWorkerSqsEventSource"]["Properties"]["BatchSize"]
    with s3_with_model(model_archive) as endpoint:
        clients = {
            service: boto3.client(
                service, endpoint_url=endpoint, region_name="us-east-1",
                aws_access_key_id="sim", aws_secret_access_key="sim",
            )
            for service in ("s3", "sqs")
        }  # fmt: skip
        queue_url, queue_arn = _queues_of(template, clients["sqs"])
        _fill_input_bucket(
            template, clients["s3"], queue_arn, images if images is not None else bulk_images()
        )
        for body in more_messages:
            clients["sqs"].send_message(QueueUrl=queue_url, MessageBody=body)
        batches = _receive_all(clients["sqs"], queue_url, batch_size)
        events = [sqs_event(batch, queue_arn) for batch in batches]
        run = run_function(package_dir, layers, interpreter, events, endpoint, function=BULK_FUNCTION)
        answers = [result["response"] for result in run.results]
        retried = _delete_all_but_failures(clients["sqs"], queue_url, batches, answers)
        results = _results(clients["s3"])
    return {
        "interpreter": interpreter.label,
        "runtime": interpreter.runtime,
        "handler": worker["Handler"],
        "batches": [
            {"messages": len(batch), "batchItemFailures": answer["batchItemFailures"]}
            for batch, answer in zip(batches, answers, strict=True)
        ],
        "retried": retried,
        "results": results,
        "cold_start_seconds": round(run.cold_start, 3),
        "batch_seconds": [round(result["seconds"], 3) for result in run.results],
        "peak_rss_mib": round(max(result["peak_rss_kib"] for result in run.results) / 1024),
        "tmp_used_mib": round(run.tmp_used / 2**20),
    }


def _queues_of(template: Mapping[str, Any], sqs: Any) -> tuple[str, str]:
    """The template's queue and dead-letter queue, made with its settings; the queue's URL and ARN."""
    resources = template["Resources"]
    dead_letter_url = sqs.create_queue(QueueName="sim-bulk-dlq")["QueueUrl"]
    names = template_names(**{"BulkDeadLetterQueue.Arn": _queue_arn(sqs, dead_letter_url)})
    properties = resolve(resources["BulkQueue"]["Properties"], names)
    attributes = {
        "VisibilityTimeout": str(properties["VisibilityTimeout"]),
        "MessageRetentionPeriod": str(properties["MessageRetentionPeriod"]),
        "RedrivePolicy": json.dumps(properties["RedrivePolicy"]),
    }
    queue_url = sqs.create_queue(QueueName="sim-bulk", Attributes=attributes)["QueueUrl"]
    return queue_url, _queue_arn(sqs, queue_url)


def _queue_arn(sqs: Any, queue_url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def _fill_input_bucket(
    template: Mapping[str, Any], s3: Any, queue_arn: str, images: Mapping[str, bytes]
) -> None:
    """The buckets, the input bucket's notification as the stack's output gives it, then the images:
    S3 queues its test event, then one event per image."""
    for bucket in {SIM_PARAMETERS["InputBucket"], SIM_PARAMETERS["ResultsBucket"]}:
        s3.create_bucket(Bucket=bucket)
    output = template["Outputs"]["BulkNotificationConfiguration"]["Value"]
    notification = json.loads(resolve(output, template_names(**{"BulkQueue.Arn": queue_arn})))
    s3.put_bucket_notification_configuration(
        Bucket=SIM_PARAMETERS["InputBucket"], NotificationConfiguration=notification
    )
    for key, data in images.items():
        s3.put_object(Bucket=SIM_PARAMETERS["InputBucket"], Key=key, Body=data)


def _receive_all(sqs: Any, queue_url: str, batch_size: int) -> list[list[dict[str, Any]]]:
    """Every message of the queue, in batches of up to ``batch_size``, as the mapping's poller gets them."""
    batches = []
    while received := sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=batch_size, AttributeNames=["All"]
    ).get("Messages"):
        batches.append(received)
    return batches


def sqs_event(messages: Sequence[Mapping[str, Any]], queue_arn: str) -> dict[str, object]:
    """The event Lambda's SQS mapping invokes a function with, for messages as ReceiveMessage gave them."""
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": message.get("Attributes", {}),
                "messageAttributes": message.get("MessageAttributes", {}),
                "md5OfBody": message["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for message in messages
        ]
    }


def _delete_all_but_failures(
    sqs: Any, queue_url: str, batches: list[list[dict[str, Any]]], answers: list[dict[str, Any]]
) -> list[str]:
    """What the mapping does with each answer: delete the messages it does not name; their bodies."""
    retried = []
    for batch, answer in zip(batches, answers, strict=True):
        failed = {failure["itemIdentifier"] for failure in answer["batchItemFailures"]}
        done = [message for message in batch if message["MessageId"] not in failed]
        retried += [message["Body"] for message in batch if message["MessageId"] in failed]
        if done:
            entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)]
            sqs.delete_message_batch(QueueUrl=queue_url, Entries=entries)
    return retried


def _results(s3: Any) -> dict[str, dict[str, Any]]:
    """Each result object under the results prefix: its body and its metadata, by key."""
    bucket, prefix = SIM_PARAMETERS["ResultsBucket"], SIM_PARAMETERS["ResultsPrefix"]
    results = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            answer = s3.get_object(Bucket=bucket, Key=item["Key"])
            results[item["Key"]] = {
                "body": json.loads(answer["Body"].read()),
                "metadata": answer["Metadata"],
                "content_type": answer["ContentType"],
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=Path("build/package"))
    parser.add_argument("--layer", type=Path, action="append", default=None)
    parser.add_argument("--model", type=Path, default=Path("build/demo-model.tar.gz"))
    parser.add_argument("--warm-requests", type=int, default=10)
    parser.add_argument(
        "--function",
        choices=[API_FUNCTION, BULK_FUNCTION],
        default=API_FUNCTION,
        help="the API (proxy events) or the bulk worker (SQS events over photos in S3)",
    )
    parser.add_argument(
        "--python",
        default=shlex.join(THIS_INTERPRETER),
        help="command that starts the runtime's Python (make lambda-sim: build/toolchain/python)",
    )
    args = parser.parse_args()
    interpreter = Interpreter.from_command(shlex.split(args.python))
    if args.function == BULK_FUNCTION:
        result = simulate_bulk(args.package, args.layer or [], args.model, interpreter)
        outcomes = {key: _outcome(found["body"]) for key, found in result.pop("results").items()}
        print(json.dumps({**result, "results": outcomes}))
        return
    result = simulate(args.package, args.layer or [], args.model, args.warm_requests, interpreter)
    answers = [f"{r['statusCode']} {json.loads(r['body']).get('class')}" for r in result.pop("responses")]
    del result["exchanges"]  # the answers say it shortly
    print(json.dumps({**result, "answers": sorted(set(answers))}))


def _outcome(result: Mapping[str, Any]) -> str:
    return f"ok {result['class']}" if result["status"] == "ok" else f"error {result['error']['Code']}"


if __name__ == "__main__":
    main()
