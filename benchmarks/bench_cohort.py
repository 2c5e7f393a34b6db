"""Benchmark: per-patient cost of the whole pipeline vs the straightforward script, and the
projection to a 1,386-patient cohort on this machine.

One command measures, on synthetic exams (``phantom/`` phantoms, exact ground
truth) and on the real ProstateX exams in ``../shared/data/dicom`` when that folder exists,
for every step (ingest, b1000, denoise, n4, register, adc, segment, volume, radiomics, qc)
and every patient: wall time (s), CPU time (s; process time of all threads plus child
processes) and peak resident memory (MB). Each variant runs in its own child process,
patient after patient, as a pipeline worker or a researcher's script would; see
``benchmarks/cohort_chains.py`` for exactly what "ours" and "naive" run and
``benchmarks/cohort_measure.py`` for how cost, memory and accuracy are measured (the page
itself is ``benchmarks/cohort_report.py``). Accuracy of both: ADC error vs the true ADC,
Dice vs the true gland, TRE of both registrations, bias-field correlation (synthetic);
agreement with the scanner ADC and Dice vs the reference masks (real). Two workers (two
processes, one patient each, at the same time) give the 2-worker throughput that the
projection uses.

Naive N4 at its defaults (4 levels x 50 iterations at full resolution) costs about 13
CPU-minutes on one 384x384x20 T2 (``benchmarks/results/preprocess.md``), more than this
whole benchmark; by default it runs with every default except the iteration cap
(``--naive-n4-iterations``, default 1 per level: the 4 levels at full resolution, one
iteration each), which makes its time a LOWER bound of the default's. ``--naive-n4-full``
runs the real default on every exam (budget about 15-40 minutes per exam on 2 cores).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_cohort.py [--patients 2] [--real/--no-real]
        [--real-exams 1] [--quick] [--output benchmarks/results] [--no-two-workers]
        [--naive-n4-iterations 1,1,1,1] [--naive-n4-full]

Defaults: 2 synthetic exams and 1 real exam (ProstateX-0000, the one with reference masks),
chosen so the run fits in about 25 minutes on the shared 2-core machine: 13 minutes
measured at a load average of 2.5-4; all four exams (``--real-exams 0``) took 35 minutes
at a load of about 6 (TAPS alone needs about 4 CPU-minutes on ProstateX-0218's T2).

``--quick``: one synthetic exam, no real exams, no 2-worker run, and the naive N4 skipped
(the naive chain goes on with the uncorrected T2): 2.5 minutes measured on the shared
2-core machine at a load average of about 2, 4.7 minutes at 3-4 (2.5-2.8 CPU-minutes).
Writes ``<output>/cohort.json`` and ``<output>/cohort.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cohort_report import STEPS  # beside this file: one list of the steps reported

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DATA = REPO.parent / "shared" / "data"
COHORT = 1386
CHAINS = HERE / "cohort_chains.py"
TASK_RUNS_PER_PATIENT = 9  # ingest, b1000, denoise, n4, register, adc, segment, radiomics, qc


def real_exams(limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` real exams under ``../shared/data/dicom`` (0: all), those with
    reference gland masks (``../shared/data/labels/<exam>/gland_*.nii.gz``) first."""
    root = DATA / "dicom"
    exams: list[dict[str, Any]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        labels = DATA / "labels" / folder.name
        references = (
            sorted(str(p) for p in labels.glob("gland_*.nii.gz")) if labels.is_dir() else []
        )
        exams.append(
            {
                "name": folder.name,
                "kind": "real",
                "root": str(root),
                "folder": folder.name,
                "references": references,
            }
        )
    exams.sort(key=lambda e: (not e["references"], e["name"]))
    return exams[:limit] if limit > 0 else exams


def synthetic_exams(root: Path, n: int, seed: int) -> tuple[list[dict[str, Any]], float]:
    """Generate ``n`` phantoms (``plan_exam(seed, i)``); return the manifest rows and the
    generation wall time (s, not part of any chain)."""
    from phantom.exam import generate_exam
    from phantom.plan import plan_exam

    start = time.perf_counter()
    exams = []
    for index in range(n):
        generated = generate_exam(root, plan_exam(seed, index))
        exams.append(
            {
                "name": generated.patient_folder,
                "kind": "synthetic",
                "root": str(root / "dicom"),
                "folder": generated.patient_folder,
                "truth_dir": str(generated.truth_dir),
                "references": [],
            }
        )
    return exams, time.perf_counter() - start


def start_chain(variant: str, exams: list[dict[str, Any]], work: Path, tag: str, **options: Any):
    """Start one child process running ``variant`` over ``exams``; return (process, out)."""
    manifest = work / f"manifest-{tag}.json"
    out = work / f"result-{tag}.json"
    manifest.write_text(json.dumps({"work": str(work), "exams": exams} | options))
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(CHAINS), variant, str(manifest), str(out)]
    return subprocess.Popen(command, env=env, cwd=REPO), out


def run_chains(jobs: list[tuple[str, list[dict[str, Any]], dict[str, Any]]], work: Path, tag: str):
    """Run the jobs as concurrent child processes; return their reports and the wall time,
    CPU time (all children, s) and load average around the batch."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    started = [
        start_chain(variant, exams, work, f"{tag}-{i}", **options)
        for i, (variant, exams, options) in enumerate(jobs)
    ]
    for process, _ in started:
        if process.wait() != 0:
            raise RuntimeError(f"a {tag} chain failed (exit {process.returncode}); see above")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    reports = [json.loads(out.read_text()) for _, out in started]
    batch = {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    return reports, batch


# ------------------------------------------------------------------------------ summary


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def step_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean wall / CPU / peak RSS per step over ``rows`` (exams), plus ``"patient"``."""
    out: dict[str, dict[str, float]] = {}
    for step in (*STEPS, "patient"):
        costs = [r["total"] if step == "patient" else r["steps"].get(step) for r in rows]
        costs = [c for c in costs if c is not None]
        if costs:
            out[step] = {
                k: round(_mean([c[k] for c in costs]), 3)
                for k in ("wall_s", "cpu_s", "peak_rss_mb")
            }
    return out


def projection(
    ours: dict[str, Any], two: dict[str, Any] | None, naive: dict[str, Any], cores: int
) -> dict[str, Any]:
    """Time for :data:`COHORT` patients on this machine, by worker count.

    Model: ``T(N, W) = startup + ceil(N / W) x p(W) + N x task_runs x overhead / W`` with
    ``p(W)`` the per-patient wall time when W workers run at once (W = 1: the mean over
    every exam of the ours run; W = 2: p(1) x the slowdown measured on the 2-worker pair),
    ``startup`` a worker's one-off start and ``overhead`` Prefect's cost per task run from
    ``benchmarks/results/scale.json`` when it exists (else 0, and said so). ``W <= cores``
    (one thread per worker at W = cores). The CPU bound is ``N x CPU per patient / cores``.
    """
    rows = ours["exams"]
    p1 = _mean([r["total"]["wall_s"] for r in rows])
    cpu1 = _mean([r["total"]["cpu_s"] for r in rows])
    startup = ours["startup"]["wall_s"]
    scale_file = RESULTS / "scale.json"
    overhead_s, overhead_note = 0.0, "not included: benchmarks/results/scale.json is absent"
    if scale_file.is_file():
        scale = json.loads(scale_file.read_text())
        overhead_s = max(0.0, scale["overhead_per_task_run_ms"] / 1000.0)
        overhead_note = (
            f"{scale['overhead_per_task_run_ms']:.0f} ms per task run "
            f"(benchmarks/results/scale.json, {scale['workers']} workers)"
        )
    rows_out = []

    def row(workers: int, per_patient: float, basis: str) -> None:
        batches = math.ceil(COHORT / workers)
        total = (
            startup + batches * per_patient + COHORT * TASK_RUNS_PER_PATIENT * overhead_s / workers
        )
        rows_out.append(
            {
                "workers": workers,
                "per_patient_wall_s": round(per_patient, 2),
                "patients_per_hour": round(3600 * workers / per_patient, 1),
                "cohort_hours": round(total / 3600, 2),
                "basis": basis,
            }
        )

    row(1, p1, "measured: 1 worker, mean over all exams")
    slowdown = None
    if two is not None:
        pair = {r["exam"]: r["total"]["wall_s"] for rep in two["reports"] for r in rep["exams"]}
        alone = {r["exam"]: r["total"]["wall_s"] for r in rows if r["exam"] in pair}
        slowdown = _mean([pair[e] / alone[e] for e in alone])
        if cores >= 2:
            row(2, p1 * slowdown, f"measured: 2 workers at once, {slowdown:.2f}x slower each")
    naive_rows = naive["exams"]
    naive_p = _mean([r["total"]["wall_s"] for r in naive_rows])
    return {
        "patients": COHORT,
        "cores": cores,
        "model": " ".join(projection.__doc__.split("\n\n")[1].split()),
        "startup_s": round(startup, 2),
        "orchestration_overhead": overhead_note,
        "two_worker_slowdown": None if slowdown is None else round(slowdown, 3),
        "two_worker_efficiency": None if slowdown is None else round(1 / slowdown, 3),
        "rows": rows_out,
        "cpu_bound_hours": round(COHORT * cpu1 / cores / 3600, 2),
        "cpu_per_patient_s": round(cpu1, 2),
        "naive_sequential_hours": round((naive["startup"]["wall_s"] + COHORT * naive_p) / 3600, 2),
        "naive_per_patient_wall_s": round(naive_p, 2),
    }


def machine() -> dict[str, Any]:
    """This machine: cores, memory (GB), Python."""
    pages = (
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    )
    return {
        "cores": os.cpu_count(),
        "memory_gb": round(pages / 1e9, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2, help="synthetic exams (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic cohort seed")
    parser.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the real exams in ../shared/data/dicom when present (default: yes)",
    )
    parser.add_argument(
        "--real-exams",
        type=int,
        default=1,
        help="how many real exams, those with reference masks first (default 1; 0: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 synthetic exam, no real exams, no 2-worker run, naive N4 skipped",
    )
    parser.add_argument(
        "--two-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure 2 workers at once on the first two synthetic exams (default: yes)",
    )
    parser.add_argument("--naive-n4-iterations", default="1,1,1,1")
    parser.add_argument("--naive-n4-full", action="store_true", help="naive N4 uncapped")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.patients, args.real, args.two_workers = 1, False, False
    if args.patients < 1:
        parser.error("--patients must be >= 1")
    cap: list[int] | str | None = [int(v) for v in args.naive_n4_iterations.split(",")]
    if args.naive_n4_full:
        cap = None
    elif args.quick:
        cap = "skip"
    began = time.perf_counter()
    cores = os.cpu_count() or 1
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        work = Path(tmp)
        exams, generation_s = synthetic_exams(work / "syn", args.patients, args.seed)
        if args.real and (DATA / "dicom").is_dir():
            real = real_exams(args.real_exams)
            exams += real
            left = len(real_exams(0)) - len(real)
            if left:
                notes.append(
                    f"{left} more real exam(s) in ../shared/data/dicom not run (--real-exams "
                    f"{args.real_exams}; --real-exams 0 runs all)"
                )
        elif args.real:
            notes.append("real exams skipped: ../shared/data/dicom is absent")
            print(f"note: {notes[-1]}", file=sys.stderr)
        else:
            notes.append("real exams not run (--no-real or --quick)")
        options = {"workers": 1, "naive_n4_iterations": cap}
        (ours,), ours_batch = run_chains([("ours", exams, options)], work, "ours")
        (naive,), naive_batch = run_chains([("naive", exams, options)], work, "naive")
        two = None
        synthetic = [e for e in exams if e["kind"] == "synthetic"]
        if args.two_workers and len(synthetic) >= 2 and cores >= 2:
            pair = {"workers": 2, "naive_n4_iterations": cap}
            reports, batch = run_chains(
                [("ours", [synthetic[0]], pair), ("ours", [synthetic[1]], pair)], work, "two"
            )
            two = {"reports": reports, "batch": batch}
        elif args.two_workers:
            notes.append("2-worker run skipped: needs >= 2 synthetic exams and >= 2 cores")
    report = {
        "command": "python benchmarks/bench_cohort.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "synthetic_patients": args.patients,
        "seed": args.seed,
        "generation_s": round(generation_s, 1),
        "naive_n4_iterations": cap or "defaults (50, 50, 50, 50)",
        "memory_method": ours["memory_method"],
        "ours": ours | {"batch": ours_batch},
        "naive": naive | {"batch": naive_batch},
        "two_workers": two,
        "projection": projection(ours, two, naive, cores),
        "notes": notes,
        "benchmark_wall_s": round(time.perf_counter() - began, 1),
    }
    from cohort_report import markdown  # noqa: PLC0415 - beside this file

    from tasks.io import write_json_atomic, write_text_atomic

    args.output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output / "cohort.json", report)
    write_text_atomic(args.output / "cohort.md", markdown(report, RESULTS / "preprocess.json"))
    print((args.output / "cohort.md").read_text())


if __name__ == "__main__":
    main()
