"""Benchmark: per-exam cost of the pipeline ("ours") vs the straightforward script ("naive")
on the real ProstateX exams first, then on synthetic phantoms; issue 18's targets; the
projection to a 1,386-exam cohort.

Each variant runs in its own child process, exam after exam, as a pipeline worker or a
researcher's script would (``benchmarks/cohort_chains.py`` says exactly what "ours" and
"naive" run, ``benchmarks/cohort_measure.py`` how cost, memory and accuracy are measured,
``benchmarks/cohort_report.py`` writes the page). Per step (ingest, denoise, n4, register,
fit_maps or b1000 + adc, segment, volume, radiomics, qc) and per exam: wall time (s), CPU
time (s; all threads plus child processes) and peak resident memory (MB).

- **ours**: one worker at ``--threads`` threads (default 1: the setting of the issue's
  target and of the 16-core projection), segmentation model ``auto`` (TAPS on real exams,
  the demo nnU-Net on synthetic ones) loaded once. The worker passes over every exam
  ``--repeats`` times (default 3) while it stays warm; each exam's figures are the MEDIAN
  over its passes, per step and in total (so a first pass's one-off costs do not count),
  and every pass's total is reported as well.
- **naive**: the same libraries at their defaults, no thread settings, one pass (minutes
  per exam). Its N4 runs at SimpleITK's TRUE defaults: 4 levels x 50 iterations at full
  resolution, no mask. ``--naive-n4-iterations 1,1,1,1`` caps it and ``skip`` leaves it
  out (``--quick`` does); the JSON and the page then say the naive times are lower bounds.
- **2 workers at once** (``--two-workers``, default yes): two ours processes, one thread
  each, on the first exam at the same time; the "on this machine" projection uses it.

Exams: every real exam under ``../shared/data/dicom`` (``--real-exams 0``, the default; here
ProstateX-0000 and -0218, those with reference masks first) and ``--patients`` synthetic
phantoms (default 1; exact ground truth for the accuracy tables).

The page (``<output>/cohort.md``, with ``<output>/cohort.json``) leads with the real exams:
per real exam, ours vs naive for the whole exam (segmentation included) and excluding
segmentation, wall and CPU, the naive / ours ratio, peak memory per worker process, and
issue 18's targets with met / not met computed from the data; then the synthetic exams;
the projection to 1,386 exams on a 16-core host (CPU only, and with segmentation on a GPU)
and on this machine; per-exam and per-step tables; accuracy (ADC vs truth and vs the
scanner, Dice vs truth and vs the reference masks, TRE, N4 field r, radiomics).

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_cohort.py [--output benchmarks/results]
        [--real-exams 0] [--patients 1] [--repeats 3] [--threads 1]
        [--naive-n4-iterations default|skip|I1,I2,I3,I4] [--no-two-workers] [--quick]

Run time of the default run: 32.3 minutes measured on the shared 2-core machine (both real
exams, 1 synthetic exam, 3 passes of ours, naive N4 uncapped, the 2-worker pair); the naive
N4 (234 s and 483 s on the two real exams) and TAPS on ProstateX-0218 (2.5 minutes at one thread per
pass) are most of it.

``--quick``: ProstateX-0000 and one synthetic exam, one pass, the naive N4 skipped (naive
times are then lower bounds, and the page says so), no 2-worker run: 4.7 minutes measured
on the shared 2-core machine (1-minute load average 0.4-2.8).
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DATA = REPO.parent / "shared" / "data"
CHAINS = HERE / "cohort_chains.py"
COHORT = 1386
HOST_CORES = 16  # the projection's host: 16 workers at one thread each
N4_DEFAULT = [50, 50, 50, 50]  # SimpleITK N4BiasFieldCorrectionImageFilter's default
LOWER_BOUND_NOTE = "naive N4 capped or skipped: naive times and naive / ours are lower bounds"
TARGETS = {  # issue 18, per real exam, wall time
    "ours_excluding_segment_max_s": 15.0,  # at one thread
    "speedup_excluding_segment_min": 15.0,  # naive / ours
    "speedup_whole_exam_min": 4.0,  # naive / ours
}


# ------------------------------------------------------------------------------- exams


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


# ------------------------------------------------------------------------------ chains


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


def naive_n4(value: str) -> dict[str, Any]:
    """``--naive-n4-iterations``: ``default`` (uncapped), ``skip`` or a cap per level."""
    if value == "skip":
        return {
            "iterations": "skip",
            "setting": "skipped (the naive chain goes on with the uncorrected T2)",
            "lower_bound": True,
        }
    cap = None if value == "default" else [int(v) for v in value.split(",")]
    if cap is None or cap == N4_DEFAULT:
        return {
            "iterations": None,
            "setting": "SimpleITK defaults, uncapped: 4 levels x 50 iterations at full "
            "resolution, no mask",
            "lower_bound": False,
        }
    return {
        "iterations": cap,
        "setting": f"capped at {cap} iterations per level (SimpleITK defaults otherwise: "
        "full resolution, no mask)",
        "lower_bound": True,
    }


# ----------------------------------------------------------------------------- summary


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 and not (math.isnan(a) or math.isnan(b)) else None


def _round(value: float, digits: int = 2) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def kind_summary(ours: list[dict[str, Any]], naive: list[dict[str, Any]]) -> dict[str, Any]:
    """Per exam of one kind, mean over its exams (ours: each exam's median over its passes):
    wall and CPU s of the whole exam, of the exam excluding segmentation and of segmentation
    alone, for both variants, and naive / ours; the largest per-exam peak RSS of each."""
    parts = {
        "whole": lambda r: r["total"],
        "excluding_segment": lambda r: r["excluding_segment"],
        "segment": lambda r: r["steps"]["segment"],
    }
    out: dict[str, Any] = {"exams": [r["exam"] for r in ours]}
    for part, cost in parts.items():
        means = {
            variant: {k: _mean([cost(r)[k] for r in rows]) for k in ("wall_s", "cpu_s")}
            for variant, rows in (("ours", ours), ("naive", naive))
        }
        out[part] = {variant: {k: _round(v) for k, v in m.items()} for variant, m in means.items()}
        out[part]["naive_over_ours"] = {
            k: _ratio(means["naive"][k], means["ours"][k]) for k in ("wall_s", "cpu_s")
        }
    out["peak_rss_mb"] = {
        variant: max(r["total"]["peak_rss_mb"] for r in rows)
        for variant, rows in (("ours", ours), ("naive", naive))
    }
    return out


def targets(
    ours_rows: list[dict[str, Any]],
    naive_rows: list[dict[str, Any]],
    kind: str,
    threads: int,
    naive_lower_bound: bool,
) -> list[dict[str, Any]]:
    """Issue 18's targets on every exam of ``kind`` (real unless none ran; wall time), each
    with the measured figures and ``met`` (True / False; None where not measured as stated).

    ``ours_rows`` / ``naive_rows``: each variant's exams of ``kind`` (ours: each its median
    over the passes). A target is met only if it holds on every exam; the CPU-time ratios
    are given beside the wall ones (ours runs at ``threads``, naive at the libraries'
    default threads).
    """
    limit = TARGETS["ours_excluding_segment_max_s"]
    per_exam = {r["exam"]: r["excluding_segment"]["wall_s"] for r in ours_rows}
    rows = [
        {
            "target": f"ours excluding segmentation <= {limit:g} s on every {kind} exam, "
            "one thread",
            "measured": ", ".join(f"{name} {s:.1f} s" for name, s in per_exam.items())
            + f" at {threads} thread(s)",
            "met": (max(per_exam.values()) <= limit) if threads == 1 else None,
            "note": "" if threads == 1 else "ours did not run at one thread (--threads)",
        }
    ]
    naive_by_exam = {r["exam"]: r for r in naive_rows}
    pairs = [(r, naive_by_exam[r["exam"]]) for r in ours_rows if r["exam"] in naive_by_exam]
    for part, name, goal in (
        ("excluding_segment", "excluding segmentation", TARGETS["speedup_excluding_segment_min"]),
        ("total", "whole exam with segmentation", TARGETS["speedup_whole_exam_min"]),
    ):

        def ratio(o: dict[str, Any], n: dict[str, Any], clock: str, part: str = part) -> float:
            return n[part][clock] / o[part][clock]

        wall = [ratio(o, n, "wall_s") for o, n in pairs]
        rows.append(
            {
                "target": f"naive / ours >= {goal:g}x, {name}, on every {kind} exam",
                "measured": ", ".join(
                    f"{o['exam']} {ratio(o, n, 'wall_s'):.2f}x "
                    f"({n[part]['wall_s']:.1f} s / {o[part]['wall_s']:.1f} s)"
                    for o, n in pairs
                )
                or "n/a",
                "met": min(wall) >= goal if wall else None,
                "note": "CPU time: "
                + ", ".join(f"{o['exam']} {ratio(o, n, 'cpu_s'):.2f}x" for o, n in pairs)
                + (f"; {LOWER_BOUND_NOTE}" if naive_lower_bound else ""),
            }
        )
    return rows


def host_projection(
    ours: list[dict[str, Any]], naive: list[dict[str, Any]], basis: str
) -> dict[str, Any]:
    """:data:`COHORT` exams on a :data:`HOST_CORES`-core host, from measured CPU s per step.

    CPU only: one worker per core at one thread each, each exam costing the sum of ours'
    per-step CPU s (mean over the basis exams; segmentation at its CPU cost), so hours =
    N x sum / cores / 3600. With a GPU: segmentation moves to the GPU, so the CPU bound is
    N x (sum less segment) / cores / 3600, and one GPU must keep up with N segmentations,
    i.e. take at most (sum less segment) / cores s per segmentation; GPU hours = N x GPU s
    per segmentation / 3600, only where this run's ours segmented on a GPU (else not
    measured, and no figure is given). The naive figure is the same CPU bound from its CPU
    s per exam. Assumes CPU time per exam does not grow with one worker per core (memory
    bandwidth, disk) and leaves out orchestration overhead.
    """

    def per_exam_cpu(rows: list[dict[str, Any]], skip: str | None = None) -> float:
        return _mean([sum(c["cpu_s"] for s, c in r["steps"].items() if s != skip) for r in rows])

    cpu_all, cpu_excl = per_exam_cpu(ours), per_exam_cpu(ours, skip="segment")
    naive_cpu = per_exam_cpu(naive)
    on_gpu = bool(ours) and all(r.get("segment_gpu") for r in ours)
    gpu_s = _mean([r["steps"]["segment"]["wall_s"] for r in ours]) if on_gpu else None

    def hours(cpu_s: float) -> float | None:
        return _round(COHORT * cpu_s / HOST_CORES / 3600)

    gpu_hours = None if gpu_s is None else _round(COHORT * gpu_s / 3600)

    return {
        "patients": COHORT,
        "cores": HOST_CORES,
        "basis": basis,
        "model": " ".join(host_projection.__doc__.split("\n\n")[1].split()),
        "ours_cpu_per_exam_s": _round(cpu_all),
        "ours_cpu_per_exam_excluding_segment_s": _round(cpu_excl),
        "ours_segment_cpu_s": _round(cpu_all - cpu_excl),
        "cpu_only_hours": hours(cpu_all),
        "gpu_cpu_bound_hours": hours(cpu_excl),
        "gpu_segment_s": None if gpu_s is None else _round(gpu_s),
        "gpu_segment_hours": gpu_hours,
        # the GPU keeps up with the CPU bound if one segmentation takes at most this long
        "gpu_segment_budget_s": _round(cpu_excl / HOST_CORES),
        "gpu_hours": None if gpu_hours is None else max(gpu_hours, hours(cpu_excl) or 0.0),
        "gpu_note": "GPU segmentation time measured in this run: ours segmented on a GPU"
        if gpu_s is not None
        else "GPU segmentation time not measured (no GPU in this run)",
        "naive_cpu_per_exam_s": _round(naive_cpu),
        "naive_cpu_only_hours": hours(naive_cpu),
    }


def projection(
    ours: dict[str, Any],
    basis_rows: list[dict[str, Any]],
    two: dict[str, Any] | None,
    naive_rows: list[dict[str, Any]],
    naive_startup_s: float,
    cores: int,
) -> dict[str, Any]:
    """Time for :data:`COHORT` patients on this machine, by worker count.

    Model: ``T(N, W) = startup + ceil(N / W) x p(W) + N x overhead / W`` with ``p(W)`` the
    per-exam wall time when W workers run at once (W = 1: the mean over the basis exams of
    each one's median over ours' passes; W = 2: p(1) x the slowdown measured on the
    2-worker pair), ``startup`` a worker's one-off start and ``overhead`` Prefect's cost
    per patient from ``benchmarks/results/scale.json`` when it exists (else 0, and said
    so). ``W <= cores``. The CPU bound is ``N x CPU per exam / cores``.
    """
    p1 = _mean([r["total"]["wall_s"] for r in basis_rows])
    cpu1 = _mean([r["total"]["cpu_s"] for r in basis_rows])
    startup = ours["startup"]["wall_s"]
    scale_file = RESULTS / "scale.json"
    overhead_s, overhead_note = 0.0, "not included: benchmarks/results/scale.json is absent"
    if scale_file.is_file():
        scale = json.loads(scale_file.read_text())
        if "overhead_per_patient_s" in scale:
            overhead_s = max(0.0, scale["overhead_per_patient_s"])
            overhead_note = (
                f"{overhead_s:.2f} s per patient (benchmarks/results/scale.json, "
                f"{scale['workers']} workers)"
            )
    rows_out = []

    def row(workers: int, per_exam: float, basis: str) -> None:
        total = startup + math.ceil(COHORT / workers) * per_exam + COHORT * overhead_s / workers
        rows_out.append(
            {
                "workers": workers,
                "per_patient_wall_s": round(per_exam, 2),
                "patients_per_hour": round(3600 * workers / per_exam, 1),
                "cohort_hours": round(total / 3600, 2),
                "basis": basis,
            }
        )

    row(1, p1, "measured: 1 worker")
    slowdown = None
    if two is not None:
        alone = {r["exam"]: r["passes"][0]["total"]["wall_s"] for r in ours["exams"]}
        pair = [r for rep in two["reports"] for r in rep["exams"]]
        slowdown = _mean([r["total"]["wall_s"] / alone[r["exam"]] for r in pair])
        row(2, p1 * slowdown, f"measured: 2 workers at once, {slowdown:.2f}x slower each")
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
        "naive_sequential_hours": round((naive_startup_s + COHORT * naive_p) / 3600, 2),
        "naive_per_patient_wall_s": round(naive_p, 2),
        "naive_cpu_bound_hours": round(
            COHORT * _mean([r["total"]["cpu_s"] for r in naive_rows]) / cores / 3600, 2
        ),
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


# -------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the real exams in ../shared/data/dicom when present (default: yes)",
    )
    parser.add_argument(
        "--real-exams",
        type=int,
        default=0,
        help="how many real exams, those with reference masks first (default 0: all)",
    )
    parser.add_argument("--patients", type=int, default=1, help="synthetic exams (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic cohort seed")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="passes of ours over the exams in its warm worker; medians reported (default 3)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="threads of the ours worker (default 1)"
    )
    parser.add_argument(
        "--naive-n4-iterations",
        default=None,
        help="naive N4: 'default' (SimpleITK's, uncapped; the default), 'skip' (--quick's), "
        "or a cap per level such as 1,1,1,1 (naive times become lower bounds)",
    )
    parser.add_argument(
        "--two-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure 2 ours workers at once on the first exam (default: yes)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 real + 1 synthetic exam, 1 pass, naive N4 skipped, no 2 workers",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.patients, args.real_exams, args.repeats, args.two_workers = 1, 1, 1, False
    if args.naive_n4_iterations is None:
        args.naive_n4_iterations = "skip" if args.quick else "default"
    if args.patients < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--patients, --repeats and --threads must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    n4 = naive_n4(args.naive_n4_iterations)
    began = time.perf_counter()
    cores = os.cpu_count() or 1
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        work = Path(tmp)
        exams: list[dict[str, Any]] = []
        if args.real and (DATA / "dicom").is_dir():
            exams = real_exams(args.real_exams)
            left = len(real_exams(0)) - len(exams)
            if left:
                notes.append(
                    f"{left} more real exam(s) in ../shared/data/dicom not run (--real-exams "
                    f"{args.real_exams}; 0 runs all)"
                )
        elif args.real:
            notes.append("real exams skipped: ../shared/data/dicom is absent")
            print(f"note: {notes[-1]}", file=sys.stderr)
        else:
            notes.append("real exams not run (--no-real)")
        synthetic, generation_s = synthetic_exams(work / "syn", args.patients, args.seed)
        exams += synthetic
        ours_options = {"workers": 1, "threads": args.threads, "repeats": args.repeats}
        (ours,), ours_batch = run_chains([("ours", exams, ours_options)], work, "ours")
        naive_options = {"naive_n4_iterations": n4["iterations"]}
        (naive,), naive_batch = run_chains([("naive", exams, naive_options)], work, "naive")
        two = None
        if args.two_workers and cores >= 2:
            pair = {"workers": 2, "threads": 1, "repeats": 1}
            job = ("ours", [exams[0]], pair)
            reports, batch = run_chains([job, job], work, "two")
            two = {"exam": exams[0]["name"], "reports": reports, "batch": batch}
        elif args.two_workers:
            notes.append("2-worker run skipped: needs >= 2 cores")
    by_kind = {
        kind: (
            [r for r in ours["exams"] if r["kind"] == kind],
            [r for r in naive["exams"] if r["kind"] == kind],
        )
        for kind in ("real", "synthetic")
    }
    summary = {kind: kind_summary(*rows) for kind, rows in by_kind.items() if rows[0]}
    basis = "real" if "real" in summary else "synthetic"
    if basis != "real":
        notes.append("no real exam ran: the headline targets and projections use synthetic ones")
    report = {
        "command": "python benchmarks/bench_cohort.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "synthetic_patients": args.patients,
        "seed": args.seed,
        "generation_s": round(generation_s, 1),
        "repeats": args.repeats,
        "ours_threads": ours["startup_info"]["threads_per_worker"],
        "naive_n4": n4,
        "memory_method": ours["memory_method"],
        "targets_basis": basis,
        "summary": summary,
        "targets": targets(
            *by_kind[basis],
            basis,
            ours["startup_info"]["threads_per_worker"],
            n4["lower_bound"],
        ),
        "ours": ours | {"batch": ours_batch},
        "naive": naive | {"batch": naive_batch},
        "two_workers": two,
        "host_projection": host_projection(*by_kind[basis], basis),
        "projection": projection(
            ours, by_kind[basis][0], two, by_kind[basis][1], naive["startup"]["wall_s"], cores
        ),
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
