"""SnapStart for the onnx stage: the template's alias wiring, and the snapshot lifecycle in a simulation.

`make package-onnx-snapstart` builds the package (`make test` does): the onnx
stage with .chalice/merge-template-snapstart.json merged into its template.
These tests fail, never skip, when it is missing. The simulation
(tools/snapstart_sim.py) runs it on CPython 3.13 with a stand-in for Lambda's
``snapshot_restore_py``; what only AWS can show is in the README (SnapStart).
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from chalicelib import snapstart
from tests.support.openapi_check import assert_lambda_response_conforms
from tests.support.packages import artefact
from tools.lambda_sim import Interpreter
from tools.snapstart_sim import STAND_IN, SnapStartRun, answers, run_snapstart

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "build" / "package-onnx-snapstart"
LAYER = PACKAGE / "layer-deployment.zip"
ONNX_PACKAGE = ROOT / "build" / "package-onnx"
RUNTIME_PYTHON = ROOT / "build" / "toolchain" / "python"
DEMO_MODEL = ROOT / "build" / "demo-model.tar.gz"
ALIAS = {"Ref": "APIHandler.Alias"}
ALIAS_INTEGRATION = {
    "Fn::Sub": [
        "arn:${AWS::Partition}:apigateway:${AWS::Region}:lambda:path/2015-03-31/functions/${Alias}/invocations",
        {"Alias": ALIAS},
    ]
}
BEFORE_SNAPSHOT = "before_snapshot chalicelib.snapstart.load_and_warm"
AFTER_RESTORE = "after_restore chalicelib.snapstart.renew_after_restore"
# What tools/snapstart_sim.py asks each restored copy: two classifications, then GET /model.
SIMULATED_REQUESTS = [
    *[{"httpMethod": "POST", "path": "/invocations", "queryStringParameters": None}] * 2,
    {"httpMethod": "GET", "path": "/model", "queryStringParameters": None},
]


def resources(package: Path) -> dict[str, Any]:
    return json.loads(artefact(package / "sam.json").read_text())["Resources"]


def integrations(package: Path) -> dict[tuple[str, str], Any]:
    """Each API route's Lambda integration URI, by (path, method)."""
    paths = resources(package)["RestAPI"]["Properties"]["DefinitionBody"]["paths"]
    return {
        (path, method): operation["x-amazon-apigateway-integration"]["uri"]
        for path, operations in paths.items()
        for method, operation in operations.items()
    }


def log_records(run: SnapStartRun) -> list[dict[str, Any]]:
    """The function's JSON log records, from all its processes (its metrics lines carry no level)."""
    lines = [json.loads(line) for line in run.log if line.startswith("{")]
    return [record for record in lines if "level" in record]


@pytest.fixture(scope="module")
def runtime_python() -> Interpreter:
    """CPython 3.13, as Lambda's python3.13 runtime runs it (make builds it; see tools/debian_root.sh)."""
    return Interpreter.from_command([str(artefact(RUNTIME_PYTHON))])


def test_the_snapstart_template_passes_cfn_lint_without_errors_or_warnings() -> None:
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cfn-lint"), str(artefact(PACKAGE / "sam.json"))],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode & (2 | 4) == 0, result.stdout  # bit 2: errors, 4: warnings, 8: informational


def test_snapstart_applies_to_published_versions_behind_an_alias() -> None:
    function = resources(PACKAGE)["APIHandler"]["Properties"]

    assert function["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    assert function["AutoPublishAlias"] == "live"
    # A new version, so a new snapshot, whenever anything the snapshot holds changes: any of the
    # function's properties, or only its dependencies' layer (with the function's code unchanged).
    assert function["AutoPublishAliasAllProperties"] is True
    assert resources(PACKAGE)["ManagedLayer"]["Properties"]["PublishLambdaVersion"] is True


def test_the_function_is_one_snapstart_can_snapshot() -> None:
    function = resources(PACKAGE)["APIHandler"]["Properties"]
    major, minor = function["Runtime"].removeprefix("python").split(".")

    assert (int(major), int(minor)) >= (3, 12)
    assert function.get("PackageType", "Zip") == "Zip"
    assert function.get("EphemeralStorage", {"Size": 512})["Size"] <= 512


def test_every_api_route_invokes_the_alias_not_the_unqualified_function() -> None:
    """Chalice points the API at ``APIHandler.Arn``, which would run $LATEST and skip the snapshot."""
    routes = integrations(PACKAGE)

    # Every route of the app, and none that only the merge template names.
    assert routes.keys() == integrations(ONNX_PACKAGE).keys()
    unqualified = {route: uri for route, uri in routes.items() if uri != ALIAS_INTEGRATION}
    assert unqualified == {}, "give these routes the alias in .chalice/merge-template-snapstart.json"
    assert "APIHandler.Arn" not in json.dumps(resources(PACKAGE)["RestAPI"])


def test_api_gateway_may_invoke_the_alias_and_nothing_else() -> None:
    permissions = [
        r["Properties"] for r in resources(PACKAGE).values() if r["Type"] == "AWS::Lambda::Permission"
    ]

    assert [(p["FunctionName"], p["Principal"]) for p in permissions] == [(ALIAS, "apigateway.amazonaws.com")]


def test_restored_copies_answer_from_the_snapshot_in_the_hooks_order(runtime_python: Interpreter) -> None:
    run = run_snapstart(PACKAGE, [artefact(LAYER)], artefact(DEMO_MODEL), runtime_python, copies=2)

    assert run.snapshot["registered"] == {"before_snapshot": 1, "after_restore": 1}
    assert run.snapshot["lifecycle"] == ["init", BEFORE_SNAPSHOT, "snapshot"]
    assert "model loaded and warmed before the snapshot" in [r["message"] for r in log_records(run)]
    for copy in run.copies:
        assert copy.lifecycle == [AFTER_RESTORE, "invoke"]
        assert answers(copy.responses[:2]) == ["200 espresso"] * 2
        assert json.loads(copy.responses[2]["body"])["backend"] == "onnx"
        for request, response in zip(SIMULATED_REQUESTS, copy.responses, strict=True):
            assert_lambda_response_conforms(request, response)
        # The model came with the snapshot: a restored copy asks nothing of S3, not even credentials.
        assert (copy.s3_requests, copy.credential_fetches) == (0, 0)
        assert copy.restore_path_seconds < run.snapshot["seconds"]  # init took the model load


def without_member_hashes(archive: Path) -> bytes:
    """The archive's ONNX model with a manifest that lists no member hashes, as older archives have:
    the model store then reads it to its end, and its S3 connection goes back to the pool."""
    members = {}
    with tarfile.open(archive) as source:
        for name in ("manifest.json", "classes.txt", "model.onnx"):
            member = source.extractfile(name)
            assert member is not None
            members[name] = member.read()
    manifest = json.loads(members["manifest.json"])
    del manifest["files"]
    members["manifest.json"] = json.dumps(manifest).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as target:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            target.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_each_restored_copy_reads_s3_over_connections_and_credentials_of_its_own(
    runtime_python: Interpreter, tmp_path: Path
) -> None:
    """The snapshot holds a pooled S3 connection; a copy must neither keep nor use it.

    With MODEL_REFRESH_SECONDS every request starts a version check (a HEAD),
    so each copy talks to S3 after its restore.
    """
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(without_member_hashes(artefact(DEMO_MODEL)))

    run = run_snapstart(
        PACKAGE,
        [artefact(LAYER)],
        archive,
        runtime_python,
        copies=2,
        environment={"MODEL_REFRESH_SECONDS": "0.001"},
    )

    assert run.snapshot["sockets"] >= 1, "no S3 connection in the snapshot: this test would prove nothing"
    for copy in run.copies:
        assert answers(copy.responses[:2]) == ["200 espresso"] * 2
        assert copy.inherited_sockets == 0
        assert copy.s3_requests >= 1
        assert copy.s3_requests_on_older_connections == 0
        assert copy.credential_fetches >= 1


def test_a_model_missing_when_the_version_is_published_still_gives_a_snapshot_and_a_clear_503(
    runtime_python: Interpreter,
) -> None:
    """Publishing does not fail on a model published late: each restored copy tries the load
    itself, and says why it cannot, as an ordinary cold start would."""
    run = run_snapstart(
        PACKAGE, [artefact(LAYER)], artefact(DEMO_MODEL), runtime_python, copies=1,
        environment={"MODEL_KEY": "nothing/here.tar.gz"},
    )  # fmt: skip

    assert run.snapshot["lifecycle"] == ["init", BEFORE_SNAPSHOT, "snapshot"]
    assert any(
        record["level"] == "WARNING"
        and record["message"].startswith("the snapshot is taken without the model")
        for record in log_records(run)
    )
    (copy,) = run.copies
    first = copy.responses[0]
    assert first["statusCode"] == 503
    assert_lambda_response_conforms(SIMULATED_REQUESTS[0], first)
    assert json.loads(first["body"])["Code"] == "ModelUnavailable"


FORKED_DRAWS = """
import json, os, random
import numpy.random
from chalicelib.snapstart import renew_after_restore

draws = []
for _ in range(2):
    reader, writer = os.pipe()
    if os.fork() == 0:
        renew_after_restore()
        os.write(writer, json.dumps([random.random(), float(numpy.random.random())]).encode())
        os._exit(0)
    os.wait()
    draws.append(json.loads(os.read(reader, 1000)))
print(json.dumps(draws))
"""


def test_each_restored_copy_draws_random_numbers_of_its_own() -> None:
    """Two forks of one process (two copies of one snapshot) share its generators until renewed."""
    result = subprocess.run(
        [sys.executable, "-c", FORKED_DRAWS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    first, second = json.loads(result.stdout)

    assert first[0] != second[0]  # random
    assert first[1] != second[1]  # numpy's global generator


def test_registering_the_hooks_does_nothing_outside_lambdas_runtime() -> None:
    """Only Lambda's python3.12+ runtimes have ``snapshot_restore_py``; the app imports everywhere."""
    assert importlib.util.find_spec("snapshot_restore_py") is None

    snapstart.register_hooks()

    assert "snapshot_restore_py" not in sys.modules


REGISTERED_AT_IMPORT = """
import json, sys
import app, snapshot_restore_py as hooks

def names(registered):
    return [f"{function.__module__}.{function.__qualname__}" for function, _, _ in registered]

heavy = [name for name in ("numpy", "PIL", "urllib3", "onnxruntime", "chalicelib.s3") if name in sys.modules]
print(json.dumps([names(hooks.get_before_snapshot()), names(hooks.get_after_restore()), heavy]))
"""


def test_importing_the_app_registers_both_hooks_and_runs_neither(tmp_path: Path) -> None:
    """Where the runtime has ``snapshot_restore_py``, importing the app registers the hooks; the
    runtime runs them later, so the import stays as light as without SnapStart."""
    (tmp_path / "snapshot_restore_py.py").write_text(STAND_IN)

    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n{REGISTERED_AT_IMPORT}"],
        cwd=ROOT, env={}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    before, after, heavy = json.loads(result.stdout)
    assert before == ["chalicelib.snapstart.load_and_warm"]
    assert after == ["chalicelib.snapstart.renew_after_restore"]
    assert heavy == []
