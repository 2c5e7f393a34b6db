"""QC metrics and statuses on clean exams and on the same exams with known defects.

Runs the demo (phantom, ``--patients`` exams, demo model) and the real ProstateX exams
(TAPS) through ``prostate-cohort`` into ``--work`` (cached when rerun), then for every exam
computes the QC metrics (:func:`tasks.qc_metrics.exam_qc_metrics`) of the clean pipeline
outputs and of the same outputs with each defect of :mod:`phantom.defects` (a 5 mm
misregistration, a mask cut off at the top slice, a two-component mask, a mask eroded by 25 %
of its volume, alone and with a second model's mask of the exam, here the clean mask) and
judges them with the default thresholds (:func:`tasks.qc_flags.judge`).

    python benchmarks/bench_qc.py [--work DIR] [--patients 8]

Writes ``benchmarks/results/qc.json`` and ``qc.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.qc import exam_qc_images  # noqa: E402
from phantom import defects  # noqa: E402
from tasks.qc_flags import judge  # noqa: E402
from tasks.qc_metrics import exam_qc_metrics  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REAL = ROOT.parent / "shared" / "data" / "dicom"
DEFECTS = {
    "clean": lambda images: images,
    "misregistered 5 mm (x)": lambda images: defects.misregistered(images, (5.0, 0.0, 0.0)),
    "misregistered 5 mm (y)": lambda images: defects.misregistered(images, (0.0, 5.0, 0.0)),
    "cut off at the top slice": defects.cut_off_top,
    "two components": defects.two_components,
    "eroded 25 % of the volume": defects.eroded,
    "eroded 25 %, a second model ran": lambda images: dataclasses.replace(
        defects.eroded(images), others={"second": images.mask}
    ),
}
#: The reason each defect must raise (a phrase of tasks.qc_flags.judge's reasons).
EXPECTED = {
    "misregistered 5 mm (x)": "DWI off the T2",
    "misregistered 5 mm (y)": "DWI off the T2",
    "cut off at the top slice": "may be cut off",
    "two components": "pieces",
    "eroded 25 % of the volume": "under-segmented",
    "eroded 25 %, a second model ran": "vs model second",
}


def _cli(*args: str) -> None:
    program = str(Path(sys.executable).with_name("prostate-cohort"))
    subprocess.run([program, *args], check=True, capture_output=True)


def _exams(output: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(patient, exam folder, register details) of every exam of an output tree."""
    database = sqlite3.connect(output / "provenance.sqlite")
    rows = database.execute(
        "SELECT p.pseudo_id, s.details FROM step_run s JOIN patient p ON p.id = s.patient_id "
        "WHERE s.step = 'register' AND s.status = 'completed' ORDER BY s.id"
    ).fetchall()
    details = {patient: json.loads(text) for patient, text in rows}
    return [
        (patient, next((output / "patients" / patient).iterdir()), details[patient])
        for patient in sorted(details)
    ]


def measure(output: Path, model: str, kind: str) -> list[dict[str, Any]]:
    out = []
    for patient, exam_dir, registration in _exams(output):
        clean = exam_qc_images(exam_dir, model)
        for defect, make in DEFECTS.items():
            started = time.perf_counter()
            metrics = exam_qc_metrics(make(clean), registration=registration)
            seconds = time.perf_counter() - started
            verdict = judge(metrics)
            expected = EXPECTED.get(defect)
            caught = (
                verdict.status == "pass"
                if expected is None
                else any(expected in reason for reason in verdict.reasons)
            )
            out.append(
                {
                    "kind": kind,
                    "patient": patient,
                    "model": model,
                    "defect": defect,
                    "status": verdict.status,
                    "reasons": list(verdict.reasons),
                    "as_expected": caught,
                    "seconds": round(seconds, 2),
                    "metrics": metrics,
                }
            )
    return out


SHOWN = (
    "residual_shift_mm",
    "reg_translation_mm",
    "edge_outside_ratio",
    "volume_ml",
    "components",
    "touches_last_slice",
    "dwi_lowb_snr",
    "adc_vs_scanner_rel",
    "dwi_decay_ratio",
)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# QC: metrics and statuses on clean exams and on known defects",
        "",
        f"`python benchmarks/bench_qc.py` ({meta['seconds']:.0f} s, Python {meta['python']}). "
        "Exams: the demo's phantom exams (demo model) and the real ProstateX exams (TAPS), "
        "each as the pipeline wrote it (clean) and with one defect put into its QC inputs "
        "(`phantom/defects.py`). Statuses with the default thresholds "
        "(`tasks/qc_flags.py`); 'as expected' = a clean exam passes, a defect raises its "
        "own reason.",
        "",
        "## Summary",
        "",
        "| exams | defect | as expected | statuses |",
        "|---|---|---|---|",
    ]
    for kind in ("phantom", "real"):
        for defect in DEFECTS:
            group = [r for r in rows if r["kind"] == kind and r["defect"] == defect]
            if not group:
                continue
            hits = sum(r["as_expected"] for r in group)
            statuses = ", ".join(
                f"{s} {sum(r['status'] == s for r in group)}"
                for s in ("pass", "review", "fail")
                if any(r["status"] == s for r in group)
            )
            lines.append(f"| {kind} | {defect} | {hits}/{len(group)} | {statuses} |")
    lines += ["", "## Every exam", "", "| exam | defect | status | " + " | ".join(SHOWN) + " |"]
    lines.append("|---" * (3 + len(SHOWN)) + "|")
    for r in rows:
        values = " | ".join(
            "" if r["metrics"].get(name) is None else f"{r['metrics'][name]:g}" for name in SHOWN
        )
        lines.append(f"| {r['kind']} {r['patient']} | {r['defect']} | {r['status']} | {values} |")
    lines += ["", "## Reasons", ""]
    for r in rows:
        if r["reasons"]:
            lines.append(f"- {r['kind']} {r['patient']}, {r['defect']}: {'; '.join(r['reasons'])}")
    real_clean = [r for r in rows if r["kind"] == "real" and r["defect"] == "clean"]
    if real_clean:
        lines += ["", "## Real exams, clean: every metric", ""]
        for r in real_clean:
            lines.append(f"### {r['patient']} ({r['status']})")
            lines.append("")
            lines += [f"- {k}: {v}" for k, v in r["metrics"].items()]
            lines.append("")
    times = [r["seconds"] for r in rows if r["defect"] == "clean"]
    lines += ["", f"QC metrics per clean exam: median {sorted(times)[len(times) // 2]:.2f} s."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-qc"))
    parser.add_argument("--patients", type=int, default=8)
    args = parser.parse_args()
    started = time.perf_counter()
    demo, real = args.work / "demo", args.work / "real"
    _cli("demo", "--patients", str(args.patients), "--output", str(demo))
    rows = measure(demo, "demo", "phantom")
    if REAL.is_dir():
        _cli("run", str(REAL), "--model", "taps", "--output", str(real))
        rows += measure(real, "taps", "real")
    meta = {"seconds": time.perf_counter() - started, "python": platform.python_version()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "qc.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "qc.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
