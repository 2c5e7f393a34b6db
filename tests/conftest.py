"""Shared fixtures: a real PostgreSQL server for the session, fresh databases per test, and
one pipeline-made cohort shared by the flow, query and report tests.

``postgres_url``   (session)  a throw-away PostgreSQL server on 127.0.0.1, started by
                              ``deployments/start-postgres.sh`` with the Debian ``postgresql``
                              binaries; skips the test if there are none.
``db_url``         (function) an empty database, once on SQLite and once on PostgreSQL
                              (the latter marked ``postgres``): ``-m "not postgres"`` skips it.
``db_engine``      (function) ``db_url`` migrated to the newest schema, as an engine.
``prefect_server`` (session)  a temporary Prefect API server for flows run in-process.
``demo``           (session)  the demo flow's output: 4 synthetic exams through the chain.
``analysed_demo``  (session)  a copy of ``demo`` with an evaluation against the phantoms'
                              true masks and a fifth exam that failed at ingest, all made
                              by the pipeline's own flows (SQLite).
``cohort_url``     (session)  ``analysed_demo``'s database, once as its SQLite file and once
                              copied row by row into PostgreSQL (marked ``postgres``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

PG_MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian package "
    "'postgresql' (they live in /usr/lib/postgresql/<version>/bin) or put them on PATH"
)


def _pg_bin_dir() -> Path | None:
    """Folder holding initdb and pg_ctl: PATH first, then the newest Debian install."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    candidates = []
    for folder in Path("/usr/lib/postgresql").glob("*/bin"):
        version = re.match(r"\d+", folder.parent.name)
        if version and (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            candidates.append((int(version.group()), folder))
    return max(candidates)[1] if candidates else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


START_POSTGRES = Path(__file__).resolve().parents[1] / "deployments" / "start-postgres.sh"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a throw-away PostgreSQL server (user ``postgres``, trust) on 127.0.0.1, started
    for this test session by the project's own ``deployments/start-postgres.sh``."""
    if _pg_bin_dir() is None:
        pytest.skip(PG_MISSING)
    if os.geteuid() == 0:  # the script runs the server as the 'postgres' OS user
        if shutil.which("runuser") is None:
            pytest.skip("running as root and 'runuser' is missing: cannot start PostgreSQL")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' OS user to run PostgreSQL")
    # under /tmp, which the 'postgres' user can traverse (pytest's own tmp folders are private)
    base = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
    base.chmod(0o755)
    port, log = _free_port(), base / "server.log"
    command = [str(START_POSTGRES), "--data", str(base / "data"), "--port", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen(
            command + ["--throwaway", "--timeout", "120"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 150
        while "postgres ready" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"start-postgres.sh failed:\n{log.read_text()}")
            time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a new, empty database: a SQLite file, or a new database on the test server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'provenance.db'}"
        return
    with _postgres_database(request.getfixturevalue("postgres_url")) as url:
        yield url


@contextmanager
def _postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the test server (dropped afterwards); its URL."""
    server = make_url(server_url)
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` after migrating it to the newest schema."""
    from db.store import make_engine, upgrade

    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real (temporary, SQLite-backed) Prefect API server for flows run in-process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, prefect_server) -> tuple[Path, dict]:
    """The demo flow's output root and result: 4 synthetic exams through the whole chain."""
    from flows.demo import demo_flow

    out = tmp_path_factory.mktemp("demo")
    result = demo_flow(patients=4, seed=0, output_root=str(out))
    return out, result


@dataclass(frozen=True)
class AnalysedDemo:
    """``analysed_demo``: where it lies and what the flows returned."""

    root: Path
    """Output root of the copy (its database: ``url``)."""
    url: str
    demo: dict[str, Any]
    """The demo flow's result (4 patients, all completed)."""
    evaluation: dict[str, Any]
    """The evaluate flow's result (reference ``phantom``: the true gland masks)."""
    broken: dict[str, Any]
    """The ingest flow's entry for the exam without DWI (``status`` ``error``)."""


@pytest.fixture(scope="session")
def analysed_demo(demo, tmp_path_factory: pytest.TempPathFactory) -> AnalysedDemo:
    """A copy of the demo output (the shared one stays as the other tests expect), then the
    evaluate flow against the true masks and the ingest flow on an exam with no DWI.

    The copied database still names the original demo's files (masks, QC figures), which
    stay in place for the whole session.
    """
    from flows.evaluate import evaluate_flow
    from flows.ingest import ingest_flow

    demo_out, demo_result = demo
    base = tmp_path_factory.mktemp("analysed")
    out, references, cohort = base / "out", base / "refs" / "phantom", base / "cohort"
    shutil.copytree(demo_out, out, ignore=shutil.ignore_patterns("demo-cohort"))
    references.mkdir(parents=True)
    for truth in sorted((demo_out / "demo-cohort" / "truth").iterdir()):
        shutil.copy(truth / "t2_gland_mask.nii.gz", references / f"{truth.name}.nii.gz")
    evaluation = evaluate_flow(references=[str(references)], output_root=str(out))
    broken = cohort / "SYN-9999"
    shutil.copytree(demo_out / "demo-cohort" / "dicom" / "SYN-0001", broken)
    for dwi in [d for d in broken.rglob("*") if d.is_dir() and "diff" in d.name.lower()]:
        shutil.rmtree(dwi)  # no DWI left: ingest fails
    (entry,) = ingest_flow(root=str(cohort), output_root=str(out))["patients"]
    assert entry["status"] == "error", entry
    return AnalysedDemo(
        out, f"sqlite:///{out / 'provenance.sqlite'}", demo_result, evaluation, entry
    )


def copy_database(source_url: str, target_url: str) -> None:
    """Migrate ``target_url`` and copy every row of every table from ``source_url`` into it
    (same ids; PostgreSQL's id sequences are moved past the copied ids)."""
    from sqlmodel import SQLModel

    from db.store import make_engine, upgrade

    upgrade(target_url)
    source, target = make_engine(source_url), make_engine(target_url)
    try:
        with source.connect() as read, target.begin() as write:
            for table in SQLModel.metadata.sorted_tables:  # parents first
                rows = [dict(row) for row in read.execute(table.select()).mappings()]
                if rows:
                    write.execute(table.insert(), rows)
                if write.dialect.name == "postgresql" and table.autoincrement_column is not None:
                    write.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                        f"(SELECT MAX(id) FROM {table.name}))"
                    )
    finally:
        source.dispose()
        target.dispose()


@pytest.fixture(scope="session")
def postgres_cohort_url(analysed_demo: AnalysedDemo, postgres_url: str) -> Iterator[str]:
    """``analysed_demo``'s rows copied into a new PostgreSQL database (:func:`copy_database`)."""
    with _postgres_database(postgres_url) as url:
        copy_database(analysed_demo.url, url)
        yield url


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def cohort_url(request: pytest.FixtureRequest, analysed_demo: AnalysedDemo) -> str:
    """``analysed_demo``'s database on SQLite, then the same rows on PostgreSQL."""
    if request.param == "sqlite":
        return analysed_demo.url
    return request.getfixturevalue("postgres_cohort_url")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def cohort_copy_url(request: pytest.FixtureRequest, analysed_demo: AnalysedDemo, tmp_path: Path):
    """A writable copy of ``analysed_demo``'s database, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'copy.sqlite'}"
        copy_database(analysed_demo.url, url)
        yield url
        return
    with _postgres_database(request.getfixturevalue("postgres_url")) as url:
        copy_database(analysed_demo.url, url)
        yield url
