"""Hypothesis strategies for whole requests: every route, body key, query parameter and content type.

A request is drawn as plain values (method, path, query, headers, body), so
the same strategy drives the app in-process (``chalice.test.Client``) and a
real `chalice local` over HTTP. Values are random, and also the targeted
ones that once gave 500s: Unicode digits, data: URLs without a comma, JSON
nested deeper than Python's recursion limit, integers too long to convert,
internationalised and malformed hosts, image headers on random bytes.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from hypothesis import strategies as st

# Every status the service may give for a request; 500 is never one of them,
# and 503 only for a broken model or configuration, which these requests
# cannot cause.
EXPECTED_STATUSES = {200, 204, 400, 405, 413, 415, 422, 502, 504}

IMAGE_HEADERS = [
    b"\xff\xd8\xff\xe0",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xc2",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"RIFF\x00\x00\x00\x00WEBPVP8L\x2f",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
]
image_like_bytes = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda header, tail: header + tail, st.sampled_from(IMAGE_HEADERS), st.binary(max_size=2048)),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
digits = st.sampled_from(
    ["1", "5", "1000", "1001", "0", "-3", "²", "٣", "\uff11", "1e3", "0x10", " 7 ", "9" * 30, ""]
)
urls = st.one_of(
    st.text(max_size=60),
    st.from_regex(r"\Ahttps?://[a-z0-9.:\[\]@%_-]{0,30}/[a-z.%]{0,10}\Z"),
    st.sampled_from(
        [
            "http://bücher.example/x.jpg",
            "http://[::1%25eth0]/x",
            "http://a..b/x",
            "http://" + "a" * 64 + ".example/",
            "http://127.0.0.1:0/x",
            "http://%41.example/",
            "http://[v1.x]/",
            "http://example.com:99999/",
            "http://user:pass@example.com/",
            "file:///etc/passwd",
            "gopher://x/",
            "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",
        ]
    ),
)
images = st.one_of(
    st.text(max_size=60),
    image_like_bytes.map(lambda raw: base64.b64encode(raw).decode()),
    image_like_bytes.map(lambda raw: "data:image/png;base64," + base64.b64encode(raw).decode()),
    st.sampled_from(["data:image/png;base64", "data:,", "data:;base64,", "data:image/png,abc", "====", "QQ"]),
)
json_objects = st.fixed_dictionaries(
    {},
    optional={
        "url": urls | json_values,
        "image": images | json_values,
        "urls": st.lists(urls, max_size=10) | json_values,
        "images": st.lists(images, max_size=10) | json_values,
        "top_k": st.integers(min_value=-5, max_value=2000) | digits | json_values,
    },
)
json_bodies = st.one_of(
    json_objects.map(lambda body: json.dumps(body).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.sampled_from(
        [
            b'{"url": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
            b'{"url": "http://x/", "top_k": ' + b"9" * 5_000 + b"}",
            b'{"url": "\\ud800"}',
            b"\xef\xbb\xbf{}",
            b"{",
            b"",
        ]
    ),
    st.binary(max_size=200),
)
content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "application/octet-stream",
        "text/plain",
        "multipart/form-data; boundary=x",
    ]
)
query_values = st.one_of(digits, st.text(max_size=20))


@dataclass(frozen=True)
class RandomRequest:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@st.composite
def invocations(draw: st.DrawFn) -> RandomRequest:
    content_type = draw(content_types)
    raw = content_type is not None and not content_type.lower().startswith("application/json")
    body = draw(image_like_bytes if raw and draw(st.booleans()) else json_bodies)
    query = draw(st.dictionaries(st.sampled_from(["top_k", "deep", "x"]), query_values, max_size=2))
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return RandomRequest("POST", "/invocations", query, headers, body)


other_routes = st.builds(
    RandomRequest,
    method=st.sampled_from(["GET", "OPTIONS", "PUT", "DELETE"]),
    path=st.sampled_from(["/ping", "/model", "/", "/invocations"]),
    query=st.dictionaries(st.sampled_from(["deep", "top_k", "x"]), query_values, max_size=2),
    headers=st.sampled_from([{}, {"Origin": "https://evil.example"}, {"Origin": "null"}]),
)
requests = st.one_of(invocations(), invocations(), invocations(), other_routes)
