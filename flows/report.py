"""What a cohort run shows in the Prefect UI: artifacts with stable keys, and its final state.

Artifacts (keys are stable, so the UI keeps one history per key across runs):

- ``cohort-progress``: a table, one row per patient (pseudonymous id), one column per
  step: its newest state in the provenance database (``completed``, ``failed``, ``-``);
- ``cohort-summary``: Markdown: counts, failures with step and reason, per-step time;
- ``cohort-qc``: Markdown links to the QC figures of the patients that failed a step.

Final state: ``Completed`` when every patient finished; ``Completed`` with a message naming
the failures when some but not all patients failed (bad data in one exam is a result to
report, not a crash of the cohort run); ``Failed`` when every patient failed or no exam was
found (nothing usable came out).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, Failed, State

from db.queries import patient_status
from db.store import session_scope
from flows.steps import RunContext, engine_for
from tasks.registry import INGEST


def progress_rows(status: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per patient, one column per step (its newest state), from ``patient_status``."""
    steps = sorted({step for p in status for step in p["steps"]})
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


def publish(results: list[dict[str, Any]], status: list[dict[str, Any]], *, title: str) -> None:
    """Create the run's artifacts (see the module docstring); ``status`` is
    :func:`db.queries.patient_status` of the run's patients."""
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
    qc = [
        f"- {r['patient']}: failed in {r.get('step') or 'ingest'}"
        + (f"; [QC figure]({r['outputs']['qc']})" if r.get("outputs", {}).get("qc") else "")
        for r in results
        if r["status"] == "error"
    ]
    if qc:
        create_markdown_artifact(
            markdown="# Patients to check\n\n" + "\n".join(qc) + "\n",
            key="cohort-qc",
            description="Patients that failed a step, with their QC figure where one exists",
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
    return Completed(
        message=message + (f"; {len(failed)} failed ({detail})" if failed else ""), data=result
    )


def publish_run(ctx: RunContext, results: list[dict[str, Any]], *, title: str) -> None:
    """:func:`publish` for the patients of ``results``, their progress read from the DB."""
    with session_scope(engine_for(ctx.database_url)) as session:
        status = patient_status(session)
    patients = {r["patient"] for r in results}
    publish(results, [p for p in status if p["patient"] in patients], title=title)
