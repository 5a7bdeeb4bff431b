"""The API's contract: an OpenAPI 3.1 document, built from the app's routes and the exception tree.

It is code rather than a static file so that it cannot drift from what it
describes: the Codes each error status may carry are read from
chalicelib/errors.py (a new leaf appears under its status by itself), the
CORS and page headers from cors.py and demo_page.py, the accepted media types
from payload.py, and the security of each operation from the route table
Chalice packages (``api_key_required`` and the IAM authorizer the front door
sets). ``app.py`` imports this module on the first ``GET /openapi.json`` or
``GET /docs``, never at import. The tests check every response they receive
against the document (tests/support/openapi_check.py), and Schemathesis runs
against `chalice local` with it.

Two answers belong to no operation, so they are components the checker and
readers look up by name: ``UnknownRoute`` (a path the API does not have) and
``MethodNotAllowed`` (a method a path does not have, answered by Chalice).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from functools import cache
from http import HTTPStatus
from pathlib import Path
from typing import Any

from chalice.app import IAMAuthorizer, MethodNotAllowedError, RouteEntry

from chalicelib import cors, demo_page, front_door
from chalicelib.errors import (
    ClassifierError,
    ConfigurationError,
    ImageTooLarge,
    InternalError,
    InvalidRequest,
    ModelUnavailable,
    ObjectUnavailable,
    UnsupportedImage,
    UpstreamError,
    UpstreamTimeout,
)
from chalicelib.payload import IMAGE_TYPES, JSON_TYPE, MAX_TOP_K

Schema = dict[str, Any]
Routes = Mapping[str, Mapping[str, RouteEntry]]

OPENAPI_VERSION = "3.1.0"
DOCS_PAGE = Path(__file__).resolve().parent / "static" / "docs.html"
UNKNOWN_ROUTE = "UnknownRoute"
METHOD_NOT_ALLOWED = "MethodNotAllowed"
API_KEY_SCHEME = "api_key"  # the names Chalice's own Swagger output gives them
SIGV4_SCHEME = IAMAuthorizer().name
# A 4 x 4 orange PNG: the examples classify for real (Schemathesis sends them first).
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAFElEQVR42mM8UaHBAANMDEgANwcAR/QBcPbvf+MAAAAASUVORK5CYII="
)

# What may go wrong where, as roots of the exception tree; every subclass comes along.
MODEL_ERRORS: tuple[type[ClassifierError], ...] = (ModelUnavailable, ConfigurationError, InternalError)
ITEM_ERRORS: tuple[type[ClassifierError], ...] = (
    InvalidRequest,
    ImageTooLarge,
    UnsupportedImage,
    UpstreamError,
    UpstreamTimeout,
    InternalError,
)
INVOCATION_ERRORS = (*ITEM_ERRORS, ModelUnavailable, ConfigurationError)
# Written only into the bulk worker's results, never an HTTP answer.
BULK_ONLY_ERRORS: tuple[type[ClassifierError], ...] = (ObjectUnavailable,)

# Chalice answers these itself: its error_response() writes the Code as a literal.
UNSUPPORTED_MEDIA_TYPE_CODE = "UnsupportedMediaType"

DESCRIPTION = """\
Image classification: send an image (a URL to fetch, base64 in JSON, or the raw bytes), get the
most likely class and, on request, the top k.

**Errors** are JSON `{"Code": ..., "Message": ...}`. `Code` is stable and safe to branch on (each
error status below lists the Codes it may carry); `Message` says what was expected and what
arrived. In a batch, an input that failed has `{"error": {"Code", "Message"}, "status"}` in its
place and the request still answers 200.

**Headers**: every answer of the service carries `x-request-id`, and the CORS headers when the
request's `Origin` is allowed by `CORS_ALLOW_ORIGIN`. Answers of API Gateway itself carry neither.

**Outside the operations**: a path the API does not have is refused by the gateway with 403
(components/responses/UnknownRoute); a method a path does not have is refused with 405 by Chalice
under `chalice local` (components/responses/MethodNotAllowed) and with the same 403 by a deployed
API Gateway.

**The front door**: on a deployed stage that requires API keys (header `x-api-key`) or IAM
(SigV4), the protected operations list their security requirement and may answer 403
`Forbidden`; a stage's throttling answers 429 `TooManyRequests`, and an API key past its quota
429 `QuotaExceeded`.
"""


def document(routes: Routes) -> Schema:
    """The whole OpenAPI 3.1 document for an app with these routes (``app.routes``)."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "chalice-classifier", "version": "1", "description": DESCRIPTION},
        # Relative to the document, so it holds under `chalice local` (/) and a stage (/api/).
        "servers": [{"url": ".", "description": "where this document is served"}],
        "paths": _paths(routes),
        "components": _components(),
    }


@cache
def docs_page() -> str:
    """``GET /docs``: a static page that renders the document with our own script, no CDN."""
    return DOCS_PAGE.read_text(encoding="utf-8")


def codes_by_status(roots: Iterable[type[ClassifierError]]) -> dict[int, list[str]]:
    """The Codes (class names) of ``roots`` and all their subclasses, grouped by HTTP status."""
    codes: dict[int, list[str]] = defaultdict(list)
    for error in _with_subclasses(roots):
        if error.__name__ not in codes[error.STATUS_CODE]:
            codes[error.STATUS_CODE].append(error.__name__)
    return dict(sorted(codes.items()))


def _with_subclasses(roots: Iterable[type[ClassifierError]]) -> Iterator[type[ClassifierError]]:
    for root in roots:
        yield root
        yield from _with_subclasses(root.__subclasses__())


# --- paths -------------------------------------------------------------------------------------


def _paths(routes: Routes) -> Schema:
    paths = {
        "/invocations": {"post": _classify()},
        "/ping": {"get": _ping()},
        "/model": {"get": _model()},
        "/": {"get": _page("demoPage", "The demo page: paste a URL or drop a file, see the top 5 classes.")},
        "/openapi.json": {"get": _openapi_document()},
        "/docs": {"get": _page("docsPage", "This document, rendered for people (no external scripts).")},
    }
    for path, item in paths.items():
        item["options"] = _preflight(path)
        for method, operation in item.items():
            _add_route_answers(operation, _route(routes, path, method.upper()))
            operation["responses"] = dict(sorted(operation["responses"].items()))
    return paths


def _route(routes: Routes, path: str, method: str) -> RouteEntry:
    route = routes.get(path, {}).get(method)
    if route is None:
        raise LookupError(f"The OpenAPI document describes {method} {path}, which app.py does not route.")
    return route


def _classify() -> Schema:
    raw = {media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in IMAGE_TYPES}
    return {
        "operationId": "classify",
        "summary": "Classify one image, or a batch",
        "description": (
            "One image as a URL, as base64 in JSON, or as the raw bytes; or a batch of URLs or "
            "base64 images (1 to MAX_BATCH, 8 unless configured), fetched and decoded side by "
            "side and answered in input order. A body with no Content-Type is read as JSON when it "
            "starts with `{`, and as image bytes otherwise. Bodies over MAX_BODY_BYTES (6 MiB) "
            "get 413: send a URL for bigger images."
        ),
        "parameters": [
            {
                "name": "top_k",
                "in": "query",
                "description": "Also answer the k best classes (from 1 to the model's number of classes).",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
                "example": 3,
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                JSON_TYPE: {"schema": _ref("InvocationRequest"), "examples": _request_examples()},
                **raw,
            },
        },
        "responses": {
            "200": _json_response(
                "The prediction, or for a batch one entry per input (a failed input has its error).",
                {"oneOf": [_ref("Prediction"), _ref("BatchPredictions")]},
            ),
            **_error_responses(INVOCATION_ERRORS),
        },
    }


def _request_examples() -> Schema:
    return {
        "url": {"summary": "An image to fetch", "value": {"url": "https://example.com/cat.jpg"}},
        "image": {"summary": "The bytes, base64", "value": {"image": EXAMPLE_PNG, "top_k": 3}},
        "data_url": {"summary": "A data: URL", "value": {"image": f"data:image/png;base64,{EXAMPLE_PNG}"}},
        "batch": {
            "summary": "A batch; the second input fails on its own",
            "value": {"images": [EXAMPLE_PNG, "bm90IGFuIGltYWdl"]},
        },
    }


def _ping() -> Schema:
    return {
        "operationId": "ping",
        "summary": "Health check",
        "description": "Cheap: checks the configuration, not the model, unless `deep` asks to load it.",
        "parameters": [
            {
                "name": "deep",
                "in": "query",
                "description": (
                    "`1` or `true` (any case) loads the model if it has to (503 if it cannot); `0`, "
                    "`false` or nothing does not; anything else is a 400."
                ),
                "schema": {"type": "string"},
            }
        ],
        "responses": {
            "200": _json_response("The service is configured.", _ref("Ping")),
            **_error_responses((InvalidRequest, *MODEL_ERRORS)),
        },
    }


def _model() -> Schema:
    return {
        "operationId": "model",
        "summary": "What model is loaded (loads it if needed)",
        "responses": {
            "200": _json_response("The loaded model.", _ref("ModelInfo")),
            **_error_responses(MODEL_ERRORS),
        },
    }


def _page(operation_id: str, summary: str) -> Schema:
    headers = {
        "Content-Security-Policy": _header_ref("ContentSecurityPolicy"),
        "X-Content-Type-Options": _header_ref("XContentTypeOptions"),
        **_service_headers(),
    }
    return {
        "operationId": operation_id,
        "summary": summary,
        "responses": {
            "200": {
                "description": "A static HTML page that talks only to this API.",
                "headers": headers,
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    }


def _openapi_document() -> Schema:
    return {
        "operationId": "openapiDocument",
        "summary": "This document",
        "responses": {"200": _json_response("The OpenAPI 3.1 document.", _ref("OpenAPIDocument"))},
    }


def _preflight(path: str) -> Schema:
    headers = {
        name: _header_ref(component)
        for name, component in (
            ("Access-Control-Allow-Methods", "AccessControlAllowMethods"),
            ("Access-Control-Allow-Headers", "AccessControlAllowHeaders"),
            ("Access-Control-Max-Age", "AccessControlMaxAge"),
        )
    }
    name = path.strip("/").replace(".", "_") or "root"
    return {
        "operationId": f"preflight_{name}",
        "summary": "CORS preflight",
        "description": "The CORS headers are present only when the request's Origin is allowed.",
        "responses": {"204": {"description": "No content.", "headers": {**_service_headers(), **headers}}},
    }


def _add_route_answers(operation: Schema, route: RouteEntry) -> None:
    """What Chalice and API Gateway answer for the route as Chalice packages it, before any view runs.

    Chalice refuses a request whose Content-Type is not one of the route's
    (``application/json`` unless the route says otherwise), whatever the
    method. The front door (chalicelib/front_door.py) marks protected routes
    with an API key or the IAM authorizer: they carry that security
    requirement, and API Gateway's own refusals come from the front door's
    list of them.
    """
    responses = operation["responses"]
    if route.content_types:
        accepted = ", ".join(route.content_types)
        responses["415"] = _error_response(
            415,
            [UNSUPPORTED_MEDIA_TYPE_CODE],
            f"The request's Content-Type is not one of {accepted} (Chalice).",
        )
    auth = _auth_of(route)
    if auth != "none":
        scheme = API_KEY_SCHEME if auth == "api_key" else SIGV4_SCHEME
        operation["security"] = [{scheme: []}]
        responses["403"] = _gateway_response(
            _gateway_codes(auth, 403), "Refused by API Gateway: no valid key or signature."
        )
    responses["429"] = _gateway_response(
        _gateway_codes(auth, 429),
        "Refused by API Gateway: the stage's throttling, or a key's quota.",
        also_plain=True,
    )


def _auth_of(route: RouteEntry) -> front_door.Auth:
    if route.api_key_required:
        return "api_key"
    return "iam" if isinstance(route.authorizer, IAMAuthorizer) else "none"


def _gateway_codes(auth: front_door.Auth, status: int) -> list[str]:
    """The Codes API Gateway answers ``status`` with, by itself, on a stage with this front door."""
    codes = [refusal.code for refusal in front_door.gateway_refusals(auth) if refusal.status == status]
    return list(dict.fromkeys(codes))


# --- responses ---------------------------------------------------------------------------------


def _error_responses(roots: Iterable[type[ClassifierError]]) -> Schema:
    return {
        str(status): _error_response(status, codes, HTTPStatus(status).phrase + ".")
        for status, codes in codes_by_status(roots).items()
    }


def _error_response(status: int, codes: list[str], description: str) -> Schema:
    """``{Code, Message}`` with the Codes ``status`` may carry."""
    return _json_response(f"{description} Code: {', '.join(codes)}.", _error_with(codes))


def _gateway_response(codes: list[str], description: str, *, also_plain: bool = False) -> Schema:
    """API Gateway's own answer: none of the service's headers, and the error shape where the front
    door's gateway responses give it; ``also_plain`` when a stage without them can answer too, with
    the gateway's own ``{"message"}``."""
    schema = _error_with(codes)
    return {
        "description": f"{description} Code: {', '.join(codes)}.",
        "content": {
            JSON_TYPE: {"schema": {"oneOf": [schema, _ref("GatewayMessage")]} if also_plain else schema}
        },
    }


def _error_with(codes: list[str]) -> Schema:
    return {"allOf": [_ref("Error")], "properties": {"Code": {"enum": codes}}}


def _json_response(description: str, schema: Schema) -> Schema:
    return {
        "description": description,
        "headers": _service_headers(),
        "content": {JSON_TYPE: {"schema": schema}},
    }


def _service_headers() -> Schema:
    """The headers the middleware sets on every answer of the service."""
    return {
        "x-request-id": _header_ref("XRequestId"),
        "Access-Control-Allow-Origin": _header_ref("AccessControlAllowOrigin"),
        "Access-Control-Expose-Headers": _header_ref("AccessControlExposeHeaders"),
        "Vary": _header_ref("Vary"),
    }


def _ref(schema: str) -> Schema:
    return {"$ref": f"#/components/schemas/{schema}"}


def _header_ref(header: str) -> Schema:
    return {"$ref": f"#/components/headers/{header}"}


# --- components --------------------------------------------------------------------------------


def _components() -> Schema:
    return {
        "schemas": _schemas(),
        "headers": _headers(),
        "responses": {
            UNKNOWN_ROUTE: {
                "x-status": 403,
                **_gateway_response(
                    _gateway_codes("none", 403),
                    "A path the API does not have (on a deployed stage, a method too). `chalice local` "
                    'answers like API Gateway, `{"message": "Missing Authentication Token"}`.',
                    also_plain=True,
                ),
            },
            METHOD_NOT_ALLOWED: {
                "x-status": 405,
                "description": "A method the path does not have (Chalice, under `chalice local`).",
                "headers": {"Allow": _header_ref("Allow"), **_service_headers()},
                "content": {JSON_TYPE: {"schema": _error_with([MethodNotAllowedError.__name__])}},
            },
        },
        "securitySchemes": {
            API_KEY_SCHEME: {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "An API key of the stage's usage plan (stages with the API-key front door).",
            },
            SIGV4_SCHEME: {
                **IAMAuthorizer().to_swagger(),
                "description": "AWS Signature Version 4 of an IAM principal allowed execute-api:Invoke.",
            },
        },
    }


def _schemas() -> Schema:
    confidence = {"type": "number", "minimum": 0, "maximum": 1, "description": "Softmax probability."}
    class_score = {
        "type": "object",
        "required": ["class", "confidence"],
        "additionalProperties": False,
        "properties": {"class": {"type": "string"}, "confidence": confidence},
    }
    return {
        "Error": {
            "type": "object",
            "required": ["Code", "Message"],
            "additionalProperties": False,
            "properties": {
                "Code": {"type": "string", "description": "Stable; safe to branch on."},
                "Message": {"type": "string", "description": "What was expected and what arrived."},
            },
        },
        "GatewayMessage": {
            "type": "object",
            "required": ["message"],
            "additionalProperties": False,
            "properties": {"message": {"type": "string"}},
        },
        "ClassScore": class_score,
        "Prediction": {
            **class_score,
            "properties": {
                **class_score["properties"],
                "top_k": {
                    "type": "array",
                    "minItems": 1,
                    "items": _ref("ClassScore"),
                    "description": "Present when top_k was asked for: the k best classes, best first.",
                },
            },
        },
        "ItemError": {
            "description": "A batch input that failed: its error and the status it would have had alone.",
            "oneOf": [_item_error(status, codes) for status, codes in codes_by_status(ITEM_ERRORS).items()],
        },
        "BatchPredictions": {
            "type": "object",
            "required": ["predictions"],
            "additionalProperties": False,
            "properties": {
                "predictions": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"oneOf": [_ref("Prediction"), _ref("ItemError")]},
                    "description": "One entry per input, in input order.",
                }
            },
        },
        "InvocationRequest": _invocation_request(),
        "Ping": {
            "type": "object",
            "required": ["status", "model_loaded"],
            "additionalProperties": False,
            "properties": {"status": {"const": "ok"}, "model_loaded": {"type": "boolean"}},
        },
        "ModelInfo": _model_info(),
        "OpenAPIDocument": {
            "type": "object",
            "required": ["openapi", "info", "paths"],
            "properties": {"openapi": {"const": OPENAPI_VERSION}},
        },
    }


def _item_error(status: int, codes: list[str]) -> Schema:
    return {
        "type": "object",
        "required": ["error", "status"],
        "additionalProperties": False,
        "properties": {
            "error": _error_with(codes),
            "status": {"const": status},
        },
    }


def _invocation_request() -> Schema:
    """Exactly one of url, image, urls, images; top_k beside it; other fields are ignored."""
    image = {
        "type": "string",
        "description": "Base64 of the image bytes, or a data URL (data:image/png;base64,...).",
    }
    url = {"type": "string", "format": "uri", "description": "An absolute http(s) URL of the image."}
    sources = {
        "url": url,
        "image": image,
        "urls": {"type": "array", "minItems": 1, "items": url, "description": "1 to MAX_BATCH URLs."},
        "images": {"type": "array", "minItems": 1, "items": image, "description": "1 to MAX_BATCH images."},
    }
    top_k = {
        "description": "As the query parameter, which wins when both are given.",
        "oneOf": [
            {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
            {"type": "string", "pattern": "^[0-9]{1,7}$"},
        ],
    }
    return {
        "oneOf": [
            {
                "type": "object",
                "title": source,
                "required": [source],
                "properties": {
                    **{other: False for other in sources if other != source},
                    source: schema,
                    "top_k": top_k,
                },
            }
            for source, schema in sources.items()
        ]
    }


def _model_info() -> Schema:
    positive = {"type": "integer", "minimum": 1}
    numbers = {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3}
    return {
        "type": "object",
        "required": [
            "name",
            "source",
            "version",
            "classes",
            "input",
            "preprocessing",
            "backend",
            "loaded_at",
        ],
        "additionalProperties": False,
        "properties": {
            "name": {"type": ["string", "null"], "description": "The manifest's name, if it has one."},
            "source": {"type": "string", "description": "s3://bucket/key, or a local path."},
            "version": {"type": "string", "description": "The S3 ETag, or sha256:... of a local archive."},
            "classes": positive,
            "input": {
                "type": "object",
                "required": ["channels", "height", "width"],
                "additionalProperties": False,
                "properties": {"channels": {"const": 3}, "height": positive, "width": positive},
            },
            "preprocessing": {
                "type": "object",
                "required": ["resize", "crop", "interpolation", "mean", "std"],
                "additionalProperties": False,
                "properties": {
                    "resize": positive,
                    "crop": positive,
                    "interpolation": {"type": "string"},
                    "mean": numbers,
                    "std": numbers,
                },
            },
            "backend": {"enum": ["torchscript", "onnx"]},
            "loaded_at": {"type": "string", "format": "date-time", "description": "UTC, to the second."},
        },
    }


def _headers() -> Schema:
    def header(description: str, schema: Schema, *, required: bool = False) -> Schema:
        return {"description": description, "required": required, "schema": {"type": "string", **schema}}

    preflight = "On a preflight from an allowed Origin."
    return {
        "XRequestId": header(
            "Lambda's request id: quote it when reporting a problem.", {"minLength": 1}, required=True
        ),
        "AccessControlAllowOrigin": header(
            "`*`, or the request's Origin when CORS_ALLOW_ORIGIN lists it.", {}
        ),
        "AccessControlExposeHeaders": header("With an allowed Origin.", {"const": cors.EXPOSED_HEADERS}),
        "Vary": header("`Origin` when CORS_ALLOW_ORIGIN is a list.", {}),
        "AccessControlAllowMethods": header(preflight, {"const": cors.ALLOWED_METHODS}),
        "AccessControlAllowHeaders": header(preflight, {"const": cors.ALLOWED_HEADERS}),
        "AccessControlMaxAge": header(preflight, {"const": cors.PREFLIGHT_MAX_AGE}),
        "ContentSecurityPolicy": header(
            "The page may talk only to this API, and run only its own inline script and style (by hash).",
            {"pattern": demo_page.POLICY_PATTERN},
            required=True,
        ),
        "XContentTypeOptions": header("", {"const": demo_page.NOSNIFF}, required=True),
        "Allow": header("The methods the path has.", {}, required=True),
    }
