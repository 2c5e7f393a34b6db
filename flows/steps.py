"""Run one patient step with caching and provenance: the glue between tasks/ and db/.

Every step goes through :func:`execute_step`:

1. its cache key is computed from the step name and version, the sha256 of every input
   file and the step's parameters (JSON) without its resources (threads, device: recorded
   apart, :data:`tasks.registry.RESOURCE_FIELDS`) — the key the database records;
2. if a completed run with that key exists and all its output files are still on disk,
   not empty, with the recorded sha256, the step is skipped (``status="cached"``; nothing
   is written);
3. otherwise the step's function runs; its outputs (written atomically by the step) and
   timing are recorded as a ``StepRun`` — ``completed`` or ``failed`` with the error text.

The image-processing functions in ``tasks/`` know nothing of this: they take parameters
and paths and return outputs, so they run the same from a notebook or another orchestrator.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import Engine
from sqlmodel import Session

from db.record import find_completed_step, record_step_run, software_versions
from db.store import make_engine, session_scope
from tasks.errors import InputError, TransientError
from tasks.io import sha256_file
from tasks.registry import StepSpec, split_resources


@dataclass(frozen=True)
class RunContext:
    """What every step of one pipeline run needs to know; small and picklable."""

    database_url: str
    output_root: Path
    pipeline_run_id: str | None = None
    threads: int = 1
    force: bool = False
    force_steps: frozenset[str] = frozenset()
    """Steps to recompute even when cached: a recorded step name (``register``) or its
    prefix before ``_`` (``segment`` for ``segment_demo``, ``segment_taps``, ...)."""

    def forces(self, step: str) -> bool:
        """True when ``step`` must run again (``--force`` or one of ``--force-step``)."""
        return self.force or any(step == s or step.startswith(f"{s}_") for s in self.force_steps)


@dataclass(frozen=True)
class FileRef:
    """A file a step reads or writes, with its role (e.g. ``t2w``) and content hash."""

    role: str
    path: str
    sha256: str

    @classmethod
    def of(cls, role: str, path: str | Path) -> FileRef:
        return cls(role=role, path=str(Path(path).resolve()), sha256=sha256_file(path))

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "path": self.path, "sha256": self.sha256}


@dataclass(frozen=True)
class StepOutcome:
    """What a step produced, whether it ran now or was found in the cache."""

    status: Literal["completed", "cached"]
    outputs: tuple[FileRef, ...]
    cache_key: str
    details: dict[str, Any] = field(default_factory=dict)

    def output(self, role: str) -> Path:
        """Path of the output with this role."""
        for ref in self.outputs:
            if ref.role == role:
                return Path(ref.path)
        raise KeyError(f"no output with role {role!r}; have {[r.role for r in self.outputs]}")


@lru_cache(maxsize=8)
def engine_for(database_url: str) -> Engine:
    """One engine (connection pool) per database URL and process."""
    return make_engine(database_url)


def utcnow() -> datetime:
    return datetime.now(UTC)


def cache_key(step: str, version: str, inputs: list[FileRef], parameters: Mapping[str, Any]) -> str:
    """sha256 over the step, its version, the input hashes (by role) and the parameters."""
    payload = {
        "step": step,
        "version": version,
        "inputs": sorted((ref.role, ref.sha256) for ref in inputs),
        "parameters": parameters,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _root(ctx: RunContext) -> Path:
    return Path(ctx.output_root).resolve()


def _intact(outputs: list[dict[str, Any]]) -> bool:
    """True if every recorded output still exists, is readable and not empty, with its
    recorded sha256. An empty file never counts (a full disk may have left one recorded,
    and its sha256 would then match the record)."""
    for output in outputs:
        path = Path(output["path"])
        try:
            if not path.is_file() or path.stat().st_size == 0:
                return False
            if sha256_file(path) != output["sha256"]:
                return False
        except OSError:  # unreadable (permissions, I/O error): recompute
            return False
    return True


def prefect_ids() -> tuple[str | None, str | None]:
    """The current Prefect flow-run and task-run ids, when running under Prefect."""
    from prefect.runtime import flow_run, task_run

    flow_id, task_id = flow_run.get_id(), task_run.get_id()
    return (str(flow_id) if flow_id else None, str(task_id) if task_id else None)


StepFunction = Callable[[], tuple[list[FileRef], dict[str, Any]]]
OnRecord = Callable[[Session, int], None]


def execute_step(
    ctx: RunContext,
    *,
    patient: str | None,
    step: str,
    version: str,
    inputs: list[FileRef],
    parameters: Mapping[str, Any],
    run: StepFunction,
    on_record: OnRecord | None = None,
    cached_details: Callable[[list[FileRef]], dict[str, Any]] | None = None,
) -> StepOutcome:
    """Run ``run()`` unless a completed, intact run with the same cache key exists.

    Parameters
    ----------
    run
        Does the work; returns ``(outputs, details)``; ``details`` (JSON) is recorded with
        the step run and returned again on a cache hit. Raise :class:`InputError` for bad
        input (recorded, never retried) and :class:`TransientError` for passing failures.
    on_record
        Called with the session and the new ``StepRun`` id in the same transaction that
        records a completed run (e.g. to add series or segmentation rows).
    cached_details
        Rebuilds ``details`` from the outputs on a cache hit (e.g. reads a JSON sidecar).
    """
    parameters, resources = split_resources(parameters)  # how it runs is not what it makes
    key = cache_key(step, version, inputs, parameters)
    engine = engine_for(ctx.database_url)
    if not ctx.forces(step):
        with session_scope(engine) as session:
            hit = find_completed_step(session, patient_pseudo_id=patient, step=step, cache_key=key)
            outputs = list(hit.outputs) if hit is not None else None
            recorded = dict(hit.details or {}) if hit is not None else {}
        if outputs is not None:  # recorded relative to the output root (or absolute, before)
            outputs = [{**o, "path": str(_root(ctx) / o["path"])} for o in outputs]
        if outputs is not None and _intact(outputs):
            refs = tuple(FileRef(o["role"], o["path"], o["sha256"]) for o in outputs)
            details = cached_details(list(refs)) if cached_details else recorded
            return StepOutcome("cached", refs, key, details)

    flow_id, task_id = prefect_ids()
    common = {
        "patient_pseudo_id": patient,
        "step": step,
        "step_version": version,
        "parameters": dict(parameters),
        "software_versions": software_versions(),
        "inputs": [ref.as_dict() for ref in inputs],
        "cache_key": key,
        "pipeline_run_id": ctx.pipeline_run_id,
        "prefect_flow_run_id": flow_id,
        "prefect_task_run_id": task_id,
        "host": socket.gethostname(),
        "output_root": _root(ctx),
        "resources": resources or None,
    }
    started = utcnow()
    try:
        produced, details = run()
    except Exception as error:
        with session_scope(engine) as session:
            record_step_run(
                session,
                **common,
                status="failed",
                started_at=started,
                ended_at=utcnow(),
                outputs=[],
                error=str(error),
                error_type=type(error).__name__,
                details=getattr(error, "details", None),
            )
        raise
    with session_scope(engine) as session:
        row = record_step_run(
            session,
            **common,
            status="completed",
            started_at=started,
            ended_at=utcnow(),
            outputs=[ref.as_dict() for ref in produced],
            details=details or None,
        )
        if on_record is not None:
            on_record(session, row.id)
    return StepOutcome("completed", tuple(produced), key, details)


def step_task(spec: StepSpec) -> Callable[[Callable[..., Any]], Any]:
    """The Prefect task decorator of a step: its registry name, task-run names, and retries
    of transient failures (Prefect's own result caching is off: :func:`execute_step`
    caches)."""
    from prefect import task
    from prefect.cache_policies import NONE

    return task(
        name=spec.name,
        task_run_name=spec.task_run_name,
        cache_policy=NONE,
        retries=spec.retries,
        retry_delay_seconds=spec.retry_delay_s,
        retry_condition_fn=is_transient if spec.retries else None,
    )


def is_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O and resource failures, never bad input."""
    try:
        state.result()
    except InputError:
        return False
    except (TransientError, OSError, MemoryError):
        return True
    except Exception as error:  # GPU out-of-memory surfaces as a RuntimeError from torch
        return "out of memory" in str(error).lower()
    return False
