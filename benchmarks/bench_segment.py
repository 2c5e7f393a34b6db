"""Benchmark: segmentation time per patient and accuracy, per model and inference setting.

Models: the demo nnU-Net model (``demo``: default plans, one fold, gland), the users' model
form (``demo-zones``: residual-encoder plans, two folds ensembled, PZ/TZ; and its fold 0
alone) and TAPS. Settings: test-time mirroring on/off, sliding-window tile step 0.5 / 1.0,
CPU threads 1 and 2 (the full matrix at 1 thread; the defaults and TAPS at 2). Every backend
is loaded once (``load s``) and reused for all patients, as the pipeline's workers do.

Inputs are what the pipeline hands the backends (T2, b1000 and ADC on the T2 grid, made by
our chain, ``benchmarks/bench_chain.run_chain``): synthetic exams of seed 0 (never trained
on; Dice against the phantom's gland and zone truth) and, when ``../shared/data`` is
present, the real exam ProstateX-0000 (time; Dice of TAPS against the reference gland mask
``gland_Bosma22b``; the demo models have never seen a real exam, so their Dice there is not
a measure of anything and is not reported).

Usage::

    .venv/bin/python benchmarks/bench_segment.py [--patients 2] [--no-real]

Writes ``benchmarks/results/segment.json`` and ``segment.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from tasks.errors import InputError  # noqa: E402
from tasks.io import write_json_atomic, write_text_atomic  # noqa: E402
from tasks.segment import SegmentationInputs, SegmentationParams, model_folder  # noqa: E402
from tasks.segment_nnunet import NnUNetBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_EXAM = "ProstateX-0000"
REAL_GLAND = DATA / "labels" / REAL_EXAM / "gland_Bosma22b.nii.gz"

#: (name, model spec, folds, mirroring, tile step, threads)
VARIANTS: list[tuple[str, str, tuple[int, ...] | None, bool, float, int]] = [
    *(
        (f"{spec} {what}", spec, folds, mirror, step, 1)
        for spec, what, folds in (
            ("demo", "(fold 0)", None),
            ("demo-zones", "(folds 0+1)", None),
        )
        for mirror, step in ((False, 0.5), (False, 1.0), (True, 0.5))
    ),
    ("demo-zones (fold 0 alone)", "demo-zones", (0,), False, 0.5, 1),
    ("demo (fold 0)", "demo", None, False, 0.5, 2),
    ("demo-zones (folds 0+1)", "demo-zones", None, False, 0.5, 2),
]
TAPS_THREADS = (1, 2)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays."""
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def accuracy(labels: sitk.Image, names: dict[int, str], truth: dict[str, np.ndarray]) -> dict:
    """Dice of the gland (all labels) and of each named zone present in ``truth``."""
    predicted = sitk.GetArrayFromImage(labels)
    out = {"dice_gland": round(dice(predicted > 0, truth["gland"]), 4)}
    if len(names) > 1 and "zones" in truth:
        for value, name in names.items():
            out[f"dice_{name}"] = round(dice(predicted == value, truth["zones"] == value), 4)
    return out


def synthetic_cases(root: Path, patients: int, threads: int) -> list[dict[str, Any]]:
    """Seed-0 phantom exams through our chain, with their gland and zone truth."""
    cases = []
    for index in range(patients):
        generated = generate_exam(root / "syn", plan_exam(0, index))
        images = load(root / "syn" / "dicom", generated.patient_folder + "/", root / "out")
        grid = run_chain(images, threads)["t2_grid"]
        gland, zones = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(generated.truth_dir / name)))
            for name in ("t2_gland_mask.nii.gz", "t2_zones.nii.gz")
        )
        truth = {"gland": gland > 0, "zones": zones}
        cases.append(
            {"exam": f"synthetic {index + 1}", "inputs": SegmentationInputs(**grid), "truth": truth}
        )
    return cases


def real_case(root: Path, threads: int) -> dict[str, Any]:
    """ProstateX-0000 through our chain, with its reference gland mask."""
    images = load(DATA / "dicom", REAL_EXAM + "/", root / "real")
    grid = run_chain(images, threads)["t2_grid"]
    reference = sitk.ReadImage(str(REAL_GLAND))
    if reference.GetSize() != grid["t2w"].GetSize():
        raise RuntimeError(f"{REAL_GLAND.name} is not on {REAL_EXAM}'s T2 grid")
    truth = {"gland": sitk.GetArrayFromImage(reference) > 0}
    return {"exam": REAL_EXAM, "inputs": SegmentationInputs(**grid), "truth": truth, "real": True}


def run_variant(backend: Any, cases: list[dict[str, Any]], real_dice: bool) -> list[dict]:
    rows = []
    for case in cases:
        try:
            result, cost = timed(lambda b=backend, c=case: b.segment(c["inputs"]))
        except InputError as error:  # e.g. TAPS finds no prostate in a phantom exam
            rows.append({"exam": case["exam"], "error": error.problem})
            continue
        row = {"exam": case["exam"], **cost}
        if not case.get("real") or real_dice:
            row |= accuracy(result.labels, result.label_names, case["truth"])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2, help="synthetic exams")
    parser.add_argument("--no-real", action="store_true", help="skip ProstateX-0000")
    parser.add_argument("--no-taps", action="store_true", help="skip the TAPS rows")
    parser.add_argument("--note", default="", help="conditions of the run, for segment.md")
    args = parser.parse_args()
    apply_thread_limits(1)
    with tempfile.TemporaryDirectory() as tmp:
        cases = synthetic_cases(Path(tmp), args.patients, threads=1)
        real = not args.no_real and DATA.is_dir()
        if real:
            cases.append(real_case(Path(tmp), threads=1))
    variants: list[dict[str, Any]] = []
    for name, spec, folds, mirroring, step, threads in VARIANTS:
        apply_thread_limits(threads)
        params = SegmentationParams(
            device="cpu",
            use_mirroring=mirroring,
            tile_step_size=step,
            threads=threads,
            folds=folds,
        )
        backend, load_cost = timed(
            lambda s=spec, p=params: NnUNetBackend(model_folder(s), params=p, name=s)
        )
        rows = run_variant(backend, cases, real_dice=False)
        variants.append(
            {"name": name, "mirroring": mirroring, "tile_step": step, "threads": threads}
            | {"load": load_cost, "patients": rows}
        )
        print(json.dumps(variants[-1]), flush=True)
    if not args.no_taps:
        from tasks.segment_taps import TapsBackend  # noqa: PLC0415

        for threads in TAPS_THREADS:
            apply_thread_limits(threads)
            params = SegmentationParams(device="cpu", threads=threads)
            backend, load_cost = timed(lambda p=params: TapsBackend(params=p))
            rows = run_variant(backend, cases, real_dice=True)
            variants.append(
                {"name": "taps", "mirroring": None, "tile_step": None, "threads": threads}
                | {"load": load_cost, "patients": rows}
            )
            print(json.dumps(variants[-1]), flush=True)
    report = {
        "patients": args.patients,
        "real_exam": REAL_EXAM if real else None,
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()},
        "device": "cpu",
        "note": args.note,
        "variants": variants,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "segment.json", report)
    write_text_atomic(RESULTS / "segment.md", markdown(report))


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values)) if values else None


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """``segment.md``: one row per variant; seconds per synthetic and real exam, Dice."""
    lines = [
        "# Segmentation per patient: time and accuracy (CPU)",
        "",
        f"Written by `benchmarks/bench_segment.py`. Inputs: {report['patients']} synthetic "
        "exams (seed 0, never trained on) and "
        + (f"the real exam {report['real_exam']}" if report["real_exam"] else "no real exam")
        + ", each preprocessed by our chain (T2, b1000 and ADC on the T2 grid). Backends are "
        "loaded once and reused across patients. Seconds are wall time of `segment()` per "
        "exam; `x` is the ratio to the first row's synthetic time, measured in the same run. "
        "Dice on the synthetic exams against the phantom truth (gland; PZ and TZ for the "
        "zonal model); TAPS also against the real exam's reference gland mask.",
        "",
        *([f"Conditions: {report['note']}", ""] if report.get("note") else []),
        "| model (folds) | threads | mirroring | tile step | load s | s / synthetic exam "
        "| x | s / real exam | Dice gland | Dice PZ | Dice TZ | Dice gland (real) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for variant in report["variants"]:
        synthetic = [r for r in variant["patients"] if r["exam"].startswith("synthetic")]
        real = [r for r in variant["patients"] if not r["exam"].startswith("synthetic")]
        seconds = _mean(synthetic, "wall_s")
        failed = [f"{r['exam']}: {r['error']}" for r in variant["patients"] if "error" in r]
        base = base or seconds
        step = "-" if variant["tile_step"] is None else f"{variant['tile_step']:.1f}"
        mirroring = {None: "-", True: "on", False: "off"}[variant["mirroring"]]
        lines.append(
            f"| {variant['name']} | {variant['threads']} | {mirroring} | {step} "
            f"| {variant['load']['wall_s']:.2f} | {_fmt(seconds, 2)} "
            f"| {_fmt(None if seconds is None else seconds / base, 2)} "
            f"| {_fmt(_mean(real, 'wall_s'), 2)} "
            f"| {_fmt(_mean(synthetic, 'dice_gland'), 3)} | {_fmt(_mean(synthetic, 'dice_pz'), 3)} "
            f"| {_fmt(_mean(synthetic, 'dice_tz'), 3)} | {_fmt(_mean(real, 'dice_gland'), 3)} "
            f"| {'; '.join(failed) or '-'} |"
        )
    return "\n".join([*lines, "", *defaults_section(report)]) + "\n"


def _variant(report: dict[str, Any], name: str, mirroring: bool, step: float) -> dict | None:
    for v in report["variants"]:
        if (v["name"], v["mirroring"], v["tile_step"], v["threads"]) == (name, mirroring, step, 1):
            return v
    return None


def _dice_change(a: dict, b: dict) -> str:
    """The largest (by magnitude, signed) change of a mean synthetic Dice (gland, PZ, TZ)
    from ``a`` to ``b``."""
    keys = ("dice_gland", "dice_pz", "dice_tz")
    rows_a = [r for r in a["patients"] if r["exam"].startswith("synthetic")]
    rows_b = [r for r in b["patients"] if r["exam"].startswith("synthetic")]
    changes = [
        _mean(rows_b, k) - _mean(rows_a, k)  # type: ignore[operator]
        for k in keys
        if _mean(rows_a, k) is not None and _mean(rows_b, k) is not None
    ]
    return f"{max(changes, key=abs):+.3f}" if changes else "-"


def defaults_section(report: dict[str, Any]) -> list[str]:
    """The defaults of :class:`SegmentationParams` and, per nnU-Net model, what the
    alternatives cost and change in this run (1 thread; ratios of seconds per exam over
    the synthetic and real exams; Dice change = largest change of a mean synthetic Dice)."""
    defaults = SegmentationParams()
    lines = [
        "## Defaults",
        "",
        f"`SegmentationParams`: mirroring {'on' if defaults.use_mirroring else 'off'}, "
        f"tile step {defaults.tile_step_size}, folds: every `fold_*` of the model. "
        "Against these, in this run (1 thread):",
        "",
        "| model (folds) | mirroring on: x slower | Dice change | tile step 1.0: x faster "
        "| Dice change |",
        "|---|---|---|---|---|",
    ]
    names = dict.fromkeys(v["name"] for v in report["variants"] if v["tile_step"] is not None)
    for name in names:
        base = _variant(report, name, False, 0.5)
        mirror = _variant(report, name, True, 0.5)
        coarse = _variant(report, name, False, 1.0)
        if base is None or mirror is None or coarse is None:
            continue
        seconds = _mean(base["patients"], "wall_s")
        lines.append(
            f"| {name} | {_mean(mirror['patients'], 'wall_s') / seconds:.1f} "  # type: ignore[operator]
            f"| {_dice_change(base, mirror)} "
            f"| {seconds / _mean(coarse['patients'], 'wall_s'):.2f} "  # type: ignore[operator]
            f"| {_dice_change(base, coarse)} |"
        )
    lines += [
        "",
        "Mirroring stays off: it multiplies the time by the factor above for a Dice change "
        "of at most a few thousandths. The tile step stays at nnU-Net's 0.5: 1.0 (no "
        "overlap) is faster by the factor above but loses zonal Dice on the phantom, and on "
        "real exams a model predicts tile borders with less context; a user may set "
        "`segmentation.tile_step_size = 1.0` for a quick pass. GPU rows are missing when the "
        "run had no GPU (`device` in the JSON).",
    ]
    return lines


if __name__ == "__main__":
    main()
