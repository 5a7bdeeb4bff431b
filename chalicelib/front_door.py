"""Who may call the API on a deployed stage: anyone (dev), holders of an API key, or AWS IAM identities.

The choice is the stage's ``API_AUTH`` in .chalice/config.json: ``api_key``,
``iam``, or ``none`` (the same as leaving it unset). Chalice fixes a route's
``api_key_required`` and ``authorizer`` when it imports ``app.py``, and
``chalice package``, ``chalice local`` and ``chalice deploy`` all import it
after putting the stage's ``environment_variables`` into ``os.environ``
(``CLIFactory.load_chalice_app`` in chalice/cli/factory.py); the deployed
function then runs with the same variables. So this one setting decides the
packaged template, what ``chalice local`` serves and what the running
function says about itself, and reading it is all this module does at
import. (``chalice.test.Client`` sets a stage's variables only while a
request runs, so in tests that use it ``AUTH`` is whatever the test
process's own environment says.)

API Gateway answers some requests itself, before the function runs: a
missing key, a bad signature, a throttle. ``gateway_refusals`` gives those
answers the API's ``{"Code", "Message"}`` shape; tools/merge_templates.py
writes them into the stage's template, with the usage plan, the keys and the
throttling the stage's ``front_door`` settings ask for (README: Securing the
API). ``chalice local`` never gives them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast, get_args

from chalice import IAMAuthorizer

Auth = Literal["none", "api_key", "iam"]
Access = Literal["public", "protected"]
AUTH_SETTING = "API_AUTH"

# The routes app.py marks with route_options("protected"), as (method, path): the
# IAM caller policy names exactly these (tests/test_front_door_deployment.py
# checks that the packaged template protects these and no others).
PROTECTED_ROUTES = (("POST", "/invocations"), ("GET", "/model"))

KEY_WANTED = "This API needs a key: send it in the x-api-key header."


def auth_from(environ: Mapping[str, str]) -> Auth:
    """The front door ``environ`` asks for; a value that is not one of them is refused, naming it."""
    value = environ.get(AUTH_SETTING, "").strip() or "none"
    if value not in get_args(Auth):
        raise ValueError(
            f"{AUTH_SETTING}={value!r} is not a front door: expected one of {', '.join(get_args(Auth))}"
        )
    return cast(Auth, value)


AUTH: Auth = auth_from(os.environ)


def route_options(access: Access) -> dict[str, object]:
    """The ``@app.route`` keyword arguments that give a route this access under this stage's ``AUTH``.

    Public routes (the demo page, the health check, the API's description and
    every CORS preflight, which browsers send without credentials) take none.
    """
    if access == "public" or AUTH == "none":
        return {}
    if AUTH == "api_key":
        return {"api_key_required": True}
    return {"authorizer": IAMAuthorizer()}


@dataclass(frozen=True)
class GatewayRefusal:
    """An answer API Gateway gives by itself, in the API's error shape."""

    response_type: str  # API Gateway's name for the case (its GatewayResponseType)
    status: int
    code: str
    message: str


def gateway_refusals(auth: Auth) -> tuple[GatewayRefusal, ...]:
    """Everything API Gateway may answer by itself on a stage with this front door and a throttle."""
    common = (
        GatewayRefusal(
            "THROTTLED", 429, "TooManyRequests", "Too many requests: slow down, and retry in a moment."
        ),
        GatewayRefusal("MISSING_AUTHENTICATION_TOKEN", 403, "Forbidden", _no_route_message(auth)),
    )
    if auth == "api_key":
        return (
            *common,
            GatewayRefusal("INVALID_API_KEY", 403, "Forbidden", KEY_WANTED),
            GatewayRefusal(
                "QUOTA_EXCEEDED",
                429,
                "QuotaExceeded",
                "This key has used its quota of requests for the period; "
                "it renews when the next period begins (UTC).",
            ),
        )
    if auth == "iam":
        return (
            *common,
            GatewayRefusal(
                "ACCESS_DENIED",
                403,
                "Forbidden",
                "The AWS identity that signed this request may not call it: "
                "it needs execute-api:Invoke on this method.",
            ),
            GatewayRefusal(
                "INVALID_SIGNATURE",
                403,
                "Forbidden",
                "The request's AWS signature does not match it: "
                "sign the request as sent, with SigV4 for the service execute-api in this API's region.",
            ),
            GatewayRefusal(
                "EXPIRED_TOKEN",
                403,
                "Forbidden",
                "The AWS credentials that signed this request have expired: sign it again with current ones.",
            ),
        )
    return common


def _no_route_message(auth: Auth) -> str:
    """API Gateway gives MISSING_AUTHENTICATION_TOKEN for a path or method it has no route for too."""
    no_route = "No route matches this method and path (the API lists its routes at GET /openapi.json)"
    if auth != "iam":
        return f"{no_route}."
    signed = " and ".join(f"{method} {path}" for method, path in PROTECTED_ROUTES)
    return f"{no_route}, or the request is not signed: {signed} take requests signed with AWS SigV4."
