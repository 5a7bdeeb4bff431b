"""The dev server (tools/dev_server.py): `make serve` and the live tests start the same server.

Its one change to `chalice local` is TCP_NODELAY on every connection it
accepts, which removes the delayed-ACK stall on kept-alive connections. The
option is read here from the live server's own socket (a copy of its
descriptor, taken with ``pidfd_getfd``), never inferred from timings.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import re
import shlex
import socket
import sys
from pathlib import Path

from tests.support.chalice_local import dev_server_command, free_port, running_chalice_local

ROOT = Path(__file__).resolve().parent.parent
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture
TCP_ESTABLISHED = "01"  # the state column of /proc/net/tcp


def test_the_dev_server_sends_at_once_on_a_kept_alive_connection() -> None:
    port = free_port()
    with running_chalice_local(port) as server:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(2):  # the second request is the one a stall would delay
                connection.request("GET", "/ping")
                assert connection.getresponse().read()
            assert connection.sock is not None
            client_port = connection.sock.getsockname()[1]
            nodelay = _accepted_socket_option(server.process.pid, port, client_port, socket.TCP_NODELAY)
        finally:
            connection.close()

    assert nodelay != 0


def test_make_serve_runs_the_command_the_live_tests_run() -> None:
    recipe = _make_recipe("serve")
    command = shlex.split(
        recipe.replace("$(BIN)/", f"{Path(sys.executable).parent}/").replace("$(PORT)", "8000")
    )

    assert command == dev_server_command(8000)


def _accepted_socket_option(pid: int, server_port: int, client_port: int, option: int) -> int:
    """A TCP option of the socket process ``pid`` accepted for the connection from ``client_port``."""
    inode = _established_socket_inode(server_port, client_port)
    descriptor = next(
        int(entry.name)
        for entry in Path(f"/proc/{pid}/fd").iterdir()
        if str(entry.readlink()) == f"socket:[{inode}]"
    )
    copy = _copy_descriptor(pid, descriptor)
    with socket.socket(fileno=copy) as accepted:  # closing the copy leaves the server's open
        return accepted.getsockopt(socket.IPPROTO_TCP, option)


def _established_socket_inode(local_port: int, remote_port: int) -> str:
    """The inode of the IPv4 connection from ``local_port`` to ``remote_port`` (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16), state) == (
            local_port,
            remote_port,
            TCP_ESTABLISHED,
        ):
            return inode
    raise AssertionError(f"no established connection from port {local_port} to {remote_port}")


def _copy_descriptor(pid: int, descriptor: int) -> int:
    """A descriptor in this process for the same open socket as ``descriptor`` in ``pid``."""
    libc = ctypes.CDLL(None, use_errno=True)
    process = os.pidfd_open(pid)
    try:
        copy = libc.syscall(SYS_PIDFD_GETFD, process, descriptor, 0)
    finally:
        os.close(process)
    if copy < 0:
        raise OSError(ctypes.get_errno(), f"pidfd_getfd of descriptor {descriptor} in process {pid}")
    return int(copy)


def _make_recipe(target: str) -> str:
    """The one command line of a Makefile target's recipe."""
    makefile = (ROOT / "Makefile").read_text()
    found = re.search(rf"^{re.escape(target)}:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert found is not None, f"the Makefile has no {target} target with a recipe"
    return found.group(1)
