"""Benchmark: elastix iterations and samples, registration time against alignment quality.

Every exam goes through the pipeline's steps up to registration once (ingest, denoising,
N4 at the shipped defaults: :func:`bench_align.preprocessed`); then each budget below runs
:func:`tasks.chain.register_exam` (motion correction within the DWI and the checked T2 <->
DWI alignment) on the same images, one thread, in the same run. Quality:

* phantom (seed 0): mean TRE (mm) over the gland's T2 voxels against the generator's
  exact transform, and the stage :mod:`tasks.align` accepted; motion correction: TRE over
  the gland's DWI voxels of every b-volume against the generator's motion (mean and worst);
* real exams: the accepted stage, its reason, and for ProstateX-0000 (public gland mask)
  the normalised mutual information of the mapped T2 and the lowest-b DWI in the gland
  + 10 mm (:func:`tasks.align.similarity`).

Usage::

    .venv/bin/python benchmarks/bench_registration_budget.py [--phantom 4]

Writes ``benchmarks/results/registration_budget.json`` and ``registration_budget.md``.
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
from bench_align import DATA, REAL, preprocessed, preprocessed_phantom

from flows.resources import apply_thread_limits
from tasks.align import gland_region, similarity
from tasks.chain import register_exam
from tasks.discover import discover_exams
from tasks.io import write_json_atomic, write_text_atomic
from tasks.register import (
    RegistrationParams,
    mask_points_mm,
    registration_error_mm,
    transform_to_matrix,
    warm_up,
)

RESULTS = Path(__file__).resolve().parent / "results"
#: name -> RegistrationParams overrides ("shipped": the defaults of this version).
BUDGETS: dict[str, dict[str, Any]] = {
    "250 it, 2048/8192 samples (both steps)": {
        "affine_iterations": 250,
        "affine_spatial_samples": 2048,
        "affine_final_spatial_samples": 8192,
    },
    "shipped": {},
    "150 it, 1024/4096 samples (both steps)": {
        "rigid_iterations": 150,
        "spatial_samples": 1024,
        "final_spatial_samples": 4096,
    },
}


def load_exams(work: Path, phantoms: int) -> list[dict[str, Any]]:
    exams: list[dict[str, Any]] = []
    if (DATA / "dicom").is_dir():
        for patient, mask_name in REAL.items():
            (exam,) = [e for e in discover_exams(DATA / "dicom") if e.folder.startswith(patient)]
            t2, dwi = preprocessed(exam, work / "real-out")
            gland = (
                sitk.ReadImage(str(DATA / "labels" / patient / mask_name)) > 0
                if mask_name
                else None
            )
            exams.append({"name": patient, "t2": t2, "dwi": dwi, "gland": gland})
    for index in range(phantoms):
        generated, t2, dwi = preprocessed_phantom(work, index)
        truth = json.loads(generated.truth_json.read_text())["transforms"]
        exams.append(
            {
                "name": generated.patient_folder,
                "t2": t2,
                "dwi": dwi,
                "true_map": np.linalg.inv(np.asarray(truth["dwi_to_t2"])),
                "true_motion": {
                    float(b): np.linalg.inv(np.asarray(m)) for b, m in truth["motion"].items()
                },
                "dwi_points": mask_points_mm(
                    sitk.ReadImage(str(generated.truth_dir / "dwi_gland_mask.nii.gz"))
                ),
                "points": mask_points_mm(
                    sitk.ReadImage(str(generated.truth_dir / "t2_gland_mask.nii.gz"))
                ),
            }
        )
    return exams


def run(exam: dict[str, Any], name: str, params: RegistrationParams) -> dict[str, Any]:
    start = time.perf_counter()
    registered = register_exam(exam["t2"], exam["dwi"], params=params)
    seconds = time.perf_counter() - start
    row = {
        "budget": name,
        "exam": exam["name"],
        "seconds": round(seconds, 2),
        "accepted": registered.alignment.stage,
        "reason": registered.alignment.reason,
    }
    transform = registered.alignment.transform
    if "true_map" in exam:
        estimated = transform_to_matrix(transform)
        row["tre_mm"] = round(registration_error_mm(estimated, exam["true_map"], exam["points"]), 3)
        motion = [
            registration_error_mm(
                transform_to_matrix(registered.motion[b]),
                exam["true_motion"][b],
                exam["dwi_points"],
            )
            for b in registered.motion
            if b != min(registered.motion)
        ]
        row["motion_tre_mm"] = [round(v, 3) for v in motion]
    elif exam.get("gland") is not None:
        reference = registered.moco[min(registered.moco)]
        region = gland_region(exam["gland"], reference, 10.0)
        row["nmi_gland_10mm"] = round(similarity(exam["t2"], reference, transform, region), 4)
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    shipped = RegistrationParams()
    lines = [
        "# Registration budget: elastix iterations and samples vs alignment quality",
        "",
        "`benchmarks/bench_registration_budget.py`, one thread, every budget on the same "
        "preprocessed images in the same run. Seconds: `register_exam` (rigid motion "
        "correction of each b onto the lowest b, then the checked T2 <-> DWI alignment). "
        f"*shipped*: within the DWI {shipped.rigid_iterations} iterations, "
        f"{shipped.spatial_samples}/{shipped.final_spatial_samples} samples (coarse/finest "
        f"level); T2 <-> DWI {shipped.affine_iterations} iterations, "
        f"{shipped.affine_spatial_samples}/{shipped.affine_final_spatial_samples} samples.",
        "",
        "| budget | exam | s | accepted | TRE mm (phantom) | motion TRE mm per b (phantom) "
        "| NMI gland + 10 mm (real) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['exam']} | {r['seconds']:.2f} | {r['accepted']} "
            f"| {r.get('tre_mm', '-')} | {' '.join(str(v) for v in r.get('motion_tre_mm', []))} "
            f"| {r.get('nmi_gland_10mm', '-')} |"
        )
    lines += [
        "",
        "| budget | mean s, real | mean s, phantom | mean TRE mm, phantom "
        "| motion TRE mm, phantom: mean / worst | accepted stages |",
        "|---|---|---|---|---|---|",
    ]
    for name in BUDGETS:
        own = [r for r in rows if r["budget"] == name]
        real = [r["seconds"] for r in own if "tre_mm" not in r]
        phantom = [r for r in own if "tre_mm" in r]
        motion = [v for r in phantom for v in r["motion_tre_mm"]]
        motion_text = f"{np.mean(motion):.3f} / {np.max(motion):.3f}" if motion else "-"
        stages = ", ".join(f"{r['exam']}: {r['accepted']}" for r in own if "tre_mm" not in r)
        lines.append(
            f"| {name} | {np.mean(real) if real else float('nan'):.2f} "
            f"| {np.mean([r['seconds'] for r in phantom]) if phantom else float('nan'):.2f} "
            f"| {np.mean([r['tre_mm'] for r in phantom]) if phantom else float('nan'):.3f} "
            f"| {motion_text} | {stages} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom", type=int, default=4, help="phantom exams (seed 0)")
    args = parser.parse_args()
    apply_thread_limits(1)
    warm_up(RegistrationParams())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        exams = load_exams(Path(tmp), args.phantom)
        for name, overrides in BUDGETS.items():
            params = RegistrationParams(**overrides)
            rows += [run(exam, name, params) for exam in exams]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "registration_budget.json", {"budgets": BUDGETS, "rows": rows})
    write_text_atomic(RESULTS / "registration_budget.md", markdown(rows))


if __name__ == "__main__":
    main()
