"""Fetching image bytes: redirects, time limits and the byte cap, against a real loopback host."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator

import pytest

from chalicelib.errors import ImageTooLarge, InvalidURL, UpstreamError, UpstreamTimeout
from chalicelib.fetch import ImageFetcher
from chalicelib.settings import FetchLimits
from chalicelib.url_policy import HostAllowList, IPAddress, Resolver, UrlPolicy
from tests.support.http_server import (
    CertificateAuthority,
    RoutedHTTPServer,
    delayed,
    drip,
    drip_headers,
    endless,
    raw_response,
    redirect_to,
    serve_bytes,
    stall,
)
from tests.support.network import PUBLIC_TEST_ADDRESS

QUICK = FetchLimits(connect_timeout=1.0, read_timeout=0.5, deadline=2.0, max_bytes=100_000)
# Timeouts close to the deadline, so a single step that outlasts the deadline shows.
LONG_STEPS = FetchLimits(connect_timeout=1.0, read_timeout=1.5, deadline=2.0, max_bytes=100_000)
# How far past the deadline a fetch may end: scheduling and unwinding, never a whole timeout.
MARGIN = 0.5
# These tests are about transport limits; the address policy has its own tests.
LOOPBACK_ALLOWED = UrlPolicy(allowed_ports=None, allow_private=True)


@pytest.fixture
def host() -> RoutedHTTPServer:
    with RoutedHTTPServer() as server:
        yield server


def listener(*, accepting: bool) -> Iterator[int]:
    """A loopback port that never answers: it completes TCP handshakes, or not even that.

    Nothing ever calls accept(). With room in the accept queue the kernel
    completes the TCP handshake and the peer then waits for a word (a TLS
    handshake stalls there); with the queue full of one connection, new
    connections are not even accepted (a slow accept).
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8 if accepting else 0)
        port = server.getsockname()[1]
        if accepting:
            yield port
            return
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            yield port


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    yield from listener(accepting=False)


@pytest.fixture
def silent_port() -> Iterator[int]:
    yield from listener(accepting=True)


def loopback_for(asked: list[str]) -> Resolver:
    """A resolver that sends every name to 127.0.0.1 and notes the names it was asked for."""

    def resolve(host: str, port: int) -> list[IPAddress]:
        asked.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    return resolve


def fetch_timed(limits: FetchLimits, url: str, resolve: Resolver | None = None) -> tuple[type, float]:
    """What the fetch raised, and how long it took."""
    started = time.monotonic()
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the type is the result
        ImageFetcher(limits, LOOPBACK_ALLOWED, resolve).fetch(url)
    return raised.type, time.monotonic() - started


def test_body_is_returned(host: RoutedHTTPServer) -> None:
    host.routes["/a.jpg"] = serve_bytes(b"image bytes")

    assert ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/a.jpg")) == b"image bytes"


def test_redirects_are_followed_up_to_three(host: RoutedHTTPServer) -> None:
    host.routes["/1"] = redirect_to("/2")
    host.routes["/2"] = redirect_to(host.url("/3"), status=301)
    host.routes["/3"] = redirect_to("/final.jpg", status=307)
    host.routes["/final.jpg"] = serve_bytes(b"end")

    assert ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/1")) == b"end"
    assert host.requests == ["/1", "/2", "/3", "/final.jpg"]


def test_a_fourth_redirect_is_refused(host: RoutedHTTPServer) -> None:
    for hop in range(1, 5):
        host.routes[f"/{hop}"] = redirect_to(f"/{hop + 1}")
    host.routes["/5"] = serve_bytes(b"never")

    with pytest.raises(UpstreamError, match="redirected more than 3 times"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/1"))
    assert "/5" not in host.requests


def test_a_redirect_loop_is_refused(host: RoutedHTTPServer) -> None:
    host.routes["/loop"] = redirect_to("/loop")

    with pytest.raises(UpstreamError, match="redirected more than 3 times"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/loop"))


def test_a_redirect_to_another_scheme_is_refused(host: RoutedHTTPServer) -> None:
    host.routes["/ftp"] = redirect_to("ftp://127.0.0.1/cat.jpg")

    with pytest.raises(InvalidURL, match="http:// or https://"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/ftp"))


def test_declared_oversize_is_refused_before_reading(host: RoutedHTTPServer) -> None:
    host.routes["/big"] = serve_bytes(b"x" * 100_001)

    with pytest.raises(ImageTooLarge, match="declares 100,001 bytes"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/big"))


def test_a_lying_content_length_does_not_lift_the_cap(host: RoutedHTTPServer) -> None:
    host.routes["/liar"] = endless(declared_length=10)

    # urllib3 stops at the declared length, so the liar gets exactly what it declared.
    assert len(ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/liar"))) == 10


def test_an_endless_body_stops_at_the_cap(host: RoutedHTTPServer) -> None:
    host.routes["/endless"] = endless()

    with pytest.raises(ImageTooLarge, match="100,000-byte limit"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/endless"))


def test_a_silent_host_times_out(host: RoutedHTTPServer) -> None:
    host.routes["/silent"] = stall(3.0)

    with pytest.raises(UpstreamTimeout):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/silent"))


@pytest.mark.parametrize(
    "byte_every",
    [pytest.param(0.2, id="many short reads"), pytest.param(1.4, id="reads just inside the read timeout")],
)
def test_a_dripping_body_is_cut_off_at_the_deadline(host: RoutedHTTPServer, byte_every: float) -> None:
    host.routes["/drip"] = drip(byte_every=byte_every)

    error, elapsed = fetch_timed(LONG_STEPS, host.url("/drip"))

    assert error is UpstreamTimeout
    assert elapsed < LONG_STEPS.deadline + MARGIN


def test_a_host_dripping_its_headers_is_cut_off_at_the_deadline(host: RoutedHTTPServer) -> None:
    host.routes["/drip-headers"] = drip_headers(byte_every=0.2, seconds=10)

    error, elapsed = fetch_timed(LONG_STEPS, host.url("/drip-headers"))

    assert error is UpstreamTimeout
    assert elapsed < LONG_STEPS.deadline + MARGIN


def test_the_timeout_message_names_the_limits(host: RoutedHTTPServer) -> None:
    host.routes["/drip"] = drip(byte_every=0.2)

    with pytest.raises(UpstreamTimeout, match=r"within 2 s \(connect 1 s, read 0.5 s\)"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/drip"))


@pytest.mark.parametrize(
    ("second_hop", "port"),
    [("http", "unaccepting_port"), ("https", "silent_port")],
    ids=["a slow accept", "a TLS handshake that never ends"],
)
def test_redirect_hops_and_a_stalled_second_host_share_the_deadline(
    host: RoutedHTTPServer, request: pytest.FixtureRequest, second_hop: str, port: str
) -> None:
    target = f"{second_hop}://127.0.0.1:{request.getfixturevalue(port)}/x.jpg"
    host.routes["/late"] = delayed(1.2, redirect_to(target))

    error, elapsed = fetch_timed(LONG_STEPS, host.url("/late"))

    assert error is UpstreamTimeout
    assert elapsed < LONG_STEPS.deadline + MARGIN


def test_a_slow_dns_answer_is_cut_off_at_the_deadline() -> None:
    def slow_resolver(host: str, port: int) -> list[IPAddress]:
        time.sleep(LONG_STEPS.deadline + 1.0)
        return [ipaddress.ip_address("127.0.0.1")]

    error, elapsed = fetch_timed(LONG_STEPS, "http://slow-dns.example/cat.jpg", slow_resolver)

    assert error is UpstreamTimeout
    assert elapsed < LONG_STEPS.deadline + MARGIN


def test_a_closed_port_is_upstream_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(UpstreamError, match="Could not connect"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(f"http://127.0.0.1:{port}/x.jpg")


@pytest.mark.usefixtures("isolated_network")
def test_the_checked_address_is_the_one_connected_to_dns_rebinding() -> None:
    """A resolver that answers public first and loopback after must not win a second lookup."""
    answers: list[str] = []

    def rebinding(host: str, port: int) -> list[IPAddress]:
        answers.append(host)
        return [ipaddress.ip_address(PUBLIC_TEST_ADDRESS if len(answers) == 1 else "127.0.0.1")]

    with RoutedHTTPServer(PUBLIC_TEST_ADDRESS, 80) as public, RoutedHTTPServer("127.0.0.1", 80) as canary:
        public.routes["/cat.jpg"] = serve_bytes(b"public bytes")
        canary.routes["/cat.jpg"] = serve_bytes(b"internal bytes")
        fetcher = ImageFetcher(QUICK, UrlPolicy(), resolve=rebinding)

        body = fetcher.fetch("http://rebind.example/cat.jpg")

    assert body == b"public bytes"
    assert answers == ["rebind.example"]
    assert canary.requests == []
    assert public.host_headers == ["rebind.example"]


def test_an_internationalised_host_is_checked_and_connected_by_its_ascii_name(host: RoutedHTTPServer) -> None:
    host.routes["/a.jpg"] = serve_bytes(b"idna bytes")
    asked: list[str] = []

    body = ImageFetcher(QUICK, LOOPBACK_ALLOWED, loopback_for(asked)).fetch(
        f"http://Bücher.example:{host.port}/a.jpg"
    )

    assert body == b"idna bytes"
    assert asked == ["xn--bcher-kva.example"]
    assert host.host_headers == [f"xn--bcher-kva.example:{host.port}"]


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_redirect_to_an_internationalised_host_is_followed(host: RoutedHTTPServer, encoding: str) -> None:
    """http.client reads header bytes as Latin-1; a Location in UTF-8 must still name the right host."""
    location = f"http://bücher.example:{host.port}/final.jpg".encode(encoding)
    host.routes["/to-idna"] = raw_response(
        b"HTTP/1.1 302 Found\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n"
    )
    host.routes["/final.jpg"] = serve_bytes(b"end")
    asked: list[str] = []

    body = ImageFetcher(QUICK, LOOPBACK_ALLOWED, loopback_for(asked)).fetch(
        f"http://redirector.example:{host.port}/to-idna"
    )

    assert body == b"end"
    assert asked == ["redirector.example", "xn--bcher-kva.example"]


# Loopback is allowed here, as in the other tests, so only the allow-list stands between a hop and the host.
LISTED_ON_LOOPBACK = UrlPolicy(
    allowed_ports=None,
    allow_private=True,
    allowed_hosts=HostAllowList.from_setting("images.example, *.cdn.example"),
)


def test_a_redirect_between_listed_hosts_is_followed(host: RoutedHTTPServer) -> None:
    host.routes["/start"] = redirect_to(f"http://img.cdn.example:{host.port}/final.jpg")
    host.routes["/final.jpg"] = serve_bytes(b"end")
    asked: list[str] = []

    body = ImageFetcher(QUICK, LISTED_ON_LOOPBACK, loopback_for(asked)).fetch(
        f"http://images.example:{host.port}/start"
    )

    assert body == b"end"
    assert asked == ["images.example", "img.cdn.example"]


@pytest.mark.parametrize(
    "location",
    [
        "http://elsewhere.example:{port}/final.jpg",
        "http://cdn.example:{port}/final.jpg",
        "http://127.0.0.1:{port}/final.jpg",
        "//elsewhere.example:{port}/final.jpg",
    ],
)
def test_a_redirect_off_the_allow_list_is_refused_before_its_host_is_resolved(
    host: RoutedHTTPServer, location: str
) -> None:
    """Without the list each hop would be followed: the policy here allows loopback and any port."""
    host.routes["/start"] = redirect_to(location.format(port=host.port))
    host.routes["/final.jpg"] = serve_bytes(b"never")
    asked: list[str] = []

    with pytest.raises(InvalidURL, match=r"\(ALLOWED_URL_HOSTS\)"):
        ImageFetcher(QUICK, LISTED_ON_LOOPBACK, loopback_for(asked)).fetch(
            f"http://images.example:{host.port}/start"
        )
    assert asked == ["images.example"]
    assert host.requests == ["/start"]


def _redirect(location: bytes, status: int = 302) -> bytes:
    return f"HTTP/1.1 {status} Moved\r\n".encode() + location + b"Content-Length: 0\r\n\r\n"


MISBEHAVING_HOSTS = {
    "no status line": (b"garbage\r\n\r\n", UpstreamError, "BadStatusLine"),
    "HTTP/0.9 body without a head": (b"\xff\xd8\xff\xe0 body", UpstreamError, "BadStatusLine"),
    "status 99": (b"HTTP/1.1 99 Low\r\n\r\n", UpstreamError, "BadStatusLine"),
    "HTTP/2.0 in an HTTP/1 status line": (b"HTTP/2.0 200 OK\r\n\r\n", UpstreamError, "UnknownProtocol"),
    "status line over 64 KiB": (b"HTTP/1.1 200 " + b"y" * 70_000 + b"\r\n\r\n", UpstreamError, "LineTooLong"),
    "header over 64 KiB": (
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",
        UpstreamError,
        "LineTooLong",
    ),
    "200 headers": (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n", UpstreamError, "100 headers"),
    "hangs up without a word": (b"", UpstreamError, "RemoteDisconnected"),
    "two Content-Lengths that disagree": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        UpstreamError,
        "Content-Length",
    ),
    "body shorter than its Content-Length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
        UpstreamError,
        "mid-download",
    ),
    "chunk size that is not hex": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        UpstreamError,
        "mid-download",
    ),
    "chunked body cut short": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        UpstreamError,
        "mid-download",
    ),
    "chunk size line that never ends": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 100_000,
        UpstreamError,
        "mid-download",
    ),
    "103 Early Hints taken as the answer": (
        b"HTTP/1.1 103 Early Hints\r\n\r\n",
        UpstreamError,
        "HTTP 103",
    ),
    "304 with nothing to show": (b"HTTP/1.1 304 Not Modified\r\n\r\n", UpstreamError, "HTTP 304"),
    "redirect without a Location": (_redirect(b""), UpstreamError, "no Location"),
    "redirect with an empty Location": (_redirect(b"Location: \r\n"), UpstreamError, "no Location"),
    "redirect to a malformed URL": (_redirect(b"Location: http://[::1/x\r\n"), InvalidURL, "not a valid URL"),
    "redirect to port 0": (_redirect(b"Location: http://127.0.0.1:0/x\r\n"), InvalidURL, "port"),
    "redirect to an IPv6 zone": (_redirect(b"Location: http://[fe80::1%25lo]/x\r\n"), InvalidURL, "zone"),
    "redirect to a host with a NUL": (_redirect(b"Location: http://a\x00b/x\r\n"), InvalidURL, "host"),
    "redirect to javascript:": (_redirect(b"Location: javascript:alert(1)\r\n"), InvalidURL, "http://"),
}


@pytest.mark.parametrize("name", list(MISBEHAVING_HOSTS))
def test_a_misbehaving_host_gets_one_of_our_errors(host: RoutedHTTPServer, name: str) -> None:
    response, error, fragment = MISBEHAVING_HOSTS[name]
    host.routes["/x"] = raw_response(response)

    with pytest.raises(error, match=fragment):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/x"))


@pytest.mark.parametrize("length", [b"\xb2", b"abc", b"-5", b"\xef\xbc\x92"])
def test_a_content_length_that_is_no_number_is_ignored(host: RoutedHTTPServer, length: bytes) -> None:
    """'²' (Latin-1 0xB2) passes str.isdigit() but not int(); the cap still holds on what arrives."""
    host.routes["/x"] = raw_response(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nab")

    assert ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/x")) == b"ab"


def test_the_request_target_is_percent_encoded(host: RoutedHTTPServer) -> None:
    host.routes["/caf%C3%A9%20au%20lait.jpg?size=%C3%BC"] = serve_bytes(b"encoded")

    body = ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/café au lait.jpg?size=ü#fragment"))

    assert body == b"encoded"


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize(
    ("url_host", "certified_name"),
    [("images.example", "images.example"), ("Bücher.example", "xn--bcher-kva.example")],
)
def test_https_connects_to_the_checked_address_and_verifies_the_host_name(
    authority: CertificateAuthority, url_host: str, certified_name: str
) -> None:
    asked: list[str] = []
    with RoutedHTTPServer(tls=authority.server_context(certified_name)) as tls_host:
        tls_host.routes["/a.jpg"] = serve_bytes(b"tls bytes")
        fetcher = ImageFetcher(QUICK, LOOPBACK_ALLOWED, loopback_for(asked), ca_bundle=authority.bundle)

        body = fetcher.fetch(f"https://{url_host}:{tls_host.port}/a.jpg")

    assert body == b"tls bytes"
    assert asked == [certified_name]
    assert tls_host.host_headers == [f"{certified_name}:{tls_host.port}"]


def test_a_certificate_for_another_name_is_refused(authority: CertificateAuthority) -> None:
    with RoutedHTTPServer(tls=authority.server_context("other.example")) as tls_host:
        tls_host.routes["/a.jpg"] = serve_bytes(b"tls bytes")
        fetcher = ImageFetcher(QUICK, LOOPBACK_ALLOWED, loopback_for([]), ca_bundle=authority.bundle)

        with pytest.raises(UpstreamError, match=r"CertificateError.*images\.example"):
            fetcher.fetch(f"https://images.example:{tls_host.port}/a.jpg")
    assert tls_host.requests == []


def test_a_certificate_from_an_unknown_authority_is_refused(authority: CertificateAuthority) -> None:
    with RoutedHTTPServer(tls=authority.server_context("images.example")) as tls_host:
        tls_host.routes["/a.jpg"] = serve_bytes(b"tls bytes")
        fetcher = ImageFetcher(QUICK, LOOPBACK_ALLOWED, loopback_for([]))

        with pytest.raises(UpstreamError, match="CERTIFICATE_VERIFY_FAILED"):
            fetcher.fetch(f"https://images.example:{tls_host.port}/a.jpg")
    assert tls_host.requests == []
