"""Every input form of POST /invocations, top_k, batches, GET /model and GET /ping?deep=1."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from chalice.test import Client
from PIL import Image

from tests.conftest import DEMO_KEY, MODEL_BUCKET
from tests.support.api import JSON, classify, error_of
from tests.support.http_server import RoutedHTTPServer, serve_bytes

pytestmark = pytest.mark.usefixtures("demo_from_s3")


def post(client: Client, body: object, query: str = "") -> object:
    return client.http.post(f"/invocations{query}", headers=JSON, body=json.dumps(body))


def test_base64_image(client: Client, photos: dict[str, bytes]) -> None:
    response = post(client, {"image": base64.b64encode(photos["coffee"]).decode()})

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


def test_base64_data_url(client: Client, photos: dict[str, bytes]) -> None:
    data_url = "data:image/jpeg;base64," + base64.b64encode(photos["coffee"]).decode()

    assert post(client, {"image": data_url}).json_body["class"] == "espresso"


@pytest.mark.parametrize("content_type", ["image/jpeg", "application/octet-stream"])
def test_raw_body(client: Client, photos: dict[str, bytes], content_type: str) -> None:
    response = client.http.post("/invocations", headers={"Content-Type": content_type}, body=photos["coffee"])

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif")]
)
def test_raw_body_in_other_formats(
    client: Client, photos: dict[str, bytes], fmt: str, content_type: str
) -> None:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photos["coffee"])).save(buffer, fmt)

    response = client.http.post(
        "/invocations", headers={"Content-Type": content_type}, body=buffer.getvalue()
    )

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


def test_a_body_over_the_limit_is_413_before_decoding(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_BODY_BYTES", "1000")

    status, code, message = error_of(
        client.http.post("/invocations", headers={"Content-Type": "image/jpeg"}, body=b"\xff" * 1001)
    )

    assert (status, code) == (413, "ImageTooLarge")
    assert "1,001 bytes" in message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"image": "not base64!"}, "base64"),
        ({"image": ""}, "empty"),
        ({"url": "http://x/", "image": "AAAA"}, "exactly one of"),
        ({"urls": []}, "1 to 8 items"),
        ({"urls": ["http://x/"] * 9}, "1 to 8 items"),
        ({"urls": "http://x/"}, "must be an array"),
        ({"urls": [1]}, "'urls' item 1 must be a string"),
        ({"url": "http://x/", "top_k": 0}, "top_k field must be an integer from 1"),
        ({"url": "http://x/", "top_k": "many"}, "top_k field must be an integer from 1"),
    ],
)
def test_malformed_inputs_are_400(client: Client, body: object, fragment: str) -> None:
    status, _, message = error_of(post(client, body))

    assert status == 400
    assert fragment in message


def test_empty_raw_body_is_400(client: Client) -> None:
    assert (
        client.http.post("/invocations", headers={"Content-Type": "image/png"}, body=b"").status_code == 400
    )


def test_top_k_from_the_query(client: Client, image_server: RoutedHTTPServer) -> None:
    body = post(client, {"url": image_server.url("/coffee.jpg")}, query="?top_k=5").json_body

    assert len(body["top_k"]) == 5
    confidences = [entry["confidence"] for entry in body["top_k"]]
    assert confidences == sorted(confidences, reverse=True)
    assert body["top_k"][0] == {"class": body["class"], "confidence": body["confidence"]}


def test_top_k_from_the_body_and_its_upper_bound(client: Client, image_server: RoutedHTTPServer) -> None:
    url = image_server.url("/coffee.jpg")

    assert len(post(client, {"url": url, "top_k": 1000}).json_body["top_k"]) == 1000
    status, _, message = error_of(post(client, {"url": url, "top_k": 1001}))
    assert status == 400
    assert "between 1 and 1000" in message


def test_without_top_k_the_tutorial_shape_is_kept(client: Client, image_server: RoutedHTTPServer) -> None:
    assert set(post(client, {"url": image_server.url("/coffee.jpg")}).json_body) == {"class", "confidence"}


def test_batch_of_urls_answers_in_order_with_errors_in_place(
    client: Client, image_server: RoutedHTTPServer
) -> None:
    image_server.routes["/batch/text.jpg"] = serve_bytes(b"text", "image/jpeg")
    urls = [
        image_server.url("/coffee.jpg"),
        image_server.url("/batch/missing.jpg"),
        image_server.url("/chelsea.jpg"),
        image_server.url("/batch/text.jpg"),
        "ftp://example.com/x.jpg",
    ]

    response = post(client, {"urls": urls, "top_k": 3})

    assert response.status_code == 200
    predictions = response.json_body["predictions"]
    assert [p.get("class") for p in predictions] == ["espresso", None, predictions[2]["class"], None, None]
    assert predictions[2]["class"] in {"Egyptian cat", "tabby", "tiger cat"}
    assert len(predictions[0]["top_k"]) == 3
    assert [(p["status"], p["error"]["Code"]) for p in predictions if "error" in p] == [
        (502, "UpstreamError"),
        (422, "UnsupportedImage"),
        (400, "InvalidURL"),
    ]


def test_batch_where_every_item_fails_is_still_200(client: Client, image_server: RoutedHTTPServer) -> None:
    response = post(client, {"urls": [image_server.url("/nope1.jpg"), image_server.url("/nope2.jpg")]})

    assert response.status_code == 200
    assert [p["status"] for p in response.json_body["predictions"]] == [502, 502]


def test_batch_of_base64_images(client: Client, photos: dict[str, bytes]) -> None:
    images = [base64.b64encode(photos[name]).decode() for name in ("coffee", "chelsea", "coffee")]

    predictions = post(client, {"images": images}).json_body["predictions"]

    assert [p["class"] for p in predictions][::2] == ["espresso", "espresso"]
    assert predictions[1]["class"] in {"Egyptian cat", "tabby", "tiger cat"}


def test_batch_results_match_single_requests(client: Client, image_server: RoutedHTTPServer) -> None:
    urls = [image_server.url("/coffee.jpg"), image_server.url("/chelsea.jpg")]

    batch = post(client, {"urls": urls}).json_body["predictions"]
    singles = [classify(client, url).json_body for url in urls]

    for one, alone in zip(batch, singles, strict=True):
        assert one["class"] == alone["class"]
        assert one["confidence"] == pytest.approx(alone["confidence"], abs=1e-5)


def test_model_endpoint_describes_the_loaded_model(client: Client) -> None:
    body = client.http.get("/model").json_body

    assert body["source"] == f"s3://{MODEL_BUCKET}/{DEMO_KEY}"
    assert body["version"]
    assert body["classes"] == 1000
    assert body["input"] == {"channels": 3, "height": 224, "width": 224}
    assert body["preprocessing"]["interpolation"] == "bicubic"
    assert body["backend"] == "onnx"  # the demo archive carries both, and onnxruntime is installed
    assert body["name"] == "efficientnet-lite0-imagenet"
    assert body["loaded_at"].endswith("+00:00")


def test_deep_ping_loads_the_model(client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "fresh"))  # a service of its own, still cold

    assert client.http.get("/ping").json_body["model_loaded"] is False

    deep = client.http.get("/ping?deep=1")

    assert (deep.status_code, deep.json_body["model_loaded"]) == (200, True)


@pytest.mark.parametrize("value", ["1", "TRUE", "0", "false", ""])
def test_ping_deep_takes_a_yes_or_a_no(client: Client, value: str) -> None:
    assert client.http.get(f"/ping?deep={quote(value)}").status_code == 200


@pytest.mark.parametrize("value", ["yes", "2", "on", "tru e"])
def test_ping_deep_refuses_what_it_would_have_to_guess(client: Client, value: str) -> None:
    """It used to do the cheap check on these: a deep health check that never loaded the model."""
    status, code, message = error_of(client.http.get(f"/ping?deep={quote(value)}"))

    assert (status, code) == (400, "InvalidRequest")
    assert "deep query parameter must be 1, true, 0 or false" in message


@pytest.mark.parametrize("value", ["²", "٣", "1e3", "-1", "1_000", " ", "99999999999"])
def test_top_k_takes_ascii_digits_only(client: Client, image_server: RoutedHTTPServer, value: str) -> None:
    """str.isdigit() accepts '²', which int() refuses: that was a 500."""
    url = image_server.url("/coffee.jpg")

    from_query = error_of(client.http.post(f"/invocations?top_k={quote(value)}", headers=JSON,
                                           body=json.dumps({"url": url})))  # fmt: skip
    from_body = error_of(post(client, {"url": url, "top_k": value}))

    assert from_query[:2] == from_body[:2] == (400, "InvalidRequest")


@pytest.mark.parametrize("padded", [" 3 ", "3\x1f", "\u30003", "\x1c3\n"])
def test_top_k_padded_with_any_whitespace_is_read_as_its_digits(
    client: Client, image_server: RoutedHTTPServer, padded: str
) -> None:
    """str.strip() also strips '\\x1f', which int() refuses: '3\\x1f' was a 500 from a random request."""
    url = image_server.url("/coffee.jpg")

    from_query = client.http.post(f"/invocations?top_k={quote(padded)}", headers=JSON,
                                  body=json.dumps({"url": url}))  # fmt: skip
    from_body = post(client, {"url": url, "top_k": padded})

    assert len(from_query.json_body["top_k"]) == len(from_body.json_body["top_k"]) == 3
    zero = error_of(post(client, {"url": url, "top_k": padded.replace("3", "0")}))
    assert zero[:2] == (400, "InvalidRequest")


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("data:image/png;base64", "not a base64 one"),
        ("data:image/png,iVBORw0KGgo=", "not a base64 one"),
        ("data:;base64,", "is empty"),
    ],
)
def test_a_malformed_data_url_is_400(client: Client, image: str, fragment: str) -> None:
    """A data: URL without its comma was an IndexError: a 500."""
    status, code, message = error_of(post(client, {"image": image}))

    assert (status, code) == (400, "InvalidRequest")
    assert fragment in message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b'{"url": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
     (b'{"url": "http://x/", "top_k": ' + b"9" * 5000 + b"}", "number too long")],
    ids=["nested 50,000 deep", "a 5,000-digit integer"],
)  # fmt: skip
def test_json_that_python_cannot_read_is_400(client: Client, body: bytes, fragment: str) -> None:
    """json.loads raises RecursionError and ValueError for these, not JSONDecodeError: they were 500s."""
    status, code, message = error_of(client.http.post("/invocations", headers=JSON, body=body))

    assert (status, code) == (400, "InvalidRequest")
    assert fragment in message


def test_json_without_a_content_type_is_read_as_json(client: Client, image_server: RoutedHTTPServer) -> None:
    """Chalice lets a body with no Content-Type through as JSON; it used to be taken for image bytes (422)."""
    body = json.dumps({"url": image_server.url("/coffee.jpg")})

    response = client.http.post("/invocations", headers={}, body=body)

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


def test_an_image_without_a_content_type_is_read_as_an_image(
    client: Client, photos: dict[str, bytes]
) -> None:
    response = client.http.post("/invocations", headers={}, body=photos["coffee"])

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


@pytest.mark.parametrize(
    ("headers", "body", "named"),
    [
        ({}, b"not an image, not JSON", "The request body (sent without a Content-Type)"),
        ({"Content-Type": "image/png"}, b"not an image", "The request body (image/png)"),
        (
            JSON,
            json.dumps({"image": base64.b64encode(b"text").decode()}).encode(),
            "The base64 image in 'image'",
        ),
    ],
    ids=["no content type", "raw", "base64"],
)
def test_an_undecodable_image_is_named_as_it_was_sent(
    client: Client, headers: dict[str, str], body: bytes, named: str
) -> None:
    status, code, message = error_of(client.http.post("/invocations", headers=headers, body=body))

    assert (status, code) == (422, "UnsupportedImage")
    assert message.startswith(named)


def test_batch_items_are_named_by_position(client: Client, image_server: RoutedHTTPServer) -> None:
    image_server.routes["/named/text.jpg"] = serve_bytes(b"text", "image/jpeg")

    predictions = post(
        client, {"urls": [image_server.url("/coffee.jpg"), image_server.url("/named/text.jpg")]}
    )

    error = predictions.json_body["predictions"][1]["error"]
    assert error["Message"].startswith("The body of the image URL ('urls' item 2)")
