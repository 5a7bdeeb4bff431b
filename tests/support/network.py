"""The isolated network that ``make test`` runs the suite in.

``tools/isolated_network.sh`` starts pytest in a network namespace with only
loopback, plus one address that the URL policy counts as public. Tests that
name any non-loopback address ask for the ``isolated_network`` fixture, which
fails (never skips) outside that namespace, so such a test can never send a
packet off this machine.
"""

from __future__ import annotations

import socket

import pytest

PUBLIC_TEST_ADDRESS = "11.22.33.44"  # keep both in step with tools/isolated_network.sh
PUBLIC_TEST_NAME = "xn--bcher-kva.example"  # bücher.example, in /etc/hosts there


def require_isolated_network() -> None:
    interfaces = [name for _, name in socket.if_nameindex()]
    if interfaces != ["lo"]:
        pytest.fail(
            f"This test names non-loopback addresses, so it runs only in the network namespace "
            f"that `make test` creates (tools/isolated_network.sh); this one has {interfaces}."
        )
    with socket.socket() as probe:
        try:
            probe.bind((PUBLIC_TEST_ADDRESS, 0))
        except OSError:
            pytest.fail(f"{PUBLIC_TEST_ADDRESS} is not on loopback: run through tools/isolated_network.sh.")


def fullwidth(text: str) -> str:
    """``text`` in the full-width forms of its ASCII characters, with ideographic full stops for dots."""
    return "".join("\u3002" if c == "." else chr(ord(c) + 0xFEE0) for c in text)
