"""Does every pinned requirement have a Lambda wheel for every runtime we deploy to? Asks PyPI.

`make package` proves it for the runtime it packages for; this proves the
others the README promises (python3.12, 3.13 and 3.14, all on Amazon Linux
2023) without an interpreter of each: pip resolves each pin, with its
environment markers evaluated for that runtime, against manylinux wheels up
to the runtime's glibc, and downloads nothing but metadata.

    python -m tools.check_wheels requirements.txt requirements-onnx.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.runtime_gate import RUNTIMES, LambdaRuntime, requirements_for

DEPLOYED_RUNTIMES = ("python3.12", "python3.13", "python3.14")


def missing_wheels(
    runtime: LambdaRuntime, requirement_files: list[Path], machine: str = "x86_64"
) -> str | None:
    """pip's complaint when some pin has no wheel for ``runtime``; None when all have one."""
    pins = [
        str(requirement).split(";", 1)[0] for _, requirement in requirements_for(runtime, requirement_files)
    ]
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(5, runtime.glibc[1] + 1)]
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed",
            "--only-binary=:all:", "--target", str(Path(scratch) / "target"), "--report", str(report),
            "--python-version", runtime.python_version, "--implementation", "cp",
            *[argument for platform in platforms for argument in ("--platform", platform)], *pins,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "pip failed"
        chosen = [
            item["download_info"]["url"].rsplit("/", 1)[-1]
            for item in json.loads(report.read_text())["install"]
        ]
    native = sorted(name.split("-", 1)[0] for name in chosen if "manylinux" in name)
    print(f"{runtime.name}: a wheel for all {len(chosen)} pins ({', '.join(native)} manylinux)")
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requirements", nargs="+", type=Path)
    args = parser.parse_args()
    failures = {name: missing_wheels(RUNTIMES[name], args.requirements) for name in DEPLOYED_RUNTIMES}
    for name, complaint in failures.items():
        if complaint:
            print(f"{name}: NO WHEEL: {complaint}", file=sys.stderr)
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
