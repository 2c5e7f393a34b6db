"""Engines, sessions and timestamps of the provenance store."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import func
from sqlalchemy.exc import StatementError
from sqlmodel import select

from db.models import Patient, PipelineRun
from db.record import ensure_patient, record_step_run
from db.store import check_connection, make_engine, session_scope, upgrade


def test_sqlite_engine_uses_wal_foreign_keys_and_busy_timeout(tmp_path):
    path = tmp_path / "not" / "yet" / "there" / "provenance.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() == 30_000
    finally:
        engine.dispose()
    assert path.exists()


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("mysql://admin:s3cret-pw@db.example.org/provenance", "mysql"),
        ("mssql+pyodbc://admin:s3cret-pw@db.example.org/provenance", "mssql+pyodbc"),
        ("postgresql+psycopg2://admin:s3cret-pw@db.example.org/provenance", "psycopg2"),
    ],
)
def test_make_engine_rejects_other_databases_without_showing_the_password(url, scheme):
    with pytest.raises(ValueError, match="unsupported") as excinfo:
        make_engine(url)
    message = str(excinfo.value)
    assert scheme in message
    assert "s3cret-pw" not in message
    assert "admin:***@db.example.org" in message


def test_make_engine_rejects_text_that_is_not_a_url():
    with pytest.raises(ValueError, match="not a database URL"):
        make_engine("provenance.db")


def test_plain_postgresql_url_means_psycopg3():
    engine = make_engine("postgresql://someone@localhost:5432/provenance")  # never connects
    assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
    assert engine.pool._pre_ping


def test_an_unreachable_postgresql_fails_at_once_naming_the_url():
    with pytest.raises(ValueError, match=r"cannot connect to postgresql://nobody:\*\*\*@") as info:
        check_connection("postgresql://nobody:s3cret-pw@127.0.0.1:1/x")
    assert "s3cret-pw" not in str(info.value) and "Connection refused" in str(info.value)


def test_a_postgresql_server_that_never_answers_times_out(monkeypatch):
    """libpq would wait for a silent server as long as the OS lets it; make_engine bounds it."""
    monkeypatch.setattr("db.store.PG_CONNECT_S", 2)
    errors: list[str] = []

    def connect(url: str) -> None:
        try:
            check_connection(url)
        except ValueError as error:
            errors.append(str(error))

    with socket.socket() as silent:  # accepts TCP connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql://nobody@127.0.0.1:{silent.getsockname()[1]}/x"
        worker = threading.Thread(target=connect, args=(url,), daemon=True)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "still connecting after 20 s: no connect timeout"
    assert errors and "timeout expired" in errors[0]


def test_session_scope_commits_on_success_and_rolls_back_on_error(db_engine):
    with session_scope(db_engine) as session:
        patient = ensure_patient(session, "sub-kept")
    assert patient.id is not None and patient.pseudo_id == "sub-kept"  # readable after commit
    with pytest.raises(RuntimeError, match="boom"), session_scope(db_engine) as session:
        ensure_patient(session, "sub-dropped")
        raise RuntimeError("boom")
    with session_scope(db_engine) as session:
        names = session.exec(select(Patient.pseudo_id)).all()
    assert names == ["sub-kept"]


def test_timestamps_are_stored_and_read_as_utc(db_engine):
    cest = timezone(timedelta(hours=2))
    with session_scope(db_engine) as session:
        run = PipelineRun(command="x", started_at=datetime(2024, 5, 1, 14, 30, tzinfo=cest))
        session.add(run)
    with session_scope(db_engine) as session:
        started = session.get(PipelineRun, run.id).started_at
    assert started == datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    assert started.utcoffset() == timedelta(0)


def test_naive_timestamps_are_rejected(db_engine):
    with pytest.raises(StatementError, match="naive datetime"):  # noqa: SIM117
        with session_scope(db_engine) as session:
            session.add(PipelineRun(command="x", started_at=datetime(2024, 5, 1, 12, 30)))
            session.flush()


def test_sqlite_parallel_writers_wait_instead_of_failing(tmp_path):
    # Workers that read then write (get-or-create the patient, then insert) in parallel:
    # each transaction must wait for the write lock rather than fail with "locked".
    url = f"sqlite:///{tmp_path / 'provenance.db'}"
    upgrade(url)
    engine = make_engine(url)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(n: int) -> None:
        start.wait()
        try:
            for i in range(15):
                with session_scope(engine) as session:
                    ensure_patient(session, f"sub-{i % 3}")
                    now = datetime.now(UTC)
                    record_step_run(
                        session,
                        patient_pseudo_id=f"sub-{i % 3}",
                        step="n4",
                        step_version="1",
                        status="completed",
                        started_at=now,
                        ended_at=now,
                        parameters={},
                        software_versions={},
                        inputs=[],
                        outputs=[],
                        cache_key=f"{n}-{i}",
                    )
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        with session_scope(engine) as session:
            assert session.exec(select(func.count()).select_from(Patient)).one() == 3
    finally:
        engine.dispose()
