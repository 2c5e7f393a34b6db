"""Read-side queries of the provenance database (no writes).

``patient_status``: where every patient stands, step by step, with the paths of the
outputs users open (the ``prostate-cohort status`` command). Works on SQLite and
PostgreSQL alike (plain SQLAlchemy/SQLModel selects).
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, select

from db.models import Artifact, Patient, StepRun, Study

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
    """Per patient: source exam folder, each step's latest state and error, output paths.

    Returns
    -------
    list of dict
        ``{"patient", "source", "steps": {step: {"state", "error", "ended_at"}},
        "outputs": {role: absolute path}}`` sorted by pseudonymous id. A step's state is
        that of its newest run (``completed``, ``failed``, ``running``); the outputs are
        the newest artifact of each role in :data:`STATUS_ROLES`.
    """
    patients = session.exec(select(Patient).order_by(Patient.pseudo_id)).all()
    out = []
    for patient in patients:
        studies = session.exec(select(Study).where(Study.patient_id == patient.id)).all()
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
                "source": studies[-1].source if studies else None,
                "steps": steps,
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
