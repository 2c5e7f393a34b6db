"""Benchmark: N4, ours next to the library default, same run.

N4 -- ours: ``tasks.bias`` (fit on a shrunk image inside an Otsu foreground mask, field
evaluated at full resolution). Baseline: SimpleITK's ``N4BiasFieldCorrectionImageFilter`` at
its defaults on the full-resolution T2 without a mask (4 levels x 50 iterations; run ONCE,
on the synthetic T2 (the size of ProstateX-0000's, 384x384x20) so its field accuracy is
known too; ``--default-n4-iterations`` caps it).

Accuracy where ground truth exists (synthetic exams): correlation of the N4 log field with
the true one, and the CV of one tissue. Registration is ``benchmarks/bench_align.py``.

Every step runs with ``--threads`` ITK threads (default 1: cohort workers run one case per
core); CPU time is ``time.process_time`` of this process (all its threads).

Usage::

    .venv/bin/python benchmarks/bench_preprocess.py [--synthetic-exams 2] [--threads 1]

Writes ``benchmarks/results/preprocess.json`` and ``preprocess.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from phantom.exam import generate_exam
from phantom.plan import FAT, MUSCLE, TISSUES, plan_exam
from tasks.bias import N4Params, correct_bias_dwi, correct_bias_n4
from tasks.discover import discover_exams
from tasks.ingest import ingest_exam
from tasks.io import write_json_atomic, write_text_atomic

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
RESULTS = Path(__file__).resolve().parent / "results"


def timed(function: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``function``; return its result and wall / CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    cost = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    return result, {k: round(v, 3) for k, v in cost.items()}


def load_exam(root: Path, exam, out: Path) -> dict:
    """Ingest one discovered exam; return its T2, DWI volumes (b -> image) and ADC."""
    result = ingest_exam(exam, out_dir=out, key="bench")
    if result.status != "ok":
        raise RuntimeError(result.error)
    images: dict[str, Any] = {"dwi": {}, "name": exam.folder.split("/")[0]}
    for record in result.series:
        image = sitk.ReadImage(str(out / record.image))
        if record.kind == "t2w":
            images["t2"] = image
        elif record.kind == "dwi":
            images["dwi"][float(record.b_value)] = image
        elif record.kind == "adc":
            images["adc"] = image
    return images


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float64)


def field_accuracy(field: sitk.Image, image: sitk.Image, corrected, truth: Path, grid: str):
    """r(log field, true log field) in the body, and CV of fat (T2) / muscle (DWI)."""
    tissue = _array(sitk.ReadImage(str(truth / f"{grid}_tissue.nii.gz")))
    true_log = np.log(_array(sitk.ReadImage(str(truth / f"{grid}_bias.nii.gz"))))
    body, log_field = tissue > 0, np.log(_array(field))
    x, y = log_field[body] - log_field[body].mean(), true_log[body] - true_log[body].mean()
    label = FAT if grid == "t2" else MUSCLE
    inside = tissue == label
    cv = [float(a[inside].std() / a[inside].mean()) for a in (_array(image), _array(corrected))]
    r = float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))
    return {
        "r_log_field": round(r, 4),
        "cv_tissue": TISSUES[label].name,
        "cv_before": round(cv[0], 4),
        "cv_after": round(cv[1], 4),
    }


def default_n4(image: sitk.Image, iterations: list[int], threads: int):
    """SimpleITK N4 at its defaults: full resolution, no mask (all voxels), log field out."""
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(iterations)
    n4.SetNumberOfThreads(threads)
    image = sitk.Cast(image, sitk.sitkFloat32)
    corrected = n4.Execute(image)
    return corrected, sitk.Exp(n4.GetLogBiasFieldAsImage(image))


def run_n4(images: dict, truth: dict | None, params: N4Params) -> dict:
    """Our N4 on the T2 and on the DWI (field from the lowest b, applied to all b)."""
    (t2_corrected, t2_field), t2_cost = timed(lambda: correct_bias_n4(images["t2"], params=params))
    (dwi_corrected, dwi_field), dwi_cost = timed(
        lambda: correct_bias_dwi(images["dwi"], params=params)
    )
    row: dict[str, Any] = {"t2_ours": t2_cost, "dwi_ours_all_b": dwi_cost}
    if truth is not None:
        low = min(images["dwi"])
        row["t2_accuracy"] = field_accuracy(
            t2_field, images["t2"], t2_corrected, truth["dir"], "t2"
        )
        row["dwi_accuracy"] = field_accuracy(
            dwi_field, images["dwi"][low], dwi_corrected[low], truth["dir"], "dwi"
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-exams", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--default-n4-iterations", default="50,50,50,50")
    parser.add_argument("--skip-default-n4", action="store_true")
    args = parser.parse_args()
    threads = args.threads
    n4_params = N4Params(threads=threads)
    report: dict[str, Any] = {
        "threads": threads,
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "simpleitk": sitk.Version.VersionString(),
        },
        "n4_params": n4_params.model_dump(mode="json"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exams: list[tuple[dict, dict | None]] = []
        real = (
            [e for e in discover_exams(DATA) if e.folder.startswith("ProstateX-0000")]
            if (DATA.is_dir())
            else []
        )
        if real:
            exams.append((load_exam(DATA, real[0], root / "real"), None))
        for index in range(args.synthetic_exams):
            generated = generate_exam(root / "syn", plan_exam(0, index))
            found = [
                e
                for e in discover_exams(root / "syn" / "dicom")
                if e.folder.startswith(generated.patient_folder + "/")
            ]
            truth = json.loads(generated.truth_json.read_text())["transforms"]
            truth["dir"] = generated.truth_dir
            exams.append((load_exam(root / "syn", found[0], root / "out"), truth))
        n4_rows = []
        for number, (images, truth) in enumerate(exams):
            if number < 2 or truth is None:  # N4 on the real exam and the first synthetic ones
                n4_rows.append({"exam": images["name"]} | run_n4(images, truth, n4_params))
                print(json.dumps(n4_rows[-1]), flush=True)
        report["n4"] = n4_rows
        if not args.skip_default_n4:
            images, truth = next((i, t) for i, t in exams if t is not None)
            iterations = [int(v) for v in args.default_n4_iterations.split(",")]
            (c, f), cost = timed(lambda: default_n4(images["t2"], iterations, threads))
            report["n4_default"] = {
                "exam": images["name"],
                "iterations": iterations,
                "t2": cost,
                "t2_accuracy": field_accuracy(f, images["t2"], c, truth["dir"], "t2"),
            }
            print(json.dumps(report["n4_default"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "preprocess.json", report)
    write_text_atomic(RESULTS / "preprocess.md", markdown(report))


def markdown(report: dict) -> str:
    """Human-readable summary with ratios."""
    lines = [
        "# Preprocessing benchmark: N4",
        "",
        f"ITK threads per step: {report['threads']}; CPU = process time (all threads).",
        "",
    ]
    lines += [
        "## N4",
        "",
        "| exam | step | wall s | CPU s | r(log field) | tissue CV before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["n4"]:
        for step, key in (("T2 ours (shrunk + mask)", "t2"), ("DWI ours (lowest b, all b)", "dwi")):
            cost = row[f"{key}_ours" if key == "t2" else "dwi_ours_all_b"]
            acc = row.get(f"{key}_accuracy")
            extra = (
                (
                    f"{acc['r_log_field']:.3f} | {acc['cv_tissue']} {acc['cv_before']:.4f} -> "
                    f"{acc['cv_after']:.4f}"
                )
                if acc
                else "n/a (no truth) | n/a"
            )
            lines.append(
                f"| {row['exam']} | {step} | {cost['wall_s']:.1f} | {cost['cpu_s']:.1f} | {extra} |"
            )
    default = report.get("n4_default")
    if default:
        acc = default["t2_accuracy"]
        lines.append(
            f"| {default['exam']} | T2 library default (full res, no mask, "
            f"{'x'.join(map(str, default['iterations']))} it.), run once | "
            f"{default['t2']['wall_s']:.1f} | {default['t2']['cpu_s']:.1f} | "
            f"{acc['r_log_field']:.3f} | {acc['cv_tissue']} {acc['cv_before']:.4f} -> "
            f"{acc['cv_after']:.4f} |"
        )
        ours = next(r for r in report["n4"] if r["exam"] == default["exam"])
        lines += [
            "",
            f"N4 speed-up on {default['exam']} T2 (default / ours): wall "
            f"{default['t2']['wall_s'] / ours['t2_ours']['wall_s']:.0f}x, CPU "
            f"{default['t2']['cpu_s'] / ours['t2_ours']['cpu_s']:.0f}x. The default run had "
            "only the filter's own thread count set, as a plain call would, so its internal "
            "B-spline fitter used ITK's process-wide default (all cores: CPU ~ cores x wall); "
            "ours sets that default to `threads` for the call. Field accuracy is no better "
            "at full resolution: on this phantom four levels let the field absorb anatomy.",
        ]
    lines += [
        "",
        "Registration (T2 <-> DWI and within the DWI) is measured by "
        "`benchmarks/bench_align.py` (`benchmarks/results/align.md`).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
