"""Benchmark: how fast the command line answers and how long ``run`` takes to start working.

Measured as a user meets them, each command a fresh process (``.venv/bin/prostate-cohort``):

* ``prostate-cohort --help``: wall time, median of 5;
* ``prostate-cohort run`` on a one-exam cohort (a folder with a symbolic link to the real
  exam ProstateX-0000, ``--follow-symlinks``; the default model, TAPS on real exams): the
  time from starting the process to the first step's start as the provenance database
  records it (imports, settings, the temporary Prefect server, discovery, model checks),
  the sum of the step times and the whole command's wall time;
* ``prostate-cohort status`` on that output and, with ``--status-output DIR``, on another
  output tree (e.g. a 10-exam demo output): wall time, median of 5.

Usage::

    .venv/bin/python benchmarks/bench_startup.py [--status-output demo-output]

Writes ``benchmarks/results/startup.json`` and ``startup.md``.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.io import write_json_atomic, write_text_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CLI = HERE.parent / ".venv" / "bin" / "prostate-cohort"
EXAM = HERE.parents[1] / "shared" / "data" / "dicom" / "ProstateX-0000"


def wall(args: list[str], repeats: int = 1) -> float:
    """Median wall seconds of ``prostate-cohort ARGS`` (output discarded; must succeed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([str(CLI), *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def run_one_exam(work: Path) -> dict[str, Any]:
    """``run`` on a one-exam cohort; start-up = process start -> first step's start."""
    cohort, output = work / "cohort", work / "output"
    cohort.mkdir()
    (cohort / "exam-1").symlink_to(EXAM, target_is_directory=True)
    began = datetime.now(UTC)
    start = time.perf_counter()
    subprocess.run(
        [str(CLI), "run", str(cohort), "--follow-symlinks", "--output", str(output)],
        check=True,
        capture_output=True,
    )
    total = time.perf_counter() - start
    with sqlite3.connect(output / "provenance.sqlite") as db:
        rows = db.execute("SELECT step, started_at, duration_s FROM step_run").fetchall()
    first = min(_utc(started) for _, started, _ in rows)
    return {
        "startup_s": round((first - began).total_seconds(), 3),
        "steps_s": round(sum(d or 0.0 for *_, d in rows), 3),
        "command_s": round(total, 3),
        "steps": {step: round(d or 0.0, 3) for step, _, d in rows},
        "output": output,
    }


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [
        "# Command line: answer and start-up times",
        "",
        "`benchmarks/bench_startup.py`: each command a fresh process, as a user runs it.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| `prostate-cohort --help` (median of 5) | {report['help_s']:.2f} |",
        f"| `run` on one real exam: process start -> first step starts | {run['startup_s']:.2f} |",
        f"| `run`: the steps themselves (sum of step times) | {run['steps_s']:.2f} |",
        f"| `run`: the whole command (ends with the Prefect server stopped) "
        f"| {run['command_s']:.2f} |",
        f"| `status` on that one-exam output (median of 5) | {report['status_one_s']:.2f} |",
    ]
    if report.get("status_other"):
        other = report["status_other"]
        lines.append(
            f"| `status` on {other['patients']} exams ({other['what']}, median of 5) "
            f"| {other['seconds']:.2f} |"
        )
    lines += [
        "",
        "Step times of the `run` (s): "
        + ", ".join(f"{step} {seconds:.2f}" for step, seconds in run["steps"].items()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status-output", type=Path, help="another output tree for status")
    args = parser.parse_args()
    report: dict[str, Any] = {"help_s": wall(["--help"], repeats=5)}
    with tempfile.TemporaryDirectory() as tmp:
        run = run_one_exam(Path(tmp))
        report["status_one_s"] = wall(["status", "--output", str(run.pop("output"))], 5)
        report["run"] = run
    if args.status_output:
        with sqlite3.connect(args.status_output / "provenance.sqlite") as db:
            (patients,) = db.execute("SELECT COUNT(*) FROM patient").fetchone()
        report["status_other"] = {
            "what": args.status_output.name,
            "patients": patients,
            "seconds": wall(["status", "--output", str(args.status_output)], 5),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "startup.json", report)
    write_text_atomic(RESULTS / "startup.md", markdown(report))


if __name__ == "__main__":
    main()
