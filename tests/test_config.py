"""The real Chalice stages: dev is convenient, the deployed ones (prod, onnx) are locked down."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from chalicelib.model_store import S3Archive
from chalicelib.settings import Settings
from chalicelib.url_policy import DEFAULT_PORTS
from tests.support.chalice_local import running_chalice_local

CHALICE_DIR = Path(__file__).resolve().parent.parent / ".chalice"
CONFIG = json.loads((CHALICE_DIR / "config.json").read_text())
DEPLOYED_STAGES = ["prod", "onnx"]


def stage_environment(stage: str) -> dict[str, str]:
    return {
        **CONFIG.get("environment_variables", {}),
        **CONFIG["stages"][stage].get("environment_variables", {}),
    }


def test_the_deployed_stages_are_the_ones_tested_here() -> None:
    assert set(CONFIG["stages"]) == {"dev", *DEPLOYED_STAGES}


def test_dev_stage_serves_the_demo_model_and_may_fetch_from_this_machine() -> None:
    environment = stage_environment("dev")
    settings = Settings.from_environ(environment)

    assert "MODEL_BUCKET" not in environment
    assert "MODEL_KEY" not in environment
    assert settings.url_policy.allow_private
    assert settings.cors.any_origin


@pytest.mark.parametrize("stage", DEPLOYED_STAGES)
def test_deployed_stages_keep_the_url_policy_on(stage: str) -> None:
    settings = Settings.from_environ(stage_environment(stage))

    assert not settings.url_policy.allow_private
    assert settings.url_policy.allowed_ports == DEFAULT_PORTS
    assert settings.cors.headers("https://anyone.example", preflight=True) == {}


@pytest.mark.parametrize("stage", DEPLOYED_STAGES)
def test_deployed_stages_load_from_s3_within_api_gateway_limits(stage: str) -> None:
    config = CONFIG["stages"][stage]

    assert {"MODEL_BUCKET", "MODEL_KEY"} <= set(config["environment_variables"])
    assert config["lambda_timeout"] <= 29
    assert not CONFIG.get("debug", False)
    assert not config.get("debug", False)


@pytest.mark.parametrize("stage", DEPLOYED_STAGES)
def test_deployed_stages_may_read_exactly_their_model_archive(stage: str) -> None:
    config = CONFIG["stages"][stage]
    policy = json.loads((CHALICE_DIR / config["iam_policy_file"]).read_text())
    settings = Settings.from_environ(stage_environment(stage))
    reads = [s for s in policy["Statement"] if "s3:GetObject" in s["Action"] and s["Effect"] == "Allow"]

    assert isinstance(settings.model.location, S3Archive)
    assert config["autogen_policy"] is False
    assert [s["Resource"] for s in reads] == [
        f"arn:aws:s3:::{settings.model.location.bucket}/{settings.model.location.key}"
    ]


def test_prod_stage_runs_torchscript_from_its_pytorch_layer() -> None:
    settings = Settings.from_environ(stage_environment("prod"))

    assert settings.model.backend in {"auto", "torch"}
    assert CONFIG["stages"]["prod"]["layers"]
    assert not CONFIG["stages"]["prod"].get("automatic_layer", False)


def test_onnx_stage_runs_onnx_runtime_from_its_own_layer_without_torch() -> None:
    settings = Settings.from_environ(stage_environment("onnx"))

    assert settings.model.backend == "onnx"
    assert CONFIG["stages"]["onnx"]["automatic_layer"] is True
    assert "layers" not in CONFIG["stages"]["onnx"]  # the PyTorch layer is prod's alone


def test_chalice_local_that_cannot_start_fails_the_test_at_once_with_its_output() -> None:
    """The `chalice_local` fixture must not hand over a server that is not there."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]

        with pytest.raises(pytest.fail.Exception) as failed, running_chalice_local(port, ready_within=30):
            pass

    assert "exited with status" in str(failed.value)
    assert "Address already in use" in str(failed.value)
