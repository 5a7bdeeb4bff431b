"""The glibc and ABI gate, on the real packages `make test` builds and on real mismatches made from them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from datetime import date
from pathlib import Path

import pytest

from tests.support.shared_libraries import FAKE_TORCH, IN_MEMORY, build_fake_torch
from tests.test_deployment import (
    ONNX_LAYER,
    ONNX_PACKAGE,
    PACKAGE,
    ROOT,
    SIMULATION_LAYER,
    SIMULATION_PACKAGE,
    artefact,
)
from tools.build_layer import LayerInfo, write_layer
from tools.runtime_gate import RUNTIMES, Target, _platform_problem, _python_problem, check_zip, main

ONNX_REQUIREMENTS = ROOT / "build" / "onnx-project" / "requirements.txt"
PYTHON_3_13 = Target(RUNTIMES["python3.13"])


def gate(capsys: pytest.CaptureFixture[str], *arguments: object) -> tuple[int, str]:
    status = main([str(argument) for argument in arguments])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def copy_zip(source: Path, destination: Path, *, rename: tuple[str, str] = ("", ""), drop: str = "") -> Path:
    """A copy of a real zip, with member paths renamed or a distribution left out."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as copy:
        for info in original.infolist():
            if drop and info.filename.split("/")[0].startswith(drop):
                continue
            copy.writestr(info.filename.replace(*rename) if rename[0] else info.filename, original.read(info))
    return destination


def test_both_python3_13_stages_pass(capsys: pytest.CaptureFixture[str]) -> None:
    prod = gate(capsys, "--runtime", "python3.13", "--requirements", ROOT / "requirements.txt",
                artefact(PACKAGE / "deployment.zip"))  # fmt: skip
    onnx = gate(capsys, "--runtime", "python3.13", "--requirements", artefact(ONNX_REQUIREMENTS),
                artefact(ONNX_PACKAGE / "deployment.zip"), artefact(ONNX_LAYER))  # fmt: skip

    for status, output in (prod, onnx):
        assert status == 0, output
        assert "every shared object, extension and wheel loads on python3.13" in output
    assert "glibc 2.34" in onnx[1]


def test_the_cp311_torch_layer_fails_on_python3_11_naming_the_library(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, output = gate(capsys, "--runtime", "python3.11", artefact(SIMULATION_LAYER))

    assert status == 1
    assert "torch/lib/libtorch_cpu.so needs GLIBC_2.28 (fcntl64" in output
    assert "python3.11 runs on Amazon Linux 2 with glibc 2.26" in output


def test_a_library_in_the_torch_layers_tar_zst_is_read_through(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The PyTorch layer's in-memory libraries travel in a Zstandard tarball: one built for a newer
    glibc fails the gate there, named by its path inside it."""
    fake = build_fake_torch(tmp_path / "fake")
    shutil.copy(fake.future_glibc_cpu, fake.site / FAKE_TORCH / "lib" / "libfake_cpu.so")
    (tmp_path / "vendor").mkdir()
    layer = tmp_path / "layer.zip"
    info = LayerInfo("python3.13", "2.99", simulation_only=False)
    write_layer(fake.site, tmp_path / "vendor", "fake", layer, info, in_memory=IN_MEMORY, level=3)

    status, output = gate(capsys, "--runtime", "python3.13", layer)

    assert status == 1
    assert (
        f"layer.zip:pytorch/fake-in-memory.tar.zst:{FAKE_TORCH}/lib/libfake_cpu.so needs GLIBC_2.99 "
        "(glibc_from_the_future), but python3.13 runs on Amazon Linux 2023 with glibc 2.34"
    ) in output


# Gate argv[1:] with zstandard made unimportable.
GATE_WITHOUT_ZSTANDARD = """
import sys
sys.modules["zstandard"] = None
from tools.runtime_gate import main
sys.exit(main(sys.argv[1:]))
"""


def test_only_a_tar_zst_needs_zstandard(tmp_path: Path) -> None:
    """The gate runs where zstandard is not installed (the packaging toolchain) on every other package,
    tarballs inside zips included."""
    fake = build_fake_torch(tmp_path / "fake")
    library = fake.site / FAKE_TORCH / "lib" / "libfake_c10.so"
    with tarfile.open(tmp_path / "libraries.tar.gz", "w:gz") as tarball:
        tarball.add(library, arcname="lib/libfake_c10.so")
    package = tmp_path / "package.zip"
    with zipfile.ZipFile(package, "w") as bundle:
        bundle.write(library, "lib/libfake_c10.so")
        bundle.write(tmp_path / "libraries.tar.gz", "libraries.tar.gz")

    result = subprocess.run(
        [sys.executable, "-c", GATE_WITHOUT_ZSTANDARD, "--runtime", "python3.13", str(package)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "every shared object, extension and wheel loads on python3.13" in result.stdout
    assert " 2 " in result.stdout.splitlines()[1]  # both copies of the library were read


def test_a_cp311_wheel_in_a_python3_13_package_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The python3.13 package with Pillow taken from the python3.11 one: a real cp311 build."""
    mixed = tmp_path / "deployment.zip"
    with (
        zipfile.ZipFile(artefact(PACKAGE / "deployment.zip")) as cp313,
        zipfile.ZipFile(artefact(SIMULATION_PACKAGE / "deployment.zip")) as cp311,
        zipfile.ZipFile(mixed, "w") as package,
    ):
        for name in cp313.namelist():
            if not name.startswith(("PIL/", "pillow")):
                package.writestr(name, cp313.read(name))
        for name in cp311.namelist():
            if name.startswith(("PIL/", "pillow")):
                package.writestr(name, cp311.read(name))

    status, output = gate(capsys, "--runtime", "python3.13", mixed)

    assert status == 1
    assert (
        "PIL/_imaging.cpython-311-x86_64-linux-gnu.so is an extension for CPython 3.11, not cp313" in output
    )
    assert (
        "pillow-12.2.0.dist-info is a cp311-cp311-manylinux_2_17_x86_64 wheel: built for cp311-cp311"
        in output
    )
    assert "numpy" not in output.split("WILL NOT LOAD")[1]  # only what came from the cp311 package


def test_a_layer_for_another_python_is_never_on_the_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    layer = copy_zip(artefact(ONNX_LAYER), tmp_path / "layer.zip", rename=("python3.13/", "python3.12/"))

    status, output = gate(capsys, "--runtime", "python3.13", layer)

    assert status == 1
    assert "packages are under python/lib/python3.12/site-packages, where python3.13 never looks" in output


def test_a_pinned_requirement_left_out_of_the_package_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """What chalice does, with only a warning, to a pin it finds no Lambda wheel for."""
    package = copy_zip(artefact(PACKAGE / "deployment.zip"), tmp_path / "deployment.zip", drop="idna")

    status, output = gate(
        capsys, "--runtime", "python3.13", "--requirements", ROOT / "requirements.txt", package
    )

    assert status == 1
    assert "requirements.txt asks for idna==3.20, but no package here holds idna" in output


def test_libraries_for_another_architecture_fail(capsys: pytest.CaptureFixture[str]) -> None:
    status, output = gate(capsys, "--runtime", "python3.13", "--architecture", "arm64", artefact(ONNX_LAYER))

    assert status == 1
    assert (
        "onnxruntime_pybind11_state.cpython-313-x86_64-linux-gnu.so: built for EM_X86_64, not arm64" in output
    )


def test_the_report_counts_what_it_read() -> None:
    report = check_zip(artefact(ONNX_LAYER), PYTHON_3_13)

    assert report.shared_objects > 20
    assert report.newest_glibc == (2, 28)  # onnxruntime's and numpy's manylinux_2_28 builds
    assert {"numpy", "onnxruntime", "pillow"} <= set(report.distributions)
    assert not report.problems


@pytest.mark.parametrize(
    ("tag", "problem"),
    [
        ("cp313-cp313-manylinux_2_28_x86_64", None),
        ("cp313-cp313-manylinux2014_x86_64", None),
        ("py3-none-any", None),
        ("cp38-abi3-manylinux_2_17_x86_64", None),
        ("cp314-abi3-manylinux_2_17_x86_64", "needs CPython 3.14 or later"),
        ("cp313-cp313-manylinux_2_35_x86_64", "needs glibc 2.35; python3.13 has 2.34"),
        ("cp313-cp313-manylinux_2_28_aarch64", "built for aarch64, not x86_64"),
        ("cp313-cp313-linux_x86_64", "built on the packaging machine"),
        ("cp313-cp313-macosx_11_0_arm64", "platform macosx_11_0_arm64 is not Linux"),
        ("cp312-cp312-manylinux_2_17_x86_64", "built for cp312-cp312, not cp313"),
        ("cp313-cp313t-manylinux_2_17_x86_64", "built for cp313-cp313t, not cp313"),
    ],
)
def test_wheel_tags(tag: str, problem: str | None) -> None:
    verdict = _platform_problem(tag, PYTHON_3_13) or _python_problem(tag, PYTHON_3_13)

    assert verdict is None if problem is None else problem in (verdict or "")


def test_the_runtime_table_matches_cfn_lints_lifecycle_data() -> None:
    import cfnlint

    lifecycle = json.loads(
        (Path(cfnlint.__file__).parent / "data" / "AdditionalSpecs" / "LmbdRuntimeLifecycle.json").read_text()
    )

    for name, runtime in RUNTIMES.items():
        assert runtime.deprecated == date.fromisoformat(lifecycle[name]["deprecated"]), name


def test_make_layer_refuses_a_runtime_its_torch_cannot_load_on(tmp_path: Path) -> None:
    """What `make layer` runs, for python3.11: the cp311 CPU torch needs glibc 2.28."""
    output = tmp_path / "layer.zip"

    result = subprocess.run(
        [sys.executable, "-m", "tools.build_layer", "--runtime", "python3.11", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip

    assert result.returncode == 1
    assert "torch/lib/libtorch_cpu.so needs GLIBC_2.28" in result.stderr
    assert "torch 2.13.0 cannot load on python3.11: no layer written" in result.stderr
    assert not output.exists()
