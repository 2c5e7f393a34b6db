"""Writing and reading provenance through db.record, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import delete, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from db import record
from db.models import (
    TABLES,
    Artifact,
    EvaluationMetric,
    Patient,
    PipelineRun,
    RadiomicsFeature,
    Segmentation,
    Series,
    StepRun,
    Study,
)
from db.store import make_engine, session_scope, upgrade

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


@pytest.fixture
def sqlite_engine(tmp_path):
    """For checks made in Python before anything is written: one engine is enough."""
    url = f"sqlite:///{tmp_path / 'provenance.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _step(session: Session, patient: str | None = "sub-001", **overrides) -> StepRun:
    values = dict(
        patient_pseudo_id=patient,
        step="n4",
        step_version="1.0",
        status="completed",
        started_at=T0,
        ended_at=T0 + timedelta(seconds=12.5),
        parameters={"shrink": [4, 4, 1], "iterations": [50, 50, 30]},
        software_versions={"SimpleITK": "2.5.7"},
        inputs=[{"role": "t2w", "path": "in/t2w.nii.gz", "sha256": SHA_A}],
        outputs=[{"role": "t2w_n4", "path": "out/t2w_n4.nii.gz", "sha256": SHA_B}],
        cache_key="k" * 64,
    )
    values.update(overrides)
    return record.record_step_run(session, **values)


def _count(session: Session, table) -> int:
    return session.exec(select(func.count()).select_from(table)).one()


def _populate(engine) -> dict:
    """One patient with a row in every table; returns the ids."""
    with session_scope(engine) as s:
        run = record.begin_pipeline_run(
            s,
            command="prostate-cohort run /data/cohort",
            settings={"root": Path("/data/cohort"), "n4": {"shrink": np.array([4, 4, 1])}},
            software_versions=record.software_versions(),
            host="worker-1",
            prefect_flow_run_id="5f0c0a4e-0000-4000-8000-000000000001",
        )
        study = record.ensure_study(s, patient_pseudo_id="sub-001", study_key="d" * 64)
        series = record.record_series(
            s,
            study_id=study.id,
            kind="dwi",
            b_value=800.0,
            selected=True,
            selection_reason="highest b-value below 1000",
            series_number=7,
            description="ep2d_diff_b50_400_800",
            source=Path("7"),
            n_files=3,
            source_sha256=SHA_C,
            source_files=[{"name": f"{i}.dcm", "sha256": SHA_A} for i in range(3)],
            shape=np.array([128, 84, 19]),
            spacing=[2.0, 2.0, 3.6],
            origin=[-120.5, -90.25, 10.0],
            direction=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        )
        step = _step(s, pipeline_run_id=run.id, prefect_task_run_id="task-1", host="worker-1")
        seg = record.record_segmentation(
            s,
            patient_pseudo_id="sub-001",
            step_run_id=step.id,
            model="nnunet-gland",
            model_hash=SHA_C,
            mask_path=Path("out/mask.nii.gz"),
            mask_sha256=SHA_A,
            label=1,
            label_name="gland",
            voxel_count=np.int64(51234),
            volume_ml=38.2,
        )
        features = record.record_radiomics_features(
            s,
            patient_pseudo_id="sub-001",
            step_run_id=step.id,
            segmentation_id=seg.id,
            image="adc",
            mask="gland",
            features={("firstorder", "Mean"): np.float64(1.1e-3), ("glcm", "Idm"): float("nan")},
            settings_hash=SHA_B,
        )
        metrics = record.record_evaluation_metrics(
            s,
            patient_pseudo_id="sub-001",
            model="nnunet-gland",
            reference="prostatex-ai",
            label_name="gland",
            metrics={"dice": 0.85, "hd95": None},
            pipeline_run_id=run.id,
        )
        record.finish_pipeline_run(
            s, run.id, status="partial", n_patients=2, n_failed=1, summary={"failed": ["sub-2"]}
        )
    return {
        "run": run.id,
        "series": series.id,
        "step": step.id,
        "seg": seg.id,
        "features": [f.id for f in features],
        "metrics": [m.id for m in metrics],
    }


def test_every_table_round_trips(db_engine):
    ids = _populate(db_engine)
    with session_scope(db_engine) as s:
        patient = s.exec(select(Patient)).one()
        assert patient.pseudo_id == "sub-001" and patient.created_at.tzinfo == UTC

        study = s.exec(select(Study)).one()
        assert (study.patient_id, study.study_key, study.source) == (patient.id, "d" * 64, None)

        series = s.get(Series, ids["series"])
        assert series.study_id == study.id and series.kind == "dwi" and series.b_value == 800.0
        assert series.selected is True and series.series_number == 7
        assert series.source == "7"
        assert series.source_files[2] == {"name": "2.dcm", "sha256": SHA_A}
        assert series.shape == [128, 84, 19] and series.spacing == [2.0, 2.0, 3.6]
        assert series.origin == [-120.5, -90.25, 10.0] and len(series.direction) == 9
        assert series.image_path is None

        run = s.get(PipelineRun, ids["run"])
        assert run.status == "partial" and (run.n_patients, run.n_failed) == (2, 1)
        assert run.settings == {"root": "/data/cohort", "n4": {"shrink": [4, 4, 1]}}
        assert run.software_versions["SimpleITK"] == record.software_versions()["SimpleITK"]
        assert run.summary == {"failed": ["sub-2"]} and run.host == "worker-1"
        assert run.started_at <= run.ended_at and run.ended_at.tzinfo == UTC

        step = s.get(StepRun, ids["step"])
        assert (step.patient_id, step.pipeline_run_id, step.status) == (
            patient.id,
            run.id,
            "completed",
        )
        assert step.duration_s == pytest.approx(12.5)
        assert step.started_at == T0 and step.ended_at == T0 + timedelta(seconds=12.5)
        assert step.parameters == {"shrink": [4, 4, 1], "iterations": [50, 50, 30]}
        assert step.inputs == [{"role": "t2w", "path": "in/t2w.nii.gz", "sha256": SHA_A}]
        assert step.prefect_task_run_id == "task-1" and step.error is None

        artifact = s.exec(select(Artifact)).one()
        assert (artifact.patient_id, artifact.step_run_id, artifact.role, artifact.sha256) == (
            patient.id,
            step.id,
            "t2w_n4",
            SHA_B,
        )
        assert artifact.path == "out/t2w_n4.nii.gz" and artifact.size_bytes is None

        seg = s.get(Segmentation, ids["seg"])
        assert (seg.label, seg.label_name, seg.voxel_count) == (1, "gland", 51234)
        assert seg.volume_ml == pytest.approx(38.2) and seg.mask_path == "out/mask.nii.gz"

        features = {
            (f.feature_class, f.feature): f
            for f in s.exec(
                select(RadiomicsFeature).where(RadiomicsFeature.patient_id == patient.id)
            )
        }
        assert features[("firstorder", "Mean")].value == pytest.approx(1.1e-3)
        assert features[("glcm", "Idm")].value is None  # NaN is undefined, not a number
        assert {f.segmentation_id for f in features.values()} == {seg.id}

        metrics = {m.metric: m.value for m in s.exec(select(EvaluationMetric))}
        assert metrics == {"dice": pytest.approx(0.85), "hd95": None}


def test_step_run_for_missing_patient_is_rejected(db_engine):
    with pytest.raises(IntegrityError), session_scope(db_engine) as s:
        s.add(
            StepRun(
                patient_id=999,
                step="n4",
                step_version="1",
                status="completed",
                started_at=T0,
                cache_key="k",
            )
        )
        s.flush()


def test_unknown_status_is_rejected_by_the_database(db_engine):
    with pytest.raises(IntegrityError), session_scope(db_engine) as s:
        s.add(StepRun(step="n4", step_version="1", status="done", started_at=T0, cache_key="k"))
        s.flush()


def test_duplicate_pseudo_id_is_rejected_and_ensure_patient_reuses_it(db_engine):
    with session_scope(db_engine) as s:
        first = record.ensure_patient(s, "sub-001")
        assert record.ensure_patient(s, "sub-001").id == first.id
    with pytest.raises(IntegrityError), session_scope(db_engine) as s:
        s.add(Patient(pseudo_id="sub-001"))
        s.flush()


def test_duplicate_feature_row_is_rejected(db_engine):
    with session_scope(db_engine) as s:
        step = _step(s)
    kwargs = dict(
        patient_pseudo_id="sub-001",
        step_run_id=step.id,
        image="t2w",
        mask="pz",
        features={("shape", "MeshVolume"): 1.0},
        settings_hash=SHA_A,
    )
    with session_scope(db_engine) as s:
        record.record_radiomics_features(s, **kwargs)
    with pytest.raises(IntegrityError), session_scope(db_engine) as s:
        record.record_radiomics_features(s, **kwargs)


def test_deleting_a_patient_deletes_everything_of_theirs(db_engine):
    ids = _populate(db_engine)
    with session_scope(db_engine) as s:
        other = _step(s, patient="sub-002", outputs=[])
        _step(s, patient=None, step="cohort_summary")
    with session_scope(db_engine) as s:
        s.exec(delete(Patient).where(Patient.pseudo_id == "sub-001"))
    with session_scope(db_engine) as s:
        assert s.exec(select(Patient.pseudo_id)).all() == ["sub-002"]
        for table in (Study, Series, Artifact, Segmentation, RadiomicsFeature, EvaluationMetric):
            assert _count(s, table) == 0, table.__tablename__
        assert s.get(StepRun, other.id) is not None
        remaining = s.exec(select(StepRun)).all()
        assert sorted(r.step for r in remaining) == ["cohort_summary", "n4"]  # not sub-001's
        assert s.get(PipelineRun, ids["run"]) is not None  # runs are not per patient


def test_deleting_a_pipeline_run_keeps_its_step_runs(db_engine):
    ids = _populate(db_engine)
    with session_scope(db_engine) as s:
        s.exec(delete(PipelineRun).where(PipelineRun.id == ids["run"]))
    with session_scope(db_engine) as s:
        step = s.get(StepRun, ids["step"])
        assert step is not None and step.pipeline_run_id is None
        assert _count(s, EvaluationMetric) == 2


def test_find_completed_step_is_the_cache_lookup(db_engine):
    with session_scope(db_engine) as s:
        _step(
            s,
            status="failed",
            cache_key="key-1",
            ended_at=T0 + timedelta(seconds=1),
            error="N4 diverged",
            error_type="StepError",
            outputs=[],
        )
        assert (
            record.find_completed_step(s, patient_pseudo_id="sub-001", step="n4", cache_key="key-1")
            is None
        )
        done = _step(s, cache_key="key-1")
        _step(s, status="failed", cache_key="key-1", ended_at=T0 + timedelta(hours=1), outputs=[])
        _step(s, patient="sub-002", cache_key="key-2")
        _step(s, patient=None, step="summary", cache_key="key-3")
    with session_scope(db_engine) as s:
        found = record.find_completed_step(
            s, patient_pseudo_id="sub-001", step="n4", cache_key="key-1"
        )
        assert found is not None and found.id == done.id and found.status == "completed"
        assert (
            record.find_completed_step(s, patient_pseudo_id="sub-001", step="n4", cache_key="key-2")
            is None
        )  # another patient's key
        assert (
            record.find_completed_step(
                s, patient_pseudo_id="sub-001", step="denoise", cache_key="key-1"
            )
            is None
        )
        cohort = record.find_completed_step(
            s, patient_pseudo_id=None, step="summary", cache_key="key-3"
        )
        assert cohort is not None and cohort.patient_id is None


def test_find_completed_step_prefers_the_latest_run(db_engine):
    with session_scope(db_engine) as s:
        _step(s, cache_key="key-1", ended_at=T0 + timedelta(seconds=5))
        latest = _step(s, cache_key="key-1", ended_at=T0 + timedelta(seconds=50))
        _step(s, cache_key="key-1", ended_at=T0 + timedelta(seconds=20))
        found = record.find_completed_step(
            s, patient_pseudo_id="sub-001", step="n4", cache_key="key-1"
        )
        assert found.id == latest.id


def test_rerun_with_the_same_output_makes_one_artifact(db_engine, tmp_path):
    output = tmp_path / "adc.nii.gz"
    output.write_bytes(b"12345")
    outputs = [{"role": "adc", "path": output, "sha256": SHA_C}]
    with session_scope(db_engine) as s:
        first = _step(s, outputs=outputs, step="adc")
        _step(s, outputs=outputs, step="adc")
        _step(s, outputs=[{"role": "adc", "path": "x", "sha256": SHA_A}], status="failed")
    with session_scope(db_engine) as s:
        artifact = s.exec(select(Artifact)).one()
        assert (artifact.step_run_id, artifact.size_bytes, artifact.path) == (
            first.id,
            5,
            str(output),
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"status": "done"}, "status"),
        ({"started_at": datetime(2024, 3, 1, 9, 0)}, "timezone-aware"),
        ({"ended_at": T0 - timedelta(seconds=1)}, "before it starts"),
        ({"outputs": [{"role": "adc", "path": "x"}]}, "lacks"),
        ({"parameters": {"sigma": float("nan")}}, "JSON"),
    ],
)
def test_record_step_run_rejects_bad_values(sqlite_engine, overrides, message):
    with pytest.raises(ValueError, match=message), session_scope(sqlite_engine) as s:
        _step(s, **overrides)


def test_running_step_has_no_duration(db_engine):
    with session_scope(db_engine) as s:
        assert _step(s, status="running", ended_at=None).duration_s is None


def test_bad_pseudo_ids_and_series_columns_are_rejected(sqlite_engine):
    with session_scope(sqlite_engine) as s:
        for bad in ("", "sub 001", "x" * 65):
            with pytest.raises(ValueError, match="pseudonymous"):
                record.ensure_patient(s, bad)
        with pytest.raises(TypeError, match="patient_name"):
            record.record_series(s, study_id=1, patient_name="DOE^JOHN")


def test_finish_pipeline_run_checks_its_arguments(sqlite_engine):
    with session_scope(sqlite_engine) as s:
        run = record.begin_pipeline_run(
            s, command="c", settings={}, software_versions={}, host=None
        )
        assert run.status == "running" and len(run.id) == 36
        with pytest.raises(ValueError, match="final pipeline status"):
            record.finish_pipeline_run(
                s, run.id, status="running", n_patients=0, n_failed=0, summary={}
            )
        with pytest.raises(LookupError, match="no-such-run"):
            record.finish_pipeline_run(
                s, "no-such-run", status="completed", n_patients=0, n_failed=0, summary={}
            )


def test_software_versions_names_every_package(monkeypatch):
    versions = record.software_versions()
    assert set(versions) == {"python", *record.SOFTWARE}
    assert versions["SimpleITK"][0].isdigit() and versions["python"].startswith("3.")
    monkeypatch.setattr(record, "SOFTWARE", ("no-such-distribution-for-tests",))
    assert record.software_versions()["no-such-distribution-for-tests"] == "not installed"


def test_no_column_holds_identifying_dicom_fields():
    identifying = ("patientname", "birth", "studydate", "dicompatientid", "accession")
    columns = [f"{t.__tablename__}.{c.name}" for t in TABLES for c in t.__table__.columns]
    leaks = [c for c in columns if any(w in c.replace("_", "").lower() for w in identifying)]
    assert leaks == []


def test_ensure_patient_survives_a_concurrent_insert(db_engine):
    # Another worker inserts the patient between our look-up and our insert: the unique
    # constraint fails inside a savepoint, and their row is returned instead.
    with session_scope(db_engine) as other:
        theirs = record.ensure_patient(other, "sub-race")

    class _NothingFound:
        def first(self):
            return None

    with session_scope(db_engine) as s:
        real_exec, calls = s.exec, []

        def exec_missing_first_lookup(query, *args, **kwargs):
            calls.append(query)
            return _NothingFound() if len(calls) == 1 else real_exec(query, *args, **kwargs)

        s.exec = exec_missing_first_lookup
        patient = record.ensure_patient(s, "sub-race")
        assert len(calls) == 2 and patient.id == theirs.id
        _step(s, patient="sub-race")  # the transaction is still usable
    with session_scope(db_engine) as s:
        assert _count(s, Patient) == 1 and _count(s, StepRun) == 1


def test_close_interrupted_runs_closes_only_this_trees_runs_on_this_host(db_engine) -> None:
    begin, close = record.begin_pipeline_run, record.close_interrupted_runs
    with Session(db_engine) as s:
        mine = begin(
            s, command="run", settings={"output_root": "/out/a"}, software_versions={}, host="h1"
        ).id
        other_tree = begin(
            s, command="run", settings={"output_root": "/out/b"}, software_versions={}, host="h1"
        ).id
        other_host = begin(
            s, command="run", settings={"output_root": "/out/a"}, software_versions={}, host="h2"
        ).id
        assert close(s, host="h1", output_root="/out/a") == 1
        s.commit()
        status = {r.id: r.status for r in s.exec(select(PipelineRun)).all()}
        assert status == {mine: "failed", other_tree: "running", other_host: "running"}
        assert "interrupted" in s.get(PipelineRun, mine).summary["error"]
