"""What every command does before its work: Prefect's defaults and home, the checks at start,
and, for the commands that run flows, the output tree's lock and the Prefect server."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.settings import Settings
from flows.tree_lock import output_tree_lock

#: Commands that open the provenance database (checked at start: ``database_url``).
DATABASE_COMMANDS = frozenset(
    {"demo", "run", "evaluate", "ingest", "status", "features", "volumes", "report", "qc", "db"}
)

#: Commands that run flows on the output tree (they hold its lock while they run).
RUN_COMMANDS = frozenset({"demo", "run", "ingest", "evaluate"})


def prefect_defaults() -> None:
    """Offline-friendly Prefect defaults; an operator's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def prefect_home(output_root: Path) -> None:
    """Put Prefect's home under ``output_root/.prefect`` when ``~/.prefect`` is unusable.

    Prefect keeps its profiles and the temporary server's database in ``PREFECT_HOME``
    (default ``~/.prefect``); without a writable home folder (``HOME`` unset, missing or
    read-only: a service account, a container) the server cannot start. An operator's own
    ``PREFECT_HOME`` wins. Call before Prefect is imported.
    """
    if os.environ.get("PREFECT_HOME"):
        return
    home = os.environ.get("HOME")
    if home:
        default = Path(home) / ".prefect"
        usable = default if default.exists() else Path(home)
        if usable.is_dir() and os.access(usable, os.W_OK | os.X_OK):
            return
    os.environ["PREFECT_HOME"] = str(output_root / ".prefect")


def check_before_work(args: argparse.Namespace, settings: Settings) -> None:
    """Stop at start, before any work, on a database or segmentation model that cannot be
    used (:class:`SettingsError`, exit code 2)."""
    from flows.checks import check_database, check_demo_tree, check_models

    if args.command in DATABASE_COMMANDS:
        check_database(settings)
    if args.command == "demo":
        check_demo_tree(settings)
    if args.command in ("run", "demo"):
        prefect_defaults()  # flows.segment imports Prefect
        specs = getattr(args, "model", None) or [settings.segmentation.model]
        check_models(specs, settings, demo=args.command == "demo")


@contextmanager
def flow_session(settings: Settings) -> Iterator[None]:
    """The block of a command that runs flows: it holds the output tree's lock (one run at a
    time per output tree; :class:`OutputTreeBusy` otherwise) and has a Prefect API (the
    operator's, else a temporary server that ends with this process, even after kill -9)."""
    with output_tree_lock(settings.output_root):
        prefect_defaults()
        from flows.prefect_server import temporary_server

        with temporary_server():
            yield
