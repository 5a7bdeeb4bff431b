"""HTTP routes only: parse the request, call chalicelib, shape the JSON.

Errors are typed exceptions from chalicelib that already carry their HTTP
status (see chalicelib/errors.py), so the views hold no try/except. Importing
this module does no I/O: the model loads on the first request that needs it.
"""

from __future__ import annotations

from chalice import Chalice

from chalicelib.payload import parse_invocation
from chalicelib.service import get_service

app = Chalice(app_name="chalice-classifier")


@app.route("/invocations", methods=["POST"], content_types=["application/json"])
def invocations() -> dict[str, object]:
    request = parse_invocation(app.current_request.raw_body)
    prediction = get_service().classify_url(request.url)
    return {"class": prediction.label, "confidence": prediction.confidence}


@app.route("/ping", methods=["GET"])
def ping() -> dict[str, object]:
    """SageMaker-style health check: cheap, and 503 when the configuration is wrong."""
    return {"status": "ok", "model_loaded": get_service().model_loaded}
