"""What a cohort run shows in the Prefect UI: artifacts with stable keys, and its final state.

Artifacts (keys are stable, so the UI keeps one history per key across runs):

- ``cohort-progress``: a table, one row per patient (pseudonymous id), one column per
  step: its newest state in the provenance database (``completed``, ``failed``, ``-``);
- ``cohort-summary``: Markdown: counts, failures with step and reason, per-step time;
- ``cohort-qc``: Markdown: the QC review list of the run's exams (flagged ones worst first,
  with reasons; :mod:`flows.qc_review`) and the patients that failed a step.

While the run goes on, ``cohort-progress`` is a table of every patient's state (``done``,
``failed`` with its step, ``running``, ``waiting``) and seconds, its description the counts
and the time left; it is updated as patients finish.

Final state: ``Completed`` when every patient finished; a Completed state named
``Completed with failures``, its message naming the failures, when some but not all patients
failed (bad data in one exam is a result to report, not a crash of the cohort run);
``Failed`` when every patient failed or no exam was found (nothing usable came out).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, Failed, State

from db.queries import patient_status, patients_started
from db.store import session_scope
from flows.qc_review import review_list, review_markdown
from flows.steps import RunContext, engine_for
from tasks.qc_flags import QcThresholds
from tasks.registry import INGEST, step_names

#: The name of the final state of a run where some, not all, patients failed.
COMPLETED_WITH_FAILURES = "Completed with failures"


def _pipeline_order(step: str) -> tuple[int, str]:
    """Recorded step names in pipeline order (``segment_demo`` where ``segment`` is)."""
    names = step_names()
    base = step if step in names else step.split("_", 1)[0]
    return (names.index(base) if base in names else len(names), step)


def progress_rows(status: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per patient, one column per step in pipeline order (its newest state), from
    ``patient_status``."""
    steps = sorted({step for p in status for step in p["steps"]}, key=_pipeline_order)
    return [
        {"patient": p["patient"]} | {s: p["steps"].get(s, {}).get("state", "-") for s in steps}
        for p in status
    ]


def summary_markdown(results: list[dict[str, Any]], title: str) -> str:
    """Counts and every failure (patient, step, reason) as Markdown; no identifiers."""
    failed = [r for r in results if r["status"] == "error"]
    lines = [
        f"# {title}",
        "",
        f"{len(results)} patients: {len(results) - len(failed)} completed, {len(failed)} failed.",
        "",
    ]
    if failed:
        lines += ["| patient | step | error |", "|---|---|---|"]
        for r in failed:
            error = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['patient']} | {r.get('step') or 'ingest'} | {error} |")
    return "\n".join(lines) + "\n"


def publish(
    results: list[dict[str, Any]],
    status: list[dict[str, Any]],
    *,
    title: str,
    review: list[dict[str, Any]] | None = None,
) -> None:
    """Create the run's artifacts (see the module docstring); ``status`` is
    :func:`db.queries.patient_status` of the run's patients, ``review`` their
    :func:`flows.qc_review.review_list`."""
    create_table_artifact(
        table=progress_rows(status),
        key="cohort-progress",
        description="Per patient and step: the newest state (completed, failed, - not run)",
    )
    create_markdown_artifact(
        markdown=summary_markdown(results, title),
        key="cohort-summary",
        description="Counts and failures of this run",
    )
    failed = [
        f"- {r['patient']}: failed in {r.get('step') or 'ingest'}"
        for r in results
        if r["status"] == "error"
    ]
    markdown = review_markdown(review) if review else ""
    if failed:
        markdown += "\n# Patients that failed a step\n\n" + "\n".join(failed) + "\n"
    if markdown:
        create_markdown_artifact(
            markdown=markdown,
            key="cohort-qc",
            description="QC review list (flagged exams first, with reasons) and failed patients",
        )


def final_state(result: dict[str, Any]) -> State:
    """The flow's final state for ``result`` (``{"patients": [...], ...}``), see above."""
    patients = result["patients"]
    failed = [p for p in patients if p["status"] == "error"]
    by_step = Counter(p.get("step") or INGEST.name for p in failed)
    detail = ", ".join(f"{n} in {step}" for step, n in sorted(by_step.items()))
    if not patients:
        return Failed(message="no exams found", data=result)
    if len(failed) == len(patients):
        return Failed(message=f"all {len(patients)} patients failed ({detail})", data=result)
    message = f"{len(patients) - len(failed)}/{len(patients)} patients completed"
    if failed:  # a Completed state whose name says so at a glance in the UI
        return Completed(
            name=COMPLETED_WITH_FAILURES,
            message=f"{message}; {len(failed)} failed ({detail})",
            data=result,
        )
    return Completed(message=message, data=result)


def live_rows(
    patients: list[str], entries: list[dict[str, Any]], started: set[str]
) -> list[dict[str, Any]]:
    """One row per patient of a running cohort: ``done``, ``failed`` (with the step),
    ``running`` (a step on record, not finished) or ``waiting``, and its seconds."""
    by_patient = {e["patient"]: e for e in entries}
    rows = []
    for patient in patients:
        entry = by_patient.get(patient)
        if entry is None:
            state = "running" if patient in started else "waiting"
            rows.append({"patient": patient, "state": state, "step": "", "seconds": ""})
            continue
        failed = entry.get("status") == "error"
        rows.append(
            {
                "patient": patient,
                "state": "failed" if failed else "done",
                "step": entry.get("step", "") if failed else "",
                "seconds": entry.get("seconds", ""),
            }
        )
    return rows


def publish_progress(rows: list[dict[str, Any]], line: str) -> None:
    """The ``cohort-progress`` table while the run goes on; ``line`` (counts, time per
    patient, time left) is its description."""
    create_table_artifact(table=rows, key="cohort-progress", description=line)


class LiveProgress:
    """``on_progress`` of :func:`flows.patient.run_patients`: publishes :func:`live_rows` at
    most every ``every_s`` seconds, at the first patient and at the last."""

    def __init__(self, ctx: RunContext, patients: list[str], every_s: float = 10.0) -> None:
        self.ctx, self.patients, self.every_s = ctx, patients, every_s
        self.last = -float("inf")

    def __call__(self, progress: Any, entries: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        if progress.done not in (1, progress.total) and now - self.last < self.every_s:
            return
        self.last = now
        started: set[str] = set()
        if self.ctx.pipeline_run_id is not None:
            with session_scope(engine_for(self.ctx.database_url)) as session:
                started = patients_started(session, self.ctx.pipeline_run_id)
        publish_progress(live_rows(self.patients, entries, started), progress.line())


def publish_run(
    ctx: RunContext,
    results: list[dict[str, Any]],
    *,
    title: str,
    thresholds: QcThresholds | None = None,
) -> None:
    """:func:`publish` for the patients of ``results``, their progress and QC read from the
    DB (QC statuses judged against every exam so far, with ``thresholds``)."""
    patients = {r["patient"] for r in results}
    with session_scope(engine_for(ctx.database_url)) as session:
        status = patient_status(session)
        review = review_list(session, thresholds, patients=sorted(patients))
    mine = [p for p in status if p["patient"] in patients]
    publish(results, mine, title=title, review=review)
