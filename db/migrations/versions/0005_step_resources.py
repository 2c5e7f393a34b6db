"""Column ``step_run.resources``: how a step ran (threads, device), kept out of its cache key.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

Up to 0004 the thread count and the segmentation device were step parameters, so they were
part of the cache key: rerunning a cohort with another number of workers recomputed it.
This migration moves them, at any depth of ``step_run.parameters``, into the new
``resources`` column (by dotted path, e.g. ``t2.threads``), renames the recorded step
``standardize_b1000`` to ``b1000`` (its one name, :mod:`tasks.registry`), and recomputes each
row's ``cache_key`` the way :func:`flows.steps.cache_key` does, from the row's own step,
version, input digests and parameters: finished work stays a cache hit.
The downgrade puts the resources back into the parameters and the old name and keys back.
"""

import hashlib
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RESOURCE_FIELDS = frozenset({"threads", "device"})
_RENAMED = {"standardize_b1000": "b1000"}


def _json(value):
    return value if not isinstance(value, str) else json.loads(value)


def _split(parameters: dict) -> tuple[dict, dict]:
    kept, resources = {}, {}
    for key, value in parameters.items():
        if key in _RESOURCE_FIELDS:
            resources[key] = value
        elif isinstance(value, dict):
            inner, inner_resources = _split(value)
            kept[key] = inner
            resources.update({f"{key}.{k}": v for k, v in inner_resources.items()})
        else:
            kept[key] = value
    return kept, resources


def _merge(parameters: dict, resources: dict) -> dict:
    merged = json.loads(json.dumps(parameters))
    for path, value in resources.items():
        *parents, leaf = path.split(".")
        target = merged
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return merged


def _cache_key(step: str, version: str, inputs: list, parameters: dict) -> str:
    payload = {
        "step": step,
        "version": version,
        "inputs": sorted((i["role"], i["sha256"]) for i in inputs),
        "parameters": parameters,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _rewrite(bind, *, forward: bool) -> None:
    renamed = _RENAMED if forward else {new: old for old, new in _RENAMED.items()}
    rows = bind.execute(
        sa.text("SELECT id, step, step_version, inputs, parameters, resources FROM step_run")
    ).all()
    update = sa.text(
        "UPDATE step_run SET step = :step, parameters = :parameters, resources = :resources, "
        "cache_key = :key WHERE id = :i"
    ).bindparams(
        sa.bindparam("parameters", type_=sa.JSON), sa.bindparam("resources", type_=sa.JSON)
    )
    for run_id, step, version, inputs, parameters, resources in rows:
        parameters = _json(parameters) or {}
        if forward:
            parameters, resources = _split(parameters)
        else:
            parameters, resources = _merge(parameters, _json(resources) or {}), None
        step = renamed.get(step, step)
        key = _cache_key(step, version, _json(inputs) or [], parameters)
        bind.execute(
            update,
            {
                "step": step,
                "parameters": parameters,
                "resources": resources,
                "key": key,
                "i": run_id,
            },
        )


def upgrade() -> None:
    op.add_column("step_run", sa.Column("resources", sa.JSON(), nullable=True))
    _rewrite(op.get_bind(), forward=True)


def downgrade() -> None:
    _rewrite(op.get_bind(), forward=False)
    op.drop_column("step_run", "resources")
