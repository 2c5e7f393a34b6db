"""Issue 18's targets in ``benchmarks/bench_cohort.py``: met only if every exam meets them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench_cohort() -> Iterator[Any]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("bench_cohort")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _row(exam: str, excluding: float, total: float, cpu_factor: float = 1.0) -> dict[str, Any]:
    def cost(wall: float) -> dict[str, float]:
        return {"wall_s": wall, "cpu_s": wall * cpu_factor}

    return {"exam": exam, "excluding_segment": cost(excluding), "total": cost(total)}


def test_speedups_are_judged_per_exam_not_on_the_mean(bench_cohort: Any) -> None:
    ours = [_row("A", 10.0, 50.0), _row("B", 12.0, 150.0)]
    # A: 50x / 10x; B: 20x / 2x. The mean whole exam (1100 / 100 s = 11x) would pass.
    naive = [_row("A", 500.0, 500.0, 2.0), _row("B", 240.0, 300.0, 2.0)]
    time_limit, excluding, whole = bench_cohort.targets(ours, naive, "real", 1, False)
    assert time_limit["met"] is True
    assert excluding["met"] is True
    assert "A 50.00x" in excluding["measured"] and "B 20.00x" in excluding["measured"]
    assert whole["met"] is False
    assert "B 2.00x (300.0 s / 150.0 s)" in whole["measured"]
    assert whole["note"] == "CPU time: A 20.00x, B 4.00x"


def test_time_limit_fails_on_one_slow_exam_and_needs_one_thread(bench_cohort: Any) -> None:
    ours = [_row("A", 9.0, 50.0), _row("B", 15.5, 60.0)]
    naive = [_row("A", 500.0, 500.0), _row("B", 500.0, 500.0)]
    assert bench_cohort.targets(ours, naive, "real", 1, False)[0]["met"] is False
    assert bench_cohort.targets(ours, naive, "real", 2, False)[0]["met"] is None
    capped = bench_cohort.targets(ours, naive, "real", 1, True)
    assert capped[1]["note"].endswith(bench_cohort.LOWER_BOUND_NOTE)
