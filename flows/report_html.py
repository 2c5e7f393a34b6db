"""The cohort report: one self-contained HTML file that opens offline.

Sections: run summary (counts and the latest pipeline runs), failures with their reasons,
time per step, the gland-volume distribution (matplotlib plot), a grid of per-patient QC
thumbnails linking to the full figures, and the evaluation table when reference masks have
been evaluated. Patients appear by pseudonymous id (their exam folders, often named after
the original patient id, are not listed); failure reasons are shown as recorded, and an
ingest error may name the exam folder it could not read.

Nothing is fetched: the style is inline, the plot and the thumbnails are PNGs embedded as
``data:`` URIs, and each thumbnail links to its full QC figure by a path relative to the
report's folder (so the report and the output tree can move together). A figure that is
no longer on disk gets a note instead of a link, so the report has no broken link.

The data are image-free DataFrames from :mod:`db.queries` and :mod:`db.run_queries`
(:func:`collect_report_data`); everything visual is made here (:func:`render_report`).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sqlmodel import Session

from db.queries import evaluation_metrics, volumes
from db.run_queries import pipeline_runs, qc_figures, step_failures, step_time_summary, step_timings
from flows.qc_review import counts, review_list
from tasks.io import write_text_atomic
from tasks.qc_flags import QcThresholds

#: Longest side of a QC thumbnail, pixels.
THUMBNAIL_PX = 320
#: Pipeline runs listed in the run summary (newest first).
RUNS_SHOWN = 10
#: Evaluation metrics shown, in this order, when present (units in the column names).
EVALUATION_COLUMNS = ("dice", "iou", "hd95", "hd", "sensitivity", "precision", "volume_diff_ml")

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0; } .meta { color: #666; margin-top: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .7em; text-align: left; }
td.error { white-space: pre-wrap; max-width: 60em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #ccc; border-radius: 4px; padding: 6px; width: 330px; }
.card img { display: block; max-width: 100%; }
.card.failed { border-color: #c0392b; background: #fdf2f0; }
.caption { font-size: 12px; margin-top: 4px; }
"""


@dataclass(frozen=True)
class ReportData:
    """What the report shows, as read from the provenance database (no images)."""

    patients: list[str]
    """Every patient with a recorded step, sorted."""
    runs: pd.DataFrame
    """:func:`db.run_queries.pipeline_runs`, newest first."""
    failures: pd.DataFrame
    """:func:`db.run_queries.step_failures` (current failures only)."""
    step_times: pd.DataFrame
    """:func:`db.run_queries.step_time_summary` (seconds)."""
    volumes: pd.DataFrame
    """:func:`db.queries.volumes` of the whole gland (mL)."""
    qc: pd.DataFrame
    """:func:`db.run_queries.qc_figures`."""
    evaluation: pd.DataFrame
    """:func:`db.queries.evaluation_metrics` in wide form (empty without references)."""
    review: list[dict[str, Any]] = field(default_factory=list)
    """:func:`flows.qc_review.review_list`, worst first."""


def collect_report_data(session: Session, thresholds: QcThresholds | None = None) -> ReportData:
    """Read everything the report shows: the cohort as it stands (newest results)."""
    timings = step_timings(session)
    return ReportData(
        patients=sorted(timings["patient"].dropna().unique()),
        runs=pipeline_runs(session, limit=RUNS_SHOWN),
        failures=step_failures(session),
        step_times=step_time_summary(session),
        volumes=volumes(session, labels="gland"),
        qc=qc_figures(session),
        evaluation=evaluation_metrics(session, wide=True),
        review=review_list(session, thresholds),
    )


def write_report(
    session: Session,
    path: str | Path,
    *,
    title: str = "Cohort report",
    thresholds: QcThresholds | None = None,
) -> ReportData:
    """Collect the data, render the report and write it atomically to ``path``."""
    path = Path(path).resolve()
    data = collect_report_data(session, thresholds)
    write_text_atomic(path, render_report(data, base_dir=path.parent, title=title))
    return data


def render_report(
    data: ReportData,
    *,
    base_dir: Path,
    title: str = "Cohort report",
    generated_at: datetime | None = None,
) -> str:
    """The report as one HTML document; links to QC figures are relative to ``base_dir``."""
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    sections = [
        _section("QC review list", _review_html(data.review, base_dir)),
        _section("Run summary", _summary_html(data)),
        _section("Failures", _failures_html(data.failures)),
        _section("Time per step", _step_times_html(data.step_times)),
        _section("Gland volume", _volumes_html(data.volumes)),
        _section("QC figures", _qc_grid_html(data, base_dir)),
    ]
    if not data.evaluation.empty:
        sections.append(_section("Evaluation against reference masks", _evaluation_html(data)))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">generated {when}</p>'
        + "".join(sections)
        + "</body></html>\n"
    )


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _table(frame: pd.DataFrame, digits: int = 2) -> str:
    """``frame`` as an HTML table (text escaped; floats to ``digits`` decimals)."""
    return frame.to_html(
        index=False, border=0, na_rep="–", float_format=lambda v: f"{v:.{digits}f}"
    )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _summary_html(data: ReportData) -> str:
    failed = set(data.failures["patient"].dropna())
    n = len(data.patients)
    counts = (
        f"<p>{n} patients: {n - len(failed & set(data.patients))} without a failed step, "
        f"{len(failed)} with one.</p>"
    )
    runs = data.runs.assign(
        started=data.runs["started_at"].map(_time), duration_s=data.runs["duration_s"]
    )
    columns = ["started", "command", "status", "n_patients", "n_failed", "duration_s"]
    return counts + f"<p>Latest pipeline runs (UTC):</p>{_table(runs[columns], digits=1)}"


def _time(value: datetime | None) -> str:
    return "–" if value is None or pd.isna(value) else value.strftime("%Y-%m-%d %H:%M:%S")


def _failures_html(failures: pd.DataFrame) -> str:
    if failures.empty:
        return "<p>No failed steps.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(str(f.patient or 'cohort'))}</td><td>{html.escape(f.step)}</td>"
        f"<td>{html.escape(str(f.error_type or ''))}</td>"
        f'<td class="error">{html.escape(str(f.error or ""))}</td></tr>'
        for f in failures.itertuples()
    )
    head = "<tr><th>patient</th><th>step</th><th>error type</th><th>reason</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>"


def _step_times_html(times: pd.DataFrame) -> str:
    if times.empty:
        return "<p>No step has run.</p>"
    return "<p>Recorded step runs (cache hits take no time); seconds.</p>" + _table(times, digits=1)


def volume_plot_png(volumes_ml: pd.DataFrame) -> bytes:
    """Histogram of the gland volumes (mL), one colour per model, each patient a tick."""
    figure = Figure(figsize=(6.4, 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    values = volumes_ml["volume_ml"].to_numpy(dtype=float)
    bins = np.histogram_bin_edges(values, bins="auto") if len(values) else 10
    for model, group in volumes_ml.groupby("model"):
        ml = group["volume_ml"].to_numpy(dtype=float)
        ax.hist(ml, bins=bins, alpha=0.6, label=f"{model} (n={len(ml)})")
        ax.plot(ml, np.zeros_like(ml), "|", markersize=14, color="black")
    ax.set_xlabel("gland volume (mL)")
    ax.set_ylabel("patients")
    if len(values):
        ax.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _volumes_html(volumes_ml: pd.DataFrame) -> str:
    if volumes_ml.empty:
        return "<p>No gland segmented yet.</p>"
    stats = (
        volumes_ml.groupby("model")["volume_ml"]
        .agg(n="count", mean_ml="mean", sd_ml="std", min_ml="min", median_ml="median", max_ml="max")
        .reset_index()
    )
    image = _data_uri(volume_plot_png(volumes_ml))
    alt = "histogram of gland volumes in mL"
    return f'<img src="{image}" alt="{alt}" width="640" height="300">' + _table(stats, 1)


def thumbnail_png(path: Path, max_px: int = THUMBNAIL_PX) -> bytes:
    """A PNG of the image at ``path`` shrunk to at most ``max_px`` on its longest side."""
    with Image.open(path) as image:
        image.thumbnail((max_px, max_px))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _href(path: Path, base_dir: Path) -> str:
    return quote(os.path.relpath(path, base_dir))


def _qc_grid_html(data: ReportData, base_dir: Path) -> str:
    if not data.patients:
        return "<p>No patients.</p>"
    volume = {(v.patient, v.model): v.volume_ml for v in data.volumes.itertuples()}
    failed = {f.patient: f.step for f in data.failures.itertuples()}
    cards = []
    for patient in data.patients:
        figures = data.qc[data.qc["patient"] == patient]
        for figure in figures.itertuples():
            ml = volume.get((patient, figure.model))
            caption = f"{patient} · model {figure.model}" + (f" · {ml:.1f} mL" if ml else "")
            cards.append(_figure_card(Path(figure.path), caption, patient in failed, base_dir))
        if figures.empty:
            why = f"failed in {failed[patient]}" if patient in failed else "not segmented yet"
            cards.append(_card(f"{patient}: no QC figure ({why})", patient in failed))
    note = (
        "<p>Click a thumbnail for the full figure (the mask at apex, mid-gland and base on "
        "T2, b1000 and ADC).</p>"
    )
    return note + f'<div class="grid">{"".join(cards)}</div>'


#: Flagged exams shown with their thumbnail in the review list (the rest as a table).
REVIEW_CARDS = 60


def _review_html(review: list[dict[str, Any]], base_dir: Path) -> str:
    """Counts, then the flagged exams worst first: thumbnail (apex/mid/base figure) and
    reasons."""
    if not review:
        return "<p>No QC metrics recorded yet.</p>"
    n = counts(review)
    head = (
        f"<p>{n['fail']} fail, {n['review']} to review, {n['pass']} pass "
        "(<code>prostate-cohort qc</code>; <code>qc --json</code> for every metric).</p>"
    )
    flagged = [e for e in review if e["status"] != "pass"]
    cards = []
    for entry in flagged[:REVIEW_CARDS]:
        caption = f"{entry['status'].upper()} {entry['patient']} · model {entry['model']}"
        reasons = "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in entry["reasons"])
        failed, figure = entry["status"] == "fail", entry.get("figure")
        cards.append(
            _figure_card(Path(figure), caption, failed, base_dir, after=reasons + "</ul>")
            if figure
            else _card(caption, failed, after=reasons + "</ul>")
        )
    rest = flagged[REVIEW_CARDS:]
    table = ""
    if rest:
        frame = pd.DataFrame(
            [
                {
                    "patient": e["patient"],
                    "model": e["model"],
                    "status": e["status"],
                    "reasons": "; ".join(e["reasons"]),
                }
                for e in rest
            ]
        )
        table = _table(frame)
    return head + f'<div class="grid">{"".join(cards)}</div>' + table


def _figure_card(path: Path, caption: str, failed: bool, base_dir: Path, *, after: str = "") -> str:
    if not path.is_file():
        return _card(f"{caption}: figure missing ({path.name})", failed, after=after)
    thumb = _data_uri(thumbnail_png(path))
    image = f'<img src="{thumb}" alt="QC figure {html.escape(caption)}">'
    link = f'<a href="{_href(path, base_dir)}">{image}</a>'
    return _card(caption, failed, link, after=after)


def _card(caption: str, failed: bool, body: str = "", *, after: str = "") -> str:
    """A grid card: ``body`` (HTML), the caption, then ``after`` (HTML, e.g. reasons)."""
    kind = "card failed" if failed else "card"
    caption_html = f'<div class="caption">{html.escape(caption)}</div>'
    return f'<div class="{kind}">{body}{caption_html}{after}</div>'


def _evaluation_html(data: ReportData) -> str:
    table = data.evaluation
    metrics = [m for m in EVALUATION_COLUMNS if m in table.columns]
    keys = ["model", "reference", "label_name"]
    grouped = table.groupby(keys)[metrics]
    sd = grouped.std().round(3).astype(str)
    summary = grouped.mean().round(3).astype(str) + (" ± " + sd).where(sd != "nan", "")
    summary.insert(0, "patients", grouped.size())
    units = "Dice, IoU, sensitivity, precision: 0-1; HD, HD95: mm; volume_diff_ml: mL."
    return (
        f"<p>Mean ± SD per model and reference, over patients (SD with two or more; {units})</p>"
        + _table(summary.reset_index())
        + "<p>Per case:</p>"
        + _table(table[["patient", *keys, *metrics]], digits=3)
    )
