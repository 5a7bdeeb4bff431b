"""bench/run.py's arithmetic and its cold-start clock (no timing asserted beyond a generous margin)."""

from __future__ import annotations

import time

import pytest

from bench.run import (
    BACKENDS,
    PRICE_PER_GB_SECOND,
    SIZES,
    first_answer,
    lambda_cost_per_million,
    percentile,
    summarize,
    summarize_dev_server,
    targets,
)


def test_percentiles_interpolate_between_ranks_so_p50_is_the_median() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([float(n) for n in range(101)], 0.99) == 99.0


def test_cost_is_the_mean_of_durations_billed_per_millisecond_rounded_up() -> None:
    # Billed 2, 2 and 11 ms: a mean of 5 ms, where the p50 would have said 1.1 ms.
    cost = lambda_cost_per_million([0.0011, 0.0011, 0.0101], memory_mb=1024)

    assert cost == pytest.approx(0.005 * PRICE_PER_GB_SECOND * 1e6)


def test_reported_percentiles_pool_every_rounds_samples() -> None:
    # One slow round of three requests, one fast round of five: pooled, the p50 is the
    # fast one; a median of the two rounds' medians would have been 15 ms.
    slow, fast = [0.020] * 3, [0.010] * 5
    per_round = [_round(e2e) for e2e in (slow, fast)]
    busy = {backend: [0.010] for backend in BACKENDS}

    summary = summarize(per_round=per_round, busy=busy, experiments={}, accuracy={})
    row = summary["sizes"]["640x480"]["onnx"]

    assert row["e2e_p50_ms"] == pytest.approx(10.0)
    assert row["e2e_p99_ms"] == pytest.approx(20.0)
    assert row["cost_per_million_usd"] == pytest.approx(
        summary["lambda_memory_mb"] / 1024 * (3 * 0.020 + 5 * 0.010) / 8 * PRICE_PER_GB_SECOND * 1e6
    )


def test_the_cold_start_clock_stops_at_the_first_answer_not_at_exit() -> None:
    script = "import sys, time\nprint('BENCH', 'first', flush=True)\ntime.sleep(2)\nprint('BENCH', 'last')\n"

    started = time.monotonic()
    seconds, values = first_answer(script, [], {})
    until_exit = time.monotonic() - started

    assert values == ["first", "last"]
    assert seconds < until_exit - 1  # the two seconds after the answer are not counted


def test_a_child_that_fails_is_reported_with_its_error() -> None:
    with pytest.raises(RuntimeError, match=r"cold start child failed \(1\): .*no model here"):
        first_answer("import sys\nsys.exit('no model here')\n", [], {})


def test_dev_server_ratios_are_each_rounds_own_and_its_p50s_pool_the_rounds() -> None:
    # One round stalls on its kept-alive connection (40 ms against 10); two do not (11 against 10).
    per_round = [
        _dev_server_round(keep_alive=0.040),
        _dev_server_round(keep_alive=0.011),
        _dev_server_round(0.011),
    ]

    summary = summarize_dev_server(per_round)
    row = summary["torchscript"]

    assert row["keep_alive_over_new_connection"] == pytest.approx(1.1)
    assert row["keep_alive_p50_ms"] == pytest.approx(11.0)
    assert row["new_connection_over_parts"] == pytest.approx(0.010 / (0.003 + 0.005))
    assert row["fresh_thread_over_parts"] == pytest.approx(0.009 / (0.003 + 0.005))


def test_a_stalling_dev_server_misses_its_keep_alive_target() -> None:
    summary = summarize_dev_server([_dev_server_round(keep_alive=0.050)])

    met = {name: met for name, _, _, met in targets({"dev_server": summary})}

    assert met["onnx: dev server, keep-alive / new connection, 640x480"] is False
    assert met["torchscript: fresh thread / (decode+preprocess+forward), 640x480"] is True


def _dev_server_round(keep_alive: float) -> dict[str, list[float]]:
    """One dev-server round: 10 ms on a new connection, 9 ms on a fresh thread, 3 + 5 ms of parts."""
    samples = {"parts": [0.003]}
    for backend in BACKENDS:
        samples |= {
            f"forward {backend}": [0.005],
            f"keep_alive {backend}": [keep_alive],
            f"new_connection {backend}": [0.010],
            f"fresh_thread {backend}": [0.009],
        }
    return samples


def _round(e2e: list[float]) -> dict[str, list[float]]:
    """One round's samples: ``e2e`` for every end-to-end key, a flat 5 ms for everything else."""
    samples = {f"e2e {backend} {size}": e2e for backend in BACKENDS for size in SIZES}
    flat = [f"forward {b}" for b in BACKENDS] + [f"{kind} {s}" for kind in ("parts", "naive") for s in SIZES]
    return samples | {key: [0.005] for key in flat}
