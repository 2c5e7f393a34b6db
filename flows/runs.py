"""Pipeline-run bookkeeping shared by the flows: database migration, run record, summary."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from db.record import (
    begin_pipeline_run,
    close_interrupted_runs,
    finish_pipeline_run,
    software_versions,
)
from db.store import session_scope, upgrade
from flows.checks import check_force_steps
from flows.settings import Settings, pseudonym_key
from flows.steps import RunContext, engine_for, prefect_ids
from flows.tree_lock import output_tree_lock
from tasks.registry import INGEST


def pseudonym_secret(settings: Settings) -> SecretStr:
    """The pseudonymisation key wrapped so that it never prints or logs."""
    return SecretStr(pseudonym_key(settings))


@dataclass
class RunHandle:
    """Collects the per-patient results of a run to write its final status and summary."""

    results: list[dict[str, Any]] = field(default_factory=list)

    def finish(self, results: list[dict[str, Any]]) -> None:
        self.results = list(results)

    def summary(self) -> dict[str, Any]:
        failed = [r for r in self.results if r.get("status") == "error"]
        return {
            "patients": len(self.results),
            "failed": len(failed),
            "failures": [
                {"patient": r["patient"], "step": r.get("step", INGEST.name), "error": r["error"]}
                for r in failed
            ],
            "by_status": dict(Counter(r.get("status", "ok") for r in self.results)),
        }

    def status(self) -> str:
        """``completed`` (no failures), ``partial`` (some) or ``failed`` (all, or none ran)."""
        n, n_failed = len(self.results), sum(r.get("status") == "error" for r in self.results)
        if n_failed == 0 and n > 0:
            return "completed"
        return "failed" if n_failed == n else "partial"


@contextmanager
def pipeline_run(
    settings: Settings,
    *,
    command: str,
    force: bool = False,
    force_steps: list[str] | None = None,
) -> Iterator[tuple[RunContext, RunHandle]]:
    """Migrate the database, record a running pipeline run, and close it with its outcome.

    Holds the output tree's lock (:mod:`flows.tree_lock`) for the whole run: a second run on
    the same output tree stops at once with :class:`flows.tree_lock.OutputTreeBusy`, and a
    run of this tree left ``running`` by a killed process is closed as ``failed``. An
    exception inside the block marks the run ``failed`` (with the error) and re-raises.
    """
    check_force_steps(force_steps)
    with output_tree_lock(settings.output_root):
        yield from _pipeline_run(settings, command=command, force=force, force_steps=force_steps)


def _pipeline_run(
    settings: Settings, *, command: str, force: bool, force_steps: list[str] | None
) -> Iterator[tuple[RunContext, RunHandle]]:
    url = settings.resolved_database_url
    settings.output_root.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    engine = engine_for(url)
    public = settings.public_dict()
    with session_scope(engine) as session:
        close_interrupted_runs(
            session, host=socket.gethostname(), output_root=public["output_root"]
        )
        run = begin_pipeline_run(
            session,
            command=command,
            settings=public,
            software_versions=software_versions(),
            host=socket.gethostname(),
            prefect_flow_run_id=prefect_ids()[0],
        )
        run_id = run.id
    ctx = RunContext(
        database_url=url,
        output_root=settings.output_root,
        pipeline_run_id=run_id,
        threads=settings.threads.per_worker(),
        force=force,
        force_steps=frozenset(force_steps or ()),
    )
    handle = RunHandle()
    try:
        yield ctx, handle
    except BaseException as error:
        with session_scope(engine) as session:
            finish_pipeline_run(
                session,
                run_id,
                status="failed",
                n_patients=len(handle.results),
                n_failed=len(handle.results),
                summary={"error": str(error)},
            )
        raise
    summary = handle.summary()
    with session_scope(engine) as session:
        finish_pipeline_run(
            session,
            run_id,
            status=handle.status(),
            n_patients=summary["patients"],
            n_failed=summary["failed"],
            summary=summary,
        )
