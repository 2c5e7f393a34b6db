"""Alembic migrations build exactly the schema that db/models.py describes, on both engines."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

from db import models
from db.store import current_revision, downgrade, head_revision, make_engine, upgrade

TABLES = {
    "patient",
    "study",
    "series",
    "pipeline_run",
    "step_run",
    "artifact",
    "segmentation",
    "radiomics_feature",
    "evaluation_metric",
    "qc_metric",
}


def _tables(url: str, *, views: bool = False) -> set[str]:
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        return set(inspector.get_view_names() if views else inspector.get_table_names())
    finally:
        engine.dispose()


def _schema_diff(url: str) -> list:
    """What autogenerate would change to make the database match the models."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()


def test_models_define_the_expected_tables():
    assert {table.__tablename__ for table in models.TABLES} == TABLES
    assert set(SQLModel.metadata.tables) == TABLES


def test_upgrade_to_head_creates_every_table(db_url):
    assert current_revision(db_url) is None
    upgrade(db_url)
    assert current_revision(db_url) == head_revision() == "0007"
    assert _tables(db_url) == TABLES | {"alembic_version"}


def test_migrated_schema_matches_models(db_url):
    upgrade(db_url)
    assert _schema_diff(db_url) == []


def test_schema_comparison_sees_drift(db_url):
    # The test above is only worth something if the comparison notices a difference.
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE patient ADD COLUMN nickname VARCHAR(20)")
    engine.dispose()
    diff = _schema_diff(db_url)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("remove_column", "patient", "nickname")]


def test_downgrade_to_base_then_upgrade_again(db_url):
    upgrade(db_url)
    downgrade(db_url, "base")
    assert current_revision(db_url) is None
    assert _tables(db_url) == {"alembic_version"}
    added = {d[1].name for d in _schema_diff(db_url) if d[0] == "add_table"}
    assert added == TABLES
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert _schema_diff(db_url) == []


def test_radiomics_wide_view_comes_and_goes_with_0002(db_url):
    upgrade(db_url, "0001")
    assert _tables(db_url, views=True) == set()
    upgrade(db_url)
    assert _tables(db_url, views=True) == {"radiomics_wide"}
    engine = make_engine(db_url)
    with engine.connect() as connection:  # it runs on an empty database
        assert connection.exec_driver_sql("SELECT * FROM radiomics_wide").all() == []
    engine.dispose()
    downgrade(db_url, "0001")
    assert _tables(db_url, views=True) == set() and current_revision(db_url) == "0001"
    assert _tables(db_url) == TABLES - {"qc_metric"} | {"alembic_version"}  # from 0006


def test_failed_migration_leaves_nothing_behind(db_url):
    # A table in the way makes the migration fail part-way: the tables it created before
    # failing must be rolled back too (transactional DDL, also on SQLite).
    engine = make_engine(db_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE series (id INTEGER PRIMARY KEY)")
    engine.dispose()
    with pytest.raises(Exception, match="(?i)series"):
        upgrade(db_url)
    assert current_revision(db_url) is None
    assert _tables(db_url) == {"series"}


def test_0004_removes_exam_folder_names(db_url):
    """Rows written before 0004 named the exam folder (PatientID / study date); after the
    upgrade no column holds it, and series are named relative to the exam."""
    from datetime import UTC, datetime

    from db.models import Patient, PipelineRun, Series, Study
    from db.store import session_scope

    folder = "ProstateX-0000/07-07-2011"
    upgrade(db_url, "0003")
    engine = make_engine(db_url)
    now = datetime.now(UTC)
    with session_scope(engine) as session:
        patient = Patient(pseudo_id="P000000000001")
        session.add(patient)
        session.flush()
        study = Study(patient_id=patient.id, study_key="S1", source=folder)
        session.add(study)
        session.flush()
        files = [{"name": f"{folder}/4-t2/1.dcm", "sha256": "a" * 64}]
        session.add(
            Series(
                study_id=study.id,
                kind="t2w",
                source=f"{folder}/4-t2",
                n_files=1,
                source_sha256="b" * 64,
                source_files=files,
            )
        )
        session.add(
            Series(
                study_id=study.id,
                kind="t2w",
                source="x/1234_5678_t2w.mha",
                n_files=1,
                source_sha256="c" * 64,
            )
        )
        inputs = [{"role": "source", "path": f"/data/{folder}/4-t2/1.dcm", "sha256": "a" * 64}]
        _insert_step_run(
            session,
            patient_id=patient.id,
            step="ingest",
            step_version="1",
            status="failed",
            started_at=now,
            cache_key="k",
            inputs=inputs,
            error=f"{folder}: no usable DWI series",
            details={"note": "ProstateX-0000 has no DWI"},
        )
        session.add(
            PipelineRun(
                command="run /data",
                started_at=now,
                summary={"failures": [{"error": f"{folder}: no DWI"}]},
            )
        )
    engine.dispose()
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as connection:
        dump = " ".join(
            str(row)
            for table in ("study", "series", "step_run", "pipeline_run")
            for row in connection.exec_driver_sql(f"SELECT * FROM {table}").all()
        )
        sources = sorted(r[0] for r in connection.exec_driver_sql("SELECT source FROM series"))
    engine.dispose()
    assert "ProstateX-0000" not in dump and "07-07-2011" not in dump and "1234" not in dump
    assert sources == ["4-t2", "t2w.mha"]
    assert "exam/4-t2/1.dcm" in dump and "<exam>: no usable DWI series" in dump


def _insert_step_run(session, **values) -> int:
    """A ``step_run`` row written with the columns of an older revision (the ORM model has
    the newest columns)."""
    import json

    from sqlalchemy import text

    columns = {"parameters": {}, "software_versions": {}, "inputs": [], "outputs": []} | values
    for name in ("parameters", "software_versions", "inputs", "outputs", "details"):
        if name in columns and columns[name] is not None:
            columns[name] = json.dumps(columns[name])
    names = ", ".join(columns)
    marks = ", ".join(f":{name}" for name in columns)
    result = session.execute(
        text(f"INSERT INTO step_run ({names}) VALUES ({marks}) RETURNING id"), columns
    )
    return result.scalar_one()


def test_0005_moves_resources_out_of_the_cache_key(db_url):
    """Threads and device leave the parameters for ``resources``; the b1000 step gets its one
    name; every cache key is what the pipeline computes now, so finished work stays cached;
    the downgrade restores the rows."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from db.models import Patient
    from db.store import session_scope
    from flows.steps import FileRef, cache_key

    upgrade(db_url, "0004")
    engine = make_engine(db_url)
    inputs = [{"role": "dwi_b800_moco", "path": "a.nii.gz", "sha256": "a" * 64}]
    params = {"estimator": "ols", "threads": 2, "t2": {"iterations": 5, "threads": 2}}
    with session_scope(engine) as session:
        patient = Patient(pseudo_id="P000000000001")
        session.add(patient)
        session.flush()
        run_id = _insert_step_run(
            session,
            patient_id=patient.id,
            step="standardize_b1000",
            step_version="2",
            status="completed",
            started_at=datetime.now(UTC),
            cache_key="old",
            inputs=inputs,
            parameters=params,
        )
    engine.dispose()

    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT step, parameters, resources, cache_key FROM step_run WHERE id = :i"),
            {"i": run_id},
        ).one()
    engine.dispose()
    step, parameters, resources, key = (_loaded(v) for v in row)
    assert step == "b1000"
    assert parameters == {"estimator": "ols", "t2": {"iterations": 5}}
    assert resources == {"threads": 2, "t2.threads": 2}
    refs = [FileRef(i["role"], i["path"], i["sha256"]) for i in inputs]
    assert key == cache_key("b1000", "2", refs, parameters)

    downgrade(db_url, "0004")
    engine = make_engine(db_url)
    with engine.connect() as connection:
        step, parameters = connection.execute(
            text("SELECT step, parameters FROM step_run WHERE id = :i"), {"i": run_id}
        ).one()
    engine.dispose()
    assert (step, _loaded(parameters)) == ("standardize_b1000", params)


def _loaded(value):
    import json

    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


def test_0006_adds_the_qc_metric_table_and_takes_it_away(db_url):
    upgrade(db_url, "0005")
    assert "qc_metric" not in _tables(db_url)
    upgrade(db_url)
    assert "qc_metric" in _tables(db_url) and _schema_diff(db_url) == []
    downgrade(db_url, "0005")
    assert _tables(db_url) == TABLES - {"qc_metric"} | {"alembic_version"}


def test_0007_gives_the_wide_view_model_and_zone_columns(db_url):
    def view_columns() -> list[str]:
        engine = make_engine(db_url)
        with engine.connect() as connection:
            names = list(connection.exec_driver_sql("SELECT * FROM radiomics_wide").keys())
        engine.dispose()
        return names

    upgrade(db_url, "0006")
    before = view_columns()
    upgrade(db_url)
    after = view_columns()
    assert after[:5] == ["patient", "image", "mask", "model", "zone"]
    assert [c for c in after if c not in ("model", "zone")] == before
    downgrade(db_url, "0006")
    assert view_columns() == before and current_revision(db_url) == "0006"
