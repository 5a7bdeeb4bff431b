"""Fetching image bytes: redirects, time limits and the byte cap, against a real loopback host."""

from __future__ import annotations

import ipaddress
import time

import pytest

from chalicelib.errors import ImageTooLarge, InvalidURL, UpstreamError, UpstreamTimeout
from chalicelib.fetch import FetchLimits, ImageFetcher
from chalicelib.url_policy import IPAddress, UrlPolicy
from tests.support.http_server import RoutedHTTPServer, drip, endless, redirect_to, serve_bytes, stall
from tests.support.network import PUBLIC_TEST_ADDRESS

QUICK = FetchLimits(connect_timeout=1.0, read_timeout=0.5, deadline=2.0, max_bytes=100_000)
# These tests are about transport limits; the address policy has its own tests.
LOOPBACK_ALLOWED = UrlPolicy(allowed_ports=None, allow_private=True)


@pytest.fixture
def host() -> RoutedHTTPServer:
    with RoutedHTTPServer() as server:
        yield server


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


def test_a_dripping_host_is_cut_off_at_the_deadline(host: RoutedHTTPServer) -> None:
    host.routes["/drip"] = drip(byte_every=0.2)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout, match="within 2 s"):
        ImageFetcher(QUICK, LOOPBACK_ALLOWED).fetch(host.url("/drip"))
    # Correctness bound, not a speed target: the deadline plus one read timeout at most.
    assert time.monotonic() - started < QUICK.deadline + QUICK.read_timeout + 3.0


def test_a_closed_port_is_upstream_error() -> None:
    import socket

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
