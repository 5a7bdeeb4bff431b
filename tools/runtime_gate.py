"""Will this package load on that Lambda runtime? The glibc, ABI and size gate.

``chalice package`` picks wheels for the Python that runs it, and a wheel
that cannot load on Lambda fails only there, at the first import, as an init
error with no JSON answer. So every package and layer is read here before it
is trusted, and the build fails, naming the file, when

- a shared object needs a newer glibc than the runtime's Amazon Linux has
  (the ``GLIBC_x.y`` versions in its ELF version-needs section: 2.26 on
  Amazon Linux 2, for python3.10/3.11; 2.34 on Amazon Linux 2023, for 3.12+),
  or was built for another CPU;
- a Python extension or wheel was built for another CPython (a
  ``.cpython-311-*.so`` or a ``cp311`` wheel tag in a python3.13 package), or
  on the build machine itself (a ``linux_x86_64`` wheel tag instead of
  manylinux: it links against whatever that machine had);
- a layer puts its packages under another Python's site-packages, where the
  runtime never looks;
- a pinned requirement is missing, or at another version (Chalice leaves out
  a package it cannot find a Lambda wheel for, with only a warning);
- the function and its layers unzip to more than Lambda's 250 MB.

Zips are read as Lambda would unpack them, and tarballs inside them (the
PyTorch layer's ``.tar.zst``, gzip ones too) are read through. ``main`` prints the sizes against Lambda's
limits and the newest glibc each package needs.

    python -m tools.runtime_gate --runtime python3.13 --requirements requirements.txt \\
        build/package/deployment.zip [LAYER.zip ...]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath
from typing import IO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

MB = 1000 * 1000
MIB = 1024 * 1024
UNZIPPED_LIMIT = 250 * MIB  # function and all its layers, unzipped
DIRECT_UPLOAD_LIMIT = 50 * MIB  # a zip sent in the API call; larger ones go through S3
ELF_MAGIC = b"\x7fELF"
TARBALLS = (".tar.gz", ".tgz", ".tar.zst")
ELF_MACHINES = {"x86_64": "EM_X86_64", "arm64": "EM_AARCH64"}
WHEEL_MACHINES = {"x86_64": "x86_64", "arm64": "aarch64"}
EXTENSION = re.compile(r"\.cpython-(?P<tag>\d+t?)-(?P<platform>[^.]+)\.so$")
LAYER_SITE = re.compile(r"^python/lib/python(?P<version>\d+\.\d+)/site-packages/")
DIST_INFO = re.compile(r"(?:^|/)(?P<name>[^/]+)-(?P<version>[^/-]+)\.dist-info/")
MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
LEGACY_MANYLINUX = re.compile(r"^(manylinux1|manylinux2010|manylinux2014)_(\w+)$")
LEGACY_GLIBC = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


@dataclass(frozen=True)
class LambdaRuntime:
    """One Lambda Python runtime: its interpreter, its operating system and its glibc.

    Dates are AWS's deprecation dates (the runtimes table; cfn-lint's
    LmbdRuntimeLifecycle.json carries the same, and a test holds them equal).
    """

    name: str
    python: tuple[int, int]
    system: str
    glibc: tuple[int, int]
    deprecated: date

    @property
    def abi(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}"

    @property
    def python_version(self) -> str:
        return f"{self.python[0]}.{self.python[1]}"


AMAZON_LINUX_2 = ("Amazon Linux 2", (2, 26))
AMAZON_LINUX_2023 = ("Amazon Linux 2023", (2, 34))
RUNTIMES = {
    runtime.name: runtime
    for runtime in (
        LambdaRuntime("python3.10", (3, 10), *AMAZON_LINUX_2, date(2026, 10, 31)),
        LambdaRuntime("python3.11", (3, 11), *AMAZON_LINUX_2, date(2027, 6, 30)),
        LambdaRuntime("python3.12", (3, 12), *AMAZON_LINUX_2023, date(2028, 10, 31)),
        LambdaRuntime("python3.13", (3, 13), *AMAZON_LINUX_2023, date(2029, 6, 30)),
        LambdaRuntime("python3.14", (3, 14), *AMAZON_LINUX_2023, date(2029, 6, 30)),
    )
}


@dataclass
class Report:
    """What one package (a zip, or a folder about to become one) holds, and what is wrong with it."""

    name: str
    zipped: int = 0
    unzipped: int = 0
    newest_glibc: tuple[int, int] = (0, 0)
    shared_objects: int = 0
    distributions: dict[str, str] = field(default_factory=dict)  # canonical name -> version
    problems: list[str] = field(default_factory=list)


def format_version(version: tuple[int, int]) -> str:
    return ".".join(map(str, version)) if version != (0, 0) else "-"


@dataclass(frozen=True)
class Target:
    """Where the function runs: a runtime on a CPU architecture (``x86_64`` or ``arm64``)."""

    runtime: LambdaRuntime
    architecture: str = "x86_64"

    @property
    def elf_machine(self) -> str:
        return ELF_MACHINES[self.architecture]

    @property
    def wheel_machine(self) -> str:
        return WHEEL_MACHINES[self.architecture]


def check_zip(path: Path, target: Target) -> Report:
    """Read every member of a deployment or layer zip, and of any tarball inside it."""
    scan = _Scan(Report(name=path.name, zipped=path.stat().st_size), target)
    with zipfile.ZipFile(path) as bundle:
        for info in bundle.infolist():
            if not info.is_dir():
                scan.report.unzipped += info.file_size
                with bundle.open(info) as member:
                    scan.member(f"{path.name}:{info.filename}", info.filename, member)
    return scan.report


def check_tree(root: Path, target: Target) -> Report:
    """The same checks on an unpacked folder, such as a layer before it is packed."""
    scan = _Scan(Report(name=root.name), target)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(root).as_posix()
        scan.report.unzipped += path.stat().st_size
        with path.open("rb") as member:
            scan.member(relative, relative, member)
    return scan.report


@dataclass
class _Scan:
    """One pass over a package's files, filling in its report; ``where`` names a file in messages."""

    report: Report
    target: Target

    def member(self, where: str, name: str, content: IO[bytes]) -> None:
        self._site_packages(where, name)
        if name.endswith(TARBALLS):
            with _tarball(name, content) as tarball:
                for entry in tarball:
                    extracted = tarball.extractfile(entry) if entry.isfile() else None
                    if extracted is not None:
                        self.member(f"{where}:{entry.name}", entry.name, extracted)
            return
        if name.endswith(".dist-info/WHEEL"):
            self._wheel_tags(where.removesuffix("/WHEEL"), content.read().decode("utf-8", "replace"))
        dist_info = DIST_INFO.search(name)
        if dist_info and name.endswith(".dist-info/METADATA"):
            self.report.distributions[canonicalize_name(dist_info["name"])] = dist_info["version"]
        head = content.read(len(ELF_MAGIC))
        if head == ELF_MAGIC:
            # ELF readers seek all over the file; copy it out of the zip or tar stream first.
            with tempfile.TemporaryFile() as copy:
                copy.write(head)
                shutil.copyfileobj(content, copy, 1024 * 1024)
                copy.seek(0)
                self._shared_object(where, name, copy)

    def _site_packages(self, where: str, name: str) -> None:
        runtime = self.target.runtime
        site = LAYER_SITE.match(name)
        if site and site["version"] != runtime.python_version:
            package = where.rsplit(":", 1)[0]
            problem = (
                f"{package}: packages are under python/lib/python{site['version']}/site-packages, "
                f"where {runtime.name} never looks"
            )
            if problem not in self.report.problems:
                self.report.problems.append(problem)

    def _shared_object(self, where: str, name: str, stream: IO[bytes]) -> None:
        try:
            elf = ELFFile(stream)
        except ELFError as error:
            self.report.problems.append(f"{where}: not a readable ELF file ({error})")
            return
        self.report.shared_objects += 1
        runtime, problems = self.target.runtime, self.report.problems
        if elf["e_machine"] != self.target.elf_machine:
            problems.append(f"{where}: built for {elf['e_machine']}, not {self.target.architecture}")
        needed = _glibc_versions_needed(elf)
        if needed:
            newest = max(needed)
            self.report.newest_glibc = max(self.report.newest_glibc, newest)
            if newest > runtime.glibc:
                too_new = {f"GLIBC_{format_version(v)}" for v in needed if v > runtime.glibc}
                symbols = ", ".join(_symbols_needing(elf, too_new)) or "no symbol named"
                problems.append(
                    f"{where} needs GLIBC_{format_version(newest)} ({symbols}), but {runtime.name} runs on "
                    f"{runtime.system} with glibc {format_version(runtime.glibc)}"
                )
        extension = EXTENSION.search(PurePosixPath(name).name)
        if extension and f"cp{extension['tag']}" != runtime.abi:
            tag = extension["tag"]
            problems.append(f"{where} is an extension for CPython {tag[0]}.{tag[1:]}, not {runtime.abi}")
        elif extension and not extension["platform"].startswith(f"{self.target.wheel_machine}-linux"):
            problems.append(
                f"{where} is an extension for {extension['platform']}, not {self.target.architecture}"
            )

    def _wheel_tags(self, where: str, wheel: str) -> None:
        """A wheel loads if any one of its tags fits; report the first tag's misfit otherwise."""
        tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
        verdicts = [_platform_problem(tag, self.target) or _python_problem(tag, self.target) for tag in tags]
        if tags and all(verdicts):
            self.report.problems.append(f"{where} is a {tags[0]} wheel: {verdicts[0]}")


@contextmanager
def _tarball(name: str, content: IO[bytes]) -> Iterator[tarfile.TarFile]:
    """A tarball read as a stream. zstandard is imported only for a ``.tar.zst`` (the PyTorch
    layer's), so the gate runs without it on every other package."""
    if not name.endswith(".tar.zst"):
        with tarfile.open(fileobj=content, mode="r|gz") as tarball:
            yield tarball
        return
    import zstandard  # noqa: PLC0415 - only the PyTorch layer needs it

    with (
        zstandard.ZstdDecompressor().stream_reader(content) as decompressed,
        tarfile.open(fileobj=decompressed, mode="r|") as tarball,
    ):
        yield tarball


def _glibc_versions_needed(elf: ELFFile) -> set[tuple[int, int]]:
    versions: set[tuple[int, int]] = set()
    for section in elf.iter_sections():
        if isinstance(section, GNUVerNeedSection):
            for _, auxiliaries in section.iter_versions():
                for auxiliary in auxiliaries:
                    match = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", auxiliary.name)
                    if match:
                        versions.add((int(match[1]), int(match[2])))
    return versions


def _symbols_needing(elf: ELFFile, version_names: set[str], limit: int = 5) -> list[str]:
    """A few of the symbols that ask for one of ``version_names``: what the library calls that is too new."""
    indexes = {
        auxiliary["vna_other"]
        for section in elf.iter_sections()
        if isinstance(section, GNUVerNeedSection)
        for _, auxiliaries in section.iter_versions()
        for auxiliary in auxiliaries
        if auxiliary.name in version_names
    }
    versym = next((s for s in elf.iter_sections() if isinstance(s, GNUVerSymSection)), None)
    dynsym = elf.get_section_by_name(".dynsym")
    if versym is None or dynsym is None:
        return []
    names: list[str] = []
    for number, symbol in enumerate(dynsym.iter_symbols()):
        if versym.get_symbol(number)["ndx"] in indexes and symbol.name not in names:
            names.append(symbol.name)
            if len(names) == limit:
                break
    return names


def _platform_problem(tag: str, target: Target) -> str | None:
    """Why a wheel tag's platform (``manylinux_2_28_x86_64``) cannot run on the target, or None."""
    platform = tag.rsplit("-", 1)[-1]
    if platform == "any":
        return None
    if platform == f"linux_{target.wheel_machine}":
        return "built on the packaging machine, not manylinux: it needs that machine's own libraries"
    manylinux, legacy = MANYLINUX.match(platform), LEGACY_MANYLINUX.match(platform)
    if manylinux:
        glibc, machine = (int(manylinux[1]), int(manylinux[2])), manylinux[3]
    elif legacy:
        glibc, machine = LEGACY_GLIBC[legacy[1]], legacy[2]
    else:
        return f"platform {platform} is not Linux"
    if machine != target.wheel_machine:
        return f"built for {machine}, not {target.architecture}"
    runtime = target.runtime
    if glibc > runtime.glibc:
        return f"needs glibc {format_version(glibc)}; {runtime.name} has {format_version(runtime.glibc)}"
    return None


def _python_problem(tag: str, target: Target) -> str | None:
    """Why a wheel tag's interpreter and ABI (``cp313-cp313``, ``cp38-abi3``) do not fit, or None."""
    python, abi, _ = tag.split("-")
    runtime = target.runtime
    if python.startswith("py") or abi == "none":
        return None
    if abi == "abi3":
        minimum = int(python.removeprefix("cp3") or 0)
        return None if minimum <= runtime.python[1] else f"needs CPython 3.{minimum} or later"
    return None if python == abi == runtime.abi else f"built for {python}-{abi}, not {runtime.abi}"


def requirements_for(
    runtime: LambdaRuntime, requirement_files: Sequence[Path]
) -> Iterator[tuple[Path, Requirement]]:
    """The requirements, with each file they came from, whose markers select them on the runtime's Python."""
    environment = {
        **default_environment(),
        "python_version": runtime.python_version,
        "python_full_version": f"{runtime.python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    for path in requirement_files:
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith(("#", "-")):
                continue
            try:
                requirement = Requirement(line)
            except InvalidRequirement as error:
                raise SystemExit(f"{path}:{number}: {error}") from error
            if requirement.marker is None or requirement.marker.evaluate(environment):
                yield path, requirement


def check_requirements(
    reports: Sequence[Report], requirement_files: Sequence[Path], runtime: LambdaRuntime
) -> list[str]:
    """Every requirement that applies to the runtime's Python must be in the packages, at its pin."""
    installed: dict[str, str] = {}
    for report in reports:
        installed.update(report.distributions)
    problems = []
    for path, requirement in requirements_for(runtime, requirement_files):
        name = canonicalize_name(requirement.name)
        version = installed.get(name)
        if version is None:
            problems.append(f"{path.name} asks for {requirement}, but no package here holds {name}")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{path.name} asks for {requirement}, but {name} {version} is packaged")
    return problems


def print_reports(reports: Sequence[Report], runtime: LambdaRuntime) -> None:
    total = sum(report.unzipped for report in reports)
    print(f"{'package':34} {'zip MiB':>8} {'unzipped':>9} {'.so':>5} {'glibc':>6}")
    for report in reports:
        note = "" if report.zipped <= DIRECT_UPLOAD_LIMIT else "  over 50 MiB: deploy through S3"
        print(
            f"{report.name:34} {report.zipped / MIB:8.1f} {report.unzipped / MIB:9.1f} "
            f"{report.shared_objects:5d} {format_version(report.newest_glibc):>6}{note}"
        )
    verdict = "ok" if total <= UNZIPPED_LIMIT else "OVER Lambda's limit"
    print(f"{'together, unzipped':34} {'':8} {total / MIB:9.1f} {'':5} {'':6}  limit 250 MiB: {verdict}")
    print(
        f"{runtime.name}: {runtime.system}, glibc {format_version(runtime.glibc)}, {runtime.abi}; "
        f"deprecated {runtime.deprecated.isoformat()}"
    )


def gate(
    packages: Sequence[Path], target: Target, requirement_files: Sequence[Path]
) -> tuple[list[Report], list[str]]:
    reports = [check_zip(path, target) for path in packages]
    problems = [problem for report in reports for problem in report.problems]
    problems += check_requirements(reports, requirement_files, target.runtime)
    if sum(report.unzipped for report in reports) > UNZIPPED_LIMIT:
        problems.append(
            f"the function and its layers unzip to {sum(r.unzipped for r in reports) / MIB:.1f} MiB; "
            f"Lambda allows {UNZIPPED_LIMIT / MIB:.0f} MiB"
        )
    return reports, problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", type=Path, help="the function zip and its layer zips")
    parser.add_argument(
        "--runtime",
        default=f"python{sys.version_info[0]}.{sys.version_info[1]}",
        choices=sorted(RUNTIMES),
        help="the Lambda runtime (default: this Python's, as chalice package picks it)",
    )
    parser.add_argument("--architecture", default="x86_64", choices=sorted(ELF_MACHINES))
    parser.add_argument(
        "--requirements", type=Path, action="append", default=[], help="pins that must all be packaged"
    )
    args = parser.parse_args(argv)
    runtime = RUNTIMES[args.runtime]
    reports, problems = gate(args.packages, Target(runtime, args.architecture), args.requirements)
    print_reports(reports, runtime)
    if problems:
        print(f"\nWILL NOT LOAD on {runtime.name} ({len(problems)} problems):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"every shared object, extension and wheel loads on {runtime.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
