"""HTTP routes and the bulk worker's queue handler: parse the event, call chalicelib, shape the answer.

Errors are typed exceptions from chalicelib that already carry their HTTP
status (see chalicelib/errors.py), so the views hold no try/except. Importing
this module does no I/O and stays light (no numpy, Pillow, urllib3 or model
runtime): the model loads on the first request that needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from chalice import Chalice, Response
from chalice.app import Request, SQSEvent

from chalicelib import demo_page, front_door, observability, snapstart
from chalicelib.current import get_holder, get_service, get_settings, run_bulk_batch, settings_or_none
from chalicelib.payload import IMAGE_TYPES, JSON_TYPE, deep_check, parse_invocation

if TYPE_CHECKING:  # the model and the service are imported by the first request (see chalicelib.current)
    from chalicelib.model_holder import LoadedModel
    from chalicelib.service import Outcome

# The queue the bulk worker reads (README: Classify a bucket). The deployed
# template gives the worker the queue it creates instead, and sets the
# batching window and the maximum concurrency (.chalice/merge-template-bulk.json).
BULK_QUEUE = "chalice-classifier-bulk"
BULK_BATCH_SIZE = 10

# configure_logs=False: logging is set up once, per request, by observability.
app = Chalice(app_name="chalice-classifier", configure_logs=False)
app.api.binary_types.extend(t for t in IMAGE_TYPES if t not in app.api.binary_types)
# With SnapStart the model loads and warms before the snapshot, and each restored
# copy gets connections of its own; nothing happens outside Lambda's runtime.
snapstart.register_hooks()


@app.middleware("http")
def around_every_request(request: Request, get_response: Callable[[Request], Response]) -> Response:
    """One JSON log line and metrics per request; CORS and the request id on every response."""
    request_id = app.lambda_context.aws_request_id if app.lambda_context is not None else "local"
    settings = settings_or_none()  # read once for the log level and the CORS headers
    level = settings.log_level if settings else observability.DEFAULT_LOG_LEVEL
    record = observability.begin(request_id, request.path, request.method, level)
    response = get_response(request)
    body = response.body if isinstance(response.body, dict) else {}
    observability.finish(
        record, response.status_code, body.get("Code") if response.status_code >= 400 else None
    )
    if settings is not None:
        origin = request.headers.get("origin")
        response.headers.update(settings.cors.headers(origin, preflight=request.method == "OPTIONS"))
    response.headers["x-request-id"] = request_id
    return response


@app.route("/", methods=["OPTIONS"])
@app.route("/invocations", methods=["OPTIONS"])
@app.route("/model", methods=["OPTIONS"])
@app.route("/ping", methods=["OPTIONS"])
@app.route("/openapi.json", methods=["OPTIONS"])
@app.route("/docs", methods=["OPTIONS"])
def preflight() -> Response:
    """CORS preflight; the middleware adds the headers when the origin is allowed.

    Every route has one, so the CORS policy is always ours: for a route
    without it, `chalice local` would answer the preflight itself.
    """
    return Response(body="", status_code=204)


@app.route("/", methods=["GET"])
def index() -> Response:
    """The demo page: paste a URL or drop a file, see the top 5 classes."""
    page = demo_page.page()
    return Response(body=page, headers=demo_page.headers(page))


@app.route("/openapi.json", methods=["GET"])
def openapi_document() -> dict[str, object]:
    """This API's OpenAPI 3.1 document, built from its routes and its exception tree."""
    from chalicelib import openapi  # noqa: PLC0415 - read rarely: built on request, never at import

    return openapi.document(app.routes)


@app.route("/docs", methods=["GET"])
def docs() -> Response:
    """The OpenAPI document for people: our own static page, under the demo page's CSP."""
    from chalicelib import openapi  # noqa: PLC0415 - as above

    page = openapi.docs_page()
    return Response(body=page, headers=demo_page.headers(page))


@app.route(
    "/invocations",
    methods=["POST"],
    content_types=[JSON_TYPE, *IMAGE_TYPES],
    **front_door.route_options("protected"),
)
def invocations() -> dict[str, object]:
    request = app.current_request
    invocation = parse_invocation(
        request.raw_body, request.headers.get("content-type", ""), request.query_params, get_settings().body
    )
    outcomes = get_service().classify(invocation)
    if not invocation.batch:
        return _prediction(outcomes[0], with_top_k=invocation.top_k is not None)
    return {"predictions": [_prediction(o, with_top_k=invocation.top_k is not None) for o in outcomes]}


@app.route("/ping", methods=["GET"])
def ping() -> dict[str, object]:
    """SageMaker-style health check: cheap; ``?deep=1`` loads the model if it has to."""
    models = get_holder()
    if deep_check(app.current_request.query_params):
        models.model()
    return {"status": "ok", "model_loaded": models.loaded}


@app.route("/model", methods=["GET"], **front_door.route_options("protected"))
def model() -> dict[str, object]:
    return _model_info(get_holder().model())


def _prediction(outcome: Outcome, *, with_top_k: bool) -> dict[str, object]:
    if outcome.error is not None:
        error = outcome.error
        return {"error": {"Code": type(error).__name__, "Message": str(error)}, "status": error.STATUS_CODE}
    assert outcome.predictions is not None
    best = outcome.predictions[0]
    shaped: dict[str, object] = {"class": best.label, "confidence": best.confidence}
    if with_top_k:
        shaped["top_k"] = [{"class": p.label, "confidence": p.confidence} for p in outcome.predictions]
    return shaped


def _model_info(loaded: LoadedModel) -> dict[str, object]:
    preprocessing = loaded.preprocessing
    return {
        "name": loaded.files.manifest.get("name"),
        "source": loaded.files.source,
        "version": loaded.files.version,
        "classes": len(loaded.classifier.classes),
        "input": {"channels": 3, "height": preprocessing.crop, "width": preprocessing.crop},
        "preprocessing": {
            "resize": preprocessing.resize,
            "crop": preprocessing.crop,
            "interpolation": preprocessing.interpolation,
            "mean": list(preprocessing.mean),
            "std": list(preprocessing.std),
        },
        "backend": loaded.classifier.backend,
        "loaded_at": loaded.loaded_at.isoformat(timespec="seconds"),
    }


@app.on_sqs_message(queue=BULK_QUEUE, batch_size=BULK_BATCH_SIZE, name="bulk_worker")
def bulk_worker(event: SQSEvent) -> dict[str, list[dict[str, str]]]:
    """Classify the S3 objects a batch of messages names; answer which messages to deliver again.

    Lambda's SQS mapping (with ReportBatchItemFailures) deletes the others.
    """
    context = event.context
    settings = settings_or_none()
    level = settings.log_level if settings else observability.DEFAULT_LOG_LEVEL
    record = observability.begin(context.aws_request_id, "sqs", "SQS", level)
    messages = [(sqs.to_dict()["messageId"], sqs.body) for sqs in event]
    retry = run_bulk_batch(messages, context.get_remaining_time_in_millis() / 1000)
    observability.finish(record, 200, None)
    return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in retry]}
