"""A server for ``make bench-peers`` as a process group: started, watched for memory, stopped whole.

A server is rarely one process: ours is ``make`` running ``chalice local``,
TorchServe a Python launcher, a JVM and a Python worker. Each is started in a
session of its own, so every process it forks shares its process group and
the whole group can be measured and stopped together. Memory is each
process's own high-water mark (``VmHWM``), read while it runs: a process
that exits early still counts. The process started (the launcher) and any
shell between it and the servers are reported apart, because they serve
nothing (``make`` stands in for a user's terminal, and TorchServe's launcher
only waits for the JVM with ``--foreground``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
SHELLS = frozenset({"sh", "bash", "dash"})
# A high-water mark needs no fast sampling; a slow one keeps the client's GIL free for its requests.
SAMPLE_EVERY_S = 1.0
STOP_WITHIN_S = 30.0


@dataclass(frozen=True)
class Launch:
    """How to start one server: its command, its whole environment, where it runs, and that in words."""

    command: Sequence[str]
    environment: Mapping[str, str]
    cwd: Path
    description: str


@dataclass
class ProcessPeak:
    """One process of a server's group: what it is, its memory high-water mark, its most threads."""

    label: str
    peak_rss_bytes: int
    threads: int
    launcher: bool


@dataclass
class RunningServer:
    """A started server: its group, its log, and the peaks of every process seen in the group."""

    process: subprocess.Popen[bytes]
    log: Path
    started: float  # time.monotonic() just before the launch
    peaks: dict[int, ProcessPeak] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def sample(self) -> None:
        """Read every live process of the group once and keep each one's highest figures."""
        for pid in group_members(self.process.pid):
            status = read_status(pid)
            if status is None:
                continue
            label = process_label(pid)
            with self._lock:
                known = self.peaks.get(pid)
                peak = ProcessPeak(
                    label=label,
                    peak_rss_bytes=max(status["VmHWM"], known.peak_rss_bytes if known else 0),
                    threads=max(status["Threads"], known.threads if known else 0),
                    launcher=pid == self.process.pid or label in SHELLS,
                )
                self.peaks[pid] = peak

    def memory(self) -> dict[str, object]:
        """Peak RSS in MiB: the serving processes' sum, each process, and the launchers apart."""
        with self._lock:
            peaks = list(self.peaks.values())
        serving = [p for p in peaks if not p.launcher]
        return {
            "serving_mib": sum(p.peak_rss_bytes for p in serving) / 2**20,
            "processes": [
                {
                    "label": p.label,
                    "peak_rss_mib": p.peak_rss_bytes / 2**20,
                    "threads": p.threads,
                    "launcher": p.launcher,
                }
                for p in sorted(peaks, key=lambda p: (p.launcher, -p.peak_rss_bytes))
            ],
        }


@contextlib.contextmanager
def running(launch: Launch, log: Path) -> Iterator[RunningServer]:
    """The server's group, sampled in the background while it runs, and stopped whole afterwards."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as output:
        started = time.monotonic()
        process = subprocess.Popen(
            list(launch.command), cwd=launch.cwd, env=dict(launch.environment),
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = RunningServer(process=process, log=log, started=started)
    done = threading.Event()
    sampler = threading.Thread(target=_sample_until, args=(server, done), daemon=True)
    sampler.start()
    try:
        yield server
    finally:
        done.set()
        sampler.join()
        server.sample()
        stop_group(process)


def _sample_until(server: RunningServer, done: threading.Event) -> None:
    while not done.wait(SAMPLE_EVERY_S):
        server.sample()


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole group, SIGKILL to whatever of it still runs after ``STOP_WITHIN_S``."""
    group = process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WITHIN_S
    while group_members(group) and time.monotonic() < deadline:
        process.poll()  # reaps the launcher, our child; the others' parent reaps them
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    process.wait(timeout=STOP_WITHIN_S)


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes in process group ``group``."""
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # it exited while we looked
            continue
        state, process_group = fields[0], int(fields[2])
        if process_group == group and state != "Z":
            members.append(int(entry.name))
    return members


def read_status(pid: int) -> dict[str, int] | None:
    """VmHWM (bytes) and Threads of a live process; None once it has exited or become a zombie."""
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in lines if ":" in line)
    if "VmHWM" not in values:  # a zombie has no memory left to report
        return None
    return {"VmHWM": int(values["VmHWM"].split()[0]) * 1024, "Threads": int(values["Threads"])}


def process_label(pid: int) -> str:
    """What a process runs: the program's name, or for Python the script or module it runs."""
    try:
        arguments = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    return label_of(arguments)


def label_of(arguments: Sequence[str]) -> str:
    """``java``, ``make``; for Python ``chalice``, ``model_service_worker.py`` or ``python -c``."""
    program = Path(arguments[0]).name if arguments and arguments[0] else "?"
    if not program.startswith("python"):
        return program
    rest = iter(arguments[1:])
    for argument in rest:
        if argument in ("-m", "-c"):
            return next(rest, program) if argument == "-m" else f"{program} -c"
        if argument and not argument.startswith("-"):
            return Path(argument).name
    return program
