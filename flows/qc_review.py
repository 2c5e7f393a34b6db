"""The review list: every exam's QC status with reasons, worst first, from the database.

Statuses are judged when read (:func:`tasks.qc_flags.judge`) from the stored metrics
(:func:`db.queries.qc_metrics`), the settings' thresholds (``qc``) and the cohort so far
(robust z-scores per model), so a changed threshold applies at once. The same list feeds
``prostate-cohort qc``, the HTML report and the cohort run's Prefect artifact.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlmodel import Session

from db.queries import qc_metrics
from db.run_queries import qc_figures
from tasks.qc_flags import STATUS_ORDER, CohortStats, QcThresholds, judge


def review_list(
    session: Session, thresholds: QcThresholds | None = None, *, patients: Any = None
) -> list[dict[str, Any]]:
    """One entry per exam and model, worst first (fail, review, pass; then most reasons).

    Each entry: ``patient``, ``model``, ``status``, ``reasons`` (list of str), ``metrics``
    (``{name: value}``, units in ``tasks.qc_metrics.METRICS``), ``figure`` (the QC figure's
    path, or None).
    """
    long = qc_metrics(session)
    if long.empty:
        return []
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for row in long.itertuples(index=False):
        value = row.text if isinstance(row.text, str) else _plain(row.value)
        records.setdefault((row.patient, row.model), {})[row.metric] = value
    cohorts = {
        model: CohortStats.of(r for (_, m), r in records.items() if m == model)
        for model in {m for _, m in records}
    }
    figures = _figures(session)
    wanted = (
        None if patients is None else set([patients] if isinstance(patients, str) else patients)
    )
    entries = []
    for (patient, model), metrics in records.items():
        if wanted is not None and patient not in wanted:
            continue
        verdict = judge(metrics, thresholds, cohorts[model])
        entries.append(
            {
                "patient": patient,
                "model": model,
                "status": verdict.status,
                "reasons": list(verdict.reasons),
                "metrics": metrics,
                "figure": figures.get((patient, model)),
            }
        )
    entries.sort(key=lambda e: (STATUS_ORDER[e["status"]], -len(e["reasons"]), e["patient"]))
    return entries


def _plain(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _figures(session: Session) -> dict[tuple[str, str], str]:
    """The newest QC figure of each patient and model (not the evaluation's figures)."""
    frame = qc_figures(session)
    out = {}
    for row in frame.itertuples(index=False):
        out[(row.patient, row.model)] = row.path
    return out


def counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """``{"fail": n, "review": n, "pass": n}``."""
    return {status: sum(e["status"] == status for e in entries) for status in STATUS_ORDER}


def review_text(entries: list[dict[str, Any]], *, show_pass: bool = False) -> str:
    """Plain-text review list: one block per flagged exam, then the counts."""
    lines = []
    for entry in entries:
        if entry["status"] == "pass" and not show_pass:
            continue
        lines.append(f"{entry['status'].upper():6} {entry['patient']}  model {entry['model']}")
        lines.extend(f"         - {reason}" for reason in entry["reasons"])
    n = counts(entries)
    lines.append(f"{n['fail']} fail, {n['review']} to review, {n['pass']} pass")
    return "\n".join(lines)


def review_markdown(entries: list[dict[str, Any]], *, limit: int = 50) -> str:
    """Markdown table of the flagged exams (worst first, at most ``limit``) and the counts."""
    n = counts(entries)
    flagged = [e for e in entries if e["status"] != "pass"]
    lines = [
        "# QC review list",
        "",
        f"{n['fail']} fail, {n['review']} to review, {n['pass']} pass "
        "(`prostate-cohort qc` for the list, `qc --json` for every metric).",
        "",
    ]
    if flagged:
        lines += ["| patient | model | status | reasons |", "|---|---|---|---|"]
        for entry in flagged[:limit]:
            reasons = "; ".join(entry["reasons"]).replace("|", "/")
            lines.append(
                f"| {entry['patient']} | {entry['model']} | {entry['status']} | {reasons} |"
            )
        if len(flagged) > limit:
            lines.append(f"\n{len(flagged) - limit} more flagged exams not shown.")
    return "\n".join(lines) + "\n"
