"""Our server for ``make bench-peers``, started exactly as ``make serve`` starts it.

The one place that says how ours starts is the Makefile's ``serve`` target,
and the benchmark must measure what a user gets from it, including any
change to it (a wrapper, a flag, another server). So this module does not
restate its command: it asks make. ``make serve`` is run with a port of our
choosing and with its prerequisites marked as up to date (``--old-file``),
so make never rebuilds anything inside a timed cold start. Whether they
are up to date is asked once, as the run begins, by comparing what make
would run (``--dry-run``) with and without those marks. ``make bench-peers``
depends on the same prerequisites as ``serve``, so there they always are;
run alone, in a tree where someone just edited a requirements file, the
benchmark measures the prerequisites as they are and says so in its report.

The variables a running make hands its children (``MAKEFLAGS`` and kin) are
dropped, so the inner make sees what a user's ``make serve`` sees.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.peers_processes import Launch

ROOT = Path(__file__).resolve().parent.parent
TARGET = "serve"
# Reported name -> MODEL_BACKEND value, as bench/run.py switches them.
BACKENDS = {"onnx": "onnx", "torchscript": "torch"}
MAKE_VARIABLES = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "GNUMAKEFLAGS")
# The port in the recipe as reported: each start gets a free port of its own.
PORT_PLACEHOLDER = "<port>"


class ServeTargetError(RuntimeError):
    """The Makefile has no ``serve`` target, or make cannot read it."""


@dataclass(frozen=True)
class ServeTarget:
    """``make serve`` as the Makefile has it when the run begins.

    Read once: a prerequisite that goes stale during the run is not rebuilt
    inside a later start (which would time the rebuild as a cold start), so
    every start of the run serves alike.
    """

    project: Path
    prerequisites: tuple[str, ...]
    recipe: str  # what it runs, with the port left as PORT_PLACEHOLDER
    skipped: str  # what `make serve` would have rebuilt first; empty when its prerequisites are current

    def launch(self, backend: str, port: int, cache_dir: Path) -> Launch:
        """``make serve`` on ``port`` with this backend and a model cache of its own (unpacked at start)."""
        return Launch(
            command=["make", *make_arguments(self.prerequisites, str(port), dry_run=False)],
            environment={
                **user_environment(os.environ),
                "MODEL_BACKEND": BACKENDS[backend],
                "MODEL_CACHE_DIR": str(cache_dir),
            },
            cwd=self.project,
            description=f"`make {TARGET}`, which runs: {self.recipe}"
            + (f" (its stale prerequisites not rebuilt first: {self.skipped})" if self.skipped else ""),
        )


def serve_target(project: Path = ROOT) -> ServeTarget:
    """The ``serve`` target: its prerequisites, its recipe, and what of them is out of date."""
    prerequisites = serve_prerequisites(project)
    everything = _make(make_arguments([], PORT_PLACEHOLDER, dry_run=True), project).strip()
    recipe = _make(make_arguments(prerequisites, PORT_PLACEHOLDER, dry_run=True), project).strip()
    skipped = everything.removesuffix(recipe).strip()
    return ServeTarget(
        project=project,
        prerequisites=tuple(prerequisites),
        recipe=recipe,
        skipped="; ".join(skipped.splitlines()),
    )


def serve_prerequisites(project: Path) -> list[str]:
    """The prerequisites of the ``serve`` rule, as make itself reads the Makefile."""
    database = _make(["--print-data-base", "--question", TARGET], project, check=False)
    rule = re.search(rf"^{TARGET}:(?![=:])(.*)$", database, re.MULTILINE)
    if rule is None:
        raise ServeTargetError(f"The Makefile in {project} has no `{TARGET}` target.")
    return rule.group(1).split()


def make_arguments(prerequisites: Sequence[str], port: str, *, dry_run: bool) -> list[str]:
    old_files = [option for name in prerequisites for option in ("--old-file", name)]
    dry = ["--dry-run"] if dry_run else []
    return ["--no-print-directory", *dry, *old_files, TARGET, f"PORT={port}"]


def user_environment(environment: Mapping[str, str]) -> dict[str, str]:
    """The environment without the variables a running make hands its children."""
    return {name: value for name, value in environment.items() if name not in MAKE_VARIABLES}


def _make(arguments: Sequence[str], project: Path, *, check: bool = True) -> str:
    completed = subprocess.run(
        ["make", *arguments], cwd=project, env=user_environment(os.environ), capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if check and completed.returncode != 0:
        raise ServeTargetError(f"make {' '.join(arguments)} failed in {project}:\n{completed.stderr[-2000:]}")
    return completed.stdout
