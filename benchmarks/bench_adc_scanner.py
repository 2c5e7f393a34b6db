"""Our ADC against the scanner's ADC map on the real ProstateX exams, per estimator.

Radiologists read ADC against the vendor's map, so this is the figure that decides the
default estimator of ``tasks.dwi.DwiFitParams``. For ProstateX-0000 and ProstateX-0218:

1. ingest the exam with ``tasks.ingest.ingest_exam`` (as the pipeline does);
2. take the selected DWI b-volumes as ingested (raw, on the DWI grid) and the scanner ADC
   (converted to mm²/s by ingest);
3. compute ADC with ``tasks.dwi.compute_adc`` for each estimator (``ols``, ``wlls``,
   ``wlls_measured``; the default b-value rule: b < 50 s/mm² left out when three remain),
   plus OLS on every acquired b for reference;
4. report the median over voxels of the signed relative difference
   ``(ours - scanner) / scanner`` (and the median of its absolute value), on the DWI grid,
   over voxels where the scanner ADC is > 0 (the scanner zeroes what it judged noise), in
   two regions: the gland, and the central box (middle half along each axis).

Gland masks: ProstateX-0000 has a reference mask (``labels/ProstateX-0000/
gland_Bosma22b.nii.gz``, on the T2 grid). ProstateX-0218 has none: its ingested (raw) T2 is
segmented with the TAPS backend (``tasks.segment_taps.TapsBackend``, CPU, 1 thread). Either
mask is mapped onto the DWI grid through scanner coordinates (identity transform: no
registration), by linear interpolation of the binary mask, then ``>= 0.5``.

ProstateX-0218 is also fitted the way ingest selected DWI before one acquisition per fit was
the rule: series 8 (b 0/100/400/800, TE 60 ms, TR 3300 ms) merged with the separate b100,
b500 and b1400 series 17, 18, 19 (TE 72 ms, TR 3600 ms), the two b100 averaged, built from
the raw DICOM with the ingest's own volume builder.

Run ``.venv/bin/python benchmarks/bench_adc_scanner.py`` (about 1-5 min on 2 cores, most of it
TAPS; ``--no-taps`` skips the 0218 gland). Writes ``benchmarks/results/adc_scanner.json`` and
``adc_scanner.md``. Exits 0 with a message when ``../shared/data`` is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from tasks.dicom_headers import read_headers  # noqa: E402
from tasks.discover import discover_exams  # noqa: E402
from tasks.dwi import DwiFitParams, compute_adc, select_b_values  # noqa: E402
from tasks.ingest import IngestResult, ingest_exam  # noqa: E402
from tasks.volumes import build_dwi_volumes  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
X0000 = "ProstateX-0000/07-07-2011"
X0218 = "ProstateX-0218/02-18-2011"
REFERENCE_MASK = DATA / "labels" / "ProstateX-0000" / "gland_Bosma22b.nii.gz"
MERGED_SERIES = ("8.", "17.", "18.", "19.")  # ProstateX-0218, the pre-change selection
ESTIMATORS = {
    "ols": DwiFitParams(estimator="ols"),
    "wlls": DwiFitParams(estimator="wlls"),
    "wlls_measured": DwiFitParams(estimator="wlls_measured"),
}


def _records(result: IngestResult, kind: str) -> list:
    return [s for s in result.series if s.kind == kind]


def _on_dwi_grid(mask: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """Binary mask mapped through scanner coordinates (identity), linear, then >= 0.5."""
    moved = sitk.Resample(
        sitk.Cast(mask > 0, sitk.sitkFloat32),
        reference,
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(moved) >= 0.5


def _central_box(shape: tuple[int, ...]) -> np.ndarray:
    box = np.zeros(shape, bool)
    nz, ny, nx = shape
    box[nz // 4 : nz - nz // 4, ny // 4 : ny - ny // 4, nx // 4 : nx - nx // 4] = True
    return box


def _compare(ours: np.ndarray, scanner: np.ndarray, region: np.ndarray) -> dict[str, float]:
    where = region & (scanner > 0)
    rel = (ours[where] - scanner[where]) / scanner[where]
    return {
        "voxels": int(where.sum()),
        "median_signed_rel_diff": float(np.median(rel)),
        "median_abs_rel_diff": float(np.median(np.abs(rel))),
        "median_ours_mm2_s": float(np.median(ours[where])),
        "median_scanner_mm2_s": float(np.median(scanner[where])),
    }


def _fits(
    images: dict[float, sitk.Image], scanner: np.ndarray, regions: dict[str, np.ndarray]
) -> dict[str, dict]:
    variants = dict(ESTIMATORS)
    variants["ols, every acquired b"] = DwiFitParams(estimator="ols", b_values=tuple(images))
    rows = {}
    for name, params in variants.items():
        adc = sitk.GetArrayFromImage(compute_adc(images, params=params)).astype(np.float64)
        rows[name] = {
            "fit_b_values": list(select_b_values(list(images), params)),
            **{region: _compare(adc, scanner, mask) for region, mask in regions.items()},
        }
    return rows


def _series_folder(exam: Path, prefix: str) -> Path:
    (folder,) = [p for p in exam.iterdir() if p.name.startswith(prefix)]
    return folder


def _merged_0218() -> tuple[dict[float, sitk.Image], list[str]]:
    """b-volumes of series 8 + 17 + 18 + 19 on series 8's grid, repeated b averaged."""
    exam = DATA / "dicom" / X0218
    pairs = []
    for prefix in MERGED_SERIES:
        folder = _series_folder(exam, prefix)
        pairs.append((folder.name, read_headers(sorted(folder.iterdir()))))
    volumes = build_dwi_volumes(pairs)
    return {v.b_value: v.image for v in volumes}, [v.note for v in volumes]


def _taps_gland(t2: sitk.Image) -> tuple[sitk.Image, dict]:
    from tasks.segment import SegmentationInputs, SegmentationParams  # noqa: PLC0415
    from tasks.segment_taps import TapsBackend  # noqa: PLC0415

    start = time.perf_counter()
    backend = TapsBackend(params=SegmentationParams(device="cpu", threads=1))
    result = backend.segment(SegmentationInputs(t2w=t2))
    seconds = time.perf_counter() - start
    details = {
        "model": f"TAPS ({backend.version}), raw ingested T2, CPU 1 thread",
        "model_sha256": backend.model_hash,
        "volume_ml_t2_grid": float(result.details.get("volume_ml", float("nan"))),
        "seconds": round(seconds, 1),
        "qc_flags": result.details.get("qc_flags"),
    }
    return result.labels, details


def _exam(folder: str, out: Path, taps: bool) -> dict:
    (exam,) = [e for e in discover_exams(DATA / "dicom") if e.folder == folder]
    result = ingest_exam(exam, out_dir=out, key="bench")
    if result.status != "ok":
        raise SystemExit(f"ingest of {folder} failed: {result.error}")
    dwi = _records(result, "dwi")
    images = {s.b_value: sitk.ReadImage(str(out / s.image)) for s in dwi}
    (adc_record,) = _records(result, "adc")
    (t2_record,) = _records(result, "t2w")
    scanner_image = sitk.ReadImage(str(out / adc_record.image))
    scanner = sitk.GetArrayFromImage(scanner_image).astype(np.float64)
    reference = images[min(images)]
    regions = {"central_box": _central_box(scanner.shape)}
    gland_info: dict = {}
    if folder == X0000:
        gland = sitk.ReadImage(str(REFERENCE_MASK))
        gland_info = {"source": f"reference mask {REFERENCE_MASK.name} (PI-CAI, AI-made)"}
    elif taps:
        gland, gland_info = _taps_gland(sitk.ReadImage(str(out / t2_record.image)))
        gland_info["source"] = "TAPS segmentation of the ingested T2 (no reference mask)"
    else:
        gland = None
    if gland is not None:
        regions["gland"] = _on_dwi_grid(gland, reference)
        voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
        gland_info["volume_ml_dwi_grid"] = float(regions["gland"].sum()) * voxel_ml
        regions = {"gland": regions["gland"], "central_box": regions["central_box"]}
    row = {
        "exam": folder,
        "dwi_series": sorted({f for s in dwi for f in s.source_folders}),
        "dwi_b_values": sorted(images),
        "scanner_adc_series": adc_record.source,
        "gland": gland_info or None,
        "selected": _fits(images, scanner, regions),
    }
    if folder == X0218:
        merged, notes = _merged_0218()
        if not all(
            m.GetSize() == reference.GetSize()
            and np.allclose(m.GetOrigin(), reference.GetOrigin(), atol=1e-3)
            for m in merged.values()
        ):
            raise SystemExit("merged 0218 volumes are not on the ingested DWI grid")
        row["merged_before_change"] = {
            "series": [_series_folder(DATA / "dicom" / X0218, p).name for p in MERGED_SERIES],
            "b_values": sorted(merged),
            "notes": notes,
            "fits": _fits(merged, scanner, regions),
        }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-taps", action="store_true", help="skip ProstateX-0218's gland")
    args = parser.parse_args()
    if not (DATA / "dicom").is_dir():
        print(f"skipped: real exams not found under {DATA} (needs ../shared/data)")
        return 0
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_exam(folder, Path(tmp), taps=not args.no_taps) for folder in (X0000, X0218)]
    result = {
        "command": "python benchmarks/bench_adc_scanner.py"
        + (" --no-taps" if args.no_taps else ""),
        "default_estimator": DwiFitParams().estimator,
        "exams": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adc_scanner.json").write_text(json.dumps(result, indent=2) + "\n")
    text = _markdown(result)
    (RESULTS / "adc_scanner.md").write_text(text)
    print(text)
    return 0


def _pct(value: float) -> str:
    return f"{value:+.1%}"


def _table(fits: dict[str, dict], regions: list[str], label: str) -> list[str]:
    lines = []
    for name, row in fits.items():
        fitted = "/".join(f"{b:g}" for b in row["fit_b_values"])
        cells = [
            f"{_pct(row[r]['median_signed_rel_diff'])} ({row[r]['median_abs_rel_diff']:.1%})"
            for r in regions
        ]
        lines.append(f"| {label} | {name} | {fitted} | " + " | ".join(cells) + " |")
    return lines


def _summary(result: dict) -> list[str]:
    """Which estimator agrees with the scanner within +-5 % in every exam's gland."""
    lines = ["## Summary (gland, DWI as ingested, median signed difference)", ""]
    lines += [
        "| estimator | " + " | ".join(e["exam"] for e in result["exams"]) + " | all within ±5 % |"
    ]
    lines += ["|---|" + "---|" * len(result["exams"]) + "---|"]
    for name in ESTIMATORS:
        values = [e["selected"][name].get("gland") for e in result["exams"]]
        if any(v is None for v in values):
            return []
        figures = [v["median_signed_rel_diff"] for v in values]
        within = "yes" if all(abs(f) <= 0.05 for f in figures) else "no"
        lines.append(f"| {name} | " + " | ".join(_pct(f) for f in figures) + f" | {within} |")
    return [*lines, ""]


def _markdown(result: dict) -> str:
    lines = [
        "# Our ADC vs the scanner's ADC map (real ProstateX exams)",
        "",
        f"`{result['command']}` ({result['seconds']:.0f} s, Python {result['python']}, "
        f"{result['machine']}). Default estimator when run: `{result['default_estimator']}`.",
        "",
        "Cells: median over voxels of the signed relative difference (ours - scanner) / "
        "scanner, and in brackets the median of its absolute value; on the DWI grid, over "
        "voxels where the scanner ADC > 0. Central box = middle half of the volume along "
        "each axis. Masks are mapped from the T2 grid through scanner coordinates (no "
        "registration; linear interpolation of the binary mask, >= 0.5).",
        "",
    ]
    lines += _summary(result)
    for exam in result["exams"]:
        regions = [r for r in ("gland", "central_box") if r in exam["selected"]["ols"]]
        first = exam["selected"]["ols"]
        lines += [
            f"## {exam['exam']}",
            "",
            f"DWI as ingested: b {', '.join(f'{b:g}' for b in exam['dwi_b_values'])} from "
            f"{', '.join(f'`{s}`' for s in exam['dwi_series'])}; scanner ADC "
            f"`{exam['scanner_adc_series']}`.",
        ]
        gland = exam["gland"]
        if gland:
            extra = ""
            if "seconds" in gland:
                extra = (
                    f" ({gland['model']}, {gland['seconds']:.0f} s; "
                    f"{gland['volume_ml_t2_grid']:.1f} mL on the T2 grid; "
                    f"QC flags {gland['qc_flags']})"
                )
            lines.append(
                f"Gland: {gland['source']}{extra}; {gland['volume_ml_dwi_grid']:.1f} mL on the "
                f"DWI grid, {first['gland']['voxels']} voxels with scanner ADC > 0."
            )
        else:
            lines.append("Gland: not computed (run without --no-taps).")
        lines.append(
            f"Central box: {first['central_box']['voxels']} voxels with scanner ADC > 0; "
            f"scanner median {first['central_box']['median_scanner_mm2_s'] * 1e6:.0f} "
            "x1e-6 mm²/s."
        )
        lines += [
            "",
            "| DWI | estimator | b fitted | " + " | ".join(regions) + " |",
            "|---|---|---|" + "---|" * len(regions),
        ]
        lines += _table(exam["selected"], regions, "as ingested")
        merged = exam.get("merged_before_change")
        if merged:
            lines += _table(merged["fits"], regions, "merged (before)")
            lines += [
                "",
                "merged (before) = the selection before one acquisition per fit: "
                + ", ".join(f"`{s}`" for s in merged["series"])
                + f" on one grid, b {', '.join(f'{b:g}' for b in merged['b_values'])}; "
                + "; ".join(n for n in merged["notes"] if "averaged" in n)
                + ".",
            ]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
