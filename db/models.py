"""Provenance tables: who (pseudonymous patient), what (series, files), how (step runs), results.

Privacy: no table holds a patient name, DICOM PatientID, birth date or study date. A patient
is known only by ``Patient.pseudo_id``; a study only by a hash of its StudyInstanceUID.

Conventions
-----------
- Timestamps are timezone-aware UTC (``UTCDateTime``); naive datetimes are rejected.
- Lengths in mm, volumes in ml, b-values in s/mm², durations in seconds.
- JSON columns use SQLAlchemy's generic ``JSON`` so that SQLite and PostgreSQL both work.
- Every row that belongs to a patient is deleted with the patient (``ON DELETE CASCADE``);
  links to a pipeline run are cleared (``SET NULL``) when the run is deleted, so step results
  (and the cache they form) outlive the run that made them.
- Constraint and index names follow ``NAMING_CONVENTION`` so migrations can refer to them.

Changing a table means adding an Alembic revision under ``db/migrations/versions``;
``tests/db/test_migrations.py`` fails while models and migrations disagree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, DateTime, Index, Text, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# Set before any table is defined: names are given when constraints attach to their table.
SQLModel.metadata.naming_convention = NAMING_CONVENTION

RUN_STATUSES = ("running", "completed", "failed", "partial")
"""Allowed ``PipelineRun.status`` values; ``partial`` = finished with some patients failed."""

STEP_STATUSES = ("running", "completed", "failed", "cached")
"""Allowed ``StepRun.status`` values; ``cached`` = skipped because an identical run exists."""


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC timestamp on every engine.

    Stored as ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL and as naive UTC text on SQLite
    (which has no time zones); always read back as an aware ``datetime`` in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _created_at() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime)


def _sha256(*, nullable: bool = False) -> Any:
    return Field(default=None, max_length=64) if nullable else Field(max_length=64)


def _status_check(values: tuple[str, ...]) -> CheckConstraint:
    quoted = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"status IN ({quoted})", name="status")


class Patient(SQLModel, table=True):
    """One subject of the cohort, known only by a pseudonymous id."""

    __tablename__ = "patient"

    id: int | None = Field(default=None, primary_key=True)
    pseudo_id: str = Field(max_length=64, unique=True, index=True)
    """Pseudonymous patient id (e.g. ``sub-3f9a...``); never the DICOM PatientID or a name."""
    created_at: datetime = _created_at()
    """When the patient was first seen by the pipeline (UTC)."""


class Study(SQLModel, table=True):
    """One imaging exam (DICOM study) of a patient."""

    __tablename__ = "study"
    __table_args__ = (UniqueConstraint("patient_id", "study_key"),)

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", ondelete="CASCADE", index=True)
    study_key: str = Field(max_length=64)
    """Pseudonymous hash of the StudyInstanceUID; unique per patient."""
    source: str | None = None
    """Not stored since migration 0004 (the exam folder often names the patient and the
    study date); NULL."""
    created_at: datetime = _created_at()


class Series(SQLModel, table=True):
    """One image series of a study, with what ingest decided about it.

    A multi-b DWI series stored as one DICOM series gives one row per b-value (same
    ``source``). Geometry is that of the image as ingest read it, in LPS physical space.
    """

    __tablename__ = "series"

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", ondelete="CASCADE", index=True)
    kind: str = Field(max_length=32)
    """Series class: ``t2w``, ``dwi``, ``adc``, ``computed_dwi``, ``ignored`` ..."""
    b_value: float | None = None
    """Diffusion weighting in s/mm²; NULL when not a diffusion image."""
    selected: bool = False
    """True when this series is the one used downstream for its kind (and b-value)."""
    selection_reason: str | None = Field(default=None, sa_type=Text)
    """Why the series was chosen or rejected, in words."""
    series_number: int | None = None
    """DICOM SeriesNumber (0020,0011), when known."""
    description: str | None = None
    """DICOM SeriesDescription (protocol name), when known."""
    source: str
    """Series folder relative to the exam folder (PI-CAI: the role's file name, e.g.
    ``t2w.mha``); never the patient or study folder."""
    n_files: int
    """Number of source files (DICOM slices, or 1 for NIfTI/MHA)."""
    source_sha256: str = _sha256()
    """One digest over all source files (sha256 of the sorted name/digest pairs)."""
    source_files: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    """Every source file as ``{"name": str, "sha256": str}``."""
    shape: list[int] | None = Field(default=None, sa_type=JSON)
    """Image size in voxels, ``[x, y, z]``."""
    spacing: list[float] | None = Field(default=None, sa_type=JSON)
    """Voxel spacing in mm, ``[x, y, z]``."""
    origin: list[float] | None = Field(default=None, sa_type=JSON)
    """Physical position of the first voxel, LPS, mm."""
    direction: list[float] | None = Field(default=None, sa_type=JSON)
    """Direction cosines, 9 floats, row-major (as SimpleITK gives them)."""
    image_path: str | None = None
    """NIfTI written by ingest, when it wrote one."""
    image_sha256: str | None = _sha256(nullable=True)
    created_at: datetime = _created_at()


class PipelineRun(SQLModel, table=True):
    """One invocation of the cohort pipeline (a command or a Prefect flow run)."""

    __tablename__ = "pipeline_run"
    __table_args__ = (_status_check(RUN_STATUSES),)

    id: str = Field(default_factory=lambda: str(uuid.uuid4()), primary_key=True, max_length=36)
    """A random UUID, given when the run begins."""
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    status: str = Field(default="running", max_length=16)
    """One of ``RUN_STATUSES``."""
    command: str = Field(sa_type=Text)
    """The command line or entry point that started the run."""
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    """The fully resolved settings of the run."""
    software_versions: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    """``{distribution: version}``, see ``db.record.software_versions``."""
    host: str | None = Field(default=None, max_length=255)
    prefect_flow_run_id: str | None = Field(default=None, max_length=36, index=True)
    n_patients: int | None = None
    """Patients the run processed (set when it finishes)."""
    n_failed: int | None = None
    """Patients with at least one failed step."""
    summary: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """Cohort-level summary written when the run finishes."""


class StepRun(SQLModel, table=True):
    """One execution (or cache hit) of one processing step for one patient.

    ``inputs`` and ``outputs`` are lists of ``{"role": str, "path": str, "sha256": str}``.
    ``cache_key`` hashes the input digests, the parameters and ``step_version``: a completed
    run with the same key for the same patient means the step need not run again.
    """

    __tablename__ = "step_run"
    __table_args__ = (_status_check(STEP_STATUSES),)

    id: int | None = Field(default=None, primary_key=True)
    pipeline_run_id: str | None = Field(
        default=None,
        max_length=36,
        foreign_key="pipeline_run.id",
        ondelete="SET NULL",
        index=True,
    )
    patient_id: int | None = Field(
        default=None, foreign_key="patient.id", ondelete="CASCADE", index=True
    )
    """NULL for cohort-level steps."""
    step: str = Field(max_length=64)
    """Step name, e.g. ``ingest``, ``n4``, ``register``."""
    step_version: str = Field(max_length=32)
    """Version of the step's code; a change invalidates cached results."""
    status: str = Field(max_length=16)
    """One of ``STEP_STATUSES``."""
    started_at: datetime = Field(sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_s: float | None = None
    """Wall-clock seconds from start to end."""
    parameters: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    """The step's resolved parameters."""
    software_versions: dict[str, str] = Field(default_factory=dict, sa_type=JSON)
    inputs: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    outputs: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    cache_key: str = Field(max_length=64, index=True)
    prefect_flow_run_id: str | None = Field(default=None, max_length=36)
    prefect_task_run_id: str | None = Field(default=None, max_length=36)
    host: str | None = Field(default=None, max_length=255)
    error: str | None = Field(default=None, sa_type=Text)
    """Error message (and traceback) when the step failed."""
    error_type: str | None = Field(default=None, max_length=255)
    """Exception class name, e.g. ``InputError``."""
    details: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """What the step measured about its own result (JSON), e.g. the registration's
    accepted stage, similarities and scale factors, or the b-values a fit used."""
    resources: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    """How the step ran, by dotted parameter path (``threads``, ``t2.threads``, ``device``):
    provenance, not part of ``cache_key`` (see ``tasks.registry.RESOURCE_FIELDS``)."""


class Artifact(SQLModel, table=True):
    """A file a step produced for a patient, by content: the same bytes are one row."""

    __tablename__ = "artifact"
    __table_args__ = (UniqueConstraint("patient_id", "role", "sha256"),)

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", ondelete="CASCADE", index=True)
    step_run_id: int = Field(foreign_key="step_run.id", ondelete="CASCADE", index=True)
    """The step run that first produced this content."""
    role: str = Field(max_length=64)
    """What the file is to the patient, e.g. ``t2w``, ``adc``, ``mask``, ``qc``."""
    path: str
    sha256: str = _sha256()
    size_bytes: int | None = Field(default=None, sa_type=BigInteger)
    created_at: datetime = _created_at()


class Segmentation(SQLModel, table=True):
    """One label of a segmentation mask produced by a model for a patient."""

    __tablename__ = "segmentation"

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", ondelete="CASCADE", index=True)
    step_run_id: int = Field(foreign_key="step_run.id", ondelete="CASCADE", index=True)
    model: str = Field(max_length=128)
    """Model name (registry key), e.g. ``nnunet-gland``."""
    model_hash: str | None = _sha256(nullable=True)
    """Digest of the model weights, when known."""
    mask_path: str
    mask_sha256: str = _sha256()
    label: int
    """Integer label value in the mask file."""
    label_name: str = Field(max_length=64)
    """E.g. ``gland``, ``pz``, ``tz``."""
    voxel_count: int = Field(sa_type=BigInteger)
    volume_ml: float
    """Label volume in ml (voxel count x voxel volume in mm³ / 1000)."""
    created_at: datetime = _created_at()


class RadiomicsFeature(SQLModel, table=True):
    """One radiomics feature value (long form: one row per image, mask and feature)."""

    __tablename__ = "radiomics_feature"
    __table_args__ = (
        Index("ix_radiomics_feature_patient_image_mask", "patient_id", "image", "mask"),
        UniqueConstraint(
            "step_run_id", "image", "mask", "feature_class", "feature", name="uq_radiomics_feature"
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", ondelete="CASCADE")
    step_run_id: int = Field(foreign_key="step_run.id", ondelete="CASCADE", index=True)
    segmentation_id: int | None = Field(
        default=None, foreign_key="segmentation.id", ondelete="SET NULL", index=True
    )
    image: str = Field(max_length=16)
    """Image the feature was computed on: ``t2w``, ``adc``, ``b1000``."""
    mask: str = Field(max_length=64)
    """Label name of the region, e.g. ``gland``, ``pz``, ``tz``."""
    feature_class: str = Field(max_length=64)
    """pyradiomics feature class, e.g. ``firstorder``, ``glcm``, ``shape``."""
    feature: str = Field(max_length=128)
    """Feature name within its class, e.g. ``Mean``."""
    value: float | None = None
    """Feature value in the image's units; NULL when undefined (never a stand-in zero)."""
    settings_hash: str = _sha256()
    """Digest of the extraction settings."""


class EvaluationMetric(SQLModel, table=True):
    """One agreement metric of a model's mask against a reference mask, for one patient."""

    __tablename__ = "evaluation_metric"
    __table_args__ = (Index("ix_evaluation_metric_model_reference", "model", "reference"),)

    id: int | None = Field(default=None, primary_key=True)
    pipeline_run_id: str | None = Field(
        default=None,
        max_length=36,
        foreign_key="pipeline_run.id",
        ondelete="SET NULL",
        index=True,
    )
    patient_id: int = Field(foreign_key="patient.id", ondelete="CASCADE", index=True)
    model: str = Field(max_length=128)
    reference: str = Field(max_length=128)
    """Name of the reference mask set."""
    label_name: str = Field(max_length=64)
    metric: str = Field(max_length=32)
    """``dice``, ``iou``, ``hd`` (mm), ``hd95`` (mm), ``sensitivity``, ``precision``,
    ``volume_diff_ml`` (ml, model minus reference)."""
    value: float | None = None
    """NULL when undefined (e.g. a distance to an empty mask)."""
    created_at: datetime = _created_at()


class QcMetric(SQLModel, table=True):
    """One quality-control metric of a model's mask and its exam, for one patient (long
    form). Names, units and meanings: ``tasks.qc_metrics.METRICS``; the status and reasons
    are judged when read (``flows.qc_review``), so thresholds can change without recomputing.
    """

    __tablename__ = "qc_metric"
    __table_args__ = (Index("ix_qc_metric_patient_model", "patient_id", "model"),)

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", ondelete="CASCADE")
    step_run_id: int = Field(foreign_key="step_run.id", ondelete="CASCADE", index=True)
    """The ``qc`` step run that measured it."""
    model: str = Field(max_length=128)
    metric: str = Field(max_length=64)
    """E.g. ``residual_shift_mm``, ``volume_ml``, ``dice_vs_taps``."""
    value: float | None = None
    """In the metric's unit; NULL where it does not apply or is text."""
    text: str | None = Field(default=None, max_length=255)
    """Text-valued metrics (``reg_stage``, ``dwi_b_values``)."""


TABLES = (
    Patient,
    Study,
    Series,
    PipelineRun,
    StepRun,
    Artifact,
    Segmentation,
    RadiomicsFeature,
    EvaluationMetric,
    QcMetric,
)
"""Every table class, parents before children."""
