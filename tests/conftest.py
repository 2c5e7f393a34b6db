"""Shared fixtures: a real PostgreSQL server for the session, and fresh databases per test.

``postgres_url``  (session)  starts a throw-away PostgreSQL server on 127.0.0.1 with the
                             Debian ``postgresql`` binaries; skips the test if there are none.
``db_url``        (function) an empty database, once on SQLite and once on PostgreSQL
                             (the latter marked ``postgres``): ``-m "not postgres"`` skips it.
``db_engine``     (function) ``db_url`` migrated to the newest schema, as an engine.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

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


def _run(command: list[str], *, as_user: list[str], cwd: Path) -> None:
    result = subprocess.run(
        as_user + command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server started for this test session (user ``postgres``, trust)."""
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        pytest.skip(PG_MISSING)
    # PostgreSQL refuses to run as root: run it as the 'postgres' OS user, in a folder it owns
    # (under /tmp, since pytest's own tmp folders are private to root).
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="pytest-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root and 'runuser' is missing: cannot start PostgreSQL")
        try:
            shutil.chown(base, user="postgres", group="postgres")
        except LookupError:
            pytest.skip("running as root and there is no 'postgres' OS user to run PostgreSQL")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log = base / "data", base / "server.log"
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        _run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
            + ["-E", "UTF8", "--locale=C", "--no-sync"],
            as_user=as_user,
            cwd=base,
        )
        try:
            start = ["-w", "-t", "60", "-l", str(log), "-o", options, "start"]
            _run(pg_ctl + start, as_user=as_user, cwd=base)
        except RuntimeError as exc:
            server_log = log.read_text() if log.exists() else "(no server log)"
            raise RuntimeError(f"{exc}\nserver log:\n{server_log}") from None
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():  # also after a start that timed out
            _run(pg_ctl + ["-m", "fast", "-w", "stop"], as_user=as_user, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a new, empty database: a SQLite file, or a new database on the test server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'provenance.db'}"
        return
    server = make_url(request.getfixturevalue("postgres_url"))
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
