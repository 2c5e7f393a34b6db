"""Read-side queries of the provenance database (no writes), on SQLite and PostgreSQL alike.

``patient_status``: where every patient stands, step by step, with the paths of the
outputs users open (the ``prostate-cohort status`` command).

The analysis API returns pandas DataFrames (plain SQLAlchemy selects, no engine-specific
SQL). Every function takes an open ``Session`` and keyword-only filters; a filter given as
a string or a sequence of strings keeps the rows matching any of them, ``None`` keeps all.

- ``features``: radiomics in long form, one row per value (``wide=True``: one row per
  patient x image x mask, one column per feature);
- ``volumes``: mask volumes per patient, model and label, mL;
- ``evaluation_metrics``: agreement with reference masks (Dice, HD95 in mm, ...);
- ``qc_metrics``: measured quality-control metrics per patient and model
  (``tasks.qc_metrics.METRICS``; the review list is ``flows.qc_review``);
- in :mod:`db.run_queries`, how the runs went: ``pipeline_runs``, ``step_timings`` and
  ``step_time_summary`` (seconds), ``step_failures`` (with reasons), ``step_runs``
  (provenance), ``qc_figures``.

Traceability: every feature and volume row carries ``step_run_id``;
``db.run_queries.step_runs(session, step_run_ids=...)`` gives that run's step version,
parameters (for radiomics: the resolved pyradiomics settings), software versions and
input/output files.

``latest=True`` (the default) keeps, for each patient x image x mask (volumes: patient x
model; metrics: patient x model x reference x label x metric), only the newest recorded
result: what a forced recompute replaced is left out. ``pipeline_run_id`` keeps what the
step runs of one pipeline run recorded; a cached step is not recorded again, so a run that
reused every step has no results of its own (leave it ``None`` for the current state).

Wide column naming (the same here and in the SQL view ``radiomics_wide``, migration
0002): ``<feature_class>_<feature>`` in lower case, e.g. ``firstorder_mean``,
``glcm_contrast``, ``ngtdm_contrast``, ``shape_maximum2ddiameterslice``,
``firstorder_10percentile`` (:func:`wide_column`); the long form's ``wide_column`` column
maps each value to its wide column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Select, and_, func, or_
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from db.models import (
    Artifact,
    EvaluationMetric,
    Patient,
    QcMetric,
    RadiomicsFeature,
    Segmentation,
    StepRun,
)

Names = str | Sequence[str] | None
"""A filter: one value, several (any matches) or ``None`` (no filter)."""

#: Output role shown by ``status`` -> artifact role recorded by the step that writes it.
STATUS_ROLES: dict[str, str] = {
    "t2w": "t2w_n4",  # preprocessed T2 (denoised + N4), the T2 grid
    "dwi_b1000": "dwi_b1000",  # b1000 resampled onto the T2 grid
    "adc": "adc",  # ADC (mm²/s) on the T2 grid
    "adc_native": "adc_native",  # ADC on the DWI grid
    "mask": "mask",  # segmentation label map, T2 grid (newest model run)
    "qc": "qc",  # QC figure of that mask
}


def patient_status(session: Session) -> list[dict[str, Any]]:
    """Per patient: each step's latest state and error, what ingest found, output paths.

    Returns
    -------
    list of dict
        ``{"patient", "steps": {step: {"state", "error", "ended_at"}}, "found": [...],
        "outputs": {role: absolute path}}`` sorted by pseudonymous id; ``found`` is the
        newest ingest run's list of series (``tasks.ingest.FoundSeries``), failed or not.
        A step's state is that of its newest run (``completed``, ``failed``,
        ``running``); the outputs are the newest artifact of each role in
        :data:`STATUS_ROLES`.
    """
    patients = session.exec(select(Patient).order_by(Patient.pseudo_id)).all()
    out = []
    for patient in patients:
        runs = session.exec(
            select(StepRun).where(StepRun.patient_id == patient.id).order_by(StepRun.id)
        ).all()
        steps = {
            run.step: {
                "state": run.status,
                "error": run.error,
                "ended_at": run.ended_at.isoformat() if run.ended_at else None,
            }
            for run in runs  # later runs overwrite earlier ones
        }
        artifacts = session.exec(
            select(Artifact).where(Artifact.patient_id == patient.id).order_by(Artifact.id)
        ).all()
        newest = {a.role: a.path for a in artifacts}
        out.append(
            {
                "patient": patient.pseudo_id,
                "steps": steps,
                "found": next(
                    (
                        (run.details or {}).get("found", [])
                        for run in reversed(runs)
                        if run.step == "ingest"
                    ),
                    [],
                ),
                "outputs": {
                    role: newest[stored]
                    for role, stored in STATUS_ROLES.items()
                    if stored in newest
                },
            }
        )
    return out


def first_failures(session: Session, pipeline_run_id: str) -> dict[str, tuple[str, str]]:
    """``{patient: (step, error)}``: the first failed step of each patient in one run."""
    rows = session.exec(
        select(Patient.pseudo_id, StepRun.step, StepRun.error)
        .join(Patient, Patient.id == StepRun.patient_id)
        .where(StepRun.pipeline_run_id == pipeline_run_id, StepRun.status == "failed")
        .order_by(StepRun.id)
    ).all()
    out: dict[str, tuple[str, str]] = {}
    for patient, step, error in rows:
        out.setdefault(patient, (step, error or ""))
    return out


# ------------------------------------------------------------------- analysis DataFrames

_COLUMN = re.compile(r"[a-z][a-z0-9_]*")

#: Columns that identify one wide radiomics row (the feature columns follow).
WIDE_KEYS = (
    "patient",
    "image",
    "mask",
    "model",
    "zone",
    "settings_hash",
    "step_run_id",
    "pipeline_run_id",
)


def steps_run(session: Session, pipeline_run_id: str) -> dict[str, list[str]]:
    """``{patient: [step, ...]}``: the steps each patient computed in one run (completed
    there, not found in the cache), in the order they ran."""
    rows = session.exec(
        select(Patient.pseudo_id, StepRun.step)
        .join(Patient, Patient.id == StepRun.patient_id)
        .where(StepRun.pipeline_run_id == pipeline_run_id, StepRun.status == "completed")
        .order_by(StepRun.id)
    ).all()
    out: dict[str, list[str]] = {}
    for patient, step in rows:
        out.setdefault(patient, []).append(step)
    return out


def patients_started(session: Session, pipeline_run_id: str) -> set[str]:
    """The patients with at least one step on record (any state) in one run."""
    rows = session.exec(
        select(Patient.pseudo_id)
        .join(StepRun, Patient.id == StepRun.patient_id)
        .where(StepRun.pipeline_run_id == pipeline_run_id)
        .distinct()
    ).all()
    return set(rows)


def has_patient(session: Session, pseudo_id: str) -> bool:
    """True when a patient with this pseudonymous id is on record."""
    return session.exec(select(Patient).where(Patient.pseudo_id == pseudo_id)).first() is not None


def segmentation_ids(session: Session, *, mask_sha256: str, model: str) -> dict[str, int]:
    """``{label name: segmentation id}`` of one recorded mask (by content) of ``model``."""
    rows = session.exec(
        select(Segmentation).where(
            Segmentation.mask_sha256 == mask_sha256, Segmentation.model == model
        )
    ).all()
    return {row.label_name: row.id for row in rows}


def latest_mask_paths(session: Session, patient: str) -> dict[str, str]:
    """``{model: mask path}`` of the newest segmentation of each model of a patient."""
    rows = session.exec(
        select(Segmentation)
        .join(Patient, Patient.id == Segmentation.patient_id)
        .where(Patient.pseudo_id == patient)
        .order_by(Segmentation.created_at)
    ).all()
    return {row.model: row.mask_path for row in rows}


def wide_column(feature_class: str, feature: str) -> str:
    """Wide column of one feature: ``("glcm", "JointEnergy")`` -> ``"glcm_jointenergy"``.

    Raises
    ------
    ValueError
        If the name is not a plain SQL identifier (lower-case letters, digits, ``_``).
    """
    name = f"{feature_class}_{feature}".lower()
    if not _COLUMN.fullmatch(name):
        raise ValueError(f"feature {feature_class}/{feature} gives no SQL column name: {name!r}")
    return name


def _names(value: Names) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def where_in(query: Select, column: Any, value: Names) -> Select:
    """``query`` keeping the rows whose ``column`` is one of ``value`` (all if None)."""
    names = _names(value)
    return query if names is None else query.where(col(column).in_(names))


def read_frame(session: Session, query: Select) -> pd.DataFrame:
    """Run ``query`` in the session's transaction; its rows as a DataFrame (label = column)."""
    result = session.connection().execute(query)
    return pd.DataFrame(result.all(), columns=list(result.keys()))


def features(
    session: Session,
    *,
    patients: Names = None,
    images: Names = None,
    masks: Names = None,
    zones: Names = None,
    models: Names = None,
    feature_classes: Names = None,
    feature_names: Names = None,
    pipeline_run_id: str | None = None,
    latest: bool = True,
    wide: bool = False,
) -> pd.DataFrame:
    """Radiomics feature values, long (one row per value) or wide.

    Parameters
    ----------
    patients, images, masks
        Pseudonymous ids; ``t2w``, ``adc``, ``b1000``; stored mask names ``<model>:<zone>``.
    zones, models
        The two halves of the mask name: ``gland``, ``pz``, ``tz``; ``demo``, ``taps`` ...
    feature_classes, feature_names
        pyradiomics names, e.g. ``firstorder``, ``Mean``.
    pipeline_run_id, latest
        See the module docstring.
    wide
        One row per patient x image x mask (x step run), keyed by :data:`WIDE_KEYS`, one
        column per feature named by :func:`wide_column` (alphabetical); NaN where a feature
        was not extracted for that image (e.g. ``shape_*`` outside T2) or is undefined.

    Returns
    -------
    pandas.DataFrame
        Long: ``patient, image, mask, model, zone, feature_class, feature, wide_column,
        value, settings_hash, step_run_id, step, step_version, pipeline_run_id``. Values
        are in the image's units (ADC: mm²/s; shape: mm, mm², mm³).
    """
    f = RadiomicsFeature
    query = results_query(
        f,
        f.image,
        f.mask,
        f.feature_class,
        f.feature,
        f.value,
        f.settings_hash,
        f.step_run_id,
        StepRun.step,
        StepRun.step_version,
        StepRun.pipeline_run_id,
    ).order_by(Patient.pseudo_id, f.image, f.mask, f.step_run_id, f.feature_class, f.feature)
    group = ("patient_id", "image", "mask")
    query = _runs_kept(query, f, group, latest=latest, run=pipeline_run_id)
    for column, value in (
        (Patient.pseudo_id, patients),
        (f.image, images),
        (f.mask, masks),
        (f.feature_class, feature_classes),
        (f.feature, feature_names),
    ):
        query = where_in(query, column, value)
    query = _mask_part(query, zones, lambda z: col(f.mask).endswith(f":{z}", autoescape=True))
    query = _mask_part(query, models, lambda m: col(f.mask).startswith(f"{m}:", autoescape=True))
    long = read_frame(session, query).astype({"value": "float64"})
    parts = [mask.split(":", 1) if ":" in mask else (None, mask) for mask in long["mask"]]
    long.insert(3, "model", [model for model, _ in parts])
    long.insert(4, "zone", [zone for _, zone in parts])
    pairs = zip(long["feature_class"], long["feature"], strict=True)
    long.insert(7, "wide_column", [wide_column(c, n) for c, n in pairs])
    return _wide_features(long) if wide else long


def _mask_part(query: Select, value: Names, condition: Any) -> Select:
    names = _names(value)
    return query if names is None else query.where(or_(*(condition(n) for n in names)))


def results_query(table: Any, *columns: Any) -> Select:
    """``SELECT patient, *columns`` from a result ``table`` (one with ``patient_id`` and
    ``step_run_id``), joined to its patient and to the step run that made it."""
    return (
        sa_select(col(Patient.pseudo_id).label("patient"), *columns)
        .join(Patient, col(Patient.id) == table.patient_id)
        .join(StepRun, col(StepRun.id) == table.step_run_id)
    )


def _runs_kept(
    query: Select, table: Any, group: tuple[str, ...], *, latest: bool, run: str | None
) -> Select:
    """``query`` on a result ``table`` keeping, per ``group`` of its columns, the rows of
    the newest step run (``latest``), within pipeline run ``run`` when given."""
    if not latest:
        return query if run is None else query.where(StepRun.pipeline_run_id == run)
    keys = [getattr(table, name) for name in group]
    newest = sa_select(*keys, func.max(table.step_run_id).label("step_run_id"))
    if run is not None:
        newest = newest.join(StepRun, col(StepRun.id) == table.step_run_id).where(
            StepRun.pipeline_run_id == run
        )
    newest = newest.group_by(*keys).subquery()
    names = ("step_run_id", *group)
    return query.join(newest, and_(*(newest.c[n] == getattr(table, n) for n in names)))


def _wide_features(long: pd.DataFrame) -> pd.DataFrame:
    keys = long.drop_duplicates(["step_run_id", "image", "mask"])[list(WIDE_KEYS)]
    row = ["step_run_id", "image", "mask"]
    values = long.pivot(index=row, columns="wide_column", values="value")
    values.columns.name = None
    wide = keys.merge(values.reset_index(), on=row, how="left")
    return wide.reset_index(drop=True)


def volumes(
    session: Session,
    *,
    patients: Names = None,
    models: Names = None,
    labels: Names = None,
    pipeline_run_id: str | None = None,
    latest: bool = True,
) -> pd.DataFrame:
    """Mask volumes: one row per patient, model and label (``gland``, ``pz``, ``tz``).

    Returns
    -------
    pandas.DataFrame
        ``patient, model, label_name, label, volume_ml`` (mL), ``voxel_count, model_hash,
        mask_path, step_run_id, pipeline_run_id``; ``latest``: the newest segmentation run
        of each patient and model.
    """
    s = Segmentation
    query = results_query(
        s,
        s.model,
        s.label_name,
        s.label,
        s.volume_ml,
        s.voxel_count,
        s.model_hash,
        s.mask_path,
        s.step_run_id,
        StepRun.pipeline_run_id,
    ).order_by(Patient.pseudo_id, s.model, s.label, s.step_run_id)
    query = _runs_kept(query, s, ("patient_id", "model"), latest=latest, run=pipeline_run_id)
    for column, value in ((Patient.pseudo_id, patients), (s.model, models), (s.label_name, labels)):
        query = where_in(query, column, value)
    return read_frame(session, query).astype({"volume_ml": "float64"})


def evaluation_metrics(
    session: Session,
    *,
    patients: Names = None,
    models: Names = None,
    references: Names = None,
    pipeline_run_id: str | None = None,
    latest: bool = True,
    wide: bool = False,
) -> pd.DataFrame:
    """Agreement of each model's mask with each reference mask, per patient.

    Metrics (``tasks.evaluate.METRICS``): ``dice``, ``iou``, ``sensitivity``,
    ``precision`` (0-1), ``hd``, ``hd95`` (mm), ``volume_pred_ml``, ``volume_ref_ml``,
    ``volume_diff_ml`` (mL, model minus reference), ``volume_diff_pct`` (%); NaN where
    undefined.

    Returns
    -------
    pandas.DataFrame
        Long: ``patient, model, reference, label_name, metric, value, pipeline_run_id``.
        ``wide=True`` (needs ``latest``): one row per patient x model x reference x label,
        one column per metric.

    Raises
    ------
    ValueError
        ``wide=True`` with ``latest=False`` (repeated measurements have no single cell).
    """
    if wide and not latest:
        raise ValueError("evaluation_metrics(wide=True) needs latest=True")
    e = EvaluationMetric
    group = (e.patient_id, e.model, e.reference, e.label_name, e.metric)
    query = (
        sa_select(
            col(Patient.pseudo_id).label("patient"),
            e.model,
            e.reference,
            e.label_name,
            e.metric,
            e.value,
            e.pipeline_run_id,
        )
        .join(Patient, col(Patient.id) == e.patient_id)
        .order_by(Patient.pseudo_id, e.model, e.reference, e.label_name, e.metric, e.id)
    )
    if pipeline_run_id is not None:
        query = query.where(e.pipeline_run_id == pipeline_run_id)
    if latest:
        newest = sa_select(func.max(e.id)).group_by(*group)
        if pipeline_run_id is not None:
            newest = newest.where(e.pipeline_run_id == pipeline_run_id)
        query = query.where(col(e.id).in_(newest))
    for column, value in (
        (Patient.pseudo_id, patients),
        (e.model, models),
        (e.reference, references),
    ):
        query = where_in(query, column, value)
    long = read_frame(session, query).astype({"value": "float64"})
    if not wide:
        return long
    keys = ["patient", "model", "reference", "label_name"]
    table = long.pivot(index=keys, columns="metric", values="value").reset_index()
    table.columns.name = None
    return table


def qc_metrics(
    session: Session,
    *,
    patients: Names = None,
    models: Names = None,
    pipeline_run_id: str | None = None,
    latest: bool = True,
    wide: bool = False,
) -> pd.DataFrame:
    """Quality-control metrics per patient and model (names and units:
    ``tasks.qc_metrics.METRICS``).

    Returns
    -------
    pandas.DataFrame
        Long: ``patient, model, metric, value, text, step_run_id, pipeline_run_id``
        (``value`` in the metric's unit, NaN where it does not apply; ``text`` for the text
        metrics). ``latest``: the newest QC run of each patient and model. ``wide=True``:
        one row per patient x model, one column per metric (text metrics as text).
    """
    q = QcMetric
    query = results_query(
        q, q.model, q.metric, q.value, q.text, q.step_run_id, StepRun.pipeline_run_id
    ).order_by(Patient.pseudo_id, q.model, q.metric, q.step_run_id)
    query = _runs_kept(query, q, ("patient_id", "model"), latest=latest, run=pipeline_run_id)
    for column, value in ((Patient.pseudo_id, patients), (q.model, models)):
        query = where_in(query, column, value)
    long = read_frame(session, query).astype({"value": "float64"})
    if not wide:
        return long
    cells = long.assign(cell=long["text"].where(long["text"].notna(), long["value"]))
    table = cells.pivot(index=["patient", "model"], columns="metric", values="cell")
    table.columns.name = None
    return table.reset_index()
