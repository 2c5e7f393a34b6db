"""T2 <-> DWI alignment on the pipeline's own inputs: phantom TRE and real-exam similarity.

Each exam goes through the pipeline's steps up to registration (ingest, denoising, N4,
motion correction, all at the shipped defaults), then three T2 -> DWI maps are compared:

* ``pipeline``: :func:`tasks.align.align_dwi_to_t2` (the accepted stage);
* ``affine unchecked``: the same elastix run's affine stage, as the pipeline used it before
  the acceptance test;
* ``elastix default``: elastix's default affine parameter map (fixed = lowest-b DWI, moving
  = T2, whole field of view, no mask), the straightforward script's choice;
* ``identity``: the scanner's coordinates.

Phantom (``phantom.exam``, seed 0): mean target registration error (mm) over the gland's
T2 voxel centres against the generator's exact transform. Real exams (``../shared/data``):
normalised mutual information between the lowest-b DWI and the mapped T2 inside the gland
dilated by 10 mm (:func:`tasks.align.similarity`, :func:`tasks.align.gland_region`; gland:
the PI-CAI reference mask of ProstateX-0000, the TAPS segmentation of ProstateX-0218, which
has no public mask), and the map's scale factors (singular values).

    .venv/bin/python benchmarks/bench_align.py [--phantom N] [--output DIR]

Writes ``benchmarks/results/align.md`` and ``align.json``.
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

from phantom.exam import generate_exam
from phantom.plan import plan_exam
from tasks.align import Alignment, gland_region, similarity
from tasks.bias import N4Params, correct_bias_dwi, correct_bias_n4
from tasks.chain import register_exam
from tasks.denoise import SusanParams, T2DenoiseParams, denoise_dwi, denoise_t2
from tasks.discover import discover_exams
from tasks.ingest import ingest_exam
from tasks.register import (
    RegistrationParams,
    elastix_default_affine,
    mask_points_mm,
    registration_error_mm,
    transform_to_matrix,
    warm_up,
)

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
REAL = {"ProstateX-0000": "gland_Bosma22b.nii.gz", "ProstateX-0218": None}


def preprocessed(exam, out: Path) -> tuple[sitk.Image, dict[float, sitk.Image]]:
    """T2 and DWI after ingest, denoising and N4 at the pipeline's defaults."""
    result = ingest_exam(exam, out_dir=out, key="bench")
    if result.status != "ok":
        raise RuntimeError(f"ingest failed: {result.error}")
    t2, dwi = None, {}
    for record in result.series:
        image = sitk.ReadImage(str(out / record.image), sitk.sitkFloat32)
        if record.kind == "t2w":
            t2 = image
        elif record.kind == "dwi":
            dwi[float(record.b_value)] = image
    t2 = correct_bias_n4(denoise_t2(t2, params=T2DenoiseParams()), params=N4Params())[0]
    dwi = correct_bias_dwi(denoise_dwi(dwi, params=SusanParams()), params=N4Params())[0]
    return t2, dwi


def preprocessed_phantom(work: Path, index: int) -> tuple[Any, sitk.Image, dict[float, sitk.Image]]:
    """Phantom exam ``index`` of seed 0 (generated under ``work``), then :func:`preprocessed`."""
    generated = generate_exam(work / "phantom", plan_exam(0, index))
    (exam,) = [
        e
        for e in discover_exams(work / "phantom" / "dicom")
        if e.folder.startswith(generated.patient_folder + "/")
    ]
    return (generated, *preprocessed(exam, work / "phantom-out"))


def elastix_default(t2: sitk.Image, dwi_ref: sitk.Image) -> sitk.AffineTransform:
    """elastix's default affine map, fixed = DWI, moving = T2; returned as T2 -> DWI."""
    return sitk.AffineTransform(elastix_default_affine(dwi_ref, t2).GetInverse())


def maps_of(alignment: Alignment, default: sitk.AffineTransform) -> dict[str, sitk.Transform]:
    return {
        "pipeline": alignment.transform,
        "rigid stage": alignment.candidate("rigid").transform,
        "affine unchecked": alignment.candidate("affine").transform,
        "elastix default": default,
        "identity": sitk.AffineTransform(3),
    }


def scales(transform: sitk.Transform) -> list[float]:
    values = np.linalg.svd(transform_to_matrix(transform)[:3, :3], compute_uv=False)
    return [round(float(v), 4) for v in values]


def phantom_rows(n: int, work: Path, params: RegistrationParams) -> list[dict[str, Any]]:
    rows = []
    for index in range(n):
        generated, t2, dwi = preprocessed_phantom(work, index)
        registered = register_exam(t2, dwi, params=params)
        ref = registered.moco[min(registered.moco)]
        truth = json.loads(generated.truth_json.read_text())["transforms"]
        true_map = np.linalg.inv(np.asarray(truth["dwi_to_t2"]))
        gland = sitk.ReadImage(str(generated.truth_dir / "t2_gland_mask.nii.gz"))
        points = mask_points_mm(gland)
        start = time.perf_counter()
        default = elastix_default(t2, ref)
        default_s = time.perf_counter() - start
        row: dict[str, Any] = {
            "exam": generated.patient_folder,
            "accepted": registered.alignment.stage,
            "reason": registered.alignment.reason,
            "details": registered.alignment.details(),
            "seconds": {"pipeline": registered.alignment.seconds, "elastix default": default_s},
        }
        for name, transform in maps_of(registered.alignment, default).items():
            estimated = transform_to_matrix(transform)
            row[name] = {
                "tre_mm": round(registration_error_mm(estimated, true_map, points), 3),
                "scales": scales(transform),
            }
        true_scales = np.linalg.svd(true_map[:3, :3], compute_uv=False)
        row["true scales"] = [round(float(v), 4) for v in true_scales]
        rows.append(row)
        print(json.dumps(row))
    return rows


def _taps_gland(t2: sitk.Image) -> sitk.Image:
    from tasks.segment import SegmentationInputs, SegmentationParams, get_backend

    result = get_backend("taps", SegmentationParams(device="cpu")).segment(SegmentationInputs(t2))
    return result.labels > 0


def real_rows(work: Path, params: RegistrationParams) -> list[dict[str, Any]]:
    rows = []
    for patient, mask_name in REAL.items():
        (exam,) = [e for e in discover_exams(DATA / "dicom") if e.folder.startswith(patient)]
        t2, dwi = preprocessed(exam, work / "real-out")
        registered = register_exam(t2, dwi, params=params)
        ref = registered.moco[min(registered.moco)]
        if mask_name:
            gland = sitk.ReadImage(str(DATA / "labels" / patient / mask_name)) > 0
            gland_source = f"reference {mask_name}"
        else:
            gland, gland_source = _taps_gland(t2), "TAPS segmentation (no public mask)"
        region = gland_region(gland, ref, 10.0)
        default = elastix_default(t2, ref)
        row: dict[str, Any] = {
            "exam": patient,
            "gland": gland_source,
            "accepted": registered.alignment.stage,
            "reason": registered.alignment.reason,
            "details": registered.alignment.details(),
        }
        for name, transform in maps_of(registered.alignment, default).items():
            row[name] = {
                "nmi_gland_10mm": round(similarity(t2, ref, transform, region), 4),
                "scales": scales(transform),
            }
        rows.append(row)
        print(json.dumps(row))
    return rows


def report(phantom: list[dict[str, Any]], real: list[dict[str, Any]]) -> str:
    names = ["pipeline", "rigid stage", "affine unchecked", "elastix default", "identity"]
    lines = [
        "# T2 <-> DWI alignment: phantom TRE and real-exam similarity",
        "",
        "`benchmarks/bench_align.py`; inputs are the pipeline's own (denoised, N4-corrected, "
        "motion-corrected lowest b). Every column measured in the same run.",
        "",
        "## Phantom (seed 0): mean TRE over the gland (mm)",
        "",
        "| exam | accepted | " + " | ".join(names) + " | true scales |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for row in phantom:
        cells = [f"{row[n]['tre_mm']:.2f}" for n in names]
        true = "/".join(f"{s:.3f}" for s in row["true scales"])
        lines.append(f"| {row['exam']} | {row['accepted']} | " + " | ".join(cells) + f" | {true} |")
    if phantom:
        means = [np.mean([r[n]["tre_mm"] for r in phantom]) for n in names]
        lines.append("| **mean** | | " + " | ".join(f"**{m:.2f}**" for m in means) + " | |")
    lines += [
        "",
        "## Real exams: NMI(mapped T2, lowest-b DWI) inside the gland + 10 mm; scale factors",
        "",
        "| exam | gland | accepted | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in real:
        cells = [
            f"{row[n]['nmi_gland_10mm']:.4f} ({'/'.join(f'{s:.3f}' for s in row[n]['scales'])})"
            for n in names
        ]
        lines.append(
            f"| {row['exam']} | {row['gland']} | {row['accepted']} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Reasons recorded for the accepted stage:", ""]
    for row in phantom + real:
        lines.append(f"- {row['exam']}: {row['reason']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phantom", type=int, default=8, help="phantom exams (seed 0)")
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    params = RegistrationParams()
    warm_up(params)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        phantom = phantom_rows(args.phantom, work, params)
        real = real_rows(work, params) if (DATA / "dicom").is_dir() else []
    if not real:
        print(f"real exams skipped: {DATA / 'dicom'} not found")
    args.output.mkdir(parents=True, exist_ok=True)
    payload = {"params": params.model_dump(mode="json"), "phantom": phantom, "real": real}
    (args.output / "align.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.output / "align.md").write_text(report(phantom, real))
    print(report(phantom, real))


if __name__ == "__main__":
    main()
