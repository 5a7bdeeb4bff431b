"""The deployment artefacts, checked with AWS's own tools and a faithful Lambda simulation.

`make test` builds them first (`chalice package` with the prod stage, and the
PyTorch layer); these tests fail, never skip, when they are missing.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tools.lambda_sim import simulate

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "build" / "package"
LAYER = ROOT / "build" / "layer" / "pytorch-layer.zip"
DEMO_MODEL = ROOT / "build" / "demo-model.tar.gz"
CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())
MIB = 1024 * 1024


def artefact(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `make package layer` (make test does).")
    return path


def template() -> dict[str, Any]:
    return json.loads(artefact(PACKAGE / "sam.json").read_text())


def unzipped_size(archive: Path) -> int:
    with zipfile.ZipFile(archive) as bundle:
        return sum(info.file_size for info in bundle.infolist())


def test_template_passes_cfn_lint() -> None:
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cfn-lint"), str(artefact(PACKAGE / "sam.json"))],
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
    function = next(
        r["Properties"] for r in template()["Resources"].values() if r["Type"] == "AWS::Serverless::Function"
    )

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


def test_lambda_simulation_classifies_a_real_photo() -> None:
    result = simulate(PACKAGE, [artefact(LAYER)], artefact(DEMO_MODEL), warm_requests=3)
    print(json.dumps({k: v for k, v in result.items() if k != "responses"}))

    responses = result["responses"]
    assert [r["statusCode"] for r in responses] == [200] * 4
    assert {json.loads(r["body"])["class"] for r in responses} == {"espresso"}
