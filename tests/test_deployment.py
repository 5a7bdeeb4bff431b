"""The deployment artefacts, checked with AWS's own tools and a faithful Lambda simulation.

`make test` builds them first (`chalice package` with the prod stage and the
PyTorch layer, and with the onnx stage and its automatic layer); these tests
fail, never skip, when they are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tools.lambda_sim import PYTHON_MINOR, simulate, unzip

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "build" / "package"
LAYER = ROOT / "build" / "layer" / "pytorch-layer.zip"
ONNX_PACKAGE = ROOT / "build" / "package-onnx"
ONNX_LAYER = ONNX_PACKAGE / "layer-deployment.zip"
DEMO_MODEL = ROOT / "build" / "demo-model.tar.gz"
CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())
MIB = 1024 * 1024


def artefact(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make package layer` (make test does).")
    return path


def template(package: Path = PACKAGE) -> dict[str, Any]:
    return json.loads(artefact(package / "sam.json").read_text())


def function_of(package: Path) -> dict[str, Any]:
    return next(
        r["Properties"]
        for r in template(package)["Resources"].values()
        if r["Type"] == "AWS::Serverless::Function"
    )


def unzipped_size(archive: Path) -> int:
    with zipfile.ZipFile(archive) as bundle:
        return sum(info.file_size for info in bundle.infolist())


@pytest.mark.parametrize("package", [PACKAGE, ONNX_PACKAGE], ids=["torch", "onnx"])
def test_template_passes_cfn_lint(package: Path) -> None:
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cfn-lint"), str(artefact(package / "sam.json"))],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode & 2 == 0, result.stdout  # bit 2: errors (4: warnings, 8: informational)


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


def test_function_fits_lambda_limits_with_the_layer() -> None:
    function = function_of(PACKAGE)

    assert unzipped_size(artefact(PACKAGE / "deployment.zip")) + unzipped_size(artefact(LAYER)) <= 250 * MIB
    assert (PACKAGE / "deployment.zip").stat().st_size <= 50 * MIB  # chalice deploy uploads it directly
    assert function["Timeout"] <= 29
    assert function["EphemeralStorage"]["Size"] >= 1024
    assert function["Layers"] == CONFIG["stages"]["prod"]["layers"]


def test_the_package_leaves_torch_to_the_layer() -> None:
    with zipfile.ZipFile(artefact(PACKAGE / "deployment.zip")) as package:
        top_level = {name.split("/")[0] for name in package.namelist()}

    assert {"app.py", "chalicelib", "PIL", "numpy", "requests"} <= top_level
    assert not top_level & {"torch", "torchvision", "boto3", "botocore", "tests", "tools", "bench", "build"}


@pytest.mark.parametrize(
    ("package", "layer", "backend"),
    [(PACKAGE, LAYER, "torchscript"), (ONNX_PACKAGE, ONNX_LAYER, "onnx")],
    ids=["torch", "onnx"],
)
def test_lambda_simulation_classifies_a_real_photo(package: Path, layer: Path, backend: str) -> None:
    """The demo archive carries both formats: each deployment serves it with its own backend."""
    result = simulate(package, [artefact(layer)], artefact(DEMO_MODEL), warm_requests=3)
    print(json.dumps({k: v for k, v in result.items() if k != "responses"}))

    responses = result["responses"]
    assert [r["statusCode"] for r in responses] == [200] * 4
    assert {json.loads(r["body"])["class"] for r in responses} == {"espresso"}
    assert result["backend"] == backend


def test_the_onnx_deployment_fits_direct_upload_with_no_torch() -> None:
    function = function_of(ONNX_PACKAGE)
    with zipfile.ZipFile(artefact(ONNX_LAYER)) as layer:
        site = f"python/lib/python{PYTHON_MINOR}/site-packages/"
        installed = {name.removeprefix(site).split("/")[0] for name in layer.namelist()}
    function_zip = artefact(ONNX_PACKAGE / "deployment.zip")

    # chalice deploy uploads both zips directly, which AWS allows up to 50 MB each.
    assert function_zip.stat().st_size <= 50 * MIB
    assert ONNX_LAYER.stat().st_size <= 50 * MIB
    assert unzipped_size(function_zip) + unzipped_size(ONNX_LAYER) <= 250 * MIB
    assert {"onnxruntime", "numpy", "PIL", "requests", "aws_lambda_powertools"} <= installed
    assert not installed & {"torch", "torchvision", "sympy", "mpmath", "boto3", "botocore"}
    assert function["Layers"] == [{"Ref": "ManagedLayer"}]
    assert function["Environment"]["Variables"]["MODEL_BACKEND"] == "onnx"


def test_the_onnx_backend_refuses_numpy_2_under_the_old_onnxruntime(tmp_path: Path) -> None:
    """The deployment pins numpy 1.26 beside onnxruntime 1.16.3. Should numpy 2 slip in,
    onnxruntime would crash the process on its first run; the backend refuses instead."""
    task, opt = tmp_path / "task", tmp_path / "opt"
    unzip(artefact(ONNX_PACKAGE / "deployment.zip"), task)
    unzip(artefact(ONNX_LAYER), opt)
    layer_site = opt / "python" / "lib" / f"python{PYTHON_MINOR}" / "site-packages"
    numpy_2 = tmp_path / "numpy-2"
    numpy_2.mkdir()
    venv_numpy = Path(np.__file__).parent
    (numpy_2 / "numpy").symlink_to(venv_numpy, target_is_directory=True)
    if (venv_numpy.parent / "numpy.libs").is_dir():
        (numpy_2 / "numpy.libs").symlink_to(venv_numpy.parent / "numpy.libs", target_is_directory=True)
    path = [str(task), str(numpy_2), str(layer_site)]
    script = f"import sys; sys.path[:0] = {path!r}; import chalicelib.onnx_backend"

    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, check=False, timeout=60
    )

    assert np.__version__.startswith("2.")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "onnxruntime 1.16.3 was built for numpy 1 but numpy 2" in result.stderr
