"""The URL policy as decisions: nothing here opens a connection.

Hostnames are resolved by a table, not DNS. The few tests that use the system
resolver (numeric spellings, an unknown name) ask for the isolated network,
so even a resolver that decided to send a DNS query could not reach anything.
"""

from __future__ import annotations

import ipaddress

import pytest

from chalicelib.errors import InvalidURL, UpstreamError
from chalicelib.url_policy import (
    HostAllowList,
    IPAddress,
    Resolver,
    UrlPolicy,
    forbidden_reason,
    resolve_host,
)
from tests.support.network import fullwidth

PRODUCTION = UrlPolicy()


def table(*addresses: str, asked: list[str] | None = None) -> Resolver:
    """A resolver with one answer for every name; ``asked`` collects the names it was given."""

    def resolve(host: str, port: int) -> list[IPAddress]:
        if asked is not None:
            asked.append(host)
        return [ipaddress.ip_address(a) for a in addresses]

    return resolve


def no_lookup(host: str, port: int) -> list[IPAddress]:
    raise AssertionError("resolved a URL that should have been refused first")


FORBIDDEN = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.170.2",
    "100.64.0.1",
    "100.127.255.255",
    "192.0.0.1",
    "192.0.2.1",
    "192.88.99.1",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fd00:ec2::254",
    "fc00::1",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::1",
    "2002:7f00:1::",
    "2002:a9fe:a9fe::",
    "2001:db8::1",
    "2001::1",
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "11.22.33.44", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_metadata_address_is_named_for_what_it_is() -> None:
    assert "link-local" in forbidden_reason(ipaddress.ip_address("169.254.169.254"))


@pytest.mark.parametrize(
    "spelling", ["2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "127.1", "017700000001"]
)
@pytest.mark.usefixtures("isolated_network")
def test_numeric_spellings_resolve_to_loopback_and_are_refused(spelling: str) -> None:
    assert all(a.is_loopback for a in resolve_host(spelling, 80))
    with pytest.raises(InvalidURL, match="loopback"):
        PRODUCTION.check(f"http://{spelling}/cat.jpg")


@pytest.mark.parametrize(
    "name", ["localhost", "LocalHost.", "metadata.localhost", "a.b.localhost.", fullwidth("localhost")]
)
def test_localhost_names_are_refused_without_resolving(name: str) -> None:
    with pytest.raises(InvalidURL, match="loopback name"):
        PRODUCTION.check(f"http://{name}/", no_lookup)


def test_one_private_record_among_public_ones_refuses_the_host() -> None:
    with pytest.raises(InvalidURL, match="private"):
        PRODUCTION.check("http://mixed.example/cat.jpg", table("8.8.8.8", "10.0.0.1"))


def test_a_public_host_is_pinned_to_its_first_address() -> None:
    target = PRODUCTION.check("https://images.example/cat.jpg", table("8.8.8.8", "1.1.1.1"))

    assert (target.host, target.port, str(target.address)) == ("images.example", 443, "8.8.8.8")


def test_refusal_does_not_reveal_the_internal_address() -> None:
    with pytest.raises(InvalidURL) as refused:
        PRODUCTION.check("http://internal.example/", table("10.1.2.3"))

    assert "10.1.2.3" not in str(refused.value)
    assert "internal.example" in str(refused.value)


@pytest.mark.usefixtures("isolated_network")
def test_allow_private_lifts_only_the_address_check() -> None:
    relaxed = UrlPolicy(allow_private=True)

    assert str(relaxed.check("http://127.0.0.1/x.jpg").address) == "127.0.0.1"
    with pytest.raises(InvalidURL, match="port 8080"):
        relaxed.check("http://127.0.0.1:8080/x.jpg")
    with pytest.raises(InvalidURL, match="http:// or https://"):
        relaxed.check("file:///etc/passwd")


def test_allowed_ports_can_be_widened_or_opened() -> None:
    assert (
        UrlPolicy(allowed_ports=frozenset({8080})).check("http://x.example:8080/", table("8.8.8.8")).port
        == 8080
    )
    assert UrlPolicy(allowed_ports=None).check("http://x.example:9/", table("8.8.8.8")).port == 9


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "http:// or https://"),
        ("ftp://x.example/cat.jpg", "http:// or https://"),
        ("gopher://x.example:70/", "http:// or https://"),
        ("dict://x.example:11211/", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("//x.example/cat.jpg", "http:// or https://"),
        ("cat.jpg", "http:// or https://"),
        ("http:///cat.jpg", "no host name"),
        ("http://user:pass@x.example/cat.jpg", "user name or password"),
        ("http://user@x.example/cat.jpg", "user name or password"),
        ("http://x.example:99999/cat.jpg", "not valid"),
        ("http://x.example:8080/cat.jpg", "port 8080"),
        ("https://x.example:22/", "port 22"),
        ("http://x.example:0/", "port 0"),
        ("http://x.example/" + "a" * 2100, "limit is 2048"),
        ("http://" + "a" * 64 + ".example/", "not a valid host name"),
        ("http://" + "ü" * 64 + ".example/", "not a valid domain name: Label too long"),
        ("http://" + "a" * 60 + ".a" * 100 + "/", "253 characters"),
        ("http://a..example/", "not a valid host name"),
        ("http://a b.example/", "not a valid host name"),
        ("http://a\x00b.example/", "not a valid host name"),
        ("http://%31%32%37.0.0.1/", "not a valid host name"),
        ("http://bü cher.example/", "not a valid domain name"),
        ("http://☃.example/", "not a valid domain name"),
        ("http://[fe80::1%25eth0]/", "zone identifiers"),
        ("http://[v1.x]/", "not a plain IPv6 address"),
    ],
)
def test_url_shape_is_refused_before_any_lookup(url: str, fragment: str) -> None:
    with pytest.raises(InvalidURL, match=fragment):
        PRODUCTION.check(url, no_lookup)


@pytest.mark.usefixtures("isolated_network")
def test_an_unresolvable_host_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="Could not resolve"):
        resolve_host("no-such-host.invalid", 80)


@pytest.mark.parametrize(
    ("host", "ascii_host"),
    [
        ("Bücher.example", "xn--bcher-kva.example"),
        ("bücher.example.", "xn--bcher-kva.example."),
        (fullwidth("11.22.33.44"), "11.22.33.44"),
    ],
)
def test_a_host_is_normalised_once_for_the_resolver_and_the_target(host: str, ascii_host: str) -> None:
    asked: list[str] = []

    target = PRODUCTION.check(f"https://{host}/cat.jpg", table("8.8.8.8", asked=asked))

    assert (asked, target.host) == ([ascii_host], ascii_host)


def test_a_full_width_loopback_address_is_still_loopback() -> None:
    with pytest.raises(InvalidURL, match="loopback"):
        PRODUCTION.check(f"http://{fullwidth('127.0.0.1')}/cat.jpg", resolve_numeric_only)


def resolve_numeric_only(host: str, port: int) -> list[IPAddress]:
    """Read the host as an IP address, as the system resolver would, or fail the test."""
    return [ipaddress.ip_address(host)]


def test_port_0_is_refused_even_when_any_port_is_allowed() -> None:
    with pytest.raises(InvalidURL, match="port 0"):
        UrlPolicy(allowed_ports=None).check("http://x.example:0/", no_lookup)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("http://x.example", "/"),
        ("http://x.example/a/b.jpg?w=1&h=2#part", "/a/b.jpg?w=1&h=2"),
        ("http://x.example/café au lait.jpg?size=ü", "/caf%C3%A9%20au%20lait.jpg?size=%C3%BC"),
        ("http://x.example/already%20escaped%2F.jpg", "/already%20escaped%2F.jpg"),
        ('http://x.example/a\x7fb"<>.jpg', "/a%7Fb%22%3C%3E.jpg"),
    ],
)
def test_the_target_path_is_what_the_request_line_needs(url: str, path: str) -> None:
    assert PRODUCTION.check(url, table("8.8.8.8")).path == path


ALLOW_LIST = HostAllowList.from_setting(
    "cdn.example.com, *.s3.example.com, Bücher.example, 8.8.8.8, [2606:4700:4700::1111]"
)
LISTED = UrlPolicy(allowed_hosts=ALLOW_LIST)


@pytest.mark.parametrize(
    ("url", "asked_for"),
    [
        ("https://cdn.example.com/cat.jpg", "cdn.example.com"),
        ("https://CDN.Example.COM/cat.jpg", "cdn.example.com"),
        ("https://cdn.example.com./cat.jpg", "cdn.example.com."),
        (f"https://{fullwidth('cdn.example.com')}/cat.jpg", "cdn.example.com"),
        ("https://bucket.s3.example.com/cat.jpg", "bucket.s3.example.com"),
        ("https://a.b.s3.example.com./cat.jpg", "a.b.s3.example.com."),
        ("https://xn--bcher-kva.example/cat.jpg", "xn--bcher-kva.example"),
        ("https://BÜCHER.example/cat.jpg", "xn--bcher-kva.example"),
    ],
)
def test_a_listed_host_in_any_spelling_goes_on_to_the_resolver(url: str, asked_for: str) -> None:
    asked: list[str] = []

    LISTED.check(url, table("8.8.8.8", asked=asked))

    assert asked == [asked_for]


@pytest.mark.parametrize(
    "url", ["http://8.8.8.8/cat.jpg", f"http://{fullwidth('8.8.8.8')}/", "http://[2606:4700:4700:0::1111]/"]
)
def test_a_listed_address_is_matched_as_an_address(url: str) -> None:
    assert LISTED.check(url, resolve_numeric_only).address in ALLOW_LIST.addresses


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/cat.jpg",
        "https://s3.example.com/cat.jpg",  # *.suffix does not match the suffix itself
        "https://evils3.example.com/cat.jpg",
        "https://evil-s3.example.com/cat.jpg",
        "https://example.com/cat.jpg",
        "https://cdn.example.com.evil.example/cat.jpg",
        "https://cdn.example.co/cat.jpg",
        "https://xn--bcher-kva.example.evil/cat.jpg",
        "https://cdn.ex\u0430mple.com/cat.jpg",  # a Cyrillic a: another name altogether
        "http://evil.example/cdn.example.com",
        "http://evil.example#@cdn.example.com/",
        "http://evil.example?@cdn.example.com/",
        "http://8.8.4.4/cat.jpg",
        "http://134744072/cat.jpg",  # 8.8.8.8, but not as the list wrote it
        "http://0x8.8.8.8/cat.jpg",
        "http://008.8.8.8/cat.jpg",
        "http://[::ffff:8.8.8.8]/cat.jpg",
        "http://[2606:4700:4700::1112]/cat.jpg",
        "http://127.0.0.1/cat.jpg",
        "http://localhost/cat.jpg",
        "http://[::1]/cat.jpg",
    ],
)
def test_an_unlisted_host_is_refused_before_any_lookup(url: str) -> None:
    with pytest.raises(InvalidURL, match=r"not one this service may fetch from \(ALLOWED_URL_HOSTS\)"):
        LISTED.check(url, no_lookup)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://cdn.example.com@evil.example/", "user name"),
        ("http://cdn.example.com:443@evil.example/", "user name"),
        ("http://cdn.example.com\\@evil.example/", "user name"),
        ("http://cdn.example.com%2F@evil.example/", "user name"),
        ("http://evil.example\\.cdn.example.com/", "not a valid host name"),
        ("http://cdn%2Eexample.com/", "not a valid host name"),
        ("http://%63dn.example.com/", "not a valid host name"),
    ],
)
def test_a_url_that_only_mentions_a_listed_host_is_refused_before_any_lookup(url: str, fragment: str) -> None:
    with pytest.raises(InvalidURL, match=fragment):
        LISTED.check(url, no_lookup)


def test_the_refusal_names_the_host_but_not_the_list() -> None:
    with pytest.raises(InvalidURL) as refused:
        LISTED.check("https://evil.example/", no_lookup)

    assert "'evil.example'" in str(refused.value)
    assert "cdn.example.com" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "addresses", "reason"),
    [
        ("http://cdn.example.com/", ["169.254.169.254"], "link-local"),
        ("http://bucket.s3.example.com/", ["8.8.8.8", "10.0.0.1"], "private"),
        ("http://xn--bcher-kva.example/", ["::ffff:127.0.0.1"], "loopback"),
    ],
)
def test_a_listed_name_is_still_refused_for_what_it_resolves_to(
    url: str, addresses: list[str], reason: str
) -> None:
    with pytest.raises(InvalidURL, match=reason):
        LISTED.check(url, table(*addresses))


@pytest.mark.parametrize(
    ("listed", "url", "reason"),
    [
        ("169.254.169.254", "http://169.254.169.254/latest/meta-data/", "link-local"),
        ("[::1]", "http://[::1]/", "loopback"),
        ("localhost", "http://localhost/", "loopback name"),
        ("cdn.example.com", "http://cdn.example.com:8080/", "port 8080"),
    ],
)
def test_listing_a_host_does_not_lift_the_rest_of_the_policy(listed: str, url: str, reason: str) -> None:
    policy = UrlPolicy(allowed_hosts=HostAllowList.from_setting(listed))

    with pytest.raises(InvalidURL, match=reason):
        policy.check(url, resolve_numeric_only)


def test_allow_private_does_not_lift_the_allow_list() -> None:
    policy = UrlPolicy(allow_private=True, allowed_hosts=HostAllowList.from_setting("127.0.0.1"))

    assert str(policy.check("http://127.0.0.1/", resolve_numeric_only).address) == "127.0.0.1"
    with pytest.raises(InvalidURL, match="ALLOWED_URL_HOSTS"):
        policy.check("http://127.0.0.2/", no_lookup)
