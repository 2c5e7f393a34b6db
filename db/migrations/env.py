"""Alembic environment for the provenance database.

Normally run through ``db.store.upgrade`` / ``downgrade``, which pass an open connection in
``config.attributes["connection"]`` (and wrap the run in one transaction). Without one, the
URL is read from the ``sqlalchemy.url`` option; offline mode (``--sql``) writes the SQL out.
"""

from alembic import context
from sqlalchemy.engine import make_url
from sqlmodel import SQLModel

import db.models  # noqa: F401  (registers every table on SQLModel.metadata)
from db.store import make_engine

config = context.config
target_metadata = SQLModel.metadata


def _options(dialect_name: str) -> dict:
    # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
    return {
        "target_metadata": target_metadata,
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_options(make_url(url).get_backend_name()),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, **_options(connection.dialect.name))
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **_options(connection.dialect.name))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
