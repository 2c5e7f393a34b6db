"""Benchmark: the grid and iterations N4 fits on, time against field accuracy.

For each setting of :class:`tasks.bias.N4Params` below, N4 runs on the denoised T2 and DWI
(one field from the lowest b), as in the chain, of the real exams ProstateX-0000 and -0218
and of 2 phantom exams (seed 0), one thread, all settings on the same images in the same
run; then the shipped registration (:func:`tasks.chain.register_exam`) runs on the corrected
images and the T2 <-> DWI stage it accepts is recorded. Accuracy:

* phantom: correlation of the log field with the generator's true log field in the body
  (:func:`bench_preprocess.field_accuracy`);
* real exams (no true field): correlation with the field of the first setting, inside the
  Otsu body mask, and the similarity of the T2 field to the DWI field of the same exam.
  The receive coil is the same for both series, so two independent fits that agree are
  more likely both right; the DWI field is mapped onto the T2 grid by the scanner
  coordinates (the series share them).

Usage::

    .venv/bin/python benchmarks/bench_n4_grid.py [--synthetic-exams 2]

Writes ``benchmarks/results/n4_grid.json`` and ``n4_grid.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from bench_preprocess import DATA, field_accuracy, load_exam

from flows.resources import apply_thread_limits
from phantom.exam import generate_exam
from phantom.plan import plan_exam
from tasks.bias import N4Params, correct_bias_dwi, correct_bias_n4, foreground_mask
from tasks.chain import register_exam
from tasks.denoise import SusanParams, T2DenoiseParams, denoise_dwi, denoise_t2
from tasks.discover import discover_exams
from tasks.io import write_json_atomic, write_text_atomic
from tasks.register import RegistrationParams, warm_up

RESULTS = Path(__file__).resolve().parent / "results"
REAL_EXAMS = ("ProstateX-0000", "ProstateX-0218")
#: name -> N4Params overrides; the first is the reference of the real-exam correlations.
SETTINGS: dict[str, dict[str, Any]] = {
    "4 mm grid, 50 it/level": {"target_spacing_mm": 4.0, "iterations": (50, 50, 50)},
    "8 mm grid, 50 it/level": {"target_spacing_mm": 8.0, "iterations": (50, 50, 50)},
    "8 mm grid, 20 it/level": {"target_spacing_mm": 8.0, "iterations": (20, 20, 20)},
    "4 mm grid, 20 it/level": {"target_spacing_mm": 4.0, "iterations": (20, 20, 20)},
    "12 mm grid, 50 it/level": {"target_spacing_mm": 12.0, "iterations": (50, 50, 50)},
}


def _correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    x, y = a[where] - a[where].mean(), b[where] - b[where].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _log(image: sitk.Image) -> np.ndarray:
    return np.log(sitk.GetArrayFromImage(image).astype(np.float64))


def run_exam(images: dict[str, Any], truth: Path | None) -> list[dict[str, Any]]:
    """Every setting on one exam: seconds and field accuracy."""
    t2 = denoise_t2(images["t2"], params=T2DenoiseParams())
    dwi = denoise_dwi(images["dwi"], params=SusanParams())
    low = min(dwi)
    body = {
        "t2": sitk.GetArrayFromImage(foreground_mask(t2)) > 0,
        "dwi": sitk.GetArrayFromImage(foreground_mask(dwi[low])) > 0,
    }
    rows, reference = [], {}
    for name, overrides in SETTINGS.items():
        params = N4Params(**overrides)
        start = time.perf_counter()
        t2_corrected, t2_field = correct_bias_n4(t2, params=params)
        t2_s = time.perf_counter() - start
        start = time.perf_counter()
        dwi_corrected, dwi_field = correct_bias_dwi(dwi, params=params)
        dwi_s = time.perf_counter() - start
        logs = {"t2": _log(t2_field), "dwi": _log(dwi_field)}
        reference = reference or logs
        dwi_on_t2 = sitk.Resample(dwi_field, t2, sitk.Transform(), sitk.sitkLinear, 0.0)
        covered = body["t2"] & (sitk.GetArrayFromImage(dwi_on_t2) > 0)
        row = {
            "exam": images["name"],
            "setting": name,
            "t2_s": round(t2_s, 3),
            "dwi_s": round(dwi_s, 3),
            "r_t2_vs_first": round(_correlation(logs["t2"], reference["t2"], body["t2"]), 4),
            "r_dwi_vs_first": round(_correlation(logs["dwi"], reference["dwi"], body["dwi"]), 4),
            "r_t2_vs_dwi_field": round(
                _correlation(
                    logs["t2"],
                    np.log(np.maximum(sitk.GetArrayFromImage(dwi_on_t2).astype(np.float64), 1e-6)),
                    covered,
                ),
                4,
            ),
        }
        alignment = register_exam(t2_corrected, dwi_corrected, params=RegistrationParams())
        row["accepted"] = alignment.alignment.stage
        if truth is not None:
            row["r_t2_truth"] = field_accuracy(t2_field, t2, t2_corrected, truth, "t2")[
                "r_log_field"
            ]
            row["r_dwi_truth"] = field_accuracy(
                dwi_field, dwi[low], dwi_corrected[low], truth, "dwi"
            )["r_log_field"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# N4 fit grid and iterations: seconds and field accuracy",
        "",
        "`benchmarks/bench_n4_grid.py`, one thread, every setting on the same images in the "
        "same run. Seconds: T2, and DWI (one field fitted on the lowest b, divided out of "
        "every b). r: correlation of log fields in the body; *vs first*: against the first "
        "setting's field; *T2 vs DWI field*: the two independently fitted fields of one exam "
        "(same receive coil) on the T2 grid; *truth*: the phantom's true field.",
        "",
        "| exam | setting | T2 s | DWI s | r T2 vs first | r DWI vs first "
        "| r T2 vs DWI field | r T2 truth | r DWI truth | T2 <-> DWI accepted |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['exam']} | {r['setting']} | {r['t2_s']:.2f} | {r['dwi_s']:.2f} "
            f"| {r['r_t2_vs_first']:.4f} | {r['r_dwi_vs_first']:.4f} "
            f"| {r['r_t2_vs_dwi_field']:.4f} | {r.get('r_t2_truth', '-')} "
            f"| {r.get('r_dwi_truth', '-')} | {r['accepted']} |"
        )
    lines += [
        "",
        "## Mean over exams",
        "",
        "| setting | real: T2 + DWI s | phantom: T2 + DWI s "
        "| real: r T2 vs DWI field | phantom: r T2 truth | phantom: r DWI truth "
        "| real: T2 <-> DWI accepted |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        real = [r for r in rows if r["setting"] == name and "r_t2_truth" not in r]
        phantom = [r for r in rows if r["setting"] == name and "r_t2_truth" in r]

        def mean(group: list[dict[str, Any]], key: str) -> str:
            return f"{np.mean([g[key] for g in group]):.3f}" if group else "-"

        seconds = [
            f"{np.mean([g['t2_s'] + g['dwi_s'] for g in group]):.2f}" if group else "-"
            for group in (real, phantom)
        ]
        stages = ", ".join(f"{r['exam']}: {r['accepted']}" for r in real)
        lines.append(
            f"| {name} | {seconds[0]} | {seconds[1]} | {mean(real, 'r_t2_vs_dwi_field')} "
            f"| {mean(phantom, 'r_t2_truth')} | {mean(phantom, 'r_dwi_truth')} "
            f"| {stages} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-exams", type=int, default=2)
    args = parser.parse_args()
    apply_thread_limits(1)
    warm_up(RegistrationParams())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if DATA.is_dir():
            for name in REAL_EXAMS:
                (exam,) = [e for e in discover_exams(DATA) if e.folder.startswith(name + "/")]
                rows += run_exam(load_exam(DATA, exam, root / name), None)
        for index in range(args.synthetic_exams):
            generated = generate_exam(root / "syn", plan_exam(0, index))
            (exam,) = [
                e
                for e in discover_exams(root / "syn" / "dicom")
                if e.folder.startswith(generated.patient_folder + "/")
            ]
            rows += run_exam(load_exam(root / "syn", exam, root / "out"), generated.truth_dir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "n4_grid.json", {"settings": SETTINGS, "rows": rows})
    write_text_atomic(RESULTS / "n4_grid.md", markdown(rows))


if __name__ == "__main__":
    main()
