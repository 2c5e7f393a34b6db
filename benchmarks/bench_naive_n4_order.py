"""Benchmark: why the naive script of ``bench_cohort.py`` runs N4 before diffusion.

SimpleITK's N4 at its true defaults (4 levels x 50 iterations, convergence 0.001, no mask)
on the T2 of the real exam ProstateX-0000, one thread, after three preprocessings:

* ``diffused, time step 0.0625``: curvature anisotropic diffusion at SimpleITK's default
  step (ITK warns it is unstable at this spacing), 5 iterations, conductance 1;
* ``diffused, stable time step``: the same at min(spacing) / 2**(dim+1);
* ``ingested``: the T2 as read, N4 capped at 5 iterations per level so the script stays
  short (the uncapped run is ``bench_cohort.py``'s naive N4).

Per row: iterations run per level, seconds, the range of log intensities N4 fits on, and
the 1st / 99th percentile of the fitted field over the voxels brighter than the image mean
(``cohort_chains._field_spread``, the same figure ``bench_cohort.py`` reports). A field at
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
from cohort_chains import _field_spread

from tasks.discover import discover_exams
from tasks.io import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
EXAM = "ProstateX-0000"


def diffuse(image: sitk.Image, time_step: float | None) -> sitk.Image:
    """SimpleITK curvature anisotropic diffusion, 5 iterations, conductance 1."""
    diffusion = sitk.CurvatureAnisotropicDiffusionImageFilter()
    if time_step is not None:
        diffusion.SetTimeStep(time_step)
    diffusion.SetNumberOfIterations(5)
    diffusion.SetConductanceParameter(1.0)
    return diffusion.Execute(image)


def n4(image: sitk.Image, cap: int | None) -> dict[str, Any]:
    """N4 at SimpleITK's defaults (optionally capped per level); what it did."""
    n4_filter = sitk.N4BiasFieldCorrectionImageFilter()
    if cap is not None:
        n4_filter.SetMaximumNumberOfIterations([cap] * 4)
    levels: dict[int, int] = {}

    def count() -> None:
        levels[n4_filter.GetCurrentLevel()] = levels.get(n4_filter.GetCurrentLevel(), 0) + 1

    n4_filter.AddCommand(sitk.sitkIterationEvent, count)
    start = time.perf_counter()
    n4_filter.Execute(image)
    seconds = time.perf_counter() - start
    field = sitk.Exp(n4_filter.GetLogBiasFieldAsImage(image))
    values = sitk.GetArrayViewFromImage(image)
    log_values = np.log(values[values > 0])
    return {
        "iterations_run": [levels[k] for k in sorted(levels)],
        "iteration_cap": cap,
        "seconds": round(seconds, 1),
        "log_intensity_range": [round(float(v), 1) for v in (log_values.min(), log_values.max())],
        "field_p1_p99": _field_spread(field, image),
        "last_convergence": round(float(n4_filter.GetCurrentConvergenceMeasurement()), 6),
    }


def main() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    (exam,) = [e for e in discover_exams(DATA) if e.folder.startswith(EXAM + "/")]
    with tempfile.TemporaryDirectory() as tmp:
        t2 = sitk.Cast(load_exam(DATA, exam, Path(tmp))["t2"], sitk.sitkFloat32)
    stable = min(t2.GetSpacing()) / 2 ** (t2.GetDimension() + 1)
    rows = [
        {"input": "diffused, time step 0.0625", **n4(diffuse(t2, None), None)},
        {"input": f"diffused, stable time step {stable:g}", **n4(diffuse(t2, stable), None)},
        {"input": "ingested", **n4(t2, 5)},
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
