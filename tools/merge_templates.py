"""A stage's one ``chalice package --merge-template``: templates of .chalice/ combined, and its front door.

Chalice takes only one. Every stage takes .chalice/merge-template-bulk.json
(the bulk worker's queue, permissions and event source mapping);
onnx-snapstart takes .chalice/merge-template-snapstart.json too (the API on
published versions behind an alias). They are combined the way Chalice merges a template into
its own (objects merged key by key, anything else replaced), except that
here none may replace another: two templates that set the same property to
different values are refused, naming the property, since the template given
last would otherwise win without a word.

``--front-door STAGE`` adds that stage's front door (README: Securing the
API): its ``API_AUTH`` (chalicelib/front_door.py, which also marks the
routes when Chalice imports app.py) and its ``front_door`` settings in
.chalice/config.json, the one place they are written, become

- the stage's throttle: a rate and burst for all callers together, in the
  API stage's method settings, with either front door;
- for ``api_key``, a usage plan (each key's own rate, burst and quota) and
  its keys. API Gateway generates each key's value, so it is never in the
  template, the stack's outputs or this repository: the outputs name each
  key and the command that prints its value;
- for ``iam``, a managed policy that grants execute-api:Invoke on exactly the
  protected methods, for callers to attach;
- API Gateway's own refusals (a missing key, a bad signature, a throttle) in
  the API's ``{"Code", "Message"}`` shape, with the stage's CORS headers
  when browsers on other origins may call it.

A stage with no ``API_AUTH`` and no ``front_door`` (dev) gets none of it.

    python -m tools.merge_templates .chalice/merge-template-bulk.json --front-door prod \\
        --output build/merge-template-prod.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chalicelib.cors import CorsPolicy
from chalicelib.front_door import AUTH_SETTING, PROTECTED_ROUTES, Auth, auth_from, gateway_refusals

CONFIG = Path(".chalice") / "config.json"
# Chalice's own default for a stage's api_gateway_stage.
DEFAULT_API_STAGE = "api"
QUOTA_PERIODS = ("DAY", "WEEK", "MONTH")
# A key's name becomes part of CloudFormation logical ids, which are alphanumeric.
KEY_NAME = re.compile(r"[A-Za-z0-9]{1,64}")


class MergeConflict(ValueError):
    """Two templates set one property to different values."""


class FrontDoorSettingError(ValueError):
    """A stage's front door settings in .chalice/config.json are missing or wrong."""


def merge(first: Any, second: Any, path: str = "") -> Any:
    """``first`` and ``second`` together; objects are merged key by key, other values must agree."""
    if isinstance(first, dict) and isinstance(second, dict):
        merged = dict(first)
        for key, value in second.items():
            merged[key] = merge(first[key], value, f"{path}/{key}") if key in first else value
        return merged
    if first != second:
        raise MergeConflict(f"the templates disagree on {path or 'the whole template'}")
    return first


def merge_files(sources: Sequence[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for source in sources:
        merged = merge(merged, json.loads(source.read_text()))
    return merged


def stage_merge_template(sources: Sequence[Path], config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """``sources`` combined, with the front door of ``stage`` in ``config`` (.chalice/config.json's)."""
    return merge(merge_files(sources), front_door_template(config, stage))


@dataclass(frozen=True)
class Throttle:
    rate_limit: float  # requests per second, on average
    burst_limit: int  # requests at once

    def covers(self, other: Throttle) -> bool:
        return self.rate_limit >= other.rate_limit and self.burst_limit >= other.burst_limit

    def __str__(self) -> str:
        return f"rate_limit {self.rate_limit}, burst_limit {self.burst_limit}"


@dataclass(frozen=True)
class UsagePlan:
    api_keys: tuple[str, ...]
    throttle: Throttle  # each key's own
    quota_limit: int
    quota_period: str


@dataclass(frozen=True)
class FrontDoor:
    auth: Auth
    api_stage: str
    throttle: Throttle  # all callers together
    usage_plan: UsagePlan | None
    cors_headers: dict[str, str]  # for browsers on other origins to read a refusal


def front_door_of(config: Mapping[str, Any], stage: str) -> FrontDoor | None:
    """The front door ``stage`` asks for in ``config``, checked; None for a stage with none (dev)."""
    if stage not in config.get("stages", {}):
        raise FrontDoorSettingError(f"the Chalice config has no stage {stage!r}")
    stage_config = config["stages"][stage]
    environment = {**config.get("environment_variables", {}), **stage_config.get("environment_variables", {})}
    where = f"stage {stage!r} of .chalice/config.json"
    try:
        auth = auth_from(environment)
    except ValueError as wrong:
        raise FrontDoorSettingError(f"{where}: {wrong}") from wrong
    settings = stage_config.get("front_door")
    if settings is None:
        if auth == "none":
            return None
        raise FrontDoorSettingError(
            f"{where} sets {AUTH_SETTING}={auth} but has no front_door: "
            "a protected stage needs a throttle (README: Securing the API)"
        )
    unknown = settings.keys() - {"throttle", "usage_plan"}
    if unknown:
        raise FrontDoorSettingError(f"{where}: front_door has no setting {', '.join(sorted(unknown))}")
    door = f"{where}, front_door"
    throttle = _throttle(_section(settings, "throttle", door), f"{door}.throttle")
    usage_plan = None
    if auth == "api_key":
        usage_plan = _usage_plan(_section(settings, "usage_plan", door), f"{door}.usage_plan")
        if not throttle.covers(usage_plan.throttle):
            raise FrontDoorSettingError(
                f"{door}: a key's throttle ({usage_plan.throttle}) is above the stage's ({throttle}), "
                "so no key could reach it"
            )
    elif "usage_plan" in settings:
        raise FrontDoorSettingError(
            f"{where}: front_door.usage_plan needs {AUTH_SETTING}=api_key (usage plans meter API keys)"
        )
    return FrontDoor(
        auth=auth,
        api_stage=stage_config.get("api_gateway_stage", config.get("api_gateway_stage", DEFAULT_API_STAGE)),
        throttle=throttle,
        usage_plan=usage_plan,
        cors_headers=_cors_headers(environment.get("CORS_ALLOW_ORIGIN", "")),
    )


def _section(settings: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    section = settings.get(name)
    if not isinstance(section, dict):
        raise FrontDoorSettingError(f"{where}: expected an object {name!r}, got {section!r}")
    return section


def _positive(section: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    value = section.get(name)
    # bool is an int to Python, never to a reader of the config.
    if isinstance(value, bool) or not isinstance(value, (int, kind)) or value <= 0:
        raise FrontDoorSettingError(f"{where}: expected a positive {kind.__name__} {name!r}, got {value!r}")
    return value


def _throttle(section: Mapping[str, Any], where: str) -> Throttle:
    return Throttle(
        rate_limit=_positive(section, "rate_limit", float, where),
        burst_limit=_positive(section, "burst_limit", int, where),
    )


def _usage_plan(section: Mapping[str, Any], where: str) -> UsagePlan:
    keys = section.get("api_keys")
    if (
        not isinstance(keys, list)
        or not keys
        or len(set(keys)) != len(keys)
        or not all(isinstance(k, str) and KEY_NAME.fullmatch(k) for k in keys)
    ):
        raise FrontDoorSettingError(
            f"{where}: expected 'api_keys', a list of distinct names of letters and digits, got {keys!r}"
        )
    quota = _section(section, "quota", where)
    period = quota.get("period")
    if period not in QUOTA_PERIODS:
        raise FrontDoorSettingError(
            f"{where}.quota: expected a 'period' of {', '.join(QUOTA_PERIODS)}, got {period!r}"
        )
    return UsagePlan(
        api_keys=tuple(keys),
        throttle=_throttle(_section(section, "throttle", where), f"{where}.throttle"),
        quota_limit=_positive(quota, "limit", int, f"{where}.quota"),
        quota_period=period,
    )


def _cors_headers(setting: str) -> dict[str, str]:
    """The stage's CORS headers, where one value serves every request: API Gateway cannot choose
    among several origins as the function does, so with several its refusals carry none."""
    if not setting.strip():
        return {}
    policy = CorsPolicy.from_setting(setting)
    if policy.any_origin:
        return policy.headers(None, preflight=False)
    if len(policy.origins) == 1:
        return policy.headers(next(iter(policy.origins)), preflight=False)
    return {}


def front_door_template(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The merge template of ``stage``'s front door; empty for a stage with none."""
    door = front_door_of(config, stage)
    if door is None:
        return {}
    resources: dict[str, Any] = {
        "RestAPI": {
            "Properties": {
                "MethodSettings": [
                    {
                        "ResourcePath": "/*",
                        "HttpMethod": "*",
                        "ThrottlingRateLimit": door.throttle.rate_limit,
                        "ThrottlingBurstLimit": door.throttle.burst_limit,
                    }
                ],
                "DefinitionBody": {"x-amazon-apigateway-gateway-responses": _gateway_responses(door)},
            }
        }
    }
    outputs: dict[str, Any] = {}
    if door.usage_plan is not None:
        resources |= _usage_plan_resources(door.usage_plan)
        outputs |= _key_outputs(door.usage_plan)
    if door.auth == "iam":
        resources["ApiCallerPolicy"] = _caller_policy(door.api_stage)
        outputs["ApiCallerPolicyArn"] = {
            "Description": "Attach to the role or user of each caller (aws iam attach-role-policy).",
            "Value": {"Ref": "ApiCallerPolicy"},
        }
    return {"Resources": resources, "Outputs": outputs} if outputs else {"Resources": resources}


def _gateway_responses(door: FrontDoor) -> dict[str, Any]:
    """x-amazon-apigateway-gateway-responses: part of the API's definition, so each deployment of the
    API carries them (separate GatewayResponse resources take effect only on the next deployment)."""
    responses = {}
    for refusal in gateway_refusals(door.auth):
        headers = dict(door.cors_headers)
        if refusal.response_type == "THROTTLED":
            headers["Retry-After"] = "1"  # the token bucket refills every second
        response: dict[str, Any] = {
            "statusCode": refusal.status,
            "responseTemplates": {
                "application/json": json.dumps({"Code": refusal.code, "Message": refusal.message})
            },
        }
        if headers:  # static values, in the single quotes API Gateway's mapping syntax wants
            response["responseParameters"] = {
                f"gatewayresponse.header.{name}": f"'{value}'" for name, value in headers.items()
            }
        responses[refusal.response_type] = response
    return responses


def _usage_plan_resources(plan: UsagePlan) -> dict[str, Any]:
    resources: dict[str, Any] = {
        "UsagePlan": {
            "Type": "AWS::ApiGateway::UsagePlan",
            "Properties": {
                "UsagePlanName": {"Fn::Sub": "${AWS::StackName}"},
                "Description": "Each key's throttle and quota (.chalice/config.json: front_door.usage_plan).",
                # RestAPI.Stage: SAM's name for the stage it makes, so the plan waits for it.
                "ApiStages": [{"ApiId": {"Ref": "RestAPI"}, "Stage": {"Ref": "RestAPI.Stage"}}],
                "Throttle": {"RateLimit": plan.throttle.rate_limit, "BurstLimit": plan.throttle.burst_limit},
                "Quota": {"Limit": plan.quota_limit, "Period": plan.quota_period},
            },
        }
    }
    for name in plan.api_keys:
        resources[f"ApiKey{name}"] = {
            "Type": "AWS::ApiGateway::ApiKey",
            "Properties": {
                "Name": {"Fn::Sub": f"${{AWS::StackName}}-{name}"},
                "Description": f"The API key {name} (.chalice/config.json: front_door.usage_plan.api_keys).",
                "Enabled": True,
            },
        }
        resources[f"UsagePlanKey{name}"] = {
            "Type": "AWS::ApiGateway::UsagePlanKey",
            "Properties": {
                "KeyId": {"Ref": f"ApiKey{name}"},
                "KeyType": "API_KEY",
                "UsagePlanId": {"Ref": "UsagePlan"},
            },
        }
    return resources


def _key_outputs(plan: UsagePlan) -> dict[str, Any]:
    outputs: dict[str, Any] = {"UsagePlanId": {"Value": {"Ref": "UsagePlan"}}}
    for name in plan.api_keys:
        outputs[f"ApiKey{name}Id"] = {"Value": {"Ref": f"ApiKey{name}"}}
        outputs[f"ApiKey{name}ValueCommand"] = {
            "Description": f"Prints the value of the API key {name}, which its holder sends as x-api-key.",
            "Value": {
                "Fn::Sub": f"aws apigateway get-api-key --api-key ${{ApiKey{name}}} --include-value "
                "--query value --output text --region ${AWS::Region}"
            },
        }
    return outputs


def _method_arn(api_stage: str, method: str, path: str) -> dict[str, str]:
    """The execute-api ARN of one method of this stack's API, as IAM policies name it."""
    return {
        "Fn::Sub": "arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:"
        f"${{RestAPI}}/{api_stage}/{method}/{path.lstrip('/')}"
    }


def _caller_policy(api_stage: str) -> dict[str, Any]:
    return {
        "Type": "AWS::IAM::ManagedPolicy",
        "Properties": {
            "Description": "Lets an AWS identity call the API's protected routes (README: Securing the API).",
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Sid": "InvokeTheProtectedRoutes",
                        "Effect": "Allow",
                        "Action": "execute-api:Invoke",
                        "Resource": [
                            _method_arn(api_stage, method, path) for method, path in PROTECTED_ROUTES
                        ],
                    }
                ],
            },
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("templates", type=Path, nargs="*")
    parser.add_argument("--front-door", metavar="STAGE", help="add the front door of this stage of --config")
    parser.add_argument("--config", type=Path, default=CONFIG, help=f"the Chalice config (default {CONFIG})")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    try:
        if args.front_door is None:
            merged = merge_files(args.templates)
        else:
            merged = stage_merge_template(
                args.templates, json.loads(args.config.read_text()), args.front_door
            )
    except MergeConflict as conflict:
        raise SystemExit(f"cannot merge {', '.join(map(str, args.templates))}: {conflict}") from conflict
    except ValueError as wrong:  # a front door setting, or a file that is not JSON
        raise SystemExit(f"cannot write {args.output}: {wrong}") from wrong
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged, indent=2) + "\n")


if __name__ == "__main__":
    main()
