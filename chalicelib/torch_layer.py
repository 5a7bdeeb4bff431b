"""Make PyTorch importable on Lambda: its largest libraries from memory, the rest from the layer in place.

CPU PyTorch is about 420 MB even pruned and stripped, while Lambda allows
250 MB unzipped for a function and its layers, and /tmp (512 MB by default)
is the model cache's. Nearly all of torch's size is two libraries,
``libtorch_cpu.so`` and ``libtorch_python.so``. So the PyTorch layer built by
``tools/build_layer.py`` carries those as one Zstandard tarball, and the rest
of torch as plain files (``site/``, with the bytecode of what ``import
torch`` needs), beside a ``manifest.json`` and the ``zstandard`` package that
reads the tarball (``vendor/``). The first import of this module in a
process:

1. decompresses the tarball's libraries into anonymous in-memory files
   (``memfd_create``): nothing is written to /tmp;
2. loads the libraries the manifest lists, dependencies first, each from its
   in-memory file (``/proc/self/fd/N``) or from ``site/``. When torch's own
   extension later asks for ``libtorch_cpu.so`` by name, the dynamic linker
   finds it already loaded;
3. puts ``site/`` on ``sys.path``: ``import torch`` reads the layer where it is.

- ``service`` imports this module just before the first ``import torch``,
  never at app import. Without the layer (local development, tests) it does
  nothing: torch is simply installed there.
- Everything is per process: two processes in a sandbox each load their own
  copy, and one that is killed leaves nothing behind.
- The in-memory files cost the function's memory. Where Lambda says how much
  it has (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``), that is checked first. Once a
  library is loaded its file stays open for the life of the process, so the
  ``/proc/self/fd`` name it was loaded under is never reused.
- Whatever goes wrong (a manifest that is not the one ``build_layer`` writes,
  a corrupt or cut-short archive, too little memory, an in-memory file that
  cannot be made or filled, a library the dynamic linker refuses, such as one
  built for a newer glibc) raises ``TorchUnavailable``, a 503 that says which,
  from the import itself; the in-memory files of libraries not loaded are
  closed.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.util
import json
import os
import sys
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import IO

from chalicelib.errors import TorchUnavailable
from chalicelib.model_store import describe_disk_fault

LAYER_DIR = Path(os.environ.get("PYTORCH_LAYER_DIR", "/opt/pytorch"))
MANIFEST = "manifest.json"
SITE = "site"
VENDOR = "vendor"
# Memory the function needs besides the in-memory libraries: the rest of
# torch, the model and an ordinary request.
MEMORY_HEADROOM_BYTES = 384 * 2**20
TAR_BLOCK = 512
# Small reads keep each decompressed piece small, so its memory is reused rather than mapped afresh.
COMPRESSED_READ_SIZE = 128 * 1024
# The in-memory files of the libraries this process loaded, open for its whole life.
IN_MEMORY_FILES: list[int] = []


@dataclass(frozen=True)
class LayerManifest:
    """What ``tools/build_layer.py`` writes beside the archive."""

    memory_archive: str  # a file of the layer: the libraries to load from memory
    memory_bytes: int  # their size, decompressed
    libraries: tuple[str, ...]  # paths in the archive or in site/, in the order to load them

    @classmethod
    def read(cls, path: Path) -> LayerManifest:
        try:
            fields = json.loads(path.read_bytes())
            archive, size, libraries = fields["memory_archive"], fields["memory_bytes"], fields["libraries"]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise _bad_manifest(path, f"{type(error).__name__}: {error}") from error
        if not (
            isinstance(archive, str)
            and PurePosixPath(archive).name == archive
            and isinstance(size, int)
            and size >= 0
            and isinstance(libraries, list)
            and all(_is_inside(library) for library in libraries)
        ):
            raise _bad_manifest(path, f"got {fields!r}")
        return cls(archive, size, tuple(libraries))


@dataclass(frozen=True)
class PyTorchLayer:
    """An attached PyTorch layer: its folder, its manifest and the zstandard it carries."""

    directory: Path
    manifest: LayerManifest
    zstd: ModuleType

    @classmethod
    def find(cls, directory: Path) -> PyTorchLayer | None:
        """The layer in ``directory``, or None when none is attached."""
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            return None
        return cls(directory, LayerManifest.read(manifest_path), _import_zstandard(directory / VENDOR))

    @property
    def site(self) -> Path:
        """Where torch's Python package is, to import it from."""
        return self.directory / SITE

    def load_libraries(self) -> None:
        """Load the manifest's libraries into this process, the archive's from memory."""
        _check_memory(self.manifest.memory_bytes)
        in_memory = self._decompress_to_memory()
        try:
            for library in self.manifest.libraries:
                if library in in_memory:
                    _load_in_memory(library, in_memory.pop(library))
                else:
                    _load_library(str(self.site / library), library)
        finally:
            for descriptor in in_memory.values():  # not loaded: an earlier library failed, or none lists it
                os.close(descriptor)

    def _decompress_to_memory(self) -> dict[str, int]:
        """Each library of the archive in an in-memory file: path in the archive -> descriptor."""
        path = self.directory / self.manifest.memory_archive
        with ExitStack() as on_failure:
            try:
                with path.open("rb") as raw:
                    in_memory = _extract_to_memory(_ZstdFrame(raw, self.zstd), on_failure)
            except (tarfile.TarError, EOFError, self.zstd.ZstdError, OSError) as error:
                raise TorchUnavailable(
                    f"The PyTorch layer's archive {path} is missing or corrupt "
                    f"({type(error).__name__}: {error}); rebuild and republish the layer (make layer)."
                ) from error
            on_failure.pop_all()
        return in_memory


class _ZstdFrame:
    """The decompressed content of one Zstandard frame, read front to back in exact amounts.

    Input that ends before the frame does is an ``EOFError``, and a frame
    whose content does not match its checksum a ``ZstdError`` once read to
    its end; zstandard's own stream reader would end short, unchecked, on a
    cut-short file. Decompressed pieces go straight to their destination.
    """

    def __init__(self, source: IO[bytes], zstd: ModuleType) -> None:
        self._source = source
        self._frame = zstd.ZstdDecompressor().decompressobj()
        self._pending = memoryview(b"")

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next ``size`` bytes, in pieces."""
        while size:
            if not self._pending:
                self._pending = self._decompress_more()
            piece = self._pending[:size]
            self._pending = self._pending[len(piece) :]
            size -= len(piece)
            yield piece

    def read(self, size: int) -> bytes:
        return b"".join(self.pieces(size))

    def finish(self) -> None:
        """Read to the frame's end, where the checksum is checked."""
        while not self._frame.eof:
            self._decompress_more()

    def _decompress_more(self) -> memoryview:
        if self._frame.eof:
            raise EOFError("the tarball ends before its end marker")
        compressed = self._source.read(COMPRESSED_READ_SIZE)
        if not compressed:
            raise EOFError("the archive ends before its compressed data does")
        return memoryview(self._frame.decompress(compressed))


def load(layer_dir: Path) -> Path | None:
    """Load the layer's libraries; return the folder to import torch from, or None without a layer."""
    layer = PyTorchLayer.find(layer_dir)
    if layer is None:
        return None
    layer.load_libraries()
    return layer.site


def _import_zstandard(vendor: Path) -> ModuleType:
    """``zstandard``, from the layer: only the torch stage needs it, so the function does not carry it."""
    if "zstandard" in sys.modules:
        return sys.modules["zstandard"]
    spec = importlib.machinery.PathFinder.find_spec("zstandard", [str(vendor)])
    if spec is None or spec.loader is None:
        raise TorchUnavailable(
            f"The PyTorch layer has no zstandard in {vendor}; rebuild and republish the layer (make layer)."
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["zstandard"] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        del sys.modules["zstandard"]
        raise TorchUnavailable(
            f"The PyTorch layer's zstandard cannot be imported ({error}); attach the layer built for this "
            "function's runtime (make layer)."
        ) from error
    return module


def _check_memory(needed: int) -> None:
    """Refuse, where Lambda says the function's memory, to fill more of it than the function has.

    Past it Lambda kills the process, and the caller gets no answer at all.
    """
    configured = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
    if not configured.isdigit():
        return  # not on Lambda: the machine's own memory applies
    in_use = _resident_bytes()
    if in_use + needed + MEMORY_HEADROOM_BYTES > int(configured) * 2**20:
        raise TorchUnavailable(
            f"PyTorch needs {needed / 2**20:.0f} MiB of memory for its libraries plus "
            f"{MEMORY_HEADROOM_BYTES / 2**20:.0f} MiB for the model and requests, but the function has "
            f"{configured} MB with {in_use / 2**20:.0f} MiB in use; raise its memory size."
        )


def _resident_bytes() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _memory_file(name: str, on_failure: ExitStack) -> int:
    """A new anonymous in-memory file: its descriptor, closed by ``on_failure``."""
    try:
        descriptor = os.memfd_create(name, os.MFD_CLOEXEC)
    except OSError as error:
        raise _no_memory_file(name, error) from error
    on_failure.callback(os.close, descriptor)
    return descriptor


def _extract_to_memory(frame: _ZstdFrame, on_failure: ExitStack) -> dict[str, int]:
    """Each file of a ustar tarball (as build_layer writes) in an in-memory file, closed by ``on_failure``."""
    in_memory: dict[str, int] = {}
    while (header := frame.read(TAR_BLOCK)) != bytes(TAR_BLOCK):
        member = tarfile.TarInfo.frombuf(header, encoding="utf-8", errors="strict")
        if not member.isreg():
            raise tarfile.ReadError(f"{member.name} is not a regular file")
        name = PurePosixPath(member.name).name
        in_memory[member.name] = descriptor = _memory_file(name, on_failure)
        for piece in frame.pieces(member.size):
            _write(descriptor, piece, name)
        frame.read(-member.size % TAR_BLOCK)
    frame.finish()
    return in_memory


def _write(descriptor: int, data: memoryview, name: str) -> None:
    """Write all of ``data`` to an in-memory file; failing, it is a memory fault, not the archive's."""
    try:
        while data:
            data = data[os.write(descriptor, data) :]
    except OSError as error:
        raise _no_memory_file(name, error) from error


def _load_in_memory(library: str, descriptor: int) -> None:
    """Load a library from its in-memory file, which stays open once the library is loaded."""
    try:
        _load_library(f"/proc/self/fd/{descriptor}", library)
    except TorchUnavailable:
        os.close(descriptor)
        raise
    IN_MEMORY_FILES.append(descriptor)


def _load_library(path: str, library: str) -> None:
    """Load a shared library for every later one to find (``RTLD_GLOBAL``), or say why it cannot be."""
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        raise TorchUnavailable(
            f"The PyTorch layer's {library} cannot be loaded ({error}); attach the layer built for this "
            "function's runtime, or rebuild and republish it (make layer)."
        ) from error


def _no_memory_file(name: str, error: OSError) -> TorchUnavailable:
    return TorchUnavailable(
        f"The PyTorch layer's {name} cannot be put in an in-memory file: {describe_disk_fault(error)}; "
        "the function needs memfd_create and the memory for it."
    )


def _bad_manifest(path: Path, problem: str) -> TorchUnavailable:
    return TorchUnavailable(
        f"The PyTorch layer's {path} is not the manifest tools/build_layer.py writes (memory_archive, "
        f"memory_bytes, libraries): {problem[:200]}. Rebuild and republish the layer (make layer)."
    )


def _is_inside(path: object) -> bool:
    """A relative path that stays inside its folder."""
    return (
        isinstance(path, str)
        and not PurePosixPath(path).is_absolute()
        and ".." not in PurePosixPath(path).parts
    )


def _activate() -> None:
    site = load(LAYER_DIR)
    if site is not None and str(site) not in sys.path:
        sys.path.insert(0, str(site))


_activate()
