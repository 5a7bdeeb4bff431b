"""Which URLs the service may fetch: the SSRF policy, as decisions without I/O.

The service fetches whatever URL a stranger sends, from inside an AWS
account: a Lambda has credentials in its environment and a runtime API on
loopback, and instance metadata lives at 169.254.169.254. So a URL is
fetched only if

- its scheme is http or https, it carries no ``user:pass@``, and its port is
  allowed (80 and 443 unless ``ALLOWED_PORTS`` says otherwise);
- its host is on ``ALLOWED_URL_HOSTS``, when that is set (``HostAllowList``),
  judged on the URL text before any DNS lookup, so a refused host is never
  resolved;
- every address its host resolves to (all A and AAAA records) is globally
  routable, judged after unwrapping IPv4-mapped, IPv4-compatible, 6to4 and
  NAT64 forms, so ``[::ffff:127.0.0.1]`` counts as the loopback it is.

The decision is made on resolved addresses, never on the URL text:
``2130706433``, ``0x7f.1``, ``0177.0.0.1`` and ``127.1`` are all loopback once
the resolver has read them. The caller then connects to the address that was
checked (see ``fetch.py``), so a second DNS answer cannot rebind the host.

The host is normalised once, here, and every later step uses that one form:
the allow-list, the localhost check, the resolver, the pinned connection and
the Host header. The allow-list's entries are normalised by the same function.
A name that is not ASCII is IDNA-encoded as browsers do (UTS 46), so
``Bücher.example`` is ``xn--bcher-kva.example`` and 127.0.0.1 in full-width
digits is ``127.0.0.1``; an ASCII name must be dot-separated labels of 1 to 63 letters,
digits, hyphens or underscores. Anything else in the host (spaces, ``%``,
control characters, an IPv6 zone ``%eth0`` that only link-local addresses
use, a bracketed ``[v1.x]``) makes the URL invalid, not merely unresolvable.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urlsplit

import idna

from chalicelib.errors import InvalidURL, UpstreamError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[IPAddress]]

MAX_URL_LENGTH = 2048
MAX_HOST_LENGTH = 253  # DNS: 255 octets on the wire
DEFAULT_PORTS = frozenset({80, 443})
_ASCII_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# A last label that browsers read as part of an IPv4 address (WHATWG URL, "ends in a number").
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
# Characters a request target may carry as they are (RFC 3986 pchar, "/" and
# "?", and "%" so existing escapes stay as the URL wrote them).
_TARGET_SAFE = "/?:@!$&'()*+,;=%~"


def port_or_default(scheme: str, port: int | None) -> int:
    return port if port is not None else (443 if scheme == "https" else 80)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

# Ranges that Python's is_global / is_private do not all cover on every 3.11
# patch release, named so the refusal can say what the address is.
_NAMED_RANGES: tuple[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network], ...] = (
    ("'this network' (0.0.0.0/8)", ipaddress.IPv4Network("0.0.0.0/8")),
    ("shared address space (100.64.0.0/10)", ipaddress.IPv4Network("100.64.0.0/10")),
    ("IETF protocol assignment (192.0.0.0/24)", ipaddress.IPv4Network("192.0.0.0/24")),
    ("6to4 relay anycast (192.88.99.0/24)", ipaddress.IPv4Network("192.88.99.0/24")),
    ("benchmarking (198.18.0.0/15)", ipaddress.IPv4Network("198.18.0.0/15")),
    ("local-use NAT64 (64:ff9b:1::/48)", ipaddress.IPv6Network("64:ff9b:1::/48")),
    ("site-local (fec0::/10)", ipaddress.IPv6Network("fec0::/10")),
)


@dataclass(frozen=True)
class Target:
    """A URL that passed the policy, and the one address to connect to."""

    url: str
    scheme: str
    host: str  # normalised: lower-case ASCII, IDNA-encoded; an IPv6 address without brackets
    port: int
    address: IPAddress
    path: str  # what to ask the host for: path and query, percent-encoded, never empty


@dataclass(frozen=True)
class HostAllowList:
    """The hosts an image URL may name (``ALLOWED_URL_HOSTS``), decided on the URL's text.

    An entry is one of

    - a host name, ``cdn.example.com``: that host only;
    - a pattern, ``*.cdn.example.com``: every host under that name, at any
      depth, but not ``cdn.example.com`` itself (list both to allow both);
    - an IP address in standard form, ``192.0.2.1``, ``2001:db8::1`` or
      ``[2001:db8::1]``: a URL whose host is that address, compared as an
      address. A name never allows the addresses it resolves to, nor an
      address the names that resolve to it, and patterns never match an
      address.

    Names are compared in the one form ``UrlPolicy`` gives a URL's host:
    lower-case, IDNA-encoded (``Bücher.example`` and ``xn--bcher-kva.example``
    are the same entry), without a trailing dot. Being on the list only lets
    a URL on to the rest of the policy, which still refuses an allowed name
    that resolves to a private or metadata address.

    ``from_setting`` refuses, with a ``ValueError`` that says why, anything a
    reader could take to mean more than it does: ``*`` alone (leave the
    setting unset to allow any host), ``*`` anywhere but as a whole first
    label, empty entries, ports (``ALLOWED_PORTS`` sets those), URLs, a
    pattern over a whole top-level domain (``*.com``), and names that end in a
    number (``127.1``, ``2130706433``), which resolvers read as IP addresses.
    """

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".cdn.example.com" for *.cdn.example.com, sorted
    addresses: frozenset[IPAddress] = frozenset()

    @classmethod
    def from_setting(cls, value: str) -> HostAllowList:
        names: set[str] = set()
        suffixes: set[str] = set()
        addresses: set[IPAddress] = set()
        for position, raw_entry in enumerate(value.split(","), start=1):
            entry = raw_entry.strip()
            if not entry:
                raise ValueError(f"entry {position} is empty")
            address = _address_entry(entry)
            if address is not None:
                addresses.add(address)
                continue
            name = _name_entry(entry)
            if name.startswith("*."):
                suffixes.add(name[1:])
            else:
                names.add(name)
        return cls(frozenset(names), tuple(sorted(suffixes)), frozenset(addresses))

    def allows(self, host: str) -> bool:
        """Whether ``host``, normalised as ``UrlPolicy`` does, is on the list."""
        name = host.removesuffix(".")
        try:
            return ipaddress.ip_address(name) in self.addresses
        except ValueError:
            return name in self.names or name.endswith(self.suffixes)


def _address_entry(entry: str) -> IPAddress | None:
    """The address an allow-list entry names, or None if it names hosts."""
    bracketed = entry.startswith("[") and entry.endswith("]")
    try:
        address = ipaddress.ip_address(entry[1:-1] if bracketed else entry)
    except ValueError:
        address = None
    if bracketed and not isinstance(address, ipaddress.IPv6Address):
        raise ValueError(f"{entry!r}: brackets may hold only an IPv6 address")
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"{entry!r} carries a zone identifier, which image URLs may not")
    return address


def _name_entry(entry: str) -> str:
    """An allow-list entry that names hosts, in canonical form; a pattern keeps its ``*.``."""
    pattern = entry.startswith("*.")
    name = entry[2:] if pattern else entry
    if entry == "*":
        raise ValueError("'*' alone would allow any host: leave ALLOWED_URL_HOSTS unset for that")
    if "://" in entry:
        raise ValueError(f"{entry!r} is a URL: give only its host name")
    if ":" in entry:
        raise ValueError(f"{entry!r} carries a port: ALLOWED_PORTS sets the ports")
    if "*" in name:
        raise ValueError(f"{entry!r}: '*' may only be the whole first label, as in *.cdn.example.com")
    try:
        canonical = _canonical_name(name).removesuffix(".")
    except ValueError as error:
        subject = f"{entry!r}: the name after '*.'" if pattern else repr(entry)
        raise ValueError(f"{subject} {error}") from error
    if _NUMERIC_LABEL.fullmatch(canonical.rsplit(".", 1)[-1]):
        raise ValueError(
            f"{entry!r} ends in a number, so resolvers read it as an IP address: "
            "write an address in standard form, such as 192.0.2.1"
        )
    if not pattern:
        return canonical
    if "." not in canonical:
        raise ValueError(f"{entry!r} would allow every host under a top-level domain")
    return f"*.{canonical}"


@dataclass(frozen=True)
class UrlPolicy:
    allowed_ports: frozenset[int] | None = DEFAULT_PORTS  # None: any port
    allow_private: bool = False  # development only: lifts the address check
    allowed_hosts: HostAllowList | None = None  # None: any host the address check accepts

    def check(self, url: str, resolve: Resolver | None = None) -> Target:
        """Refuse the URL with ``InvalidURL``, or say which address to connect to."""
        parts = _parse(url)
        port = port_or_default(parts.scheme, parts.port)
        if self.allowed_ports is not None and port not in self.allowed_ports:
            allowed = ", ".join(str(p) for p in sorted(self.allowed_ports))
            raise InvalidURL(f"The image URL uses port {port}; allowed ports are {allowed} (ALLOWED_PORTS).")
        host = _normalised_host(parts)
        if self.allowed_hosts is not None and not self.allowed_hosts.allows(host):
            raise InvalidURL(
                f"The image URL's host {host!r} is not one this service may fetch from (ALLOWED_URL_HOSTS)."
            )
        if not self.allow_private and _is_localhost_name(host):
            raise InvalidURL(
                f"The image URL's host {host!r} is a loopback name; only public hosts may be fetched."
            )
        addresses = (resolve or resolve_host)(host, port)
        if not self.allow_private:
            for address in addresses:
                reason = forbidden_reason(address)
                if reason is not None:
                    raise InvalidURL(
                        f"The image URL's host {host!r} resolves to {reason}; only public "
                        "internet addresses may be fetched."
                    )
        return Target(
            url=url,
            scheme=parts.scheme,
            host=host,
            port=port,
            address=addresses[0],
            path=_request_target(parts),
        )


def _parse(url: str) -> SplitResult:
    if len(url) > MAX_URL_LENGTH:
        raise InvalidURL(f"The image URL is {len(url)} characters long; the limit is {MAX_URL_LENGTH}.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as error:
        raise InvalidURL(f"The image URL is not valid: {error}.") from error
    if parts.scheme not in ("http", "https"):
        raise InvalidURL(f"The image URL must start with http:// or https://, got {url[:100]!r}.")
    if not parts.hostname:
        raise InvalidURL(f"The image URL has no host name: {url[:100]!r}.")
    if parts.username is not None or parts.password is not None:
        raise InvalidURL("The image URL must not carry a user name or password (user:pass@host).")
    if parts.port == 0:
        raise InvalidURL("The image URL uses port 0; a port must be between 1 and 65535.")
    return parts


def _normalised_host(parts: SplitResult) -> str:
    """The one form of the URL's host that is checked, resolved, connected to and sent."""
    host = parts.hostname or ""
    if "[" in parts.netloc:
        return _bracketed_address(host)
    try:
        return _canonical_name(host)
    except ValueError as error:
        raise InvalidURL(f"The image URL's host {host[:100]!r} {error}.") from error


def _canonical_name(host: str) -> str:
    """``host`` in the one form the policy compares and resolves: lower-case ASCII, IDNA-encoded.

    A ``ValueError`` gives the reason worded to follow the host's name
    ("is not a valid host name: ..."), for the caller to say whose host it is.
    """
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as error:
            raise ValueError(f"is not a valid domain name: {error}") from error
    host = host.lower()
    labels = host.removesuffix(".").split(".")
    if len(host) > MAX_HOST_LENGTH or not all(_ASCII_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            "is not a valid host name: expected dot-separated labels of 1 to 63 letters, digits, "
            f"hyphens or underscores, {MAX_HOST_LENGTH} characters in all"
        )
    return host


def _bracketed_address(host: str) -> str:
    """A host in brackets must be a plain IPv6 address: no zone (``%eth0``), no IPvFuture."""
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        address = None
    if address is None or address.scope_id is not None:
        raise InvalidURL(
            f"The image URL's host [{host[:100]}] is not a plain IPv6 address; zone identifiers "
            "(%...) and other bracketed forms are not accepted."
        )
    return host


def _request_target(parts: SplitResult) -> str:
    """Path and query as an HTTP request line needs them: anything not allowed there percent-encoded."""
    target = quote(parts.path or "/", safe=_TARGET_SAFE)
    return f"{target}?{quote(parts.query, safe=_TARGET_SAFE)}" if parts.query else target


def _is_localhost_name(host: str) -> bool:
    """RFC 6761: ``localhost`` and every name under it mean this machine, whatever DNS says."""
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for ``host``, in its order, without repeats."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise UpstreamError(f"Could not resolve the image URL's host {host!r}.") from error
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise UpstreamError(f"The image URL's host {host!r} has no IPv4 or IPv6 address.")
    return addresses


def forbidden_reason(address: IPAddress) -> str | None:
    """Why the service must not connect to ``address``, or None if it is public."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        reason = forbidden_reason(embedded)
        return None if reason is None else f"{reason} (wrapped in IPv6 as {address})"
    for name, network in _NAMED_RANGES:
        if address.version == network.version and address in network:
            return f"an address in {name}"
    flags = (
        ("a loopback address", address.is_loopback),
        ("an unspecified address", address.is_unspecified),
        ("a link-local address (cloud metadata lives there)", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
        ("an address that is not globally routable", not address.is_global),
    )
    return next((name for name, matches in flags if matches), None)


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address hidden in an IPv6 one, for the forms a host may route."""
    if address.version == 4:
        return None
    assert isinstance(address, ipaddress.IPv6Address)
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    if int(address) >> 32 == 0 and int(address) > 1:
        # Deprecated IPv4-compatible form ::a.b.c.d (::1 and :: are handled as themselves).
        return ipaddress.IPv4Address(int(address))
    return None
