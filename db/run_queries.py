"""How runs went, as pandas DataFrames: pipeline runs, step timings, failures, provenance.

The companion of :mod:`db.queries` (results: features, volumes, metrics), with the same
conventions: an open ``Session``, keyword-only filters (a string, a sequence of strings or
``None``), plain SQLAlchemy selects that run on SQLite and PostgreSQL alike. Times are UTC,
durations in seconds. Cache hits are not recorded as step runs: a step's time is that of
the run that computed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Select, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col

from db.models import Artifact, Patient, PipelineRun, StepRun
from db.queries import Names, read_frame, results_query, where_in


def _step_query(*columns: Any, pipeline_run_id: str | None = None) -> Select:
    """``SELECT step_run_id, patient, step, step_version, status, *columns`` over every
    step run (of one pipeline run, when given), oldest first; patient None for cohort-level
    steps."""
    query = (
        sa_select(
            col(StepRun.id).label("step_run_id"),
            col(Patient.pseudo_id).label("patient"),
            StepRun.step,
            StepRun.step_version,
            StepRun.status,
            *columns,
        )
        .outerjoin(Patient, col(Patient.id) == StepRun.patient_id)
        .order_by(StepRun.id)
    )
    return (
        query
        if pipeline_run_id is None
        else query.where(StepRun.pipeline_run_id == pipeline_run_id)
    )


def step_timings(
    session: Session,
    *,
    patients: Names = None,
    steps: Names = None,
    pipeline_run_id: str | None = None,
) -> pd.DataFrame:
    """One row per recorded step run (cache hits are not recorded), oldest first.

    Returns
    -------
    pandas.DataFrame
        ``step_run_id, patient`` (None for cohort-level steps), ``step, step_version,
        status, started_at, ended_at`` (UTC), ``duration_s`` (seconds),
        ``pipeline_run_id, host``.
    """
    query = _step_query(
        StepRun.started_at,
        StepRun.ended_at,
        StepRun.duration_s,
        StepRun.pipeline_run_id,
        StepRun.host,
        pipeline_run_id=pipeline_run_id,
    )
    query = where_in(where_in(query, Patient.pseudo_id, patients), StepRun.step, steps)
    return read_frame(session, query).astype({"duration_s": "float64"})


def step_time_summary(session: Session, *, pipeline_run_id: str | None = None) -> pd.DataFrame:
    """Per step: ``runs, completed, failed`` and ``total_s, mean_s, median_s, max_s``
    (seconds of the recorded runs), the most time-consuming step first."""
    timings = step_timings(session, pipeline_run_id=pipeline_run_id)
    grouped = timings.groupby("step", sort=False)
    summary = pd.DataFrame(
        {
            "runs": grouped.size(),
            "completed": grouped["status"].agg(lambda s: int((s == "completed").sum())),
            "failed": grouped["status"].agg(lambda s: int((s == "failed").sum())),
            "total_s": grouped["duration_s"].sum(),
            "mean_s": grouped["duration_s"].mean(),
            "median_s": grouped["duration_s"].median(),
            "max_s": grouped["duration_s"].max(),
        }
    )
    return summary.sort_values("total_s", ascending=False).rename_axis("step").reset_index()


def step_failures(
    session: Session, *, pipeline_run_id: str | None = None, current: bool = True
) -> pd.DataFrame:
    """Failed step runs with their reasons.

    ``current=True`` keeps a failure only while it is the newest recorded run of that step
    for that patient (a later successful run clears it).

    Returns
    -------
    pandas.DataFrame
        ``step_run_id, patient, step, step_version, status, error_type, error,
        ended_at, pipeline_run_id``, oldest first.
    """
    query = _step_query(
        StepRun.error_type,
        StepRun.error,
        StepRun.ended_at,
        StepRun.pipeline_run_id,
        pipeline_run_id=pipeline_run_id,
    ).where(StepRun.status == "failed")
    if current:
        newest = sa_select(func.max(StepRun.id)).group_by(StepRun.patient_id, StepRun.step)
        query = query.where(col(StepRun.id).in_(newest))
    return read_frame(session, query)


def step_runs(session: Session, *, step_run_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Provenance of step runs: how each result was made.

    Returns
    -------
    pandas.DataFrame
        ``step_run_id, patient, step, step_version, status, parameters`` (dict),
        ``software_versions`` (dict), ``inputs, outputs`` (lists of ``{role, path,
        sha256}``), ``cache_key, pipeline_run_id, prefect_flow_run_id,
        prefect_task_run_id, host, duration_s``, and ``details`` (dict or None: what the
        step measured about its result, e.g. the registration's accepted stage and scales).
    """
    r = StepRun
    query = _step_query(
        r.parameters,
        r.software_versions,
        r.inputs,
        r.outputs,
        r.cache_key,
        r.pipeline_run_id,
        r.prefect_flow_run_id,
        r.prefect_task_run_id,
        r.host,
        r.duration_s,
        r.details,
    )
    if step_run_ids is not None:
        query = query.where(col(r.id).in_([int(i) for i in step_run_ids]))
    return read_frame(session, query)


def pipeline_runs(session: Session, *, limit: int | None = None) -> pd.DataFrame:
    """Pipeline runs, newest first: ``pipeline_run_id, command, status, started_at,
    ended_at`` (UTC), ``duration_s`` (seconds; NaN while running), ``n_patients,
    n_failed, host``."""
    r = PipelineRun
    query = sa_select(
        col(r.id).label("pipeline_run_id"),
        r.command,
        r.status,
        r.started_at,
        r.ended_at,
        r.n_patients,
        r.n_failed,
        r.host,
    ).order_by(col(r.started_at).desc(), col(r.id).desc())
    runs = read_frame(session, query.limit(limit) if limit else query)
    ended = pd.to_datetime(runs["ended_at"], utc=True)
    started = pd.to_datetime(runs["started_at"], utc=True)
    runs.insert(5, "duration_s", (ended - started).dt.total_seconds())
    return runs


def qc_figures(session: Session, *, patients: Names = None) -> pd.DataFrame:
    """The newest QC figure (PNG) of each patient and model: ``patient, model, path,
    sha256, step_run_id`` (the run that first made that content)."""
    query = (
        results_query(
            Artifact,
            StepRun.step,
            StepRun.parameters,
            Artifact.path,
            Artifact.sha256,
            Artifact.step_run_id,
        )
        .where(Artifact.role == "qc")
        .order_by(Patient.pseudo_id, Artifact.id)
    )
    found = read_frame(session, where_in(query, Patient.pseudo_id, patients))
    found = found.drop_duplicates(["patient", "step"], keep="last")
    models = [p.get("model", step) for p, step in zip(found.parameters, found.step, strict=True)]
    found.insert(1, "model", models)
    return found.drop(columns=["step", "parameters"]).reset_index(drop=True)


def run_commands(session: Session) -> set[str]:
    """The commands that have run on this database (the first word of each pipeline run's
    command: ``demo``, ``run``, ``ingest``, ``evaluate``)."""
    rows = session.exec(sa_select(PipelineRun.command).distinct()).all()
    return {row[0].split(maxsplit=1)[0] for row in rows if row[0]}
