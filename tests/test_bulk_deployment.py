"""The bulk worker as deployed: its queue, permissions and event source mapping in every packaged
template, and the packaged worker run on SQS events.

Every stage's package carries the worker (Chalice packages every handler of
app.py), so each is built with .chalice/merge-template-bulk.json merged into
its template; onnx-snapstart with the SnapStart one as well, combined by
tools/merge_templates.py. `make test` builds them; these tests fail, never
skip, when a package is missing or was built without the bulk merge. What
only AWS can show (SAM's transform, IAM's evaluation, S3 delivering its
notifications) is listed in the README (Classify a bucket).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.validate import ParamValidator

from tools.lambda_sim import (
    API_FUNCTION,
    BULK_FUNCTION,
    CORRUPT_JPEG,
    RESULT_MARKER,
    SIM_PARAMETERS,
    Interpreter,
    collect_output,
    function_properties,
    photo_jpeg,
    resolve,
    simulate_bulk,
    template_names,
)
from tools.merge_templates import MergeConflict, merge

ROOT = Path(__file__).resolve().parent.parent
# Each stage's package, and the make target that builds it.
PACKAGES = {
    "prod": (ROOT / "build" / "package", "make package"),
    "onnx": (ROOT / "build" / "package-onnx", "make package-onnx"),
    "onnx-snapstart": (ROOT / "build" / "package-onnx-snapstart", "make package-onnx-snapstart"),
}
STAGES = list(PACKAGES)
# The Chalice stage whose settings each package carries.
CHALICE_STAGE = {"prod": "prod", "onnx": "onnx", "onnx-snapstart": "onnx"}
CONFIG = json.loads((ROOT / ".chalice" / "config.json").read_text())
API_POLICY = json.loads((ROOT / ".chalice" / "policy-prod.json").read_text())
RUNTIME_PYTHON = ROOT / "build" / "toolchain" / "python"
DEMO_MODEL = ROOT / "build" / "demo-model.tar.gz"
QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:chalice-classifier-onnx-BulkQueue-X"
DEAD_LETTER_ARN = "arn:aws:sqs:us-east-1:123456789012:chalice-classifier-onnx-BulkDeadLetterQueue-Y"
NAMES = template_names(**{"BulkQueue.Arn": QUEUE_ARN, "BulkDeadLetterQueue.Arn": DEAD_LETTER_ARN})
INPUTS = f"arn:aws:s3:::{SIM_PARAMETERS['InputBucket']}/{SIM_PARAMETERS['InputPrefix']}*"
RESULTS = f"arn:aws:s3:::{SIM_PARAMETERS['ResultsBucket']}/{SIM_PARAMETERS['ResultsPrefix']}*"
QUEUE_CONSUMER = (
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
    "sqs:ChangeMessageVisibility",
)
LOGS = ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents")
DAY = 24 * 3600
# Photos of every kind the worker meets: colour, greyscale, large, small.
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "camera", "retina", "hubble_deep_field", "coins")
NAMES_NOTHING = "this message names no object"


def package(stage: str) -> Path:
    path, target = PACKAGES[stage]
    if not (path / "sam.json").exists():
        pytest.fail(f"{path.relative_to(ROOT)} is missing: run `{target}` (make test does).")
    return path


def template(stage: str) -> dict[str, Any]:
    sam = package(stage) / "sam.json"
    packaged = json.loads(sam.read_text())
    if "BulkQueue" not in packaged["Resources"]:
        pytest.fail(
            f"{sam.relative_to(ROOT)} was packaged without .chalice/merge-template-bulk.json: "
            f"run `{PACKAGES[stage][1]}` again."
        )
    return packaged


def resources(stage: str) -> dict[str, Any]:
    return template(stage)["Resources"]


def worker(stage: str) -> dict[str, Any]:
    return function_properties(template(stage), BULK_FUNCTION)


def sqs_event_source(stage: str) -> dict[str, Any]:
    (event,) = worker(stage)["Events"].values()
    assert event["Type"] == "SQS"
    return event["Properties"]


def listed(value: str | list[str]) -> list[str]:
    return value if isinstance(value, list) else [value]


def grants(stage: str, role: str) -> set[tuple[str, str]]:
    """Every (action, resource) the role may, from its own policies and any attached to it, with the
    template's names filled in; statements with conditions or exclusions would need more than this."""
    found = resources(stage)
    assert "ManagedPolicyArns" not in found[role]["Properties"]
    documents = [policy["PolicyDocument"] for policy in found[role]["Properties"].get("Policies", [])]
    documents += [
        r["Properties"]["PolicyDocument"]
        for r in found.values()
        if r["Type"] == "AWS::IAM::Policy" and {"Ref": role} in r["Properties"]["Roles"]
    ]
    pairs = set()
    for statement in (statement for document in documents for statement in document["Statement"]):
        # Conditions and exclusions (NotAction, NotResource) would need more than pairs to compare.
        assert statement["Effect"] == "Allow", statement
        assert statement.keys() <= {"Sid", "Effect", "Action", "Resource"}, statement
        actions, where = listed(statement["Action"]), listed(resolve(statement["Resource"], NAMES))
        pairs |= {(action, resource) for action in actions for resource in where}
    return pairs


def model_object(stage: str) -> str:
    environment = CONFIG["stages"][CHALICE_STAGE[stage]]["environment_variables"]
    return f"arn:aws:s3:::{environment['MODEL_BUCKET']}/{environment['MODEL_KEY']}"


def as_event_source_mapping(stage: str) -> dict[str, Any]:
    """The AWS::Lambda::EventSourceMapping SAM makes of the worker's SQS event, in a template of its own.

    SAM passes every property but Queue straight through (Queue becomes
    EventSourceArn), and cfn-lint checks a SAM event's properties against
    nothing, so a misspelt property or a value out of Lambda's range is only
    caught on the mapping itself.
    """
    properties = dict(sqs_event_source(stage))
    queue = properties.pop("Queue")
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "BulkQueue": {"Type": "AWS::SQS::Queue"},
            "BulkWorkerSqsEventSource": {
                "Type": "AWS::Lambda::EventSourceMapping",
                "Properties": {"FunctionName": "bulk-worker", "EventSourceArn": queue, **properties},
            },
        },
    }


@pytest.fixture(scope="module")
def runtime_python() -> Interpreter:
    """CPython 3.13, as Lambda's python3.13 runtime runs it (make builds it; see tools/debian_root.sh)."""
    if not RUNTIME_PYTHON.exists():
        pytest.fail(
            f"{RUNTIME_PYTHON.relative_to(ROOT)} is missing: run `make package-onnx` (make test does)."
        )
    return Interpreter.from_command([str(RUNTIME_PYTHON)])


def test_every_template_and_its_event_source_mapping_pass_cfn_lint_cleanly(tmp_path: Path) -> None:
    mappings = []
    for stage in STAGES:
        mappings.append(tmp_path / f"{stage}-event-source-mapping.json")
        mappings[-1].write_text(json.dumps(as_event_source_mapping(stage)))
    templates = [package(stage) / "sam.json" for stage in STAGES]

    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "cfn-lint"), *map(str, templates + mappings)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode & (2 | 4) == 0, result.stdout  # bit 2: errors, 4: warnings, 8: informational


@pytest.mark.parametrize("stage", STAGES)
def test_the_queue_outlasts_six_worker_timeouts_and_sends_the_undeliverable_to_a_dead_letter_queue(
    stage: str,
) -> None:
    """AWS's guidance: a visibility timeout of six times the function's timeout (plus the batching
    window), so a batch retried after a throttle is not delivered twice meanwhile; at least five
    receives before the dead-letter queue, so throttles alone do not put a message there."""
    queue = resources(stage)["BulkQueue"]["Properties"]
    dead_letter = resources(stage)["BulkDeadLetterQueue"]["Properties"]
    timeout = worker(stage)["Timeout"]

    assert (
        queue["VisibilityTimeout"] >= 6 * timeout + sqs_event_source(stage)["MaximumBatchingWindowInSeconds"]
    )
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["BulkDeadLetterQueue", "Arn"]},
        "maxReceiveCount": 5,
    }
    # A message keeps its first enqueue time in the dead-letter queue: it must outlive the queue's.
    assert dead_letter["MessageRetentionPeriod"] == 14 * DAY > queue["MessageRetentionPeriod"]
    assert queue["SqsManagedSseEnabled"] is dead_letter["SqsManagedSseEnabled"] is True


@pytest.mark.parametrize("stage", STAGES)
def test_the_worker_reads_the_queue_the_template_makes_and_reports_each_failed_message(stage: str) -> None:
    """Chalice names the queue by an ARN built from its name, a queue that need not exist; the
    merge points the mapping at the one the stack creates."""
    mapping = sqs_event_source(stage)

    assert mapping["Queue"] == {"Fn::Sub": "${BulkQueue.Arn}"}
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BatchSize"] == 10
    assert 0 < mapping["MaximumBatchingWindowInSeconds"] <= 10
    # Past the function's reserved concurrency, Lambda throttles and sends messages back: keep below it.
    assert mapping["ScalingConfig"]["MaximumConcurrency"] <= worker(stage)["ReservedConcurrentExecutions"]


@pytest.mark.parametrize("stage", STAGES)
def test_the_worker_runs_the_apis_code_and_model_with_the_deployers_results_location(stage: str) -> None:
    function, api = worker(stage), function_properties(template(stage), API_FUNCTION)
    variables = function["Environment"]["Variables"]

    assert function["Handler"] == "app.bulk_worker"
    assert (function["Runtime"], function["CodeUri"], function.get("Layers")) == (
        api["Runtime"],
        api["CodeUri"],
        api.get("Layers"),
    )
    # INFERENCE_THREADS=1 uses one vCPU, which is what Lambda gives at 1769 MB.
    assert function["MemorySize"] == 1769
    assert function["Timeout"] == 60
    assert variables.items() >= api["Environment"]["Variables"].items()  # the same model, the same way
    assert variables["RESULTS_BUCKET"] == {"Ref": "ResultsBucket"}
    assert variables["RESULTS_PREFIX"] == {"Ref": "ResultsPrefix"}
    assert variables["RESULTS_TOP_K"] == "5"


@pytest.mark.parametrize("stage", STAGES)
def test_the_worker_may_do_its_work_and_nothing_more(stage: str) -> None:
    """The input prefix read; the results prefix read and written; the results bucket listed, without
    which S3 answers a HEAD of a result not yet written with 403, not 404; the queue consumed; the model
    read; logs written."""
    assert worker(stage)["Role"] == {"Fn::GetAtt": ["BulkWorkerRole", "Arn"]}
    assert grants(stage, "BulkWorkerRole") == {
        ("s3:GetObject", INPUTS),
        ("s3:GetObject", RESULTS),
        ("s3:PutObject", RESULTS),
        ("s3:ListBucket", f"arn:aws:s3:::{SIM_PARAMETERS['ResultsBucket']}"),
        *((action, QUEUE_ARN) for action in QUEUE_CONSUMER),
        ("s3:GetObject", model_object(stage)),
        *((action, "arn:aws:logs:*:*:*") for action in LOGS),
    }


@pytest.mark.parametrize("stage", STAGES)
def test_the_api_gains_none_of_the_workers_permissions(stage: str) -> None:
    api = function_properties(template(stage), API_FUNCTION)
    expected = {
        (action, resource)
        for statement in API_POLICY["Statement"]
        for action in listed(statement["Action"])
        for resource in listed(statement["Resource"])
    }

    assert api["Role"] == {"Fn::GetAtt": ["ApiHandlerRole", "Arn"]}
    assert grants(stage, "ApiHandlerRole") == expected


@pytest.mark.parametrize("stage", STAGES)
def test_the_mapping_is_made_only_once_the_worker_may_read_the_queue(stage: str) -> None:
    """Lambda checks the role when the mapping is created, and the mapping needs the function: the
    function waits for the policy that lets it read the queue."""
    assert "BulkWorkerAccess" in resources(stage)["BulkWorker"]["DependsOn"]


@pytest.mark.parametrize("stage", STAGES)
def test_only_the_input_bucket_of_this_account_may_send_to_the_queue(stage: str) -> None:
    policy = resources(stage)["BulkQueuePolicy"]["Properties"]
    (statement,) = policy["PolicyDocument"]["Statement"]

    assert policy["Queues"] == [{"Ref": "BulkQueue"}]
    assert statement["Effect"] == "Allow"
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert resolve(statement["Resource"], NAMES) == QUEUE_ARN
    assert resolve(statement["Condition"], NAMES) == {
        "ArnEquals": {"aws:SourceArn": f"arn:aws:s3:::{SIM_PARAMETERS['InputBucket']}"},
        "StringEquals": {"aws:SourceAccount": NAMES["AWS::AccountId"]},
    }


@pytest.mark.parametrize("stage", STAGES)
def test_the_stack_outputs_the_queues_for_the_tool(stage: str) -> None:
    outputs = template(stage)["Outputs"]

    assert {name: outputs[name]["Value"] for name in outputs if name.startswith("Bulk")} == {
        "BulkQueueUrl": {"Ref": "BulkQueue"},
        "BulkQueueArn": {"Fn::GetAtt": ["BulkQueue", "Arn"]},
        "BulkDeadLetterQueueUrl": {"Ref": "BulkDeadLetterQueue"},
        "BulkDeadLetterQueueArn": {"Fn::GetAtt": ["BulkDeadLetterQueue", "Arn"]},
        "BulkWorkerName": {"Ref": "BulkWorker"},
        "BulkNotificationConfiguration": outputs["BulkNotificationConfiguration"]["Value"],
    }


@pytest.mark.parametrize(
    ("parameter", "accepted", "refused"),
    [
        ("InputBucket", ["my-photos", "photos.example.com"], ["", "My_Photos", "-photos"]),
        ("ResultsBucket", ["my-results"], ["", "s3://my-results"]),
        # Non-empty: the notification's filter and the read permission stay inside the prefix.
        ("InputPrefix", ["photos/", "photos/2024-"], ["", "/photos/"]),
        # A folder: the worker adds the slash to RESULTS_PREFIX, the permission must cover what it writes.
        ("ResultsPrefix", ["results/", "runs/2024/"], ["", "results", "/results/"]),
    ],
)
def test_a_deployer_supplies_buckets_and_prefixes_the_permissions_can_name(
    parameter: str, accepted: list[str], refused: list[str]
) -> None:
    for stage in STAGES:
        declared = template(stage)["Parameters"][parameter]
        pattern = declared["AllowedPattern"]

        assert all(re.fullmatch(pattern, value) for value in accepted), (stage, pattern)
        assert not any(re.fullmatch(pattern, value) for value in refused), (stage, pattern)
        assert "Default" not in declared or re.fullmatch(pattern, declared["Default"])


@pytest.mark.parametrize("stage", STAGES)
def test_the_buckets_and_the_input_prefix_have_no_default_to_deploy_by_accident(stage: str) -> None:
    parameters = template(stage)["Parameters"]

    assert [
        name for name in ("InputBucket", "InputPrefix", "ResultsBucket") if "Default" in parameters[name]
    ] == []


@pytest.mark.parametrize("stage", STAGES)
def test_the_notification_output_is_a_configuration_s3_accepts(stage: str) -> None:
    """What the README's `aws s3api put-bucket-notification-configuration` sends, checked against
    botocore's model of the call (which the AWS CLI validates with before sending)."""
    output = template(stage)["Outputs"]["BulkNotificationConfiguration"]["Value"]
    document = json.loads(resolve(output, NAMES))
    s3_model = botocore.session.get_session().get_service_model("s3")
    shape = s3_model.operation_model("PutBucketNotificationConfiguration").input_shape

    report = ParamValidator().validate(
        {"Bucket": SIM_PARAMETERS["InputBucket"], "NotificationConfiguration": document}, shape
    )

    assert not report.has_errors(), report.generate_report()
    (queue,) = document["QueueConfigurations"]
    assert queue["QueueArn"] == QUEUE_ARN
    assert queue["Events"] == ["s3:ObjectCreated:*"]
    assert queue["Filter"]["Key"]["FilterRules"] == [
        {"Name": "prefix", "Value": SIM_PARAMETERS["InputPrefix"]}
    ]
    assert document.keys() == {"QueueConfigurations"}


def test_the_snapstart_stage_carries_both_merges_and_its_worker_runs_unpublished() -> None:
    """SnapStart applies to published versions, and SAM points a function's event sources at its alias
    when it has one. The worker has neither: its cold starts spread over thousands of images, while a
    snapshot of every published version is billed for as long as it is kept. So its mapping invokes
    the function itself ($LATEST), as in the onnx stage, of which it is an exact copy."""
    snapstart = resources("onnx-snapstart")

    assert snapstart["APIHandler"]["Properties"]["AutoPublishAlias"] == "live"
    assert snapstart["APIHandler"]["Properties"]["SnapStart"] == {"ApplyOn": "PublishedVersions"}
    assert snapstart["BulkWorker"] == resources("onnx")["BulkWorker"]
    assert not {"AutoPublishAlias", "SnapStart"} & worker("onnx-snapstart").keys()
    assert {name: snapstart[name] for name in snapstart if name.startswith("Bulk")} == {
        name: resource for name, resource in resources("onnx").items() if name.startswith("Bulk")
    }


def test_merging_templates_refuses_two_values_for_one_property() -> None:
    snapstart = {"Resources": {"APIHandler": {"Properties": {"AutoPublishAlias": "live", "Timeout": 29}}}}
    bulk = {"Resources": {"BulkWorker": {"DependsOn": ["BulkWorkerAccess"]}}}
    clashing = {"Resources": {"APIHandler": {"Properties": {"Timeout": 60}}}}

    assert merge(snapstart, bulk) == {"Resources": {**snapstart["Resources"], **bulk["Resources"]}}
    assert merge(snapstart, snapstart) == snapstart
    with pytest.raises(MergeConflict, match="/Resources/APIHandler/Properties/Timeout"):
        merge(snapstart, clashing)


def md5(data: bytes) -> str:
    """S3's ETag of an object uploaded in one part."""
    return hashlib.md5(data).hexdigest()


def test_the_python3_13_onnx_worker_classifies_what_s3_and_the_tool_queue(
    runtime_python: Interpreter,
) -> None:
    """The packaged worker, its queue and the bucket's notification as the template makes them, and the
    SQS events Lambda's mapping would send: S3's test event and one event per image under the prefix,
    then a message naming an object that is gone and one naming nothing."""
    prefix = SIM_PARAMETERS["InputPrefix"]
    photos = {f"{prefix}{name}.jpg": photo_jpeg(name) for name in PHOTOS}
    corrupt, gone = f"{prefix}corrupt.jpg", f"{prefix}gone.jpg"
    images = {**photos, corrupt: CORRUPT_JPEG, "elsewhere/coffee.jpg": photo_jpeg("coffee")}
    layer = package("onnx") / "layer-deployment.zip"
    missing = json.dumps({"bucket": SIM_PARAMETERS["InputBucket"], "key": gone})

    run = simulate_bulk(
        package("onnx"),
        [layer],
        DEMO_MODEL,
        runtime_python,
        images=images,
        more_messages=[missing, NAMES_NOTHING],
    )
    print(json.dumps({key: value for key, value in run.items() if key != "results"}))

    results = {
        key.removeprefix(SIM_PARAMETERS["ResultsPrefix"]).removesuffix(".json"): found
        for key, found in run["results"].items()
    }
    assert [batch["messages"] for batch in run["batches"]] == [10, 2]
    # Only the message that names nothing comes back (and, after five receives, goes to the DLQ).
    assert sum(len(batch["batchItemFailures"]) for batch in run["batches"]) == 1
    assert run["retried"] == [NAMES_NOTHING]
    # One result per input named: none for the object outside the prefix or for S3's test event.
    assert results.keys() == {*photos, corrupt, gone}
    model_version = md5(DEMO_MODEL.read_bytes())
    for key, data in photos.items():
        found, body = results[key], results[key]["body"]
        confidences = [entry["confidence"] for entry in body["top_k"]]
        assert body["status"] == "ok", body
        assert body["input"] == {"bucket": SIM_PARAMETERS["InputBucket"], "key": key, "etag": md5(data)}
        assert body["class"] == body["top_k"][0]["class"]
        assert len(confidences) == 5
        assert confidences == sorted(confidences, reverse=True)
        assert body["model"]["version"] == model_version
        assert found["metadata"] == {"input-etag": md5(data), "model-version": model_version, "status": "ok"}
        assert found["content_type"] == "application/json"
    assert results[f"{prefix}coffee.jpg"]["body"]["class"] == "espresso"
    assert results[f"{prefix}chelsea.jpg"]["body"]["class"] in {"Egyptian cat", "tabby", "tiger cat"}
    assert results[corrupt]["body"]["error"]["Code"] == "UnsupportedImage"
    assert results[gone]["body"]["error"]["Code"] == "ObjectUnavailable"
    for key in (corrupt, gone):
        assert results[key]["body"]["status"] == results[key]["metadata"]["status"] == "error"
        assert "class" not in results[key]["body"]


# A function that answers two events at once: both results reach the pipe in one write.
TWO_RESULTS_AT_ONCE = f"""
import os, sys
os.write(1, b'{{"level": "INFO"}}\\n{RESULT_MARKER}{{"n": 1}}\\n{RESULT_MARKER}{{"n": 2}}\\n')
print("a warning", file=sys.stderr)
"""


def test_the_simulation_keeps_every_result_however_fast_the_function_prints_them() -> None:
    """The worker answers a batch that needs no model in milliseconds, so its next result can arrive
    with the one before it, in one read of the pipe; the simulation must not drop it."""
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", TWO_RESULTS_AT_ONCE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    printed, first_result, stderr = collect_output(child, started, timeout=60)

    assert printed == ['{"level": "INFO"}\n', f'{RESULT_MARKER}{{"n": 1}}\n', f'{RESULT_MARKER}{{"n": 2}}\n']
    assert 0 < first_result < 60
    assert stderr == "a warning\n"


def test_a_simulated_function_that_hangs_is_stopped_and_says_so() -> None:
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    with pytest.raises(SystemExit, match="still running after 1 s, and was stopped"):
        collect_output(child, started, timeout=1)

    assert child.poll() is not None  # killed, not left behind
