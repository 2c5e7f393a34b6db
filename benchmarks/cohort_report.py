"""The Markdown page of ``bench_cohort.py`` (``benchmarks/results/cohort.md``) from its report.

Times in s, memory in MB (2^20 bytes), ADC in 1e-6 mm²/s, distances in mm, volumes in mL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STEPS = (
    "ingest",
    "denoise",
    "n4",
    "register",
    "fit_maps",  # ours: b1000 and ADC in one stage (tasks.chain.preprocess_exam)
    "b1000",
    "adc",
    "segment",
    "volume",
    "radiomics",
    "qc",
)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(values) / len(values)) if values else math.nan


def _ratio(a: float, b: float) -> str:
    """``a / b`` to 2 decimals; n/a when undefined or both below 0.05 (timer noise)."""
    if math.isnan(a) or math.isnan(b) or b <= 0 or max(a, b) < 0.05:
        return "n/a"
    return f"{a / b:.2f}"


def _f(value: float | None, digits: int = 2) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _means(rows: list[dict[str, Any]], step: str | None) -> dict[str, float]:
    costs = [r["total"] if step is None else r["steps"].get(step) for r in rows]
    costs = [c for c in costs if c]
    return {k: _mean([c[k] for c in costs]) for k in ("wall_s", "cpu_s", "peak_rss_mb")}


def _by_kind(report: dict[str, Any], variant: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in report[variant]["exams"] if r["kind"] == kind]


def step_table(report: dict[str, Any], kind: str) -> list[str]:
    """Per-step means over the exams of ``kind``: ours, naive and naive / ours."""
    ours, naive = _by_kind(report, "ours", kind), _by_kind(report, "naive", kind)
    if not ours:
        return []
    lines = [
        f"### Per step, mean over the {len(ours)} {kind} exam(s)",
        "",
        "| step | ours wall s | ours CPU s | ours peak MB | naive wall s | naive CPU s | "
        "naive peak MB | naive/ours wall | naive/ours CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for step in (*STEPS, None):
        o, n = _means(ours, step), _means(naive, step)
        name = "**per patient**" if step is None else step
        if math.isnan(o["wall_s"]) and math.isnan(n["wall_s"]):
            continue
        lines.append(
            f"| {name} | {_f(o['wall_s'])} | {_f(o['cpu_s'])} | {_f(o['peak_rss_mb'], 0)} | "
            f"{_f(n['wall_s'])} | {_f(n['cpu_s'])} | {_f(n['peak_rss_mb'], 0)} | "
            f"{_ratio(n['wall_s'], o['wall_s'])} | {_ratio(n['cpu_s'], o['cpu_s'])} |"
        )
    return lines + [""]


def patient_table(report: dict[str, Any]) -> list[str]:
    naive = {r["exam"]: r for r in report["naive"]["exams"]}
    lines = [
        "| exam | T2 / DWI size | ours wall s | ours CPU s | ours peak MB | naive wall s | "
        "naive CPU s | naive peak MB | naive/ours wall | naive/ours CPU | "
        "load (1 min) ours, naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["ours"]["exams"]:
        o, n = row["total"], naive[row["exam"]]["total"]
        load = (
            f"{row['load_average_1min'][0]:.1f}, {naive[row['exam']]['load_average_1min'][0]:.1f}"
        )
        lines.append(
            f"| {row['exam']} | {'x'.join(map(str, row['t2_size']))} / "
            f"{'x'.join(map(str, row['dwi_size']))} | {o['wall_s']:.1f} | {o['cpu_s']:.1f} | "
            f"{o['peak_rss_mb']:.0f} (+{o['peak_above_start_mb']:.0f}) | {n['wall_s']:.1f} | "
            f"{n['cpu_s']:.1f} | {n['peak_rss_mb']:.0f} (+{n['peak_above_start_mb']:.0f}) | "
            f"{_ratio(n['wall_s'], o['wall_s'])} | "
            f"{_ratio(n['cpu_s'], o['cpu_s'])} | {load} |"
        )
    return lines + [""]


SYNTHETIC_METRICS = (
    ("n4_t2_r_log_field", "N4 T2: r(log field, true log field), higher is better", 3),
    ("n4_dwi_r_log_field", "N4 DWI: r(log field, true) (naive: DWI not corrected)", 3),
    ("tre_rigid_mm", "DWI motion correction TRE, mean over b (mm)", 3),
    ("tre_affine_mm", "T2 <-> DWI affine TRE (mm)", 3),
    ("adc_gland_median_abs_error", "ADC median abs error in the gland (1e-6 mm²/s)", 1),
    ("adc_gland_median_error", "ADC median signed error in the gland (1e-6 mm²/s)", 1),
    ("dice", "Dice vs the true gland", 4),
    ("volume_error_ml", "gland volume error (mL), mean of |error|", 2),
)


def _metric(rows: list[dict[str, Any]], key: str) -> float:
    values = [r["accuracy"].get(key) for r in rows]
    if key == "volume_error_ml":
        values = [abs(v) for v in values if v is not None]
    return _mean([v for v in values if v is not None])


def _radiomics(rows: list[dict[str, Any]]) -> str:
    summaries = [r["accuracy"]["radiomics"] for r in rows]
    failed = sorted({name for s in summaries for name in s["images_failed"]})
    return (
        f"{_mean([s['features'] for s in summaries]):.0f} features, "
        f"{sum(s['non_finite'] for s in summaries)} non-finite, ADC in "
        f"{_mean([s['adc_gray_levels_in_mask'] for s in summaries]):.0f} gray levels"
        + (f", failed on {', '.join(failed)}" if failed else "")
    )


def accuracy_tables(report: dict[str, Any]) -> list[str]:
    lines = []
    ours, naive = _by_kind(report, "ours", "synthetic"), _by_kind(report, "naive", "synthetic")
    lines += [
        f"### Synthetic exams (mean over {len(ours)}; truth from `phantom/`)",
        "",
        "| metric | ours | naive |",
        "|---|---|---|",
    ]
    for key, label, digits in SYNTHETIC_METRICS:
        lines.append(
            f"| {label} | {_f(_metric(ours, key), digits)} | {_f(_metric(naive, key), digits)} |"
        )
    lines += [
        f"| radiomics (per patient; gray levels at the T2 grid with each one's ADC bin width) | "
        f"{_radiomics(ours)} | {_radiomics(naive)} |",
        "",
    ]
    real_ours = _by_kind(report, "ours", "real")
    if real_ours:
        naive_real = {r["exam"]: r for r in _by_kind(report, "naive", "real")}
        lines += [
            "### Real exams (ProstateX; no ground truth: agreement with the scanner ADC and the "
            "PI-CAI reference masks)",
            "",
            "The scanner ADC is the scanner's own fit of the unregistered, undenoised DWI: a "
            "reference to agree with, not ground truth (on synthetic exams, where the truth is "
            "known, compare the ADC error above).",
            "",
            "| exam | metric | ours | naive |",
            "|---|---|---|---|",
        ]
        for row in real_ours:
            o, n = row["accuracy"], naive_real[row["exam"]]["accuracy"]
            for name, value in o["dice"].items():
                lines.append(
                    f"| {row['exam']} | Dice vs {name} | {value:.3f} | {n['dice'][name]:.3f} |"
                )
            if "adc_vs_scanner_median_abs_diff" in o:
                region = o["adc_vs_scanner_region"]
                lines.append(
                    f"| {row['exam']} | ADC vs scanner ADC, median abs diff in {region} "
                    f"(1e-6 mm²/s) | {o['adc_vs_scanner_median_abs_diff']:.1f} | "
                    f"{n['adc_vs_scanner_median_abs_diff']:.1f} |"
                )
                lines.append(
                    f"| {row['exam']} | ADC vs scanner ADC, median signed diff | "
                    f"{o['adc_vs_scanner_median_diff']:.1f} | "
                    f"{n['adc_vs_scanner_median_diff']:.1f} |"
                )
            lines.append(
                f"| {row['exam']} | gland volume (mL) | {o['volume_ml']:.1f} | "
                f"{n['volume_ml']:.1f} |"
            )
            lines.append(
                f"| {row['exam']} | radiomics | {_radiomics([row])} | "
                f"{_radiomics([naive_real[row['exam']]])} |"
            )
        lines.append("")
    return lines


def projection_table(report: dict[str, Any]) -> list[str]:
    p = report["projection"]
    peak = max(report["ours"]["process_peak_rss_mb"], 1.0)
    ram_mb = report["machine"]["memory_gb"] * 1e9 / 2**20
    lines = [
        f"## Projection: {p['patients']:,} patients on this machine ({p['cores']} cores)",
        "",
        p["model"].replace("\n", " "),
        "",
        "| workers | per-patient wall s | patients / hour | 1,386 patients (h) | basis |",
        "|---|---|---|---|---|",
    ]
    for row in p["rows"]:
        lines.append(
            f"| {row['workers']} | {row['per_patient_wall_s']:.1f} | "
            f"{row['patients_per_hour']:.0f} | "
            f"{row['cohort_hours']:.1f} | {row['basis']} |"
        )
    lines += [
        f"| naive script (sequential) | {p['naive_per_patient_wall_s']:.1f} | "
        f"{3600 / p['naive_per_patient_wall_s']:.0f} | {p['naive_sequential_hours']:.1f} | "
        "measured, 1 process, library default threads"
        + (
            ""
            if report["naive_n4_iterations"] == "defaults (50, 50, 50, 50)"
            else " (naive N4 capped or skipped: a lower bound)"
        )
        + " |",
        "",
        f"Worker start-up (imports, elastix, model load; once per worker): {p['startup_s']:.1f} s. "
        f"Orchestration overhead per task run: {p['orchestration_overhead']}. "
        f"CPU bound (every core busy, nothing else running): {p['cpu_per_patient_s']:.1f} CPU-s "
        f"per patient -> {p['cpu_bound_hours']:.1f} h for {p['patients']:,} patients.",
        "",
        f"Memory: one ours worker peaked at {peak:.0f} MB (process, models loaded), so memory "
        f"alone would allow about {int(ram_mb // peak)} workers in this machine's "
        f"{report['machine']['memory_gb']:.0f} GB; the cores allow {p['cores']}.",
        "",
    ]
    if p["two_worker_efficiency"] is not None:
        pair = [r for rep in report["two_workers"]["reports"] for r in rep["exams"]]
        alone = {r["exam"]: r["total"] for r in report["ours"]["exams"]}
        cpu_pair = _mean([r["total"]["cpu_s"] for r in pair])
        cpu_alone = _mean([alone[r["exam"]]["cpu_s"] for r in pair])
        lines += [
            f"Adding the second worker: each patient takes {p['two_worker_slowdown']:.2f}x as long "
            f"(2-worker efficiency {p['two_worker_efficiency']:.2f}: throughput "
            f"x{2 * p['two_worker_efficiency']:.2f}). This machine has {p['cores']} cores, so a "
            "third worker adds nothing here (workers x threads <= cores). On a machine with "
            "more cores, each added worker adds about (efficiency x one worker's throughput) "
            "as long as memory (workers x the peak MB above) and disk keep up; that is an "
            "assumption, not measured here. The machine was shared with other jobs during the "
            "run (load averages in the tables), so the 2-worker figure carries their noise: "
            f"CPU time per patient was {cpu_pair:.1f} s in the pair vs {cpu_alone:.1f} s alone "
            f"({cpu_pair / cpu_alone:.2f}x), so most of the extra wall time was waiting for "
            f"a core (1-minute load {report['two_workers']['batch']['load_average_1min']} at "
            "the pair's start and end).",
            "",
        ]
    return lines


def cpu_bound(report: dict[str, Any], variant: str) -> float:
    """Hours for the cohort if ``variant``'s CPU time per patient (mean over every exam)
    kept every core busy: ``N x CPU s / cores / 3600``."""
    p = report["projection"]
    cpu = _mean([r["total"]["cpu_s"] for r in report[variant]["exams"]])
    return p["patients"] * cpu / p["cores"] / 3600


def headline(report: dict[str, Any]) -> list[str]:
    """The small table the README shows."""
    ours, naive = _by_kind(report, "ours", "synthetic"), _by_kind(report, "naive", "synthetic")
    o, n = _means(ours, None), _means(naive, None)
    p = report["projection"]
    best = min(p["rows"], key=lambda r: r["cohort_hours"])
    lines = [
        "| per synthetic patient (mean) | ours | naive script | naive / ours |",
        "|---|---|---|---|",
        f"| wall time (s) | {o['wall_s']:.1f} | {n['wall_s']:.1f} | "
        f"{_ratio(n['wall_s'], o['wall_s'])} |",
        f"| CPU time (s) | {o['cpu_s']:.1f} | {n['cpu_s']:.1f} | "
        f"{_ratio(n['cpu_s'], o['cpu_s'])} |",
        f"| peak memory (MB) | {o['peak_rss_mb']:.0f} | {n['peak_rss_mb']:.0f} | "
        f"{_ratio(n['peak_rss_mb'], o['peak_rss_mb'])} |",
        f"| Dice vs true gland | {_metric(ours, 'dice'):.3f} | {_metric(naive, 'dice'):.3f} | |",
        f"| ADC median abs error, gland (1e-6 mm²/s) | "
        f"{_metric(ours, 'adc_gland_median_abs_error'):.1f} | "
        f"{_metric(naive, 'adc_gland_median_abs_error'):.1f} | |",
        f"| T2 <-> DWI TRE (mm) | {_metric(ours, 'tre_affine_mm'):.2f} | "
        f"{_metric(naive, 'tre_affine_mm'):.2f} | |",
        f"| {p['patients']:,} patients on this machine (h; per-patient mean over all "
        f"{len(report['ours']['exams'])} exams) | {best['cohort_hours']:.1f} "
        f"({best['workers']} worker(s)) | {p['naive_sequential_hours']:.1f} (sequential) | "
        f"{_ratio(p['naive_sequential_hours'], best['cohort_hours'])} |",
        f"| {p['patients']:,} patients, CPU bound: every core busy, nothing else running "
        "(h; same mean) | "
        f"{p['cpu_bound_hours']:.1f} | {cpu_bound(report, 'naive'):.1f} | "
        f"{_ratio(cpu_bound(report, 'naive'), p['cpu_bound_hours'])} |",
    ]
    return lines


def markdown(report: dict[str, Any], preprocess_json: Path) -> str:
    """The whole page."""
    m = report["machine"]
    cap = report["naive_n4_iterations"]
    lines = [
        "# Cohort benchmark: the pipeline (ours) vs the straightforward script (naive)",
        "",
        f"`{report['command']}` on {m['machine']}, {m['cores']} cores, {m['memory_gb']} GB, "
        f"Python {m['python']}; whole benchmark {report['benchmark_wall_s'] / 60:.1f} min. "
        "Each variant ran in its own child process, patient after patient (the 1-minute load "
        "average at each patient's start is in the per-patient table: the machine was shared, "
        "so ratios measured in the same run are the figures to read, and CPU time is less "
        "disturbed by other jobs than wall time). CPU = process CPU time of all threads plus "
        f"child processes. Memory: {report['memory_method']}; per patient = the largest step "
        "peak (the whole process, imports and loaded models included).",
        "",
        "**ours** = the pipeline's plain functions (`tasks/`) at the pipeline's defaults "
        "(`StepSettings()`, `SegmentationSettings()`, `tasks/radiomics.yaml`; thread limits of "
        "one pipeline worker; model `auto`: demo nnU-Net on synthetic, TAPS on real exams, "
        "loaded once per worker; no file I/O between steps, no Prefect, no database). "
        "**naive** = the same libraries at their defaults, no thread settings: SimpleITK "
        "anisotropic diffusion at its default time step, SimpleITK N4 on the T2 at full "
        "resolution without a mask (DWI not bias-corrected), a new elastix ParameterObject "
        "with elastix's default rigid/affine map per call (affine with the T2 fixed), an "
        "unweighted log-linear ADC over all b, nnU-Net created per patient with test-time "
        "mirroring (on real exams: TAPS created per patient; the nnU-Net comparison is "
        "synthetic only, the demo model is not for real exams), `RadiomicsFeatureExtractor()` "
        "with no settings, no QC figure. Ingest, b1000 standardisation and DWI SUSAN are the "
        "pipeline's in both (no library default exists). See `benchmarks/cohort_chains.py`.",
        "",
    ]
    if cap == "skip":
        lines += [
            "**Naive N4 skipped** (`--quick`): the naive chain goes on with the uncorrected T2, "
            "so its N4 step, per-patient time and T2 field accuracy are missing from this page, "
            "and its downstream accuracy (registration, Dice) is that of a chain without N4.",
            "",
        ]
    elif cap != "defaults (50, 50, 50, 50)":
        context = ""
        if preprocess_json.is_file():
            pre = json.loads(preprocess_json.read_text()).get("n4_default")
            if pre:
                context = (
                    f" For scale, the uncapped default measured on {pre['exam']}'s T2 (same "
                    f"384x384x20 size) in `benchmarks/results/preprocess.md` (another run, "
                    f"quieter machine): {pre['t2']['wall_s']:.0f} s wall, {pre['t2']['cpu_s']:.0f} "
                    f"s CPU, field r {pre['t2_accuracy']['r_log_field']:.3f}."
                )
        lines += [
            f"**Naive N4 is capped** at {cap} iterations per level (defaults otherwise: 4 "
            "levels at full resolution, no mask): the uncapped default (50 per level) costs "
            "more than this whole benchmark, so the naive N4 time and per-patient time are "
            "LOWER bounds and the naive/ours ratios understate the naive cost; its field "
            f"accuracy is the capped one.{context} `--naive-n4-full` runs the real default.",
            "",
        ]
    lines += [
        "## Headline",
        "",
        *headline(report),
        "",
        "## Per patient",
        "",
        "Peak MB: the process's peak during the patient (+ its rise above the RSS the patient "
        "started at: what the patient itself needed; the rest is imports and models: ours' "
        "worker holds every model it loaded once, the demo nnU-Net and TAPS when real exams "
        "are in the run).",
        "",
        *patient_table(report),
    ]
    lines += ["## Per step", ""]
    for kind in ("synthetic", "real"):
        lines += step_table(report, kind)
    ours_up, naive_up = report["ours"]["startup"], report["naive"]["startup"]
    ours_batch, naive_batch = report["ours"]["batch"], report["naive"]["batch"]
    lines += [
        f"One-off start of each process (not in the per-patient figures): ours "
        f"{ours_up['wall_s']:.1f} s wall / {ours_up['cpu_s']:.1f} s CPU / "
        f"{ours_up['peak_rss_mb']:.0f} MB (imports, elastix, models loaded once); naive "
        f"{naive_up['wall_s']:.1f} s / {naive_up['cpu_s']:.1f} s / "
        f"{naive_up['peak_rss_mb']:.0f} MB (imports, elastix). Process peaks: "
        f"ours {report['ours']['process_peak_rss_mb']:.0f} MB, naive "
        f"{report['naive']['process_peak_rss_mb']:.0f} MB. Whole child processes: ours "
        f"{ours_batch['wall_s']:.0f} s wall / {ours_batch['cpu_s']:.0f} s CPU, naive "
        f"{naive_batch['wall_s']:.0f} s / {naive_batch['cpu_s']:.0f} s (synthetic generation, "
        f"{report['generation_s']:.0f} s, in neither).",
        "",
    ]
    naive_n4 = [r.get("n4_iterations_run") for r in report["naive"]["exams"]]
    if any(naive_n4):
        lines += [f"Naive N4 iterations run per level, per exam: {naive_n4}.", ""]
    lines += ["## Accuracy", "", *accuracy_tables(report)]
    lines += projection_table(report)
    if report["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    return "\n".join(lines)
