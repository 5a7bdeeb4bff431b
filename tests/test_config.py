"""The real Chalice stages: dev is convenient, prod is locked down."""

from __future__ import annotations

import json
from pathlib import Path

from chalicelib.settings import Settings
from chalicelib.url_policy import DEFAULT_PORTS

CONFIG = json.loads((Path(__file__).resolve().parent.parent / ".chalice" / "config.json").read_text())


def stage_environment(stage: str) -> dict[str, str]:
    return {
        **CONFIG.get("environment_variables", {}),
        **CONFIG["stages"][stage].get("environment_variables", {}),
    }


def test_dev_stage_serves_the_demo_model_and_may_fetch_from_this_machine() -> None:
    environment = stage_environment("dev")
    settings = Settings.from_environ(environment)

    assert "MODEL_BUCKET" not in environment
    assert "MODEL_KEY" not in environment
    assert settings.url_policy.allow_private
    assert settings.cors.any_origin


def test_prod_stage_keeps_the_url_policy_on() -> None:
    settings = Settings.from_environ(stage_environment("prod"))

    assert not settings.url_policy.allow_private
    assert settings.url_policy.allowed_ports == DEFAULT_PORTS
    assert settings.cors.headers("https://anyone.example", preflight=True) == {}


def test_prod_stage_loads_from_s3_within_api_gateway_limits() -> None:
    prod = CONFIG["stages"]["prod"]

    assert {"MODEL_BUCKET", "MODEL_KEY"} <= set(prod["environment_variables"])
    assert prod["lambda_timeout"] <= 29
    assert prod["layers"]
    assert not CONFIG.get("debug", False)
    assert not prod.get("debug", False)
