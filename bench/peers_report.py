"""What ``make bench-peers`` concludes from its raw measurements: figures, ratios, targets, the table.

Pure functions of the raw record, so they are tested without any server.
The raw record is a list of rounds; each round maps a server's key to what
was measured on one start of it (a slot, laid out below). As in
bench/run.py, a reported p50 or p90 pools every round's samples and takes
the percentile once, and a ratio is the median over rounds of that round's
own ratio, so both sides of it were measured minutes apart at most.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.peers_client import KEEP_ALIVE, NEW_CONNECTION
from bench.run import p50, percentile

# A round: server key -> slot. A slot (one start of one server), as JSON:
#   cold_start_s: float, to the first classification
#   answers: [{"photo": "chelsea 640x480", "class": str, "confidence": float}, ...]
#   latency_s: {mode: {size: [seconds, ...]}}
#   throughput_rps: {mode: float}
#   memory: {"serving_mib": float, "processes": [{"label", "peak_rss_mib", "threads", "launcher"}]}
Round = Mapping[str, Mapping[str, Any]]

PEER = "torchserve"  # the server ours are compared with
THROUGHPUT_SIZE = "640x480"
# Issue 16: a kept-alive connection may cost at most 10% over a new one at 640x480.
KEEP_ALIVE_LIMIT = 1.10


class TopOneDisagreement(RuntimeError):
    """Two servers, or two starts of one, named different classes for the same photo."""


def check_agreement(rounds: Sequence[Round]) -> dict[str, dict[str, Any]]:
    """Every server's top-1 per photo, all the same, or ``TopOneDisagreement`` naming each difference.

    Returns, per photo, the class and the widest spread of confidence between
    answers (ours decodes large JPEGs in draft mode, TorchServe's handler in
    full, so the probabilities differ slightly while the class may not).
    """
    by_photo: dict[str, list[tuple[str, str, float]]] = {}
    for number, slots in enumerate(rounds, 1):
        for key, slot in slots.items():
            for answer in slot["answers"]:
                by_photo.setdefault(answer["photo"], []).append(
                    (f"{key} (round {number})", answer["class"], answer["confidence"])
                )
    differences = [
        f"{photo}: " + ", ".join(f"{who} {label!r}" for who, label, _ in answers)
        for photo, answers in by_photo.items()
        if len({label for _, label, _ in answers}) > 1
    ]
    if differences:
        raise TopOneDisagreement("The servers disagree on the top-1 class:\n  " + "\n  ".join(differences))
    return {
        photo: {
            "class": answers[0][1],
            "confidence_spread": max(c for *_, c in answers) - min(c for *_, c in answers),
        }
        for photo, answers in by_photo.items()
    }


def summarize(rounds: Sequence[Round]) -> dict[str, Any]:
    """Per server: pooled percentiles, throughput, cold start, peak RSS; ours over TorchServe; targets."""
    keys = list(rounds[0])
    return {
        "servers": {key: _server_summary([slots[key] for slots in rounds]) for key in keys},
        "ours_over_torchserve": {key: _ratios(rounds, key) for key in keys if key != PEER},
        "targets": targets(rounds, [key for key in keys if key != PEER]),
    }


def _server_summary(slots: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first = slots[0]
    latency = {
        mode: {
            size: _percentiles([s for slot in slots for s in slot["latency_s"][mode][size]])
            for size in by_size
        }
        for mode, by_size in first["latency_s"].items()
    }
    processes: dict[str, float] = {}
    for slot in slots:
        for process in slot["memory"]["processes"]:
            label = process["label"] + (" (launcher)" if process["launcher"] else "")
            processes[label] = max(processes.get(label, 0.0), process["peak_rss_mib"])
    return {
        "latency_ms": latency,
        "throughput_rps": {
            mode: _spread([slot["throughput_rps"][mode] for slot in slots]) for mode in latency
        },
        "cold_start_s": _spread([slot["cold_start_s"] for slot in slots]),
        "peak_rss_mib": max(slot["memory"]["serving_mib"] for slot in slots),
        "peak_rss_mib_by_process": processes,
        "threads_by_process": _threads(slots),
    }


def _threads(slots: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    threads: dict[str, int] = {}
    for slot in slots:
        for process in slot["memory"]["processes"]:
            if not process["launcher"]:
                threads[process["label"]] = max(threads.get(process["label"], 0), process["threads"])
    return threads


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    return {"p50": p50(samples) * 1000, "p90": percentile(samples, 0.90) * 1000}


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": p50(values), "min": min(values), "max": max(values)}


def _ratios(rounds: Sequence[Round], key: str) -> dict[str, Any]:
    """Ours over TorchServe, each the median of the rounds' own ratios (below 1: ours is less)."""
    modes = rounds[0][key]["latency_s"]

    def ratio(figure: Callable[[Mapping[str, Any]], float]) -> float:
        return p50([figure(slots[key]) / figure(slots[PEER]) for slots in rounds])

    return {
        "latency_p50": {
            mode: {
                size: ratio(lambda slot, m=mode, s=size: p50(slot["latency_s"][m][s])) for size in modes[mode]
            }
            for mode in modes
        },
        "throughput": {mode: ratio(lambda slot, m=mode: slot["throughput_rps"][m]) for mode in modes},
        "cold_start": ratio(lambda slot: slot["cold_start_s"]),
        "peak_rss": ratio(lambda slot: slot["memory"]["serving_mib"]),
    }


def targets(rounds: Sequence[Round], ours: Sequence[str]) -> list[dict[str, Any]]:
    """Issue 16's keep-alive target for each of our servers: the median of the rounds' own ratios."""
    rows = []
    for key in ours:
        value = p50(
            [
                p50(slots[key]["latency_s"][KEEP_ALIVE]["640x480"])
                / p50(slots[key]["latency_s"][NEW_CONNECTION]["640x480"])
                for slots in rounds
            ]
        )
        rows.append(
            {
                "name": f"{key}: keep-alive p50 / new-connection p50, 640x480",
                "value": value,
                "limit": KEEP_ALIVE_LIMIT,
                "met": value <= KEEP_ALIVE_LIMIT,
            }
        )
    return rows


def markdown(result: Mapping[str, Any]) -> str:
    """The run as Markdown: the headline with ours over TorchServe, the details, and what differs."""
    rounds = len(result["rounds"])
    lines = [
        f"# `make bench-peers`, {result['when']}",
        "",
        f"{result['machine']}; {rounds} round{'s' if rounds != 1 else ''}, one start of each server "
        f"per round; {result['requests']} timed requests per size and connection mode per round; "
        f"throughput with {result['clients']} concurrent clients at {THROUGHPUT_SIZE}.",
        "",
        *_headline(result),
        *_latency_table(result),
        *_throughput_table(result),
        "## Targets",
        "",
        _row(["target", "value", "limit", ""]),
        _row(["---"] * 4),
        *(
            _row([t["name"], f"{t['value']:.3f}", f"{t['limit']:.2f}", "met" if t["met"] else "**MISSED**"])
            for t in result["summary"]["targets"]
        ),
        "",
        "## Top-1 on the same photos (every server, every round)",
        "",
        *(
            f"- {photo}: {a['class']} (confidence spread {a['confidence_spread']:.4f})"
            for photo, a in result["agreement"].items()
        ),
        "",
        "## What differs",
        "",
        *(f"- {note}" for note in result["differences"]),
        "",
        "## What ran",
        "",
        *(f"- {result['names'][key]}: {command}" for key, command in result["commands"].items()),
    ]
    return "\n".join(lines) + "\n"


def _headline(result: Mapping[str, Any]) -> list[str]:
    """Issue 16's table: medians and p50s, each of ours with its ratio to TorchServe's in brackets."""
    servers, ratios, names = (
        result["summary"]["servers"],
        result["summary"]["ours_over_torchserve"],
        result["names"],
    )
    sizes = list(servers[PEER]["latency_ms"][NEW_CONNECTION])
    small, large = sizes[0], sizes[-1]
    columns: list[
        tuple[str, Callable[[Mapping[str, Any]], float], Callable[[Mapping[str, Any]], float], str]
    ] = [
        (f"{small} p50 (ms)", _p50(NEW_CONNECTION, small), _ratio_p50(NEW_CONNECTION, small), "{:.1f}"),
        (f"{large} p50 (ms)", _p50(NEW_CONNECTION, large), _ratio_p50(NEW_CONNECTION, large), "{:.1f}"),
        (f"{small} p50, keep-alive (ms)", _p50(KEEP_ALIVE, small), _ratio_p50(KEEP_ALIVE, small), "{:.1f}"),
        (
            f"{result['clients']} clients (req/s)",
            lambda s: s["throughput_rps"][NEW_CONNECTION]["median"],
            lambda r: r["throughput"][NEW_CONNECTION],
            "{:.1f}",
        ),
        ("cold start (s)", lambda s: s["cold_start_s"]["median"], lambda r: r["cold_start"], "{:.2f}"),
        ("peak RSS (MiB)", lambda s: s["peak_rss_mib"], lambda r: r["peak_rss"], "{:.0f}"),
    ]
    lines = [
        "## Ours beside TorchServe",
        "",
        "A new connection per request unless marked; latency p50 over every round's requests, throughput "
        "and cold start the median of the rounds, peak RSS the highest; in brackets ours / TorchServe, "
        "the median of the rounds' own ratios (below 1, ours is less).",
        "",
        _row(["server", *(title for title, *_ in columns)]),
        _row(["---"] * (1 + len(columns))),
    ]
    for key, server in servers.items():
        cells = []
        for _, figure, ratio, style in columns:
            cell = style.format(figure(server))
            cells.append(cell if key == PEER else f"{cell} ({ratio(ratios[key]):.2f}x)")
        lines.append(_row([names[key], *cells]))
    return [*lines, ""]


def _p50(mode: str, size: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda server: server["latency_ms"][mode][size]["p50"]


def _ratio_p50(mode: str, size: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda ratios: ratios["latency_p50"][mode][size]


def _latency_table(result: Mapping[str, Any]) -> list[str]:
    servers, names = result["summary"]["servers"], result["names"]
    sizes = list(servers[PEER]["latency_ms"][NEW_CONNECTION])
    lines = [
        "## Warm latency, p50 / p90 (ms), one client",
        "",
        _row(["server", "connection", *sizes]),
        _row(["---"] * (2 + len(sizes))),
    ]
    for key, server in servers.items():
        for mode, by_size in server["latency_ms"].items():
            lines.append(
                _row([names[key], mode, *(f"{c['p50']:.1f} / {c['p90']:.1f}" for c in by_size.values())])
            )
    return [*lines, ""]


def _throughput_table(result: Mapping[str, Any]) -> list[str]:
    servers, names = result["summary"]["servers"], result["names"]
    lines = [
        "## Throughput, cold start, memory: median (lowest-highest) over the rounds",
        "",
        _row(["server", "req/s, keep-alive", "req/s, new connection", "cold start (s)", "peak RSS (MiB)"]),
        _row(["---"] * 5),
    ]
    for key, server in servers.items():
        rates = [
            _median_range(server["throughput_rps"][mode], "{:.1f}") for mode in (KEEP_ALIVE, NEW_CONNECTION)
        ]
        memory = " + ".join(f"{mib:.0f} {label}" for label, mib in server["peak_rss_mib_by_process"].items())
        cold = _median_range(server["cold_start_s"], "{:.2f}")
        lines.append(_row([names[key], *rates, cold, f"{server['peak_rss_mib']:.0f} ({memory})"]))
    return [*lines, ""]


def _median_range(spread: Mapping[str, float], style: str) -> str:
    median, low, high = (style.format(spread[k]) for k in ("median", "min", "max"))
    return f"{median} ({low}-{high})"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
