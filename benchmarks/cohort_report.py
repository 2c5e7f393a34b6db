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


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _met(value: bool | None) -> str:
    return {True: "**met**", False: "not met", None: "n/a"}[value]


def _naive_label(report: dict[str, Any]) -> str:
    return "naive (lower bound)" if report["naive_n4"]["lower_bound"] else "naive"


def kind_headline(report: dict[str, Any], kind: str) -> list[str]:
    """Per exam of ``kind`` (mean): whole exam, excluding segmentation, segmentation alone,
    wall and CPU, naive / ours; peak memory; the main accuracy figures."""
    s = report["summary"].get(kind)
    if not s:
        return []
    ours, naive = _by_kind(report, "ours", kind), _by_kind(report, "naive", kind)
    model = ", ".join(sorted({r["model"] for r in ours}))
    lines = [
        f"### Per {kind} exam (mean over {len(s['exams'])}: {', '.join(s['exams'])})",
        "",
        f"| per {kind} exam (mean) | ours | {_naive_label(report)} | naive / ours |",
        "|---|---|---|---|",
    ]
    parts = (
        ("whole", f"whole exam with segmentation (ours: {model})"),
        ("excluding_segment", "excluding segmentation (sum of every step but `segment`)"),
        ("segment", "segmentation alone"),
    )
    for part, label in parts:
        for key, unit in (("wall_s", "wall s"), ("cpu_s", "CPU s")):
            o, n = s[part]["ours"][key], s[part]["naive"][key]
            lines.append(
                f"| {label}, {unit} | {_f(o, 1)} | {_f(n, 1)} | "
                f"{_x(s[part]['naive_over_ours'][key])} |"
            )
    peak = s["peak_rss_mb"]
    lines.append(
        f"| peak memory during a {kind} exam (MB, largest; whole process) | "
        f"{peak['ours']:.0f} | {peak['naive']:.0f} | |"
    )
    if kind == "real":
        dice = {
            variant: _mean([v for r in rows for v in r["accuracy"]["dice"].values()])
            for variant, rows in (("ours", ours), ("naive", naive))
        }
        if not math.isnan(dice["ours"]):
            lines.append(
                f"| Dice vs the reference masks (mean) | {dice['ours']:.3f} | "
                f"{dice['naive']:.3f} | |"
            )
    else:
        lines += [
            f"| Dice vs true gland | {_metric(ours, 'dice'):.3f} | "
            f"{_metric(naive, 'dice'):.3f} | |",
            f"| ADC median abs error, gland (1e-6 mm²/s) | "
            f"{_metric(ours, 'adc_gland_median_abs_error'):.1f} | "
            f"{_metric(naive, 'adc_gland_median_abs_error'):.1f} | |",
            f"| T2 <-> DWI TRE (mm) | {_metric(ours, 'tre_affine_mm'):.2f} | "
            f"{_metric(naive, 'tre_affine_mm'):.2f} | |",
        ]
    return lines + [""]


def targets_table(report: dict[str, Any]) -> list[str]:
    """Issue 18's targets next to the measured figures; met / not met from the data."""
    lines = [
        f"### Targets (issue 18), per {report['targets_basis']} exam, wall time",
        "",
        "Met / not met is computed from the per-exam figures: a target is met only if it "
        f"holds on every {report['targets_basis']} exam. Ours ran at "
        f"{report['ours_threads']} thread(s), naive at the libraries' default threads (all "
        f"{report['machine']['cores']} cores here), so the wall ratios compare a one-thread "
        "worker with the script as it runs; the CPU ratios are in the notes.",
        "",
        "| target | measured | met? | note |",
        "|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {_met(t['met'])} | {t['note']} |")
    return lines + [""]


def passes_table(report: dict[str, Any]) -> list[str]:
    """Ours' every pass per exam (the figures elsewhere are the median over them)."""
    rows = report["ours"]["exams"]
    n = report["ours"]["repeats"]
    lines = [
        f"Ours' {n} pass(es) over the exams in one warm worker (wall s / CPU s per exam; "
        "elsewhere on this page ours is each exam's median over its passes, per step and in "
        "total; the first pass may include one-off costs):",
        "",
        "| exam | " + " | ".join(f"pass {i + 1}" for i in range(n)) + " | median |",
        "|---|" + "---|" * (n + 1),
    ]
    for row in rows:
        cells = [f"{p['total']['wall_s']:.1f} / {p['total']['cpu_s']:.1f}" for p in row["passes"]]
        median = f"{row['total']['wall_s']:.1f} / {row['total']['cpu_s']:.1f}"
        lines.append(f"| {row['exam']} | " + " | ".join(cells) + f" | {median} |")
    sums = [
        sum(r["passes"][i]["total"][k] for r in rows) for i in range(n) for k in ("wall_s", "cpu_s")
    ]
    cells = [f"{sums[2 * i]:.1f} / {sums[2 * i + 1]:.1f}" for i in range(n)]
    lines.append("| **all exams** | " + " | ".join(cells) + " | |")
    return lines + [""]


def memory_line(report: dict[str, Any]) -> str:
    ours, naive = report["ours"]["process_peak_rss_mb"], report["naive"]["process_peak_rss_mb"]
    models = ", ".join(sorted({r["model"] for r in report["ours"]["exams"]}))
    return (
        f"Peak memory per worker (the whole process over the whole run, imports and models "
        f"included): ours {ours:.0f} MB, naive {naive:.0f} MB. Ours' worker holds every "
        f"model it loaded once (here: {models})."
    )


def host_projection_table(report: dict[str, Any]) -> list[str]:
    """1,386 exams on a 16-core host, CPU only and with a GPU, from measured CPU s."""
    h = report["host_projection"]
    peak = report["ours"]["process_peak_rss_mb"]
    bound = " (lower bound)" if report["naive_n4"]["lower_bound"] else ""
    gpu_s = h["gpu_segment_s"]
    lines = [
        f"## Projection: {h['patients']:,} exams on a {h['cores']}-core host",
        "",
        f"From the measured CPU s per step, mean over the {h['basis']} exams. {h['model']}",
        "",
        f"| {h['patients']:,} exams, {h['cores']} cores | CPU s per exam | hours |",
        "|---|---|---|",
        f"| ours, CPU only: {h['cores']} workers x 1 thread, segmentation on the CPU | "
        f"{_f(h['ours_cpu_per_exam_s'], 1)} | {_f(h['cpu_only_hours'], 1)} |",
        f"| ours with a GPU, CPU part: everything but segmentation | "
        f"{_f(h['ours_cpu_per_exam_excluding_segment_s'], 1)} | "
        f"{_f(h['gpu_cpu_bound_hours'], 1)} |",
        f"| ours with a GPU, GPU part: {h['patients']:,} segmentations | "
        + (
            f"{gpu_s:.1f} s GPU wall per exam | {h['gpu_segment_hours']:.1f} |"
            if gpu_s is not None
            else "GPU segmentation time not measured | not measured |"
        ),
        f"| naive, CPU only: {h['cores']} processes, library threads{bound} | "
        f"{_f(h['naive_cpu_per_exam_s'], 1)} | {_f(h['naive_cpu_only_hours'], 1)} |",
        "",
    ]
    if gpu_s is not None:
        lines.append(
            f"With a GPU: {h['gpu_hours']:.1f} h, the larger of the CPU and GPU parts "
            f"({h['gpu_note']})."
        )
    else:
        lines.append(
            f"With a GPU: {h['gpu_note']}. The cohort then takes at least the CPU part's "
            f"{_f(h['gpu_cpu_bound_hours'], 1)} h, and that only if one GPU segments an exam "
            f"in at most {_f(h['gpu_segment_budget_s'], 2)} s ({h['patients']:,} "
            f"segmentations within the CPU part's time); ours' segmentation took "
            f"{_f(h['ours_segment_cpu_s'], 1)} CPU s per exam here."
        )
    lines += [
        "",
        f"Memory: {h['cores']} ours workers x {peak:.0f} MB (one worker's process peak here) = "
        f"{h['cores'] * peak / 1024:.1f} GB.",
        "",
    ]
    return lines


def projection_table(report: dict[str, Any]) -> list[str]:
    """The cohort on this machine, by worker count (measured 1- and 2-worker rates)."""
    p = report["projection"]
    peak = max(report["ours"]["process_peak_rss_mb"], 1.0)
    ram_mb = report["machine"]["memory_gb"] * 1e9 / 2**20
    bound = " (naive N4 capped or skipped: a lower bound)" * report["naive_n4"]["lower_bound"]
    lines = [
        f"## Projection: {p['patients']:,} patients on this machine ({p['cores']} cores)",
        "",
        f"Per-exam figures: mean over the {report['targets_basis']} exams. " + p["model"],
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
        f"measured, 1 process, library default threads{bound} |",
        "",
        f"Worker start-up (imports, elastix, model load; once per worker): {p['startup_s']:.1f} s. "
        f"Orchestration overhead: {p['orchestration_overhead']}. "
        f"CPU bound (every core busy, nothing else running): {p['cpu_per_patient_s']:.1f} CPU-s "
        f"per patient -> {p['cpu_bound_hours']:.1f} h for {p['patients']:,} patients (naive: "
        f"{p['naive_cpu_bound_hours']:.1f} h{bound}).",
        "",
        f"Memory: one ours worker peaked at {peak:.0f} MB (process, models loaded), so memory "
        f"alone would allow about {int(ram_mb // peak)} workers in this machine's "
        f"{report['machine']['memory_gb']:.0f} GB; the cores allow {p['cores']}.",
        "",
    ]
    if p["two_worker_efficiency"] is not None:
        two = report["two_workers"]
        pair = [r for rep in two["reports"] for r in rep["exams"]]
        alone = {r["exam"]: r["passes"][0]["total"] for r in report["ours"]["exams"]}
        cpu_pair = _mean([r["total"]["cpu_s"] for r in pair])
        cpu_alone = _mean([alone[r["exam"]]["cpu_s"] for r in pair])
        lines += [
            f"The 2-worker pair: two ours processes (one thread each) on {two['exam']} at once, "
            "compared with ours' first pass over it alone: each exam takes "
            f"{p['two_worker_slowdown']:.2f}x as long (2-worker efficiency "
            f"{p['two_worker_efficiency']:.2f}: throughput x{2 * p['two_worker_efficiency']:.2f}"
            f"). CPU time per exam was {cpu_pair:.1f} s in the pair vs {cpu_alone:.1f} s alone "
            f"({cpu_pair / cpu_alone:.2f}x); 1-minute load {two['batch']['load_average_1min']} "
            "at the pair's start and end (the machine may be shared). More workers than cores "
            "add nothing (workers x threads <= cores).",
            "",
        ]
    return lines


def n4_paragraph(report: dict[str, Any], preprocess_json: Path) -> list[str]:
    """What the naive N4 ran, and whether naive times are lower bounds."""
    n4 = report["naive_n4"]
    runs = [r.get("n4_iterations_run") for r in report["naive"]["exams"]]
    spread = [r.get("n4_field_p1_p99") for r in report["naive"]["exams"]]
    ran = f" Iterations run per level, per exam: {runs}." if any(runs) else ""
    if any(spread):
        ran += f" Its T2 field, 1st/99th percentile in the body, per exam: {spread}."
    if not n4["lower_bound"]:
        return [f"**Naive N4**: {n4['setting']}.{ran}", ""]
    context = ""
    if isinstance(n4["iterations"], list) and preprocess_json.is_file():
        pre = json.loads(preprocess_json.read_text()).get("n4_default")
        if pre:
            context = (
                f" For scale, the uncapped default on {pre['exam']}'s T2 in "
                f"`benchmarks/results/preprocess.md` (another run): {pre['t2']['wall_s']:.0f} s "
                f"wall, {pre['t2']['cpu_s']:.0f} s CPU."
            )
    return [
        f"**Naive N4 {n4['setting']}: naive times are LOWER BOUNDS**, and so are the naive / "
        f"ours ratios; its N4 accuracy is not the default's.{ran}{context} Run without "
        "`--quick` / `--naive-n4-iterations` for the real default.",
        "",
    ]


def markdown(report: dict[str, Any], preprocess_json: Path) -> str:
    """The whole page."""
    m = report["machine"]
    targets = targets_table(report)
    lines = [
        "# Cohort benchmark: the pipeline (ours) vs the straightforward script (naive)",
        "",
        f"`{report['command']}` on {m['machine']}, {m['cores']} cores, {m['memory_gb']} GB, "
        f"Python {m['python']}; whole benchmark {report['benchmark_wall_s'] / 60:.1f} min. "
        "Each variant ran in its own child process, exam after exam (the 1-minute load "
        "average at each exam's start is in the per-exam table: the machine may be shared, "
        "so ratios measured in the same run are the figures to read, and CPU time is less "
        "disturbed by other jobs than wall time). CPU = process CPU time of all threads plus "
        f"child processes. Memory: {report['memory_method']}; per exam = the largest step "
        "peak (the whole process, imports and loaded models included).",
        "",
        f"**ours** = one pipeline worker at {report['ours_threads']} thread(s): the pipeline's "
        "plain functions (`tasks/`) at the pipeline's defaults (`StepSettings()`, "
        "`SegmentationSettings()`, `tasks/radiomics.yaml`; model `auto`: TAPS on real exams, "
        "the demo nnU-Net on synthetic ones, loaded once per worker; no file I/O between "
        f"steps, no Prefect, no database), {report['repeats']} pass(es) over the exams in the "
        "same warm worker: each figure is the median over the passes (peak memory: the "
        "largest). **naive** = one pass of the same libraries at their defaults, no thread "
        "settings: SimpleITK N4 on the ingested T2 at full resolution without a mask (DWI not "
        "bias-corrected), then SimpleITK anisotropic diffusion of the corrected T2 at the "
        "stable time step ITK's warning gives (N4 after diffusion corrects nothing: "
        "`benchmarks/results/naive_n4_order.md`), a new elastix "
        "ParameterObject with elastix's default rigid/affine map per call (affine with the "
        "T2 fixed), an unweighted log-linear ADC over all b, TAPS created per exam on real "
        "exams (nnU-Net created per exam with test-time mirroring on synthetic ones; the "
        "demo model is not for real exams), `RadiomicsFeatureExtractor()` with no settings, "
        "no QC figure. Ingest, b1000 standardisation and DWI SUSAN are the pipeline's in "
        "both (no library default exists). See `benchmarks/cohort_chains.py`.",
        "",
        *n4_paragraph(report, preprocess_json),
        "## Headline",
        "",
        *kind_headline(report, "real"),
        *(targets if report["targets_basis"] == "real" else []),
        memory_line(report),
        "",
        *passes_table(report),
        *kind_headline(report, "synthetic"),
        *(targets if report["targets_basis"] == "synthetic" else []),
        *host_projection_table(report),
        "## Per exam",
        "",
        "Peak MB: the process's peak during the exam (+ its rise above the RSS the exam "
        "started at: what the exam itself needed; the rest is imports and models).",
        "",
        *patient_table(report),
        "## Per step",
        "",
    ]
    for kind in ("real", "synthetic"):
        lines += step_table(report, kind)
    ours_up, naive_up = report["ours"]["startup"], report["naive"]["startup"]
    ours_batch, naive_batch = report["ours"]["batch"], report["naive"]["batch"]
    lines += [
        f"One-off start of each process (not in the per-exam figures): ours "
        f"{ours_up['wall_s']:.1f} s wall / {ours_up['cpu_s']:.1f} s CPU / "
        f"{ours_up['peak_rss_mb']:.0f} MB (imports, elastix, models loaded once); naive "
        f"{naive_up['wall_s']:.1f} s / {naive_up['cpu_s']:.1f} s / "
        f"{naive_up['peak_rss_mb']:.0f} MB (imports, elastix). Whole child processes: ours "
        f"{ours_batch['wall_s']:.0f} s wall / {ours_batch['cpu_s']:.0f} s CPU "
        f"({report['repeats']} pass(es)), naive {naive_batch['wall_s']:.0f} s / "
        f"{naive_batch['cpu_s']:.0f} s (synthetic generation, {report['generation_s']:.0f} s, "
        "in neither).",
        "",
        "## Accuracy",
        "",
        *accuracy_tables(report),
        *projection_table(report),
    ]
    if report["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
    return "\n".join(lines)
