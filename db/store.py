"""Engines, sessions and schema migrations for the provenance database.

Two engines are supported, chosen by URL:

- SQLite (default, one file, e.g. ``sqlite:///output/provenance.db``): write-ahead logging so
  readers never block the writer, foreign keys enforced, a 30 s busy timeout, and every
  transaction begun with ``BEGIN IMMEDIATE``. The last matters with parallel workers: a
  transaction that reads and then writes (get-or-create a patient, then insert a step run)
  would otherwise fail at once with "database is locked" whenever another worker committed
  in between; ``IMMEDIATE`` takes the write lock up front, so it waits instead.
- PostgreSQL (``postgresql+psycopg://user:password@host:5432/db``) for a shared server.

The schema is created and changed only by Alembic migrations (``db/migrations``), never by
``create_all``: call ``upgrade(url)`` before use. No ``alembic.ini`` is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlmodel import Session

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
"""The Alembic script folder (``env.py``, ``versions/``)."""

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite connection waits for another writer's lock before failing (ms)."""

PG_CONNECT_S = 10
"""How long a PostgreSQL connection attempt may take (s) unless the URL sets
``connect_timeout``."""

_EXAMPLES = "sqlite:///path/to/provenance.db or postgresql+psycopg://user@host:5432/dbname"


def make_engine(url: str | URL) -> Engine:
    """Create an engine for a SQLite or PostgreSQL provenance database.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        ``sqlite:///<file>`` (the parent folder is created) or
        ``postgresql+psycopg://...`` (plain ``postgresql://`` is taken to mean psycopg 3).

    Returns
    -------
    sqlalchemy.Engine

    Raises
    ------
    ValueError
        If the URL cannot be parsed, or names another database or driver. The message
        shows the URL with its password hidden.
    """
    return _make_engine(url, sqlite_foreign_keys=True)


def _make_engine(url: str | URL, *, sqlite_foreign_keys: bool) -> Engine:
    parsed = _parse(url)
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise ValueError(f"unsupported SQLite driver {parsed.drivername!r} in {shown}")
        return _sqlite_engine(parsed, foreign_keys=sqlite_foreign_keys)
    if backend == "postgresql":
        if parsed.drivername not in ("postgresql", "postgresql+psycopg"):
            raise ValueError(
                f"unsupported PostgreSQL driver {parsed.drivername!r} in {shown}: "
                "use postgresql+psycopg:// (psycopg 3)"
            )
        # libpq waits for an unreachable server as long as the OS lets it (minutes): bound it.
        timeout = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_S}
        return create_engine(
            parsed.set(drivername="postgresql+psycopg"), pool_pre_ping=True, connect_args=timeout
        )
    raise ValueError(
        f"unsupported database URL scheme {parsed.drivername!r} in {shown}: "
        f"the provenance store runs on SQLite or PostgreSQL, e.g. {_EXAMPLES}"
    )


def check_connection(url: str | URL) -> None:
    """Connect to the database once, so that a wrong or unreachable URL fails at start.

    Raises
    ------
    ValueError
        Naming the URL (password hidden) and why it cannot be used.
    """
    shown = _parse(url).render_as_string(hide_password=True)
    try:
        engine = make_engine(url)
    except OSError as error:  # the SQLite file's folder cannot be made
        raise ValueError(f"cannot use {shown}: {error}") from None
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except (SQLAlchemyError, OSError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        raise ValueError(f"cannot connect to {shown}: {reason[0] if reason else error}") from None
    finally:
        engine.dispose()


def _parse(url: str | URL) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        # The URL itself may hold a password, so it is not repeated here.
        raise ValueError(f"not a database URL; expected e.g. {_EXAMPLES}") from None


def _sqlite_engine(url: URL, *, foreign_keys: bool) -> Engine:
    database = url.database
    in_memory = not database or database == ":memory:" or database.startswith("file:")
    if not in_memory:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module (its legacy mode does not begin
        # transactions for DDL or SAVEPOINT); "begin" below emits BEGIN IMMEDIATE instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises.

    Rows stay readable after the block (``expire_on_commit=False``), so a caller can use
    e.g. the ``PipelineRun.id`` it created once the transaction is committed.
    """
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (creating the schema if empty)."""
    with _migration_connection(url) as connection:
        command.upgrade(_alembic_config(connection), revision)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"`` drops every table)."""
    with _migration_connection(url) as connection:
        command.downgrade(_alembic_config(connection), revision)


def current_revision(url: str | URL) -> str | None:
    """The migration revision the database is at; None for a database never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest migration revision this code knows."""
    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def _alembic_config(connection: Connection | None) -> Config:
    config = Config()
    # ConfigParser interpolates "%": escape it in the path.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


@contextmanager
def _migration_connection(url: str | URL) -> Iterator[Connection]:
    """One transaction for a whole migration run (all of it applies, or none).

    On SQLite, foreign keys are switched off while migrating: Alembic's batch mode rebuilds
    a table by copying it and dropping the old one, and with foreign keys on, dropping a
    parent table would cascade-delete its children's rows. The foreign keys are checked
    before the transaction commits instead.
    """
    engine = _make_engine(url, sqlite_foreign_keys=False)
    try:
        with engine.begin() as connection:
            yield connection
            if engine.dialect.name == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(
                        f"migration left {len(broken)} rows with broken foreign keys "
                        f"(table, rowid, parent, fk): {broken[:5]}; rolled back"
                    )
    finally:
        engine.dispose()
