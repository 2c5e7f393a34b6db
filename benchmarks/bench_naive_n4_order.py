"""Benchmark: why the naive script of ``bench_cohort.py`` runs N4 before diffusion.

SimpleITK's N4 at its true defaults (4 levels x 50 iterations, convergence 0.001, no mask)
on the T2 of the real exam ProstateX-0000, one thread, after three preprocessings:

* ``diffused, time step 0.0625``: curvature anisotropic diffusion at SimpleITK's default
  step (ITK warns it is unstable at this spacing), at the pipeline's iterations and
  conductance (``cohort_chains.default_diffusion``, as the naive script runs it);
* ``diffused, stable time step``: the same at ``tasks.denoise.stable_time_step``;
* ``ingested``: the T2 as read, N4 capped at 5 iterations per level so the script stays
  short (the uncapped run is ``bench_cohort.py``'s naive N4).

Per row: iterations run per level, seconds, the range of log intensities N4 fits on, and
the 1st / 99th percentile of the fitted field over the voxels brighter than the image mean
(``cohort_chains.field_spread``, the same figure ``bench_cohort.py`` reports). A field at
[1, 1] corrected nothing.

Usage::

    .venv/bin/python benchmarks/bench_naive_n4_order.py

Writes ``benchmarks/results/naive_n4_order.json`` and ``naive_n4_order.md``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from bench_preprocess import DATA, load_exam
from cohort_chains import default_diffusion, default_n4, field_spread

from tasks.denoise import stable_time_step
from tasks.discover import discover_exams
from tasks.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
EXAM = "ProstateX-0000"


def n4_row(image: sitk.Image, cap: int | None) -> dict[str, Any]:
    """N4 at SimpleITK's defaults (optionally capped per level); what it did."""
    start = time.perf_counter()
    run = default_n4(image, None if cap is None else [cap] * 4)
    seconds = time.perf_counter() - start
    values = sitk.GetArrayViewFromImage(image)
    log_values = np.log(values[values > 0])
    return {
        "iterations_run": run["iterations_run"],
        "iteration_cap": cap,
        "seconds": round(seconds, 1),
        "log_intensity_range": [round(float(v), 1) for v in (log_values.min(), log_values.max())],
        "field_p1_p99": field_spread(run["field"], image),
        "last_convergence": round(run["last_convergence"], 6),
    }


def main() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    (exam,) = [e for e in discover_exams(DATA) if e.folder.startswith(EXAM + "/")]
    with tempfile.TemporaryDirectory() as tmp:
        t2 = sitk.Cast(load_exam(DATA, exam, Path(tmp))["t2"], sitk.sitkFloat32)
    stable = stable_time_step(t2.GetSpacing())
    rows = [
        {
            "input": "diffused, time step 0.0625",
            **n4_row(default_diffusion(t2, stable=False), None),
        },
        {
            "input": f"diffused, stable time step {stable:g}",
            **n4_row(default_diffusion(t2, stable=True), None),
        },
        {"input": "ingested", **n4_row(t2, 5)},
    ]
    write_json_atomic(RESULTS / "naive_n4_order.json", {"exam": EXAM, "rows": rows})
    lines = [
        f"# Naive N4 before or after diffusion ({EXAM} T2, one thread)",
        "",
        "Written by `benchmarks/bench_naive_n4_order.py`. N4 at SimpleITK's defaults, no mask.",
        "",
        "| N4 input | iterations per level (cap) | s | log intensity range | "
        "field p1 / p99 in body | last convergence |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['input']} | {row['iterations_run']} ({row['iteration_cap'] or 50}) | "
            f"{row['seconds']} | {row['log_intensity_range']} | {row['field_p1_p99']} | "
            f"{row['last_convergence']} |"
        )
    write_text_atomic(RESULTS / "naive_n4_order.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
