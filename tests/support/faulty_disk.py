"""Real disk faults for the tests: a full disk, a read-only directory, no permission.

Nothing is simulated. The code under test runs in a Python subprocess
started by ``unshare --mount --propagation private``, where a tiny tmpfs
(writes past its size fail with ENOSPC) or a read-only bind mount (EROFS, even
for root) is laid over a directory. The mounts live and die with that
subprocess: this process and the rest of the machine never see them. Root
ignores permission bits, so "no permission" (EACCES) drops root's capability
to override them instead.

Needs root, as the tests and CI run here. The subprocess shares this
process's network namespace, so it reaches the loopback S3.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Tmpfs:
    """An empty filesystem of ``size_bytes`` over ``path``: the disk is full past that."""

    path: Path
    size_bytes: int

    def command(self) -> list[str]:
        return ["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.path)]


@dataclass(frozen=True)
class ReadOnly:
    """``path`` bound over itself read-only: every write under it fails with EROFS."""

    path: Path

    def command(self) -> list[str]:
        return ["mount", "--bind", "-o", "ro", str(self.path), str(self.path)]


Mount = Tmpfs | ReadOnly


def run_python(
    code: str,
    *args: str,
    mounts: Sequence[Mount] = (),
    honour_permissions: bool = False,
    timeout: float = 120,
) -> Any:
    """Run ``code`` with ``args`` under ``mounts`` and return the JSON it printed last.

    ``honour_permissions`` drops root's override of file permission bits, so
    a directory without write permission really refuses root. The test fails
    with the subprocess's output if it crashed: an uncaught exception there is
    exactly the bug these tests look for.
    """
    setup = "; ".join(shlex.join(mount.command()) for mount in mounts)
    python = [sys.executable, "-c", code, *args]
    if honour_permissions:
        python = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *python]
    command = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-ec",
        f'{setup}\nexec "$@"',
        "sh",
    ]
    result = subprocess.run(
        [*command, *python], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip
    if result.returncode != 0 or not result.stdout.strip():
        pytest.fail(f"the subprocess failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])
