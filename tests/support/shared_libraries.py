"""Real shared libraries, built with gcc: torch's chain of libraries in miniature, and a broken link of it.

torch's extension ``_C`` needs ``libtorch_python.so``, which needs
``libshm.so`` and ``libtorch_cpu.so``, which needs ``libc10.so``: each asks
for the next by soname and finds it through its RUNPATH (``$ORIGIN``). The
fake package here has the same shape, and ``fake_torch.VALUE`` is 42 only if
every link resolved:

    fake_torch/_C.so -> lib/libfake_python.so -> lib/libfake_shm.so -> lib/libfake_cpu.so
                                              -> lib/libfake_cpu.so -> lib/libfake_c10.so

``FUTURE_GLIBC`` is ``libfake_cpu.so`` built against a stand-in ``libc.so.6``
whose one symbol is versioned ``GLIBC_2.99``: the real dynamic linker refuses
it exactly as Amazon Linux 2's refuses a library built for a newer glibc.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

FAKE_TORCH = "fake_torch"
IN_MEMORY = (f"{FAKE_TORCH}/lib/libfake_cpu.so", f"{FAKE_TORCH}/lib/libfake_python.so")
FUTURE_GLIBC_VERSION = "GLIBC_2.99"

# library (in fake_torch/lib) -> (C source, the libraries it links against)
LIBRARIES = {
    "libfake_c10.so": ("int fake_c10(void) { return 40; }", ()),
    "libfake_cpu.so": ("int fake_c10(void);\nint fake_cpu(void) { return fake_c10() + 1; }", ("fake_c10",)),
    "libfake_shm.so": ("int fake_cpu(void);\nint fake_shm(void) { return fake_cpu(); }", ("fake_cpu",)),
    "libfake_python.so": (
        "int fake_shm(void);\nint fake_python(void) { return fake_shm() + 1; }",
        ("fake_shm", "fake_cpu"),
    ),
}
EXTENSION = "int fake_python(void);\nint fake_answer(void) { return fake_python(); }"
INIT = """import ctypes
from pathlib import Path

VALUE = ctypes.CDLL(str(Path(__file__).parent / "_C.so")).fake_answer()
"""
FUTURE_CPU = (
    "void glibc_from_the_future(void);\nint fake_c10(void);\n"
    "int fake_cpu(void) { glibc_from_the_future(); return fake_c10() + 1; }"
)


@dataclass(frozen=True)
class FakeTorch:
    """A site folder holding the fake package, and a libfake_cpu.so that needs a newer glibc."""

    site: Path
    future_glibc_cpu: Path


def build_fake_torch(root: Path) -> FakeTorch:
    """Compile the fake package under ``root``/site."""
    site = root / "site"
    lib = site / FAKE_TORCH / "lib"
    lib.mkdir(parents=True)
    for name, (source, needs) in LIBRARIES.items():
        _compile(source, lib / name, rpath="$ORIGIN", link=[f"-L{lib}", *(f"-l{n}" for n in needs)])
    _compile(EXTENSION, site / FAKE_TORCH / "_C.so", rpath="$ORIGIN/lib", link=[f"-L{lib}", "-lfake_python"])
    (site / FAKE_TORCH / "__init__.py").write_text(INIT)
    return FakeTorch(site, _future_glibc_cpu(root, lib))


def _future_glibc_cpu(root: Path, lib: Path) -> Path:
    """libfake_cpu.so needing GLIBC_2.99, linked against a stand-in libc.so.6 that offers it."""
    stand_in = root / "future-libc"
    stand_in.mkdir()
    (stand_in / "versions.map").write_text(f"{FUTURE_GLIBC_VERSION} {{ global: glibc_from_the_future; }};\n")
    _compile(
        "void glibc_from_the_future(void) {}",
        stand_in / "libc.so.6",
        link=["-nostdlib", f"-Wl,--version-script={stand_in / 'versions.map'}"],
    )
    future = root / "future" / "libfake_cpu.so"
    future.parent.mkdir()
    _compile(
        FUTURE_CPU, future, rpath="$ORIGIN", link=[f"-L{lib}", "-lfake_c10", f"{stand_in / 'libc.so.6'}"]
    )
    return future


def _compile(source: str, output: Path, *, rpath: str | None = None, link: list[str]) -> None:
    source_file = output.with_suffix(".c")
    source_file.write_text(source + "\n")
    command = ["gcc", "-shared", "-fPIC", "-o", str(output), f"-Wl,-soname,{output.name}", str(source_file)]
    if rpath is not None:
        command.append(f"-Wl,-rpath,{rpath}")
    subprocess.run([*command, *link], check=True, capture_output=True, text=True)
    source_file.unlink()
