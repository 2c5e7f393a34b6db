"""Write provenance: small functions the flows call, one per kind of record.

Each function takes an open ``Session`` and plain values, adds or updates rows, flushes (so
ids are set) and returns the row(s). The caller owns the transaction, normally
``with db.store.session_scope(engine) as session: ...``. Nothing here imports Prefect: the
flows pass the Prefect run ids in as strings.

JSON values (parameters, settings, file lists) are checked before they reach the database:
``Path`` becomes ``str``, numpy scalars become Python numbers, and NaN or infinity is an
error (PostgreSQL's JSON type rejects them, SQLite would store them), so both engines
behave the same.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Iterable, Mapping
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from db.models import (
    RUN_STATUSES,
    STEP_STATUSES,
    Artifact,
    EvaluationMetric,
    Patient,
    PipelineRun,
    QcMetric,
    RadiomicsFeature,
    Segmentation,
    Series,
    StepRun,
    Study,
    utcnow,
)

SOFTWARE = (
    "prostate-cohort",
    "SimpleITK",
    "itk-elastix",
    "nnunetv2",
    "torch",
    "pyradiomics-bhklab",
    "lavlab-taps",
    "onnxruntime-gpu",
    "monai",
    "pydicom",
    "prefect",
)
"""Distributions whose versions are recorded with every run (plus ``python``)."""

NOT_INSTALLED = "not installed"

_Row = TypeVar("_Row", bound=SQLModel)


def software_versions() -> dict[str, str]:
    """Versions of Python and of each distribution in ``SOFTWARE``.

    Returns
    -------
    dict
        ``{"python": "3.11.9", "SimpleITK": "2.5.7", ...}``; a distribution that is not
        installed maps to ``"not installed"``.
    """
    versions = {"python": platform.python_version()}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = NOT_INSTALLED
    return versions


def ensure_patient(session: Session, pseudo_id: str) -> Patient:
    """Return the patient with this pseudonymous id, creating it if new.

    Raises
    ------
    ValueError
        If ``pseudo_id`` is empty, longer than 64 characters or contains whitespace.
    """
    if not pseudo_id or len(pseudo_id) > 64 or any(c.isspace() for c in pseudo_id):
        raise ValueError(
            f"pseudonymous patient id {pseudo_id!r} must be 1-64 characters without spaces"
        )
    return _get_or_create(session, Patient, pseudo_id=pseudo_id)


def ensure_study(session: Session, *, patient_pseudo_id: str, study_key: str) -> Study:
    """Return the patient's study with this key (keyed hash of the StudyInstanceUID and the
    exam folder), creating it. No folder name is stored (privacy)."""
    patient = ensure_patient(session, patient_pseudo_id)
    return _get_or_create(session, Study, patient_id=patient.id, study_key=study_key)


def clear_series(session: Session, *, study_id: int) -> int:
    """Delete a study's series rows (before a re-ingest records them anew); return how many."""
    rows = session.exec(select(Series).where(Series.study_id == study_id)).all()
    for row in rows:
        session.delete(row)
    session.flush()
    return len(rows)


def record_series(session: Session, *, study_id: int, **columns: Any) -> Series:
    """Add one series row; ``columns`` are ``Series`` column names (see ``db.models``).

    Raises
    ------
    TypeError
        If a keyword is not a column of ``Series``.
    """
    known = set(Series.model_fields) - {"id", "study_id", "created_at"}
    unknown = sorted(set(columns) - known)
    if unknown:
        raise TypeError(f"not Series columns: {unknown}; known: {sorted(known)}")
    for name in ("source_files", "shape", "spacing", "origin", "direction"):
        if name in columns:
            columns[name] = _json(columns[name], name)
    for name in ("source", "image_path"):
        if isinstance(columns.get(name), Path):
            columns[name] = str(columns[name])
    series = Series(study_id=study_id, **columns)
    session.add(series)
    session.flush()
    return series


def begin_pipeline_run(
    session: Session,
    *,
    command: str,
    settings: Mapping[str, Any],
    software_versions: Mapping[str, str],
    host: str | None,
    prefect_flow_run_id: str | None = None,
) -> PipelineRun:
    """Add a ``running`` pipeline run that starts now; its ``id`` is a new UUID."""
    run = PipelineRun(
        command=command,
        settings=_json(dict(settings), "settings"),
        software_versions=_json(dict(software_versions), "software_versions"),
        host=host,
        prefect_flow_run_id=prefect_flow_run_id,
        status="running",
        started_at=utcnow(),
    )
    session.add(run)
    session.flush()
    return run


def finish_pipeline_run(
    session: Session,
    run_id: str,
    *,
    status: str,
    n_patients: int,
    n_failed: int,
    summary: Mapping[str, Any],
) -> PipelineRun:
    """Mark a pipeline run finished now with its final status and summary.

    Raises
    ------
    ValueError
        If ``status`` is not ``completed``, ``failed`` or ``partial``.
    LookupError
        If there is no pipeline run ``run_id``.
    """
    final = tuple(s for s in RUN_STATUSES if s != "running")
    if status not in final:
        raise ValueError(f"final pipeline status must be one of {final}, not {status!r}")
    run = session.get(PipelineRun, run_id)
    if run is None:
        raise LookupError(f"no pipeline run with id {run_id!r}")
    run.status = status
    run.ended_at = utcnow()
    run.n_patients = n_patients
    run.n_failed = n_failed
    run.summary = _json(dict(summary), "summary")
    session.add(run)
    session.flush()
    return run


def close_interrupted_runs(session: Session, *, host: str | None, output_root: str) -> int:
    """Mark ``failed`` the runs on ``host`` and ``output_root`` still recorded as running.

    Call while holding the output tree's lock (:mod:`flows.tree_lock`): then no such run is
    alive, so a ``running`` row is one whose process was killed before it could close it.
    Returns the number of runs closed.
    """
    stale = session.exec(
        select(PipelineRun).where(PipelineRun.status == "running", PipelineRun.host == host)
    ).all()
    closed = 0
    for run in stale:
        if (run.settings or {}).get("output_root") != output_root:
            continue
        run.status = "failed"
        run.ended_at = utcnow()
        run.summary = {"error": "interrupted: the process ended before it closed the run"}
        closed += 1
    session.flush()
    return closed


def record_step_run(
    session: Session,
    *,
    patient_pseudo_id: str | None,
    step: str,
    step_version: str,
    status: str,
    started_at: datetime,
    ended_at: datetime | None,
    parameters: Mapping[str, Any],
    software_versions: Mapping[str, str],
    inputs: Iterable[Mapping[str, Any]],
    outputs: Iterable[Mapping[str, Any]],
    cache_key: str,
    pipeline_run_id: str | None = None,
    prefect_flow_run_id: str | None = None,
    prefect_task_run_id: str | None = None,
    host: str | None = None,
    error: str | None = None,
    error_type: str | None = None,
    details: Mapping[str, Any] | None = None,
    resources: Mapping[str, Any] | None = None,
    output_root: Path | None = None,
) -> StepRun:
    """Add one step run (``duration_s`` computed) and, if completed, its output artifacts.

    ``inputs`` and ``outputs`` are ``{"role", "path", "sha256"}`` mappings (extra keys are
    kept; ``size_bytes`` is used for the artifact). For a completed run of a patient, each
    output not yet known for that patient (same role and sha256) becomes an ``Artifact``.
    ``patient_pseudo_id=None`` records a cohort-level step. With ``output_root``, the run's
    input and output paths under it are stored relative to it (a moved or copied output
    tree stays valid); artifacts keep the absolute path.

    Raises
    ------
    ValueError
        Unknown status, naive datetimes, an end before the start, an input or output
        without role/path/sha256, or JSON values that are not finite.
    """
    if status not in STEP_STATUSES:
        raise ValueError(f"step status must be one of {STEP_STATUSES}, not {status!r}")
    for name, value in (("started_at", started_at), ("ended_at", ended_at)):
        if value is not None and value.utcoffset() is None:
            raise ValueError(f"{name} must be timezone-aware (UTC), got {value!r}")
    duration_s = None
    if ended_at is not None:
        duration_s = (ended_at - started_at).total_seconds()
        if duration_s < 0:
            raise ValueError(f"step {step!r} ends ({ended_at}) before it starts ({started_at})")
    produced = _files(outputs, "outputs")
    json_columns = {
        "parameters": _json(dict(parameters), "parameters"),
        "software_versions": _json(dict(software_versions), "software_versions"),
        "inputs": _under(_files(inputs, "inputs"), output_root),
        "outputs": _under(produced, output_root),
        "details": None if details is None else _json(dict(details), "details"),
        "resources": None if resources is None else _json(dict(resources), "resources"),
    }
    patient = None if patient_pseudo_id is None else ensure_patient(session, patient_pseudo_id)
    run = StepRun(
        pipeline_run_id=pipeline_run_id,
        patient_id=patient.id if patient else None,
        step=step,
        step_version=step_version,
        status=status,
        started_at=started_at,
        ended_at=ended_at,
        duration_s=duration_s,
        **json_columns,
        cache_key=cache_key,
        prefect_flow_run_id=prefect_flow_run_id,
        prefect_task_run_id=prefect_task_run_id,
        host=host,
        error=error,
        error_type=error_type,
    )
    session.add(run)
    session.flush()
    if status == "completed" and patient is not None:
        for output in produced:
            _get_or_create(
                session,
                Artifact,
                patient_id=patient.id,
                role=output["role"],
                sha256=output["sha256"],
                defaults={
                    "step_run_id": run.id,
                    "path": output["path"],
                    "size_bytes": output.get("size_bytes", _size(output["path"])),
                },
            )
    return run


def find_completed_step(
    session: Session, *, patient_pseudo_id: str | None, step: str, cache_key: str
) -> StepRun | None:
    """The latest completed run of ``step`` for this patient with this cache key, if any.

    This is the cache look-up: failed, running and cached runs never match. Before reusing
    the result, the caller should check that its output files still exist with the
    recorded sha256.
    """
    query = select(StepRun).where(
        StepRun.step == step, StepRun.cache_key == cache_key, StepRun.status == "completed"
    )
    if patient_pseudo_id is None:
        query = query.where(col(StepRun.patient_id).is_(None))
    else:
        query = query.join(Patient, col(Patient.id) == StepRun.patient_id).where(
            Patient.pseudo_id == patient_pseudo_id
        )
    query = query.order_by(col(StepRun.ended_at).desc(), col(StepRun.id).desc()).limit(1)
    return session.exec(query).first()


def record_segmentation(
    session: Session,
    *,
    patient_pseudo_id: str,
    step_run_id: int,
    model: str,
    model_hash: str | None,
    mask_path: str | Path,
    mask_sha256: str,
    label: int,
    label_name: str,
    voxel_count: int,
    volume_ml: float,
) -> Segmentation:
    """Add one label of a model's mask (volume in ml)."""
    segmentation = Segmentation(
        patient_id=ensure_patient(session, patient_pseudo_id).id,
        step_run_id=step_run_id,
        model=model,
        model_hash=model_hash,
        mask_path=str(mask_path),
        mask_sha256=mask_sha256,
        label=int(label),
        label_name=label_name,
        voxel_count=int(voxel_count),
        volume_ml=float(volume_ml),
    )
    session.add(segmentation)
    session.flush()
    return segmentation


def record_radiomics_features(
    session: Session,
    *,
    patient_pseudo_id: str,
    step_run_id: int,
    image: str,
    mask: str,
    features: Mapping[tuple[str, str], float | None],
    settings_hash: str,
    segmentation_id: int | None = None,
) -> list[RadiomicsFeature]:
    """Add feature values in long form, keyed ``(feature_class, feature) -> value``.

    A NaN value is stored as NULL (undefined), never as a number.
    """
    patient_id = ensure_patient(session, patient_pseudo_id).id
    rows = [
        RadiomicsFeature(
            patient_id=patient_id,
            step_run_id=step_run_id,
            segmentation_id=segmentation_id,
            image=image,
            mask=mask,
            feature_class=feature_class,
            feature=feature,
            value=_number(value),
            settings_hash=settings_hash,
        )
        for (feature_class, feature), value in features.items()
    ]
    session.add_all(rows)
    session.flush()
    return rows


def record_evaluation_metrics(
    session: Session,
    *,
    patient_pseudo_id: str,
    model: str,
    reference: str,
    label_name: str,
    metrics: Mapping[str, float | None],
    pipeline_run_id: str | None = None,
) -> list[EvaluationMetric]:
    """Add one row per metric (``{"dice": 0.85, "hd95": 4.2, ...}``); NaN is stored as NULL."""
    patient_id = ensure_patient(session, patient_pseudo_id).id
    rows = [
        EvaluationMetric(
            pipeline_run_id=pipeline_run_id,
            patient_id=patient_id,
            model=model,
            reference=reference,
            label_name=label_name,
            metric=metric,
            value=_number(value),
        )
        for metric, value in metrics.items()
    ]
    session.add_all(rows)
    session.flush()
    return rows


def record_qc_metrics(
    session: Session,
    *,
    patient_pseudo_id: str,
    step_run_id: int,
    model: str,
    metrics: Mapping[str, float | str | None],
) -> list[QcMetric]:
    """Add one row per QC metric: numbers in ``value`` (NaN as NULL), text in ``text``."""
    patient_id = ensure_patient(session, patient_pseudo_id).id
    rows = [
        QcMetric(
            patient_id=patient_id,
            step_run_id=step_run_id,
            model=model,
            metric=metric,
            value=None if isinstance(value, str) else _number(value),
            text=value if isinstance(value, str) else None,
        )
        for metric, value in metrics.items()
    ]
    session.add_all(rows)
    session.flush()
    return rows


def supersede_evaluations(
    session: Session,
    *,
    command: str,
    pipeline_run_id: str,
    evaluated: Iterable[tuple[str, str]],
) -> int:
    """Delete the evaluation rows of earlier runs of the same ``command`` (the same reference
    folders) for the ``(patient pseudo id, model)`` pairs this run evaluated: a rerun with
    another pattern replaces what it supersedes. Returns the number of rows deleted."""
    pairs = set(evaluated)
    if not pairs:
        return 0
    earlier = select(PipelineRun.id).where(
        PipelineRun.command == command, PipelineRun.id != pipeline_run_id
    )
    rows = session.exec(
        select(EvaluationMetric, Patient.pseudo_id)
        .join(Patient, col(Patient.id) == EvaluationMetric.patient_id)
        .where(col(EvaluationMetric.pipeline_run_id).in_(earlier))
    ).all()
    stale = [row for row, patient in rows if (patient, row.model) in pairs]
    for row in stale:
        session.delete(row)
    session.flush()
    return len(stale)


def _get_or_create(
    session: Session, model: type[_Row], *, defaults: Mapping[str, Any] | None = None, **key: Any
) -> _Row:
    """The row of ``model`` matching ``key``; if none, insert it (with ``defaults``).

    The insert runs in a savepoint: if another worker inserted the same key in between,
    the unique constraint fails, the savepoint is rolled back and their row is returned.
    """
    query = select(model).filter_by(**key)
    row = session.exec(query).first()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = model(**key, **(defaults or {}))
            session.add(row)
    except IntegrityError:
        row = session.exec(query).first()
        if row is None:
            raise
    return row


def _under(files: list[dict[str, Any]], root: Path | None) -> list[dict[str, Any]]:
    """File entries with paths under ``root`` made relative to it (POSIX), others as given."""
    if root is None:
        return files
    out = []
    for entry in files:
        try:
            out.append({**entry, "path": Path(entry["path"]).relative_to(root).as_posix()})
        except ValueError:
            out.append(entry)
    return out


def _files(entries: Iterable[Mapping[str, Any]], what: str) -> list[dict[str, Any]]:
    files = []
    for entry in entries:
        missing = {"role", "path", "sha256"} - set(entry)
        if missing:
            raise ValueError(f"{what} entry {dict(entry)!r} lacks {sorted(missing)}")
        files.append({**entry, "path": str(entry["path"])})
    return _json(files, what)


def _json(value: Any, what: str) -> Any:
    """``value`` as plain JSON types: Path -> str, numpy -> lists/numbers; no NaN or inf."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, Path):
            return str(obj)
        if callable(getattr(obj, "tolist", None)):  # numpy arrays and scalars
            return obj.tolist()
        raise TypeError(f"{what}: {type(obj).__name__} value {obj!r} is not JSON")

    try:
        return json.loads(json.dumps(value, default=convert, allow_nan=False))
    except ValueError as exc:  # NaN or infinity, or a circular reference
        raise ValueError(f"{what} cannot be stored as JSON: {exc}") from exc


def _number(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
