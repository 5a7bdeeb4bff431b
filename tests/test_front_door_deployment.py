"""The front door as deployed: per-route security, the usage plan and its keys, the stage's throttle and
API Gateway's own refusals, in the templates `make` packages, and the IAM option and the dev stage
packaged here from a copy of the project.

The deployed stages (prod, onnx, onnx-snapstart) are read from build/, as
`make test` builds them. The IAM option is the prod stage with ``API_AUTH``
set to ``iam`` in a copy of .chalice/config.json, which is how an operator
chooses it; that copy, and dev, are packaged here by ``chalice package``
with no requirements, which takes a second or two and no network: only
their templates are looked at. What only API Gateway can show (that it
enforces what the templates say) is listed in the README (Securing the API).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from chalicelib.front_door import KEY_WANTED, PROTECTED_ROUTES
from tests.support.packages import (
    LINT_ERRORS_OR_WARNINGS,
    ONNX_PACKAGE,
    ONNX_SNAPSTART_PACKAGE,
    PACKAGE,
    ROOT,
    cfn_lint,
    template,
)
from tools.lambda_sim import resolve, template_names
from tools.merge_templates import FrontDoorSettingError, front_door_template, stage_merge_template

CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())
BULK_MERGE = ROOT / ".chalice" / "merge-template-bulk.json"
CHALICE = Path(sys.executable).parent / "chalice"
# Each deployed package, the Chalice stage whose settings it carries, and the make target that builds it.
DEPLOYED = {
    "prod": (PACKAGE, "prod", "make package"),
    "onnx": (ONNX_PACKAGE, "onnx", "make package-onnx"),
    "onnx-snapstart": (ONNX_SNAPSTART_PACKAGE, "onnx", "make package-onnx-snapstart"),
}
PROTECTED = {(method.lower(), path) for method, path in PROTECTED_ROUTES}
GATEWAY_RESPONSES = "x-amazon-apigateway-gateway-responses"
KEY_REFUSALS = {"THROTTLED", "MISSING_AUTHENTICATION_TOKEN", "INVALID_API_KEY", "QUOTA_EXCEEDED"}
IAM_REFUSALS = {
    "THROTTLED",
    "MISSING_AUTHENTICATION_TOKEN",
    "ACCESS_DENIED",
    "INVALID_SIGNATURE",
    "EXPIRED_TOKEN",
}
FRONT_DOOR_RESOURCES = {
    "AWS::ApiGateway::UsagePlan",
    "AWS::ApiGateway::ApiKey",
    "AWS::ApiGateway::UsagePlanKey",
}
API_ID = "a1b2c3d4e5"


def deployed(stage: str) -> dict[str, Any]:
    packaged = template(DEPLOYED[stage][0])
    if "UsagePlan" not in packaged["Resources"]:
        pytest.fail(
            f"the {stage} package was built without its front door: run `{DEPLOYED[stage][2]}` again."
        )
    return packaged


def stage_settings(stage: str) -> dict[str, Any]:
    return CONFIG["stages"][DEPLOYED[stage][1]]


def operations(packaged: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every (method, path) of the API's definition, and its operation."""
    paths = packaged["Resources"]["RestAPI"]["Properties"]["DefinitionBody"]["paths"]
    return {
        (method, path): operation for path, methods in paths.items() for method, operation in methods.items()
    }


def secured(packaged: dict[str, Any]) -> dict[tuple[str, str], list[dict[str, list[str]]]]:
    return {route: op["security"] for route, op in operations(packaged).items() if "security" in op}


def definition(packaged: dict[str, Any]) -> dict[str, Any]:
    return packaged["Resources"]["RestAPI"]["Properties"]["DefinitionBody"]


def package_copy(
    destination: Path, stage: str, change: Callable[[dict[str, Any]], None] = lambda _: None
) -> dict[str, Any]:
    """The template of ``stage`` packaged as `make` packages it (the bulk merge and the stage's front door),
    from a copy of the project whose .chalice/config.json ``change`` edits first."""
    project = destination / "project"
    shutil.copytree(ROOT / "chalicelib", project / "chalicelib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "app.py", project / "app.py")
    (project / ".chalice").mkdir()
    shutil.copy(ROOT / ".chalice" / "policy-prod.json", project / ".chalice")
    config = copy.deepcopy(CONFIG)
    change(config)
    (project / ".chalice" / "config.json").write_text(json.dumps(config))
    merge_template = destination / "merge-template.json"
    merge_template.write_text(json.dumps(stage_merge_template([BULK_MERGE], config, stage)))
    environment = {name: value for name, value in os.environ.items() if name != "API_AUTH"}
    result = subprocess.run(
        [str(CHALICE), "package", "--stage", stage, "--merge-template", str(merge_template),
         str(destination / "out")],
        cwd=project, env={**environment, "AWS_DEFAULT_REGION": "us-east-1"},
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((destination / "out" / "sam.json").read_text())


def with_iam(config: dict[str, Any]) -> None:
    """The prod stage as an operator switches it to IAM: API_AUTH, and no usage plan (it meters keys)."""
    config["stages"]["prod"]["environment_variables"]["API_AUTH"] = "iam"
    del config["stages"]["prod"]["front_door"]["usage_plan"]


def dev_without_policy_analysis(config: dict[str, Any]) -> None:
    """Chalice's policy generator cannot read app.py (its analyzer fails on PEP 563 annotations), and
    dev's generated policy is no concern here: dev borrows prod's policy file, and nothing else changes."""
    config["stages"]["dev"] |= {"autogen_policy": False, "iam_policy_file": "policy-prod.json"}


@pytest.fixture(scope="module")
def iam_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("iam")
    package_copy(destination, "prod", with_iam)
    return destination / "out" / "sam.json"


@pytest.fixture(scope="module")
def dev_template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return package_copy(tmp_path_factory.mktemp("dev"), "dev", dev_without_policy_analysis)


def gateway_response_types() -> list[str]:
    model = botocore.session.get_session().get_service_model("apigateway")
    return model.shape_for("GatewayResponseType").enum


# --- The deployed stages: API keys -------------------------------------------------------------------


@pytest.mark.parametrize("stage", DEPLOYED)
def test_the_protected_routes_and_only_they_need_a_key_in_the_header(stage: str) -> None:
    packaged = deployed(stage)

    assert secured(packaged) == {route: [{"api_key": []}] for route in PROTECTED}
    assert definition(packaged)["securityDefinitions"] == {
        "api_key": {"type": "apiKey", "name": "x-api-key", "in": "header"}
    }
    # Browsers send preflights without credentials; the page, the health check and the contract are public.
    assert {("options", path) for _, path in PROTECTED} <= operations(packaged).keys() - secured(
        packaged
    ).keys()
    assert {("get", "/"), ("get", "/ping")} <= operations(packaged).keys() - secured(packaged).keys()


@pytest.mark.parametrize("stage", DEPLOYED)
def test_the_usage_plan_meters_each_configured_key_with_the_configured_throttle_and_quota(stage: str) -> None:
    resources = deployed(stage)["Resources"]
    plan = stage_settings(stage)["front_door"]["usage_plan"]
    keys = {
        name: resource
        for name, resource in resources.items()
        if resource["Type"] == "AWS::ApiGateway::ApiKey"
    }
    plan_keys = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::ApiGateway::UsagePlanKey"]

    assert resources["UsagePlan"]["Properties"]["Throttle"] == {
        "RateLimit": plan["throttle"]["rate_limit"],
        "BurstLimit": plan["throttle"]["burst_limit"],
    }
    assert resources["UsagePlan"]["Properties"]["Quota"] == {
        "Limit": plan["quota"]["limit"],
        "Period": plan["quota"]["period"],
    }
    # The stage SAM makes, by the name that makes the plan wait for it.
    assert resources["UsagePlan"]["Properties"]["ApiStages"] == [
        {"ApiId": {"Ref": "RestAPI"}, "Stage": {"Ref": "RestAPI.Stage"}}
    ]
    assert keys.keys() == {f"ApiKey{name}" for name in plan["api_keys"]}
    assert sorted(key["KeyId"]["Ref"] for key in plan_keys) == sorted(keys)
    assert all(
        key["UsagePlanId"] == {"Ref": "UsagePlan"} and key["KeyType"] == "API_KEY" for key in plan_keys
    )
    # API Gateway generates each value: none is written in the template.
    assert all(
        key["Properties"]["Enabled"] is True and "Value" not in key["Properties"] for key in keys.values()
    )


@pytest.mark.parametrize("stage", DEPLOYED)
def test_the_outputs_name_each_key_and_the_command_that_prints_its_value(stage: str) -> None:
    outputs = deployed(stage)["Outputs"]
    names = template_names(**{name: f"id-of-{name}" for name in deployed(stage)["Resources"]})

    for name in stage_settings(stage)["front_door"]["usage_plan"]["api_keys"]:
        assert resolve(outputs[f"ApiKey{name}Id"]["Value"], names) == f"id-of-ApiKey{name}"
        assert resolve(outputs[f"ApiKey{name}ValueCommand"]["Value"], names) == (
            f"aws apigateway get-api-key --api-key id-of-ApiKey{name} --include-value "
            "--query value --output text --region us-east-1"
        )
    assert resolve(outputs["UsagePlanId"]["Value"], names) == "id-of-UsagePlan"


@pytest.mark.parametrize("stage", DEPLOYED)
def test_the_stage_throttles_all_callers_together_as_configured(stage: str) -> None:
    throttle = stage_settings(stage)["front_door"]["throttle"]
    plan = stage_settings(stage)["front_door"]["usage_plan"]

    assert deployed(stage)["Resources"]["RestAPI"]["Properties"]["MethodSettings"] == [
        {
            "ResourcePath": "/*",
            "HttpMethod": "*",
            "ThrottlingRateLimit": throttle["rate_limit"],
            "ThrottlingBurstLimit": throttle["burst_limit"],
        }
    ]
    # One key alone cannot take the whole stage.
    assert plan["throttle"]["rate_limit"] < throttle["rate_limit"]


@pytest.mark.parametrize("stage", DEPLOYED)
def test_api_gateways_own_refusals_have_the_apis_error_shape(stage: str) -> None:
    responses = definition(deployed(stage))[GATEWAY_RESPONSES]
    bodies = {kind: json.loads(r["responseTemplates"]["application/json"]) for kind, r in responses.items()}

    assert responses.keys() == KEY_REFUSALS
    assert responses.keys() <= set(gateway_response_types())
    assert all(body.keys() == {"Code", "Message"} for body in bodies.values())
    assert (responses["INVALID_API_KEY"]["statusCode"], bodies["INVALID_API_KEY"]) == (
        403,
        {"Code": "Forbidden", "Message": KEY_WANTED},
    )
    assert (responses["THROTTLED"]["statusCode"], bodies["THROTTLED"]["Code"]) == (429, "TooManyRequests")
    assert responses["THROTTLED"]["responseParameters"] == {"gatewayresponse.header.Retry-After": "'1'"}
    assert (responses["QUOTA_EXCEEDED"]["statusCode"], bodies["QUOTA_EXCEEDED"]["Code"]) == (
        429,
        "QuotaExceeded",
    )
    assert (
        responses["MISSING_AUTHENTICATION_TOKEN"]["statusCode"],
        bodies["MISSING_AUTHENTICATION_TOKEN"]["Code"],
    ) == (
        403,
        "Forbidden",
    )
    # prod sets no CORS_ALLOW_ORIGIN: the demo page, on the API's own origin, reads refusals without it.
    assert not any("Access-Control" in str(r.get("responseParameters")) for r in responses.values())


def test_the_front_door_templates_pass_cfn_lint_without_errors_or_warnings(iam_template: Path) -> None:
    deployed("prod")

    result = cfn_lint(PACKAGE / "sam.json", iam_template)

    assert result.returncode & LINT_ERRORS_OR_WARNINGS == 0, result.stdout


# --- The IAM option ----------------------------------------------------------------------------------


def test_with_iam_the_protected_routes_and_only_they_take_sigv4(iam_template: Path) -> None:
    packaged = json.loads(iam_template.read_text())
    throttle = CONFIG["stages"]["prod"]["front_door"]["throttle"]

    assert secured(packaged) == {route: [{"sigv4": []}] for route in PROTECTED}
    assert definition(packaged)["securityDefinitions"]["sigv4"]["x-amazon-apigateway-authtype"] == "awsSigv4"
    assert not {r["Type"] for r in packaged["Resources"].values()} & FRONT_DOOR_RESOURCES
    assert packaged["Resources"]["RestAPI"]["Properties"]["MethodSettings"] == [
        {
            "ResourcePath": "/*",
            "HttpMethod": "*",
            "ThrottlingRateLimit": throttle["rate_limit"],
            "ThrottlingBurstLimit": throttle["burst_limit"],
        }
    ]
    responses = definition(packaged)[GATEWAY_RESPONSES]
    assert responses.keys() == IAM_REFUSALS
    assert {json.loads(r["responseTemplates"]["application/json"])["Code"] for r in responses.values()} == {
        "Forbidden",
        "TooManyRequests",
    }


def test_with_iam_the_stack_makes_the_policy_a_caller_needs_for_exactly_the_protected_methods(
    iam_template: Path,
) -> None:
    packaged = json.loads(iam_template.read_text())
    names = template_names(RestAPI=API_ID, ApiCallerPolicy="arn:aws:iam::123456789012:policy/caller")
    policy = packaged["Resources"]["ApiCallerPolicy"]
    (statement,) = policy["Properties"]["PolicyDocument"]["Statement"]

    assert policy["Type"] == "AWS::IAM::ManagedPolicy"
    assert (statement["Effect"], statement["Action"]) == ("Allow", "execute-api:Invoke")
    assert sorted(resolve(statement["Resource"], names)) == [
        f"arn:aws:execute-api:us-east-1:123456789012:{API_ID}/api/GET/model",
        f"arn:aws:execute-api:us-east-1:123456789012:{API_ID}/api/POST/invocations",
    ]
    assert resolve(packaged["Outputs"]["ApiCallerPolicyArn"]["Value"], names) == names["ApiCallerPolicy"]


# --- dev ---------------------------------------------------------------------------------------------


def test_dev_has_no_front_door(dev_template: dict[str, Any]) -> None:
    api = dev_template["Resources"]["RestAPI"]["Properties"]

    assert secured(dev_template) == {}
    assert "securityDefinitions" not in api["DefinitionBody"]
    assert GATEWAY_RESPONSES not in api["DefinitionBody"]
    assert "MethodSettings" not in api
    assert not {r["Type"] for r in dev_template["Resources"].values()} & {
        *FRONT_DOOR_RESOURCES,
        "AWS::IAM::ManagedPolicy",
    }
    assert front_door_template(CONFIG, "dev") == {}


# --- The settings ------------------------------------------------------------------------------------


def prod_with(**changes: Any) -> dict[str, Any]:
    """CONFIG with prod's API_AUTH or front_door entries changed (None removes one)."""
    config = copy.deepcopy(CONFIG)
    prod = config["stages"]["prod"]
    for name, value in changes.items():
        where = prod["environment_variables"] if name == "API_AUTH" else prod["front_door"]
        if value is None:
            del where[name]
        else:
            where[name] = value
    return config


PLAN = CONFIG["stages"]["prod"]["front_door"]["usage_plan"]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (prod_with(API_AUTH="apikey"), "API_AUTH='apikey' is not a front door"),
        (prod_with(usage_plan=None), "expected an object 'usage_plan'"),
        (prod_with(API_AUTH="iam"), "usage_plan needs API_AUTH=api_key"),
        (prod_with(throttle=None), "expected an object 'throttle'"),
        (prod_with(throttle={"rate_limit": 20, "burst_limit": 0}), "positive int 'burst_limit'"),
        (prod_with(throttle={"rate_limit": "20", "burst_limit": 40}), "positive float 'rate_limit'"),
        (prod_with(throttle={"rate_limit": 2, "burst_limit": 40}), "above the stage's"),
        (prod_with(usage_plan={**PLAN, "quota": {"limit": 100, "period": "DAILY"}}), "got 'DAILY'"),
        (prod_with(usage_plan={**PLAN, "quota": {"limit": True, "period": "DAY"}}), "positive int 'limit'"),
        (prod_with(usage_plan={**PLAN, "api_keys": ["team-a"]}), "names of letters and digits"),
        (prod_with(usage_plan={**PLAN, "api_keys": ["A", "A"]}), "distinct names"),
        (prod_with(usage_plan={**PLAN, "api_keys": []}), "got []"),
        (prod_with(throtle={}), "front_door has no setting throtle"),
    ],
)
def test_a_stage_whose_front_door_is_set_wrongly_is_refused_naming_the_setting(
    config: dict[str, Any], named: str
) -> None:
    with pytest.raises(FrontDoorSettingError, match=r"^stage 'prod' of \.chalice/config\.json") as refused:
        front_door_template(config, "prod")

    assert named in str(refused.value)


def test_a_protected_stage_without_a_throttle_is_refused() -> None:
    config = copy.deepcopy(CONFIG)
    del config["stages"]["prod"]["front_door"]

    with pytest.raises(FrontDoorSettingError, match="API_AUTH=api_key but has no front_door"):
        front_door_template(config, "prod")


def test_the_packaging_step_says_what_is_wrong_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(prod_with(throttle={"rate_limit": 20, "burst_limit": 0})))

    result = subprocess.run(
        [sys.executable, "-m", "tools.merge_templates", str(BULK_MERGE), "--front-door", "prod",
         "--config", str(config), "--output", str(tmp_path / "merged.json")],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip

    assert result.returncode == 1
    assert "front_door.throttle: expected a positive int 'burst_limit', got 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "merged.json").exists()


@pytest.mark.parametrize(
    ("setting", "headers"),
    [
        ("*", {"Access-Control-Allow-Origin": "'*'", "Access-Control-Expose-Headers": "'x-request-id'"}),
        (
            "https://app.example",
            {
                "Access-Control-Allow-Origin": "'https://app.example'",
                "Vary": "'Origin'",
                "Access-Control-Expose-Headers": "'x-request-id'",
            },
        ),
        # API Gateway cannot pick one of several origins per request, as the function does.
        ("https://app.example,https://other.example", {}),
    ],
)
def test_refusals_carry_the_stages_cors_headers_where_one_value_serves_every_origin(
    setting: str, headers: dict[str, str]
) -> None:
    config = copy.deepcopy(CONFIG)
    config["stages"]["prod"]["environment_variables"]["CORS_ALLOW_ORIGIN"] = setting

    responses = front_door_template(config, "prod")["Resources"]["RestAPI"]["Properties"]["DefinitionBody"][
        GATEWAY_RESPONSES
    ]

    for kind, response in responses.items():
        parameters = response.get("responseParameters", {})
        found = {name.removeprefix("gatewayresponse.header."): value for name, value in parameters.items()}
        found.pop("Retry-After", None)
        assert found == headers, kind


@pytest.mark.parametrize(
    ("auth", "protected"),
    [
        ("", {}),
        ("none", {}),
        ("api_key", dict.fromkeys(PROTECTED_ROUTES, "api_key_required")),
        ("iam", dict.fromkeys(PROTECTED_ROUTES, "IAMAuthorizer")),
    ],
)
def test_importing_app_marks_the_protected_routes_as_the_environment_says(
    auth: str, protected: dict[tuple[str, str], str]
) -> None:
    """As Chalice imports it while packaging, with the stage's variables in the environment."""
    probe = (
        "import json, app\n"
        "found = {f'{m} {p}': ('api_key_required' if e.api_key_required else type(e.authorizer).__name__)\n"
        "         for p, methods in app.app.routes.items() for m, e in methods.items()\n"
        "         if e.api_key_required or e.authorizer is not None}\n"
        "print(json.dumps(found))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env={"API_AUTH": auth},
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        f"{method} {path}": kind for (method, path), kind in protected.items()
    }


def test_importing_app_with_an_unknown_front_door_fails_naming_the_setting() -> None:
    """So `chalice package` stops there, rather than packaging a stage with no front door."""
    result = subprocess.run(
        [sys.executable, "-c", "import app"], cwd=ROOT, env={"API_AUTH": "apikey"},
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip

    assert result.returncode == 1
    assert "API_AUTH='apikey' is not a front door: expected one of none, api_key, iam" in result.stderr
