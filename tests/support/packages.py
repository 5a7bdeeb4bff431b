"""The deployment packages `make` builds under build/, as the tests that check them read them, and
cfn-lint, AWS's own template linter, as they run it.

A package that is missing fails the test that needs it, never skips it:
`make test` builds them all first.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGE = ROOT / "build" / "package"
ONNX_PACKAGE = ROOT / "build" / "package-onnx"
ONNX_SNAPSTART_PACKAGE = ROOT / "build" / "package-onnx-snapstart"
CFN_LINT = ROOT / ".venv" / "bin" / "cfn-lint"
# cfn-lint's exit status is a set of bits: 2 for errors, 4 for warnings, 8 for informational findings.
LINT_ERRORS_OR_WARNINGS = 2 | 4


def artefact(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"{path.relative_to(ROOT)} is missing: run `make package package-onnx package-onnx-snapstart` "
            "(make test does)."
        )
    return path


def template(package: Path = PACKAGE) -> dict[str, Any]:
    return json.loads(artefact(package / "sam.json").read_text())


def cfn_lint(*templates: Path) -> subprocess.CompletedProcess[str]:
    """cfn-lint's verdict on ``templates``; SAM templates are linted as SAM's transform expands them."""
    return subprocess.run(
        [str(CFN_LINT), *map(str, templates)], capture_output=True, text=True, check=False, timeout=600
    )
