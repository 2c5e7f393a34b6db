"""Benchmark: ingest of the real ProstateX exams, next to a straightforward baseline.

Ours: ``tasks.ingest.ingest_exam`` (headers only for classification, pixel data only for
the series used, checks, float32 NIfTI written with sha256).
Baseline, measured in the same run on the same files: what a researcher would write with
the same library at its defaults — SimpleITK's ``ImageSeriesReader`` reading every series
of the exam with its pixel data (GDCM sorts and groups), no checks, nothing written.

Usage::

    .venv/bin/python benchmarks/bench_ingest.py [--repeats 3]

Writes ``benchmarks/results/ingest.json`` and ``ingest.md``. Needs ``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from tasks.discover import discover_exams
from tasks.ingest import ingest_exam

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
RESULTS = Path(__file__).resolve().parent / "results"


def _baseline(exam_dir: Path) -> int:
    """Read every series under ``exam_dir`` with SimpleITK defaults; return voxels read."""
    voxels = 0
    for folder in sorted({p.parent for p in exam_dir.rglob("*.dcm")}):
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
            image = sitk.ReadImage(names)
            voxels += image.GetNumberOfPixels()
    return voxels


def _time(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"benchmark needs the real exams in {DATA}; not found")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    rows = []
    for exam in discover_exams(DATA):
        ours, base = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as out:
                ours.append(_time(lambda e=exam, o=out: ingest_exam(e, out_dir=o, key="bench")))
            base.append(_time(lambda e=exam: _baseline(DATA / e.folder)))
        ours_wall = statistics.median(w for w, _ in ours)
        base_wall = statistics.median(w for w, _ in base)
        rows.append(
            {
                "exam": exam.folder,
                "ours_wall_s": round(ours_wall, 3),
                "ours_cpu_s": round(statistics.median(c for _, c in ours), 3),
                "baseline_wall_s": round(base_wall, 3),
                "baseline_cpu_s": round(statistics.median(c for _, c in base), 3),
                "ours_over_baseline": round(ours_wall / base_wall, 2),
            }
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(
        json.dumps({"repeats": args.repeats, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "| exam | ours wall (s) | ours CPU (s) | baseline wall (s) | baseline CPU (s) "
        "| ours/baseline |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['exam']} | {r['ours_wall_s']} | {r['ours_cpu_s']} | {r['baseline_wall_s']} "
        f"| {r['baseline_cpu_s']} | {r['ours_over_baseline']} |"
        for r in rows
    ]
    (RESULTS / "ingest.md").write_text(
        f"Median of {args.repeats} runs, 1 ITK thread. Ours = classify from headers, read "
        "only the used series, check, write float32 NIfTI + sha256. Baseline = SimpleITK "
        "ImageSeriesReader reading every series with pixels, no checks, nothing written "
        "(it reads the interleaved multi-b DWI as ONE volume mixing b-values, with only a "
        "warning: fast, and wrong).\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
