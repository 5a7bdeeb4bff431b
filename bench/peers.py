"""``make bench-peers``: our server beside TorchServe, on the same model file, through the same client.

Users compare us with the serving systems they know; this measures that
comparison on this machine, on loopback only (``make bench-peers`` runs it
inside tools/isolated_network.sh, and nothing here needs the network). Three
servers, each on the demo archive (build/demo-model.tar.gz):

- ours, ONNX and ours, TorchScript: started as ``make serve`` starts ours
  (bench/peers_ours.py asks the Makefile), switched by MODEL_BACKEND;
- TorchServe with one worker and a handler with the same preprocessing,
  serving the archive's TorchScript file (bench/peers_torchserve.py, from
  its own venv under build/peers, which tools/torchserve_env.sh builds).

Each round starts every server once, in an order that rotates from round to
round, and measures on that start, with one client (bench/peers_client.py):

- cold start: from launching its command to the first classification;
- top-1 on the same photos at every size, which must agree across servers,
  starts and rounds, or the run fails (a fast wrong answer is no answer);
- warm latency of one client at 640x480, 1920x1080 and 4032x3024 (real
  photos from skimage.data, resized, JPEG), on a kept-alive connection and
  with a new connection per request;
- throughput of concurrent clients sending back to back, both ways;
- peak RSS of every process of the server, summed (bench/peers_processes.py).

Figures and ratios are computed as bench/run.py computes its own
(bench/peers_report.py). The results go to bench/results/peers-<time>.json
(every raw sample) and .md (the tables), and the tables are printed.
Server logs stay in build/peers/run/ until the next run.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime
import torch

from bench.peers_client import (
    KEEP_ALIVE,
    MODES,
    Answer,
    Endpoint,
    PeerError,
    first_answer,
    latencies,
    requester,
    throughput,
)
from bench.peers_ours import BACKENDS, ServeTarget, serve_target
from bench.peers_processes import Launch, running
from bench.peers_report import THROUGHPUT_SIZE, check_agreement, markdown, summarize
from bench.peers_torchserve import PATH, build_model_store, check_installed, launch_torchserve, versions
from bench.run import ACCURACY_PHOTOS, DEMO_MODEL, RESULTS, SIZES, jpeg_of, p50
from tests.support.chalice_local import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / "build" / "peers" / "run"
DEFAULT_VENV = ROOT / "build" / "peers" / "venv"
LATENCY_PHOTO = "chelsea"
COLD_START_WITHIN_S = 120.0
STARTED = time.monotonic()  # progress lines tell how long the run has taken so far


@dataclass(frozen=True)
class Server:
    key: str
    name: str
    path: str
    launch: Callable[[int, Path], Launch]  # (port, scratch folder of this start) -> how to start it


@dataclass(frozen=True)
class Workload:
    """What every start of every server is sent."""

    latency_images: Mapping[str, bytes]  # size -> the latency photo at that size
    photos: Mapping[str, bytes]  # "<photo> <size>" -> JPEG, for the top-1 check
    requests: int
    warm_up: int
    clients: int
    per_client: int


def servers(serve: ServeTarget, venv: Path, store: Path, torchserve_version: str) -> list[Server]:
    ours = [
        Server(
            key=f"ours-{backend}",
            name=f"ours, {'ONNX' if backend == 'onnx' else 'TorchScript'}",
            path="/invocations",
            launch=lambda port, scratch, b=backend: serve.launch(b, port, scratch / "model-cache"),
        )
        for backend in BACKENDS
    ]
    peer = Server(
        key="torchserve",
        name=f"TorchServe {torchserve_version}, 1 worker",
        path=PATH,
        launch=lambda port, scratch: launch_torchserve(venv, store, port, scratch),
    )
    return [*ours, peer]


def measure(server: Server, workload: Workload, scratch: Path) -> dict[str, Any]:
    """One start of ``server``: cold start, the top-1 photos, latency, throughput, memory."""
    port = free_port()
    launch = server.launch(port, scratch)
    endpoint = Endpoint(port=port, path=server.path)
    with running(launch, scratch / "server.log") as process:
        try:
            seconds, cold = first_answer(
                endpoint,
                workload.latency_images[THROUGHPUT_SIZE],
                started=process.started,
                alive=process.alive,
                within_s=COLD_START_WITHIN_S,
            )
            slot = {
                "command": launch.description,
                "cold_start_s": seconds,
                "answers": [
                    _answer(f"{LATENCY_PHOTO} {THROUGHPUT_SIZE}", cold),
                    *top_one(endpoint, workload),
                ],
                "latency_s": {mode: latency_by_size(endpoint, workload, mode) for mode in MODES},
                "throughput_rps": {mode: concurrent(endpoint, workload, mode) for mode in MODES},
            }
        except PeerError as error:
            raise PeerError(
                f"{server.name}: {error}\n--- its output ({process.log}) ---\n{process.log_tail()}"
            ) from error
    return {**slot, "memory": process.memory()}


def top_one(endpoint: Endpoint, workload: Workload) -> list[dict[str, Any]]:
    with requester(endpoint, keep_alive=False) as send:
        return [_answer(photo, send(jpeg)) for photo, jpeg in workload.photos.items()]


def _answer(photo: str, answer: Answer) -> dict[str, Any]:
    return {"photo": photo, "class": answer.label, "confidence": answer.confidence}


def latency_by_size(endpoint: Endpoint, workload: Workload, mode: str) -> dict[str, list[float]]:
    return {
        size: latencies(
            endpoint, jpeg, keep_alive=mode == KEEP_ALIVE, count=workload.requests, warm_up=workload.warm_up
        )
        for size, jpeg in workload.latency_images.items()
    }


def concurrent(endpoint: Endpoint, workload: Workload, mode: str) -> float:
    return throughput(
        endpoint,
        workload.latency_images[THROUGHPUT_SIZE],
        keep_alive=mode == KEEP_ALIVE,
        clients=workload.clients,
        per_client=workload.per_client,
    )


def progress(line: str) -> None:
    print(f"[{time.monotonic() - STARTED:4.0f} s] {line}", file=sys.stderr, flush=True)


def describe(server: Server, slot: Mapping[str, Any]) -> str:
    keep_alive, fresh = (slot["latency_s"][mode][THROUGHPUT_SIZE] for mode in MODES)
    return (
        f"{server.name}: cold start {slot['cold_start_s']:.2f} s; {THROUGHPUT_SIZE} p50 "
        f"{p50(keep_alive) * 1000:.1f} ms kept alive, {p50(fresh) * 1000:.1f} ms new; "
        + ", ".join(f"{rate:.1f} req/s {mode}" for mode, rate in slot["throughput_rps"].items())
        + f"; peak RSS {slot['memory']['serving_mib']:.0f} MiB"
    )


def run_rounds(chosen: Sequence[Server], workload: Workload, rounds: int) -> list[dict[str, Any]]:
    """Every server once per round, in an order rotating by round; the top-1 checked as each round ends."""
    results: list[dict[str, Any]] = []
    for number in range(rounds):
        order = [chosen[(number + offset) % len(chosen)] for offset in range(len(chosen))]
        slots = {}
        for server in order:
            scratch = SCRATCH / f"round-{number + 1}-{server.key}"
            progress(f"round {number + 1}/{rounds}: {server.name} ...")
            slots[server.key] = measure(server, workload, scratch)
            remove_bulk(scratch)
            progress(f"  {describe(server, slots[server.key])}")
        results.append({server.key: slots[server.key] for server in chosen})
        check_agreement(results)
    return results


def remove_bulk(scratch: Path) -> None:
    """Keep a start's logs; drop what it unpacked (a model per start adds up)."""
    for entry in scratch.iterdir():
        if entry.is_dir() and entry.name != "logs":
            shutil.rmtree(entry)


def differences(summary: Mapping[str, Any], peer_versions: Mapping[str, str]) -> list[str]:
    """What is not equal between the servers, in words, with the thread counts this run saw."""
    threads = "; ".join(
        f"{key}: " + ", ".join(f"{label} {count}" for label, count in server["threads_by_process"].items())
        for key, server in summary["servers"].items()
    )
    return [
        "Model: TorchServe and ours, TorchScript run the same TorchScript file from "
        "build/demo-model.tar.gz; ours, ONNX runs the same archive's model.onnx (the same network, "
        "exported) under ONNX Runtime. Ours freezes the TorchScript module as it loads it; TorchServe's "
        "BaseHandler runs it as torch.jit.load returns it.",
        f"Runtimes: ours torch {torch.__version__}, onnxruntime {onnxruntime.__version__} (the dev venv); "
        f"TorchServe {peer_versions['torchserve']} with torch {peer_versions['torch']} (the CPU wheel on "
        f"this machine's disk) on {peer_versions['java']}.",
        "Decoding: ours decodes a large JPEG at 1/2, 1/4 or 1/8 scale (Pillow's draft) while its short "
        "side stays at least twice the resize target, then resizes with Pillow's reducing_gap; "
        "TorchServe's handler decodes every pixel and resizes once, as torchvision's transforms do. Ours "
        "keeps this shortcut: it is its own work, and the top-1 agrees on every photo (above). At 640x480 "
        "both decode every pixel.",
        "Threads: one inference thread each (ours INFERENCE_THREADS=1, the handler "
        "torch.set_num_threads(1)). Ours is `chalice local`, Python's threading HTTP server: a thread per "
        "connection, so concurrent clients are served in parallel on both cores, sharing the GIL. "
        "TorchServe is a Netty frontend in a JVM handing one request at a time (batch size 1) to one Python "
        f"worker process. Most threads seen: {threads}.",
        "Servers: `chalice local` is Chalice's development server (ours runs on API Gateway and Lambda in "
        "production, one request per container at a time); TorchServe is a production server.",
        "Starts: each unpacks its archive at every start (ours into a fresh MODEL_CACHE_DIR, TorchServe "
        "its .mar into a fresh temporary folder). Ours loads the model on its first request, TorchServe "
        "as it starts; either clock runs from launching the command (`make serve`; `torchserve --start "
        "--foreground`) to the first classification.",
        "Logging: both write lines per request (ours JSON logs and metrics to its output, TorchServe its "
        "access and metrics logs), to files.",
        "Memory: each process's own peak RSS (VmHWM), summed over the serving processes; the launcher "
        "(make for ours, TorchServe's Python launcher) is listed apart and not summed.",
    ]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="starts of each server")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per size, mode and round")
    parser.add_argument("--warm-up", type=int, default=3, help="untimed requests before each timed series")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients for throughput")
    parser.add_argument("--per-client", type=int, default=15, help="requests per throughput client")
    parser.add_argument("--torchserve-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--output", type=Path, help="write the JSON here (and the .md beside it)")
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    venv = args.torchserve_venv.resolve()
    check_installed(venv)
    peer_versions = versions(venv)
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    # Ours starts from compiled bytecode, as its packages carry it and TorchServe's venv has its own.
    compileall.compile_file(ROOT / "app.py", quiet=1)
    compileall.compile_dir(ROOT / "chalicelib", quiet=1)
    progress("photos and TorchServe's model archive ...")
    workload = Workload(
        latency_images={size: jpeg_of(LATENCY_PHOTO, dimensions) for size, dimensions in SIZES.items()},
        photos={
            f"{name} {size}": jpeg_of(name, dimensions)
            for name in ACCURACY_PHOTOS
            for size, dimensions in SIZES.items()
        },
        requests=args.requests,
        warm_up=args.warm_up,
        clients=args.clients,
        per_client=args.per_client,
    )
    store = build_model_store(venv, DEMO_MODEL, SCRATCH / "torchserve-archive")
    serve = serve_target()
    if serve.skipped:
        progress(
            f"WARNING: `make serve` would first rebuild its prerequisites ({serve.skipped}); ours runs "
            "without that rebuild. `make bench-peers` builds them first."
        )
    chosen = servers(serve, venv, store, peer_versions["torchserve"])
    rounds = run_rounds(chosen, workload, args.rounds)
    summary = summarize(rounds)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    result = {
        "when": when,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "requests": args.requests,
        "clients": args.clients,
        "names": {server.key: server.name for server in chosen},
        "commands": {key: slot["command"] for key, slot in rounds[0].items()},
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "peer": peer_versions,
        },
        "summary": summary,
        "agreement": check_agreement(rounds),
        "differences": differences(summary, peer_versions),
        "rounds": rounds,
        "seconds": time.monotonic() - STARTED,
    }
    output = args.output or RESULTS / f"peers-{when.replace(':', '')}.json"
    table = markdown(result)
    write_results(result, table, output)
    print(table)
    progress(f"wrote {output} and {output.with_suffix('.md')} in {result['seconds']:.0f} s")


def write_results(result: Mapping[str, Any], table: str, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
