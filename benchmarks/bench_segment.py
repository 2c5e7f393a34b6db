"""Benchmark: segmentation time per patient, nnU-Net predictor reused vs re-created, mirroring
on vs off (CPU), and the TAPS baseline, with the Dice of each against the phantom truth.

Inputs are synthetic exams of seed 0 preprocessed by our chain
(``benchmarks/bench_chain.run_chain``): T2, b1000 and ADC on the T2 grid, as the pipeline
hands them to the backends. "Re-created" builds a new ``NnUNetBackend`` (and so a new
``nnUNetPredictor`` with the checkpoint loaded) for every patient, as a per-patient script
or a fresh process per task would; "reused" loads it once (``tasks.segment.get_backend``).

Usage::

    .venv/bin/python benchmarks/bench_segment.py [--patients 3] [--threads 1] [--taps]

Writes ``benchmarks/results/segment.json`` and ``segment.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_chain import load, run_chain, timed  # noqa: E402

from flows.resources import apply_thread_limits  # noqa: E402
from phantom.exam import generate_exam  # noqa: E402
from phantom.plan import plan_exam  # noqa: E402
from tasks.io import write_json_atomic, write_text_atomic  # noqa: E402
from tasks.segment import DEMO_MODEL_DIR, SegmentationInputs, SegmentationParams  # noqa: E402
from tasks.segment_nnunet import NnUNetBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def dice(labels: sitk.Image, truth: sitk.Image) -> float:
    a = sitk.GetArrayFromImage(labels) > 0
    b = sitk.GetArrayFromImage(truth) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--taps", action="store_true", help="also time the TAPS baseline")
    args = parser.parse_args()
    apply_thread_limits(args.threads)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for index in range(args.patients):
            generated = generate_exam(root / "syn", plan_exam(0, index))
            images = load(root / "syn" / "dicom", generated.patient_folder + "/", root / "out")
            grid = run_chain(images, args.threads)["t2_grid"]
            cases.append((generated, SegmentationInputs(**grid)))
        truth = {
            g.patient_folder: sitk.ReadImage(str(g.truth_dir / "t2_gland_mask.nii.gz"))
            for g, _ in cases
        }
    variants: dict[str, Any] = {}
    for mirroring in (False, True):
        params = SegmentationParams(device="cpu", use_mirroring=mirroring, threads=args.threads)
        name = "mirroring" if mirroring else "no_mirroring"
        backend, load_cost = timed(lambda p=params: NnUNetBackend(DEMO_MODEL_DIR, params=p))
        rows = []
        for generated, inputs in cases:
            result, cost = timed(lambda b=backend, i=inputs: b.segment(i))
            rows.append(cost | {"dice": dice(result.labels, truth[generated.patient_folder])})
        variants[f"reused_{name}"] = {"load": load_cost, "patients": rows}
        if not mirroring:  # re-created per patient: load + predict each time
            rows = []
            for generated, inputs in cases:

                def fresh(i: SegmentationInputs = inputs, p: SegmentationParams = params) -> Any:
                    return NnUNetBackend(DEMO_MODEL_DIR, params=p).segment(i)

                result, cost = timed(fresh)
                rows.append(cost | {"dice": dice(result.labels, truth[generated.patient_folder])})
            variants["recreated_no_mirroring"] = {"load": None, "patients": rows}
    if args.taps:
        from tasks.segment_taps import TapsBackend

        params = SegmentationParams(device="cpu", threads=args.threads)
        backend, load_cost = timed(lambda: TapsBackend(params=params))
        rows = []
        for generated, inputs in cases:
            result, cost = timed(lambda i=inputs: backend.segment(i))
            rows.append(cost | {"dice": dice(result.labels, truth[generated.patient_folder])})
        variants["taps_reused"] = {"load": load_cost, "patients": rows}
    report = {"threads": args.threads, "patients": args.patients, "variants": variants}
    print(json.dumps(report, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "segment.json", report)
    write_text_atomic(RESULTS / "segment.md", markdown(report))


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def markdown(report: dict[str, Any]) -> str:
    """The table of ``segment.md``: per-patient seconds and Dice, ratios vs reused."""
    variants = report["variants"]
    base = _mean(variants["reused_no_mirroring"]["patients"], "wall_s")
    lines = [
        "# Segmentation per patient (CPU)",
        "",
        f"{report['patients']} synthetic exams (seed 0) preprocessed by our chain; "
        f"{report['threads']} thread(s); demo nnU-Net model (`models/demo-nnunet`).",
        "",
        "| variant | model load s | wall s / patient | CPU s / patient | x reused, no mirroring "
        "| mean Dice |",
        "|---|---|---|---|---|---|",
    ]
    for name, variant in variants.items():
        load_s = f"{variant['load']['wall_s']:.2f}" if variant["load"] else "(in each patient)"
        wall = _mean(variant["patients"], "wall_s")
        lines.append(
            f"| {name} | {load_s} | {wall:.2f} | {_mean(variant['patients'], 'cpu_s'):.2f} | "
            f"{wall / base:.2f} | {_mean(variant['patients'], 'dice'):.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
