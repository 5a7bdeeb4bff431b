"""One source of truth for versions: every pin exact, and each written in one file only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.runtime_gate import RUNTIMES, requirements_for

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(ROOT.glob("requirements*.txt"))


def pinned_lines(path: Path) -> list[Requirement]:
    lines = (line.split(" #", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_every_requirement_is_pinned_exactly(path: Path) -> None:
    for requirement in pinned_lines(path):
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {requirement}"


@pytest.mark.parametrize("runtime", ["python3.11", "python3.12", "python3.13", "python3.14"])
def test_each_version_is_written_in_one_place(runtime: str) -> None:
    """Per Python, after environment markers: requirements-dev.txt takes the others with -r."""
    names = Counter(canonicalize_name(r.name) for _, r in requirements_for(RUNTIMES[runtime], FILES))

    assert [name for name, count in names.items() if count > 1] == []


def test_the_development_venv_takes_the_other_files_whole() -> None:
    includes = [
        line for line in (ROOT / "requirements-dev.txt").read_text().splitlines() if line.startswith("-r")
    ]

    assert includes == ["-r requirements.txt", "-r requirements-onnx.txt", "-r requirements-deploy.txt"]
