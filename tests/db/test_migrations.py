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
    assert current_revision(db_url) == head_revision() == "0003"
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
    assert _tables(db_url) == TABLES | {"alembic_version"}


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
