"""Add the runtime's compiled bytecode to a deployment zip, so a cold start does not compile.

Lambda unpacks the function into /var/task and each layer into /opt, both
read-only: Python cannot write a ``__pycache__`` there, so without one in the
zip every cold start compiles every module it imports from source (numpy,
Pillow, urllib3, ONNX Runtime's Python part, Chalice, ours) and throws the
result away. This compiles each ``.py`` of the zip with the runtime's own
interpreter (a ``.pyc`` is specific to one Python minor version, and is only
used by it) and adds the results beside them.

The ``.pyc`` files are "unchecked hash" ones (PEP 552): Python uses them
without comparing them with the source's modification time, which Lambda's
unpacking does not keep (and the source can never change under a deployed
function anyway). Adding the same zip twice changes nothing: a ``.pyc`` that
is already in the zip is not written again.

Run it with the runtime's interpreter (``make`` uses the toolchain's), or name
that interpreter with ``--python``:

    build/toolchain/venv/bin/python -m tools.compile_bytecode build/package-onnx/*.zip
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Fixed, like the entries Chalice writes: the same input gives the same zip.
ENTRY_DATE = (1980, 1, 1, 0, 0, 0)
ENTRY_MODE = 0o644 << 16


def add_bytecode(archive: Path, python: list[str]) -> int:
    """Compile ``archive``'s Python sources with ``python`` and add the ``.pyc`` files; how many."""
    with tempfile.TemporaryDirectory(prefix="bytecode-") as scratch:
        root = Path(scratch)
        with zipfile.ZipFile(archive) as bundle:
            present = set(bundle.namelist())
            sources = [name for name in present if name.endswith(".py")]
            bundle.extractall(root, members=sources)
        compileall = ["-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash"]
        subprocess.run([*python, *compileall, str(root)], check=True)
        compiled = sorted(
            name
            for name in (path.relative_to(root).as_posix() for path in root.rglob("*.pyc"))
            if name not in present
        )
        with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED) as bundle:
            for name in compiled:
                entry = zipfile.ZipInfo(name, date_time=ENTRY_DATE)
                entry.external_attr = ENTRY_MODE
                entry.compress_type = zipfile.ZIP_DEFLATED
                bundle.writestr(entry, (root / name).read_bytes())
    return len(compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--python", default=shlex.join([sys.executable]), help="command that starts the runtime's Python"
    )
    parser.add_argument("archives", type=Path, nargs="+")
    args = parser.parse_args()
    for archive in args.archives:
        added = add_bytecode(archive, shlex.split(args.python))
        print(f"{archive}: {added} compiled modules added")


if __name__ == "__main__":
    main()
