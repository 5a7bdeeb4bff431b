"""The deployment artefacts, checked with AWS's own tools and a faithful Lambda simulation.

`make test` builds them first: both stages packaged for python3.13 by CPython
3.13 (build/toolchain), and, for the torch code-path simulation only, the prod
stage for python3.11 with the cp311 layer. These tests fail, never skip, when
an artefact is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.openapi_check import assert_lambda_response_conforms
from tests.support.packages import (
    LINT_ERRORS_OR_WARNINGS,
    ONNX_PACKAGE,
    PACKAGE,
    ROOT,
    artefact,
    cfn_lint,
    template,
)
from tools.lambda_sim import Interpreter, function_properties, invoke, proxy_event, simulate

ONNX_LAYER = ONNX_PACKAGE / "layer-deployment.zip"
SIMULATION_PACKAGE = ROOT / "build" / "simulation" / "package"
SIMULATION_LAYER = ROOT / "build" / "simulation" / "pytorch-layer-cp311-simulation-only.zip"
RUNTIME_PYTHON = ROOT / "build" / "toolchain" / "python"
DEMO_MODEL = ROOT / "build" / "demo-model.tar.gz"
CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())
DEPLOYED_RUNTIME = "python3.13"
MIB = 1024 * 1024


def function_of(package: Path) -> dict[str, Any]:
    """The API's function (the package's other one is the bulk worker: tests/test_bulk_deployment.py)."""
    return function_properties(template(package))


def unzipped_size(archive: Path) -> int:
    with zipfile.ZipFile(archive) as bundle:
        return sum(info.file_size for info in bundle.infolist())


@pytest.fixture(scope="module")
def runtime_python() -> Interpreter:
    """CPython 3.13, as Lambda's python3.13 runtime runs it (make builds it; see tools/debian_root.sh)."""
    return Interpreter.from_command([str(artefact(RUNTIME_PYTHON))])


@pytest.mark.parametrize("package", [PACKAGE, ONNX_PACKAGE], ids=["prod", "onnx"])
def test_both_stages_are_packaged_for_python3_13(package: Path) -> None:
    assert function_of(package)["Runtime"] == DEPLOYED_RUNTIME


@pytest.mark.parametrize("package", [PACKAGE, ONNX_PACKAGE], ids=["prod", "onnx"])
def test_template_passes_cfn_lint_without_errors_or_warnings(package: Path) -> None:
    result = cfn_lint(artefact(package / "sam.json"))

    assert result.returncode & LINT_ERRORS_OR_WARNINGS == 0, result.stdout


def test_no_iam_statement_grants_anything_on_star_but_logs() -> None:
    statements = [
        statement
        for resource in template()["Resources"].values()
        if resource["Type"] == "AWS::IAM::Role"
        for policy in resource["Properties"].get("Policies", [])
        for statement in policy["PolicyDocument"]["Statement"]
    ]

    assert statements
    for statement in statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = (
            statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        )
        if "*" in resources:
            assert all(action.startswith("logs:") for action in actions), statement
        assert "*" not in actions


def test_the_role_reads_exactly_the_configured_model_object() -> None:
    environment = CONFIG["stages"]["prod"]["environment_variables"]
    policy = json.loads((ROOT / ".chalice" / "policy-prod.json").read_text())
    s3_statements = [s for s in policy["Statement"] if str(s["Action"]).startswith("s3:")]

    assert CONFIG["stages"]["prod"]["autogen_policy"] is False
    assert [(s["Action"], s["Resource"]) for s in s3_statements] == [
        ("s3:GetObject", f"arn:aws:s3:::{environment['MODEL_BUCKET']}/{environment['MODEL_KEY']}")
    ]


def test_the_prod_function_fits_lambda_limits_with_its_layer() -> None:
    """No cp313 torch can be had here, so the cp311 layer (the same torch, pruned the same way)
    stands in for its size."""
    function = function_of(PACKAGE)
    layer_size = unzipped_size(artefact(SIMULATION_LAYER))

    assert unzipped_size(artefact(PACKAGE / "deployment.zip")) + layer_size <= 250 * MIB
    assert (PACKAGE / "deployment.zip").stat().st_size <= 50 * MIB  # chalice deploy uploads it directly
    assert function["Timeout"] <= 29
    # torch loads from the layer and from memory: /tmp, at Lambda's default size, is the model's.
    assert "EphemeralStorage" not in function
    assert function["Layers"] == CONFIG["stages"]["prod"]["layers"]


def test_the_prod_package_leaves_torch_to_the_layer() -> None:
    with zipfile.ZipFile(artefact(PACKAGE / "deployment.zip")) as package:
        top_level = {name.split("/")[0] for name in package.namelist()}

    assert {"app.py", "chalicelib", "PIL", "numpy", "urllib3"} <= top_level
    assert not top_level & {"torch", "torchvision", "boto3", "botocore", "tests", "tools", "bench", "build"}


def test_the_onnx_deployment_fits_lambda_with_no_torch() -> None:
    function = function_of(ONNX_PACKAGE)
    with zipfile.ZipFile(artefact(ONNX_LAYER)) as layer:
        site = f"python/lib/{DEPLOYED_RUNTIME}/site-packages/"
        installed = {name.removeprefix(site).split("/")[0] for name in layer.namelist()}
    function_zip = artefact(ONNX_PACKAGE / "deployment.zip")

    assert unzipped_size(function_zip) + unzipped_size(ONNX_LAYER) <= 250 * MIB
    assert {"onnxruntime", "numpy", "PIL", "urllib3", "certifi"} <= installed
    assert not installed & {"torch", "torchvision", "sympy", "mpmath", "boto3", "botocore"}
    assert function["Layers"] == [{"Ref": "ManagedLayer"}]
    assert function["Environment"]["Variables"]["MODEL_BACKEND"] == "onnx"


def test_the_python3_13_onnx_package_classifies_a_real_photo(runtime_python: Interpreter) -> None:
    result = simulate(ONNX_PACKAGE, [artefact(ONNX_LAYER)], artefact(DEMO_MODEL), 3, runtime_python)
    print(json.dumps({k: v for k, v in result.items() if k not in ("responses", "exchanges")}))

    responses = result["responses"]
    assert [r["statusCode"] for r in responses] == [200] * 4
    assert {json.loads(r["body"])["class"] for r in responses} == {"espresso"}
    assert result["backend"] == "onnx"
    for exchange in result["exchanges"]:
        assert_lambda_response_conforms(exchange["request"], exchange["response"])
    assert result["runtime"] == DEPLOYED_RUNTIME
    assert result["interpreter"].startswith("CPython 3.13.")
    assert result["simulation"] == "the python3.13 package on a real CPython 3.13"


def test_the_torch_code_path_runs_on_the_simulation_only_layer() -> None:
    """The demo archive carries both formats: the prod package, which has no onnxruntime, serves it
    with TorchScript. On python3.11 with the cp311 layer: a code-path simulation, and it says so."""
    result = simulate(SIMULATION_PACKAGE, [artefact(SIMULATION_LAYER)], artefact(DEMO_MODEL), 3)
    print(json.dumps({k: v for k, v in result.items() if k not in ("responses", "exchanges")}))

    responses = result["responses"]
    assert [r["statusCode"] for r in responses] == [200] * 4
    assert {json.loads(r["body"])["class"] for r in responses} == {"espresso"}
    assert result["backend"] == "torchscript"
    for exchange in result["exchanges"]:
        assert_lambda_response_conforms(exchange["request"], exchange["response"])
    assert result["simulation"].startswith("code path only: pytorch-layer-cp311-simulation-only.zip")
    assert result["tmp_used_mib"] <= 0.6 * 512  # of Lambda's default /tmp: the model's files only
    # torch's libraries are in memory: all of it must fit the prod function's memory with room to spare.
    assert result["peak_memory_mib"] <= 0.5 * function_of(PACKAGE)["MemorySize"]


def test_the_python3_13_prod_package_runs_and_says_when_its_layer_is_missing(
    runtime_python: Interpreter,
) -> None:
    """Everything but torch, on python3.13: the health check answers, and a classification
    without the PyTorch layer is a 503 that says what to attach, not an init crash or a 500."""
    run = invoke(
        PACKAGE,
        [],
        artefact(DEMO_MODEL),
        runtime_python,
        lambda image_url: [
            proxy_event(None, method="GET", path="/ping"),
            proxy_event(json.dumps({"url": image_url})),
        ],
    )
    ping, classify = (result["response"] for result in run.results)

    assert (ping["statusCode"], json.loads(ping["body"])["status"]) == (200, "ok")
    assert classify["statusCode"] == 503
    error = json.loads(classify["body"])
    assert error["Code"] == "TorchUnavailable"
    assert "torch cannot be imported" in error["Message"]
    assert "make layer" in error["Message"]


def test_deploy_artifacts_uploads_the_package_through_s3(
    s3_server: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make deploy-artifacts`, the step of `make deploy` that can run here: the AWS CLI uploads
    the zips to (moto) S3 and rewrites the template to point at them. CloudFormation itself
    cannot run here."""
    import boto3

    artefact(ONNX_PACKAGE / "sam.json")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="artifacts")
    stage_copy = tmp_path / "package-onnx"
    shutil.copytree(ONNX_PACKAGE, stage_copy)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    result = subprocess.run(
        ["make", "--no-print-directory", "deploy-artifacts", "STAGE=onnx", "ARTIFACT_BUCKET=artifacts",
         f"STAGE_DIR={stage_copy}", "STACK=test-stack"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    packaged = (stage_copy / "packaged.yaml").read_text()
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket="artifacts")["Contents"]}
    uploaded = {f"s3://artifacts/{key}" for key in keys}
    assert len(keys) == 2  # the function zip and the managed layer zip
    assert all(key.startswith("test-stack/") for key in keys)
    assert all(uri in packaged for uri in uploaded)
    assert "deployment.zip" not in packaged


def test_the_function_logs_each_record_once_as_json_with_warnings_visible(
    runtime_python: Interpreter,
) -> None:
    """On Lambda the runtime prints whatever reaches the root logger; our records must not, and a
    chalicelib warning must be there at the default level, in JSON, with the request id."""
    run = invoke(
        ONNX_PACKAGE,
        [artefact(ONNX_LAYER)],
        artefact(DEMO_MODEL),
        runtime_python,
        lambda _: [proxy_event(None, method="GET", path="/ping")],
        environment={"MODEL_KEY": "nothing/here.tar.gz", "LOG_LEVEL": "WARNING"},
    )
    deep = invoke(
        ONNX_PACKAGE,
        [artefact(ONNX_LAYER)],
        artefact(DEMO_MODEL),
        runtime_python,
        lambda _: [proxy_event(None, method="GET", path="/ping", query={"deep": "1"})],
        environment={"MODEL_KEY": "nothing/here.tar.gz"},
    )

    # LOG_LEVEL=WARNING: no request line; the metrics (EMF) are not log records and stay.
    assert [json.loads(line).get("level") for line in run.log] == [None]
    records = [json.loads(line) for line in deep.log if line.startswith('{"level"')]
    assert [record["level"] for record in records] == ["WARNING", "INFO"]
    assert "s3://sim-models/nothing/here.tar.gz" in records[0]["message"]
    assert {record["request_id"] for record in records} == {"sim-0"}
    assert all(line.startswith("{") for line in deep.log)
