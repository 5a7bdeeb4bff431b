"""The hostile-input catalogue, end to end through chalice.test.Client.

Runs only in the isolated network namespace (see tests/support/network.py),
under the production URL policy: ALLOW_PRIVATE_URLS and ALLOWED_PORTS unset,
and ALLOWED_URL_HOSTS unset too except for the allow-list's own cases.
Three real servers stand by:

- two canaries on 127.0.0.1:80 and [::1]:80, where a URL policy bug would
  land; every address case asserts they received nothing;
- a "public" image host on PUBLIC_TEST_ADDRESS:80, the one address the policy
  accepts, serving photos, hostile images, redirects and misbehaviour; the
  system resolver knows it as PUBLIC_TEST_NAME (bücher.example).

That the allow-list refuses a host before DNS is asked about it is shown
with the system resolver itself: a fetch in a mount namespace of its own,
whose /etc/resolv.conf points at a DNS server on loopback that records every
name it is asked for (``RecordingDNS``).
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from chalice.test import Client
from PIL import Image

from tests.support.api import classify, error_of
from tests.support.http_server import (
    Route,
    RoutedHTTPServer,
    drip,
    drip_headers,
    endless,
    raw_response,
    redirect_to,
    serve_bytes,
)
from tests.support.network import PUBLIC_TEST_ADDRESS, PUBLIC_TEST_NAME, fullwidth, require_isolated_network

PUBLIC = f"http://{PUBLIC_TEST_ADDRESS}"
DEADLINE = 3.0
READ_TIMEOUT = 2.0
MAX_BYTES = 3_000_000
# How far past the deadline a 504 may arrive: scheduling and unwinding, never a whole timeout.
MARGIN = 0.5


@dataclass(frozen=True)
class Case:
    url: str
    status: int
    code: str
    address: bool = False  # a case about where the URL points: the canaries must stay silent
    allowed_hosts: str = ""  # ALLOWED_URL_HOSTS for this case; unset if empty
    says: str = ""  # what the message must contain


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    start = data.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, height, width
    return data[: start + 5] + struct.pack(">HH", height, width) + data[start + 9 :]


def _with_bmp_size(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def _with_gif_screen(data: bytes, width: int, height: int) -> bytes:
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def _flip_bytes(data: bytes, start: int, count: int) -> bytes:
    middle = bytes(b ^ 0xFF for b in data[start : start + count])
    return data[:start] + middle + data[start + count :]


def hostile_images(photo: bytes) -> dict[str, bytes]:
    small_jpeg = _encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
    small_png = _encode(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")
    return {
        "html": b"<!doctype html><html><body>not an image</body></html>",
        "empty": b"",
        "random": bytes(range(256)) * 8,
        "truncated-jpeg": photo[: len(photo) // 3],
        "truncated-png": small_png[:60],
        "corrupt-png-data": _flip_bytes(small_png, 45, 20),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n",
        "pcx": _encode(Image.new("RGB", (16, 16)), "PCX"),
        "ico": _encode(Image.new("RGB", (16, 16)), "ICO"),
        "zip": b"PK\x03\x04" + b"\x00" * 100,
        "png-100-megapixels": _encode(Image.new("1", (10_000, 10_000)), "PNG", optimize=True),
        "jpeg-65500-square": _with_jpeg_size(small_jpeg, 65_500, 65_500),
        "bmp-30000-square": _with_bmp_size(_encode(Image.new("RGB", (4, 4)), "BMP"), 30_000, 30_000),
        "gif-65535-screen": _with_gif_screen(_encode(Image.new("P", (4, 4)), "GIF"), 65_535, 65_535),
    }


IMAGE_CASES = {
    "html": Case(f"{PUBLIC}/img/html", 422, "UnsupportedImage"),
    "empty": Case(f"{PUBLIC}/img/empty", 422, "UnsupportedImage"),
    "random": Case(f"{PUBLIC}/img/random", 422, "UnsupportedImage"),
    "truncated-jpeg": Case(f"{PUBLIC}/img/truncated-jpeg", 422, "UnsupportedImage"),
    "truncated-png": Case(f"{PUBLIC}/img/truncated-png", 422, "UnsupportedImage"),
    "corrupt-png-data": Case(f"{PUBLIC}/img/corrupt-png-data", 422, "UnsupportedImage"),
    "svg": Case(f"{PUBLIC}/img/svg", 422, "UnsupportedImage"),
    "eps (would run Ghostscript)": Case(f"{PUBLIC}/img/eps", 422, "UnsupportedImage"),
    "pcx (not allowed)": Case(f"{PUBLIC}/img/pcx", 422, "UnsupportedImage"),
    "ico (not allowed)": Case(f"{PUBLIC}/img/ico", 422, "UnsupportedImage"),
    "zip": Case(f"{PUBLIC}/img/zip", 422, "UnsupportedImage"),
    "png-100-megapixels": Case(f"{PUBLIC}/img/png-100-megapixels", 413, "ImageTooLarge"),
    "jpeg-65500-square": Case(f"{PUBLIC}/img/jpeg-65500-square", 413, "ImageTooLarge"),
    "bmp-30000-square": Case(f"{PUBLIC}/img/bmp-30000-square", 413, "ImageTooLarge"),
    "gif-65535-screen": Case(f"{PUBLIC}/img/gif-65535-screen", 413, "ImageTooLarge"),
}

ADDRESS_CASES = {
    spelling: Case(f"http://{spelling}/cat.jpg", 400, "InvalidURL", address=True)
    for spelling in [
        "127.0.0.1",
        "127.0.0.2",
        "localhost",
        "LOCALHOST.",
        "2130706433",
        "0x7f.1",
        "0x7f000001",
        "0177.0.0.1",
        "127.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[0:0:0:0:0:ffff:7f00:1]",
        "[::127.0.0.1]",
        "[64:ff9b::7f00:1]",
        "[2002:7f00:1::]",
        "0.0.0.0",
        "0",
        "[::]",
        "169.254.169.254",
        "[fd00:ec2::254]",
        "[::ffff:169.254.169.254]",
        "169.254.170.2",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "[fe80::1]",
        "[fc00::1]",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "198.18.0.1",
        "[fe80::1%25lo]",
        fullwidth("127.0.0.1"),
        fullwidth("localhost"),
    ]
}

URL_CASES = {
    "redirect to loopback": Case(f"{PUBLIC}/to/loopback", 400, "InvalidURL", address=True),
    "redirect to localhost": Case(f"{PUBLIC}/to/localhost", 400, "InvalidURL", address=True),
    "redirect to [::1]": Case(f"{PUBLIC}/to/ipv6-loopback", 400, "InvalidURL", address=True),
    "redirect to metadata": Case(f"{PUBLIC}/to/metadata", 400, "InvalidURL", address=True),
    "redirect to decimal loopback": Case(f"{PUBLIC}/to/decimal", 400, "InvalidURL", address=True),
    "redirect to file://": Case(f"{PUBLIC}/to/file", 400, "InvalidURL"),
    "redirect to port 8080": Case(f"{PUBLIC}/to/port", 400, "InvalidURL"),
    "redirect loop": Case(f"{PUBLIC}/loop", 502, "UpstreamError"),
    "redirect to a malformed URL": Case(f"{PUBLIC}/to/malformed", 400, "InvalidURL"),
    "redirect to an IPv6 zone": Case(f"{PUBLIC}/to/zone", 400, "InvalidURL", address=True),
    "redirect without a Location": Case(f"{PUBLIC}/to/nowhere", 502, "UpstreamError"),
    "port 8080": Case(f"http://{PUBLIC_TEST_ADDRESS}:8080/cat.jpg", 400, "InvalidURL"),
    "port 22 over https": Case(f"https://{PUBLIC_TEST_ADDRESS}:22/", 400, "InvalidURL"),
    "https to a plain-HTTP host": Case(f"https://{PUBLIC_TEST_ADDRESS}:80/cat.jpg", 502, "UpstreamError"),
    "userinfo": Case(f"http://user:secret@{PUBLIC_TEST_ADDRESS}/cat.jpg", 400, "InvalidURL"),
    "userinfo hiding a host": Case("http://11.22.33.44@127.0.0.1/cat.jpg", 400, "InvalidURL", address=True),
    "file scheme": Case("file:///etc/passwd", 400, "InvalidURL"),
    "gopher to loopback": Case("gopher://127.0.0.1:80/_GET", 400, "InvalidURL", address=True),
    "dict to loopback": Case("dict://127.0.0.1:80/info", 400, "InvalidURL", address=True),
    "ftp": Case(f"ftp://{PUBLIC_TEST_ADDRESS}/cat.jpg", 400, "InvalidURL"),
    "no host": Case("http:///cat.jpg", 400, "InvalidURL"),
    "very long url": Case(f"{PUBLIC}/{'a' * 3000}", 400, "InvalidURL"),
    "host label over 63 characters": Case(f"http://{'a' * 64}.example/cat.jpg", 400, "InvalidURL"),
    "IDNA label over 63 characters": Case(f"http://{'ü' * 64}.example/cat.jpg", 400, "InvalidURL"),
    "host with a space": Case("http://exa mple.com/cat.jpg", 400, "InvalidURL"),
    "host not allowed by IDNA": Case("http://b\u00fc\u200dcher.example/cat.jpg", 400, "InvalidURL"),
    "percent-encoded host": Case("http://%31%31.22.33.44/cat.jpg", 400, "InvalidURL"),
    "host answers 404": Case(f"{PUBLIC}/missing.jpg", 502, "UpstreamError"),
    "host answers 500": Case(f"{PUBLIC}/error", 502, "UpstreamError"),
    "endless body": Case(f"{PUBLIC}/endless", 413, "ImageTooLarge"),
    "declares 1 GB": Case(f"{PUBLIC}/huge", 413, "ImageTooLarge"),
    "drips its body": Case(f"{PUBLIC}/drip", 504, "UpstreamTimeout"),
    "drips its headers": Case(f"{PUBLIC}/drip-headers", 504, "UpstreamTimeout"),
    "no status line": Case(f"{PUBLIC}/garbage", 502, "UpstreamError"),
    "103 Early Hints as the answer": Case(f"{PUBLIC}/early-hints", 502, "UpstreamError"),
    "chunk size that is not hex": Case(f"{PUBLIC}/bad-chunk", 502, "UpstreamError"),
    "Content-Length '²'": Case(f"{PUBLIC}/superscript-length", 422, "UnsupportedImage"),
}

# The public host by name and a pattern, plus loopback and metadata addresses,
# listed to show that being on the list does not lift the address policy.
ALLOW_LIST = "Bücher.example, *.cdn.example, 127.0.0.1, [::1], localhost, 169.254.169.254"
NOT_LISTED = "(ALLOWED_URL_HOSTS)"


def _listed(url: str, says: str = NOT_LISTED, *, address: bool = False) -> Case:
    """A URL refused with 400 under ALLOW_LIST."""
    return Case(url, 400, "InvalidURL", address=address, allowed_hosts=ALLOW_LIST, says=says)


ALLOW_LIST_CASES = {
    # Were it resolved first, this name would be a 502: nothing answers for it.
    "allow-list: unlisted name": _listed("http://evil.example/cat.jpg"),
    "allow-list: listed but unresolvable name gets as far as DNS": Case(
        "http://img.cdn.example/cat.jpg", 502, "UpstreamError", allowed_hosts=ALLOW_LIST, says="resolve"
    ),
    "allow-list: the apex of a *.suffix": _listed("http://cdn.example/cat.jpg"),
    "allow-list: a look-alike of a *.suffix": _listed("http://evilcdn.example/cat.jpg"),
    "allow-list: a listed name inside another": _listed(f"http://{PUBLIC_TEST_NAME}.evil.example/cat.jpg"),
    "allow-list: a homograph of a listed name": _listed("http://b\u00fccher.ex\u0430mple/coffee.jpg"),
    # A listed host named otherwise is not listed (the first two would be 200 without the list).
    "allow-list: the listed host's own address": _listed(f"http://{PUBLIC_TEST_ADDRESS}/coffee.jpg"),
    "allow-list: that address in decimal": _listed("http://185999660/coffee.jpg"),
    "allow-list: a listed address IPv4-mapped": _listed("http://[::ffff:127.0.0.1]/cat.jpg", address=True),
    # The host that counts is the one the URL parser finds, and only a plain one gets that far.
    "allow-list: the real host before a #@": _listed(f"http://127.0.0.2#@{PUBLIC_TEST_NAME}/", address=True),
    "allow-list: userinfo naming a listed host": _listed(
        f"http://{PUBLIC_TEST_NAME}@127.0.0.2/cat.jpg", "user name", address=True
    ),
    "allow-list: backslash before an @": _listed(
        f"http://{PUBLIC_TEST_NAME}\\@127.0.0.2/cat.jpg", "user name", address=True
    ),
    "allow-list: backslash inside the host": _listed(
        f"http://127.0.0.2\\.{PUBLIC_TEST_NAME}/cat.jpg", "not a valid host name", address=True
    ),
    "allow-list: percent-encoded listed name": _listed(
        "http://xn--bcher-kva%2Eexample/", "not a valid host name"
    ),
    # Listed, and still refused by the address policy.
    "allow-list: listed loopback address": _listed("http://127.0.0.1/cat.jpg", "loopback", address=True),
    "allow-list: listed [::1]": _listed("http://[::1]/cat.jpg", "loopback", address=True),
    "allow-list: listed localhost": _listed("http://localhost/cat.jpg", "loopback name", address=True),
    "allow-list: listed metadata address": _listed(
        "http://169.254.169.254/latest/meta-data/", "link-local", address=True
    ),
    "allow-list: listed host on port 8080": _listed(f"http://{PUBLIC_TEST_NAME}:8080/cat.jpg", "port 8080"),
    # Every hop is checked.
    "allow-list: redirect to an unlisted host": _listed(f"http://{PUBLIC_TEST_NAME}/to/unlisted"),
    "allow-list: redirect to the listed host's own address": _listed(
        f"http://{PUBLIC_TEST_NAME}/to/own-address"
    ),
    "allow-list: redirect to a listed loopback address": _listed(
        f"http://{PUBLIC_TEST_NAME}/to/loopback", "loopback", address=True
    ),
}

CATALOGUE = {**IMAGE_CASES, **ADDRESS_CASES, **URL_CASES, **ALLOW_LIST_CASES}


@pytest.fixture(scope="module")
def canaries() -> Iterator[tuple[RoutedHTTPServer, RoutedHTTPServer]]:
    require_isolated_network()
    with RoutedHTTPServer("127.0.0.1", 80) as ipv4, RoutedHTTPServer("::1", 80) as ipv6:
        for canary in (ipv4, ipv6):
            canary.routes["/cat.jpg"] = serve_bytes(_encode(Image.new("RGB", (32, 32)), "JPEG"))
        yield ipv4, ipv6


@pytest.fixture(scope="module")
def public_host(photos: dict[str, bytes]) -> Iterator[RoutedHTTPServer]:
    require_isolated_network()
    with RoutedHTTPServer(PUBLIC_TEST_ADDRESS, 80) as host:
        host.routes["/cat.jpg"] = serve_bytes(photos["chelsea"])
        host.routes["/coffee.jpg"] = serve_bytes(photos["coffee"])
        for name, data in hostile_images(photos["coffee"]).items():
            host.routes[f"/img/{name}"] = serve_bytes(data)
        host.routes["/to/loopback"] = redirect_to("http://127.0.0.1/cat.jpg")
        host.routes["/to/localhost"] = redirect_to("http://localhost/cat.jpg")
        host.routes["/to/ipv6-loopback"] = redirect_to("http://[::1]/cat.jpg")
        host.routes["/to/metadata"] = redirect_to("http://169.254.169.254/latest/meta-data/")
        host.routes["/to/decimal"] = redirect_to("http://2130706433/cat.jpg")
        host.routes["/to/file"] = redirect_to("file:///etc/passwd")
        host.routes["/to/port"] = redirect_to(f"http://{PUBLIC_TEST_ADDRESS}:8080/cat.jpg")
        host.routes["/to/coffee"] = redirect_to("/coffee.jpg")
        host.routes["/to/unlisted"] = redirect_to("http://evil.example/cat.jpg")
        host.routes["/to/own-address"] = redirect_to(f"http://{PUBLIC_TEST_ADDRESS}/coffee.jpg")
        host.routes["/loop"] = redirect_to("/loop")
        host.routes["/error"] = serve_bytes(b"oops", "text/plain", status=500)
        host.routes["/endless"] = endless()
        host.routes["/huge"] = serve_bytes_declaring(1_000_000_000)
        host.routes["/to/malformed"] = redirect_to("http://[::1/cat.jpg")
        host.routes["/to/zone"] = redirect_to("http://[fe80::1%25lo]/cat.jpg")
        host.routes["/to/nowhere"] = raw_response(b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n")
        # Each pause just inside the read timeout: no single read times out.
        host.routes["/drip"] = drip(byte_every=READ_TIMEOUT - 0.1, total=60)
        host.routes["/drip-headers"] = drip_headers(byte_every=0.2, seconds=DEADLINE * 4)
        host.routes["/garbage"] = raw_response(b"garbage\r\n\r\n")
        host.routes["/early-hints"] = raw_response(b"HTTP/1.1 103 Early Hints\r\n\r\n")
        host.routes["/bad-chunk"] = raw_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"
        )
        host.routes["/superscript-length"] = raw_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nab"
        )
        yield host


def serve_bytes_declaring(length: int) -> Route:
    """Promise ``length`` bytes and send three: the cap must act on the promise."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        handler.wfile.write(b"\xff\xd8\xff")

    return route


@pytest.fixture
def production_policy(demo_from_s3: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.delenv("ALLOWED_PORTS", raising=False)
    monkeypatch.delenv("ALLOWED_URL_HOSTS", raising=False)
    monkeypatch.setenv("FETCH_DEADLINE", str(DEADLINE))
    monkeypatch.setenv("FETCH_READ_TIMEOUT", str(READ_TIMEOUT))
    monkeypatch.setenv("MAX_IMAGE_BYTES", str(MAX_BYTES))


@pytest.mark.usefixtures("production_policy")
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_hostile_catalogue(
    client: Client,
    canaries: tuple[RoutedHTTPServer, RoutedHTTPServer],
    public_host: RoutedHTTPServer,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    case = CATALOGUE[name]
    if case.allowed_hosts:
        monkeypatch.setenv("ALLOWED_URL_HOSTS", case.allowed_hosts)
    before = [len(canary.requests) for canary in canaries]

    status, code, message = error_of(classify(client, case.url))

    assert (status, code) == (case.status, case.code), message
    assert message
    assert case.says in message
    assert "Traceback" not in message
    if case.address:
        assert [len(canary.requests) for canary in canaries] == before, "a refused URL was fetched"


def test_catalogue_is_large_enough() -> None:
    assert len(CATALOGUE) >= 40


@pytest.mark.usefixtures("production_policy")
@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"{PUBLIC}/to/coffee", id="redirected"),
        pytest.param(f"http://{fullwidth(PUBLIC_TEST_ADDRESS)}/coffee.jpg", id="internationalised host"),
        # Resolved by the system resolver, from the isolated network's /etc/hosts.
        pytest.param("http://Bücher.example/coffee.jpg", id="IDNA name"),
    ],
)
def test_a_public_host_is_served_under_the_production_policy(
    client: Client, public_host: RoutedHTTPServer, url: str
) -> None:
    response = classify(client, url)

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


@pytest.mark.usefixtures("production_policy", "canaries")
@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_dripping_host_gets_504_within_the_deadline(
    client: Client, public_host: RoutedHTTPServer, path: str
) -> None:
    classify(client, f"{PUBLIC}/cat.jpg")  # the model is loaded before the clock starts
    started = time.monotonic()

    status, code, message = error_of(classify(client, f"{PUBLIC}{path}"))

    assert (status, code) == (504, "UpstreamTimeout")
    assert f"within {DEADLINE:g} s" in message
    assert time.monotonic() - started < DEADLINE + MARGIN


@pytest.mark.usefixtures("production_policy", "canaries")
def test_an_endless_body_stops_at_the_cap(client: Client, public_host: RoutedHTTPServer) -> None:
    status, code, message = error_of(classify(client, f"{PUBLIC}/endless"))

    assert (status, code) == (413, "ImageTooLarge")
    assert f"{MAX_BYTES:,}-byte limit" in message


@pytest.mark.usefixtures("production_policy")
def test_redirect_to_loopback_is_refused_after_the_first_hop_only(
    client: Client, canaries: tuple[RoutedHTTPServer, RoutedHTTPServer], public_host: RoutedHTTPServer
) -> None:
    public_host.requests.clear()

    status, code, message = error_of(classify(client, f"{PUBLIC}/to/loopback"))

    assert (status, code) == (400, "InvalidURL")
    assert "loopback" in message
    assert public_host.requests == ["/to/loopback"]
    assert all(canary.requests == [] for canary in canaries)


@pytest.mark.usefixtures("production_policy", "canaries")
def test_a_redirect_loop_says_so(client: Client, public_host: RoutedHTTPServer) -> None:
    status, code, message = error_of(classify(client, f"{PUBLIC}/loop"))

    assert (status, code) == (502, "UpstreamError")
    assert "redirected more than 3 times" in message


@pytest.mark.usefixtures("production_policy")
@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"http://{PUBLIC_TEST_NAME}/coffee.jpg", id="as listed, in IDNA form"),
        pytest.param("http://BÜCHER.example/coffee.jpg", id="in capitals"),
        pytest.param(f"http://{fullwidth(PUBLIC_TEST_NAME)}/coffee.jpg", id="in full-width forms"),
        pytest.param(f"http://{PUBLIC_TEST_NAME}/to/coffee", id="redirected on the same host"),
    ],
)
def test_a_listed_host_is_served_in_any_spelling(
    client: Client, public_host: RoutedHTTPServer, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("ALLOWED_URL_HOSTS", ALLOW_LIST)

    response = classify(client, url)

    assert (response.status_code, response.json_body["class"]) == (200, "espresso")


@pytest.mark.usefixtures("production_policy", "public_host")
def test_a_malformed_allow_list_is_a_503_that_names_it(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLOWED_URL_HOSTS", f"{PUBLIC_TEST_NAME}, *")

    status, code, message = error_of(classify(client, f"http://{PUBLIC_TEST_NAME}/coffee.jpg"))

    assert (status, code) == (503, "ConfigurationError")
    assert "Config 'ALLOWED_URL_HOSTS'" in message
    assert "'*' alone" in message


class RecordingDNS:
    """A DNS server on 127.0.0.1:53 that answers A queries from ``answers`` and records every name asked.

    Unknown names get NXDOMAIN; a known name's other record types get an
    empty answer. ``system_resolver_conf`` is a resolv.conf that sends a
    process's system resolver here (see ``fetch_with_the_system_resolver``).
    """

    def __init__(self, answers: dict[str, str], directory: Path) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.system_resolver_conf = directory / "resolv.conf"
        self.system_resolver_conf.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 53))
        self._socket.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RecordingDNS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            self._socket.sendto(self._answer(query), client)

    def _answer(self, query: bytes) -> bytes:
        labels: list[str] = []
        end = 12  # the question follows the 12-byte header: length-prefixed labels, then 0
        while query[end]:
            labels.append(query[end + 1 : end + 1 + query[end]].decode("ascii").lower())
            end += 1 + query[end]
        end += 5  # the terminating 0, QTYPE and QCLASS
        name = ".".join(labels)
        self.asked.append(name)
        (record_type,) = struct.unpack(">H", query[end - 4 : end - 2])
        address = self.answers.get(name)
        records = b""
        if address is not None and record_type == 1:  # A
            records = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
        flags = 0x8180 if address is not None else 0x8183  # a recursive answer; NXDOMAIN if unknown
        header = query[:2] + struct.pack(">HHHHH", flags, 1, 1 if records else 0, 0, 0)
        return header + query[12:end] + records


FETCH_EACH_URL = """
import json, os, sys
from chalicelib.errors import ClassifierError
from chalicelib.fetch import ImageFetcher
from chalicelib.settings import Settings

settings = Settings.from_environ(os.environ)
fetcher = ImageFetcher(settings.fetch, settings.url_policy)
for url in sys.argv[1:]:
    try:
        outcome = f"fetched {len(fetcher.fetch(url))} bytes"
    except ClassifierError as error:
        outcome = f"{type(error).__name__}: {error}"
    print(json.dumps([url, outcome]))
"""


PRIVATE_URL_SETTINGS = ("ALLOW_PRIVATE_URLS", "ALLOWED_PORTS")


def fetch_with_the_system_resolver(dns: RecordingDNS, allowed_hosts: str, urls: list[str]) -> dict[str, str]:
    """What became of each URL, fetched under the production policy by the service's own code.

    The fetch runs in a mount namespace of its own whose /etc/resolv.conf
    sends glibc to ``dns``, so this process's resolver is left as it was.
    """
    environment = {name: value for name, value in os.environ.items() if name not in PRIVATE_URL_SETTINGS}
    done = subprocess.run(
        [
            *("unshare", "--mount", "--", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"'),
            *(str(dns.system_resolver_conf), sys.executable, "-c", FETCH_EACH_URL, *urls),
        ],
        env={**environment, "ALLOWED_URL_HOSTS": allowed_hosts},
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return dict(json.loads(line) for line in done.stdout.splitlines())


def test_the_allow_list_refuses_a_host_before_dns_is_asked_about_it(
    canaries: tuple[RoutedHTTPServer, RoutedHTTPServer],
    public_host: RoutedHTTPServer,
    photos: dict[str, bytes],
    tmp_path: Path,
) -> None:
    """The unlisted name would resolve to the public host; the system resolver is never asked about it."""
    listed, unlisted = "img.cdn.example", "evil.example"
    to_metadata, to_loopback = "metadata.cdn.example", "loopback.cdn.example"
    answers = {
        listed: PUBLIC_TEST_ADDRESS,
        unlisted: PUBLIC_TEST_ADDRESS,
        to_metadata: "169.254.169.254",
        to_loopback: "127.0.0.1",
    }

    with RecordingDNS(answers, tmp_path) as dns:
        outcomes = fetch_with_the_system_resolver(
            dns, "*.cdn.example", [f"http://{name}/coffee.jpg" for name in answers]
        )

    assert outcomes[f"http://{listed}/coffee.jpg"] == f"fetched {len(photos['coffee'])} bytes"
    assert outcomes[f"http://{unlisted}/coffee.jpg"].endswith(NOT_LISTED + ".")
    assert "link-local" in outcomes[f"http://{to_metadata}/coffee.jpg"]
    assert "loopback" in outcomes[f"http://{to_loopback}/coffee.jpg"]
    assert set(dns.asked) == {listed, to_metadata, to_loopback}
    assert all(canary.requests == [] for canary in canaries)
