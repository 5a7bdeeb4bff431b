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
   asks ``GET /model`` which backend served.

Anything the handler needs that the package or the layer lacks makes the
import or the request fail, and the simulation with it. It prints one JSON
line: which interpreter ran it, the responses, the cold start (process start
to first response), the warm latencies, the peak RSS and the /tmp used.

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
    memory_limit_in_mb = 2048
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:chalice-classifier-sim"
    def __init__(self, request_id):
        self.aws_request_id = request_id
    def get_remaining_time_in_millis(self):
        return 29000

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
    result = {"response": response, "seconds": time.monotonic() - started, **memory_kib()}
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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cat.jpg"
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
        s3.create_bucket(Bucket="sim-models")
        s3.put_object(Bucket="sim-models", Key="model.tar.gz", Body=model_archive.read_bytes())
        yield endpoint
    finally:
        server.stop()


def photo_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos.coffee()).save(buffer, "JPEG", quality=92)
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
    """Start the function cold in a fresh sandbox and send it ``events_for(image_url)``, in order.

    ``environment`` is laid over the function's own (its stage's variables and Lambda's).
    """
    template = json.loads((package_dir / "sam.json").read_text())
    function = next(
        r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::Serverless::Function"
    )
    with tempfile.TemporaryDirectory(prefix="lambda-sim-") as scratch:
        root = Path(scratch)
        task, opt, home, tmp = (root / name for name in ("var-task", "opt", "home", "tmp"))
        for folder in (task, opt, home, tmp):
            folder.mkdir()
        unzip(package_dir / "deployment.zip", task)
        for layer in layers:
            unzip(layer, opt)
        runtime = lambda_runtime_dir(root)
        with s3_with_model(model_archive) as endpoint, image_host(photo_jpeg()) as image_url:
            function_environment = {
                **function.get("Environment", {}).get("Variables", {}),
                "PATH": "/usr/bin:/bin",
                "HOME": str(home),
                "TMPDIR": str(tmp),
                "LAMBDA_TASK_ROOT": str(task),
                "AWS_LAMBDA_FUNCTION_NAME": "chalice-classifier-sim",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.get("MemorySize", 128)),
                "AWS_REGION": "us-east-1",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ACCESS_KEY_ID": "sim",
                "AWS_SECRET_ACCESS_KEY": "sim",
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_ENDPOINT_URL_S3": endpoint,
                "MODEL_BUCKET": "sim-models",
                "MODEL_KEY": "model.tar.gz",
                "PYTORCH_LAYER_DIR": str(opt / "pytorch"),
                # The image is served from loopback, which production refuses.
                "ALLOW_PRIVATE_URLS": "true",
                "ALLOWED_PORTS": "*",
                **(environment or {}),
            }
            # Lambda's own order: the function, then the layers' two folders, then the runtime.
            layer_site = opt / interpreter.layer_site_packages
            config = {
                "path": [str(task), str(layer_site), str(opt / "python"), str(runtime)],
                "handler": function["Handler"],
                "marker": RESULT_MARKER,
                "events": events_for(image_url),
            }
            started = time.monotonic()
            child = subprocess.Popen(
                [*interpreter.command, *SANDBOX_FLAGS, "-c", BOOTSTRAP, json.dumps(config)],
                cwd=task, env=function_environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert child.stdout is not None
            # The function logs JSON to stdout as on Lambda; results carry a marker.
            printed = []
            for line in iter(child.stdout.readline, ""):
                printed.append(line)
                if line.startswith(RESULT_MARKER):
                    break
            cold_start = time.monotonic() - started
            rest, stderr = child.communicate(timeout=120)
            printed += rest.splitlines(keepends=True)
        tmp_used = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    results = [
        json.loads(line.removeprefix(RESULT_MARKER)) for line in printed if line.startswith(RESULT_MARKER)
    ]
    if child.returncode != 0 or not results:
        raise SystemExit(f"the simulated function failed (exit {child.returncode}):\n{stderr[-4000:]}")
    log = [line.rstrip("\n") for line in printed if not line.startswith(RESULT_MARKER)]
    return Run(results=results, cold_start=cold_start, tmp_used=tmp_used, log=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=Path("build/package"))
    parser.add_argument("--layer", type=Path, action="append", default=None)
    parser.add_argument("--model", type=Path, default=Path("build/demo-model.tar.gz"))
    parser.add_argument("--warm-requests", type=int, default=10)
    parser.add_argument(
        "--python",
        default=shlex.join(THIS_INTERPRETER),
        help="command that starts the runtime's Python (make lambda-sim: build/toolchain/python)",
    )
    args = parser.parse_args()
    interpreter = Interpreter.from_command(shlex.split(args.python))
    result = simulate(args.package, args.layer or [], args.model, args.warm_requests, interpreter)
    answers = [f"{r['statusCode']} {json.loads(r['body']).get('class')}" for r in result.pop("responses")]
    print(json.dumps({**result, "answers": sorted(set(answers))}))


if __name__ == "__main__":
    main()
