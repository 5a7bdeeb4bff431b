"""``make bench-peers`` without TorchServe: its arithmetic, its checks, its report, how it starts ours.

The benchmark itself needs TorchServe's venv and minutes; these need
neither. The make and process tests run real make and real processes on a
Makefile and a process tree of their own. No timing is asserted.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.peers import write_results
from bench.peers_client import Endpoint, PeerError, first_answer, latencies
from bench.peers_ours import serve_target
from bench.peers_processes import Launch, group_members, label_of, running
from bench.peers_report import TopOneDisagreement, check_agreement, markdown, summarize
from tests.support.http_server import InBackground

SIZES = ("640x480", "1920x1080", "4032x3024")


def _slot(seconds: float, *, label: str = "Egyptian cat", rss: float = 100.0) -> dict[str, object]:
    """One start of one server in which every request took ``seconds``."""
    return {
        "command": "serve",
        "cold_start_s": seconds * 100,
        "answers": [{"photo": "chelsea 640x480", "class": label, "confidence": 0.5}],
        "latency_s": {
            mode: {size: [seconds] * 3 for size in SIZES} for mode in ("keep-alive", "new connection")
        },
        "throughput_rps": {"keep-alive": 1 / seconds, "new connection": 1 / seconds},
        "memory": {
            "serving_mib": rss,
            "processes": [
                {"label": "server", "peak_rss_mib": rss, "threads": 4, "launcher": False},
                {"label": "make", "peak_rss_mib": 2.0, "threads": 1, "launcher": True},
            ],
        },
    }


def test_the_top_one_check_names_every_photo_on_which_servers_disagree() -> None:
    agreeing = [{"ours-onnx": _slot(0.02), "torchserve": _slot(0.04)}]
    assert check_agreement(agreeing)["chelsea 640x480"]["class"] == "Egyptian cat"

    rounds = [*agreeing, {"ours-onnx": _slot(0.02), "torchserve": _slot(0.04, label="tabby")}]
    with pytest.raises(TopOneDisagreement, match=r"chelsea 640x480: .*torchserve \(round 2\) 'tabby'"):
        check_agreement(rounds)


def test_percentiles_pool_the_rounds_and_ratios_are_the_median_of_each_rounds_own() -> None:
    # Round 1 ours 10 ms / peer 20 ms, round 2 ours 30 ms / peer 30 ms, round 3 ours 12 ms / peer 40 ms:
    # pooled, ours' p50 is 12 ms; the rounds' ratios are 0.5, 1.0 and 0.3, so the ratio is 0.5.
    rounds = [
        {"ours-onnx": _slot(ours), "torchserve": _slot(peer)}
        for ours, peer in ((0.010, 0.020), (0.030, 0.030), (0.012, 0.040))
    ]

    summary = summarize(rounds)

    latency = summary["servers"]["ours-onnx"]["latency_ms"]["new connection"]["640x480"]
    assert latency["p50"] == pytest.approx(12.0)
    assert latency["p90"] == pytest.approx(30.0)
    assert summary["ours_over_torchserve"]["ours-onnx"]["latency_p50"]["keep-alive"][
        "640x480"
    ] == pytest.approx(0.5)
    assert summary["ours_over_torchserve"]["ours-onnx"]["throughput"]["keep-alive"] == pytest.approx(2.0)
    assert summary["servers"]["ours-onnx"]["cold_start_s"] == pytest.approx(
        {"median": 1.2, "min": 1.0, "max": 3.0}
    )


def test_the_keep_alive_target_compares_each_round_with_itself() -> None:
    stalled, fixed = _slot(0.030), _slot(0.030)
    stalled["latency_s"]["keep-alive"]["640x480"] = [0.070] * 3  # type: ignore[index]
    fixed["latency_s"]["keep-alive"]["640x480"] = [0.032] * 3  # type: ignore[index]

    (target,) = summarize([{"ours-onnx": stalled, "torchserve": _slot(0.03)}])["targets"]
    assert not target["met"]
    assert target["value"] == pytest.approx(7 / 3)
    (target,) = summarize([{"ours-onnx": fixed, "torchserve": _slot(0.03)}])["targets"]
    assert target["met"]


def test_the_report_is_written_as_json_and_markdown_with_ours_over_the_peer(tmp_path: Path) -> None:
    rounds = [{"ours-onnx": _slot(0.010, rss=50.0), "torchserve": _slot(0.040, rss=200.0)}]
    result = {
        "when": "2026-01-01T00:00:00+00:00",
        "machine": "test",
        "requests": 3,
        "clients": 4,
        "names": {"ours-onnx": "ours, ONNX", "torchserve": "TorchServe"},
        "commands": {"ours-onnx": "`make serve`", "torchserve": "`torchserve`"},
        "summary": summarize(rounds),
        "agreement": check_agreement(rounds),
        "differences": ["Decoding: ours drafts"],
        "rounds": rounds,
    }
    output = tmp_path / "results" / "peers.json"

    write_results(result, markdown(result), output)

    assert json.loads(output.read_text())["rounds"] == rounds
    table = output.with_suffix(".md").read_text()
    ours = "| ours, ONNX | 10.0 (0.25x) | 10.0 (0.25x) | 10.0 (0.25x) | 100.0 (4.00x) | 1.00 (0.25x) |"
    assert f"{ours} 50 (0.25x) |" in table
    assert "| TorchServe | 40.0 | 40.0 | 40.0 | 25.0 | 4.00 | 200 |" in table
    assert "50 (50 server + 2 make (launcher))" in table
    assert "- Decoding: ours drafts" in table


def _makefile(project: Path, recipe: str) -> None:
    (project / "Makefile").write_text(
        f".PHONY: serve\nPORT ?= 8000\nbuild/stamp: input\n\tmkdir -p build && touch $@\n"
        f"serve: build/stamp\n\t{recipe}\n"
    )


def test_ours_is_started_by_whatever_the_serve_target_runs(tmp_path: Path) -> None:
    (tmp_path / "input").touch()
    _makefile(tmp_path, 'echo "wrapper on port $(PORT) with $$MODEL_BACKEND" > served')
    subprocess.run(["make", "--silent", "build/stamp"], cwd=tmp_path, check=True)

    launch = serve_target(tmp_path).launch("torchscript", 4321, tmp_path / "cache")
    subprocess.run(launch.command, cwd=launch.cwd, env=dict(launch.environment), check=True)

    assert (tmp_path / "served").read_text() == "wrapper on port 4321 with torch\n"
    assert launch.description.endswith(
        'which runs: echo "wrapper on port <port> with $MODEL_BACKEND" > served'
    )


def test_a_stale_prerequisite_is_not_rebuilt_inside_a_start_and_the_report_says_so(tmp_path: Path) -> None:
    _makefile(tmp_path, "true")
    (tmp_path / "input").touch()

    launch = serve_target(tmp_path).launch("onnx", 4321, tmp_path / "cache")
    subprocess.run(launch.command, cwd=launch.cwd, env=dict(launch.environment), check=True)

    assert not (tmp_path / "build" / "stamp").exists()
    assert (
        "its stale prerequisites not rebuilt first: mkdir -p build && touch build/stamp" in launch.description
    )


def test_memory_counts_every_serving_process_of_the_group_and_stopping_ends_them_all(tmp_path: Path) -> None:
    child = "import time\nheld = bytearray(64 * 2**20)\nprint('ready', flush=True)\ntime.sleep(600)"
    launch = Launch(
        command=["sh", "-c", f'{sys.executable} -c "$CHILD" & wait'],
        environment={"CHILD": child, "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        description="a shell and its child",
    )
    with running(launch, tmp_path / "log") as server:
        while "ready" not in server.log.read_text():
            assert server.alive(), server.log_tail()
            time.sleep(0.05)
        group = server.process.pid
    memory = server.memory()

    assert group_members(group) == []
    serving, launcher = memory["processes"]
    assert memory["serving_mib"] == serving["peak_rss_mib"] >= 64  # the shell serves nothing
    assert (serving["label"], launcher["label"]) == (Path(sys.executable).name + " -c", "sh")
    assert (serving["launcher"], launcher["launcher"]) == (False, True)


@pytest.mark.parametrize(
    ("arguments", "label"),
    [
        (["/venv/bin/python3.11", "/venv/bin/chalice", "local", "--port", "1"], "chalice"),
        (
            ["/venv/bin/python", "-u", "/site/ts/model_service_worker.py", "--sock-type", "unix"],
            "model_service_worker.py",
        ),
        (["python3", "-m", "moto.server", "-p", "1"], "moto.server"),
        (["java", "-Dmodel_server_home=/x", "-cp", "y", "org.pytorch.serve.ModelServer"], "java"),
    ],
)
def test_a_process_is_labelled_by_the_program_or_python_script_it_runs(
    arguments: list[str], label: str
) -> None:
    assert label_of(arguments) == label


@contextmanager
def _classifier(unready: int) -> Iterator[tuple[Endpoint, list[int]]]:
    """A server that answers 503 to its first ``unready`` requests, then a class; HTTP/1.0, so it
    closes every connection. Yields its endpoint and the statuses it sent."""
    statuses: list[int] = []

    class Classifier(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            ready = len(statuses) >= unready
            body = json.dumps({"class": "espresso", "confidence": 0.9}).encode() if ready else b"loading"
            statuses.append(200 if ready else 503)
            self.send_response(statuses[-1])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Classifier)
    with InBackground(server):
        yield Endpoint(port=server.server_address[1], path="/predict"), statuses


def test_the_cold_start_clock_waits_through_refusals_and_errors_for_the_first_classification() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    refused = Endpoint(port=port, path="/predict")
    with pytest.raises(PeerError, match="no answer within"):
        first_answer(refused, b"jpeg", started=time.monotonic(), alive=lambda: True, within_s=0.3)

    with _classifier(unready=2) as (endpoint, statuses):
        _, answer = first_answer(endpoint, b"jpeg", started=time.monotonic(), alive=lambda: True, within_s=30)
    assert answer.label == "espresso"
    assert statuses == [503, 503, 200]


def test_keep_alive_figures_are_refused_from_a_server_that_closes_the_connection() -> None:
    with _classifier(unready=0) as (endpoint, _):
        assert len(latencies(endpoint, b"jpeg", keep_alive=False, count=2, warm_up=0)) == 2
        with pytest.raises(PeerError, match="closed a kept-alive connection"):
            latencies(endpoint, b"jpeg", keep_alive=True, count=2, warm_up=0)
