"""View ``radiomics_wide`` gains ``model`` and ``zone`` columns (after ``mask``).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Multi-label models (PZ/TZ) give one radiomics row per zone; the zone was only inside
``mask`` (``<model>:<zone>``). The columns come from the mask's segmentation row
(``segmentation.model``, ``segmentation.label_name``), the same values as
``prostate-cohort features --wide``, so ``WHERE zone = 'pz'`` needs no string parsing.
The feature columns are 0002's (its ``view_sql``, read from that migration's file).
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _view_0002() -> str:
    path = Path(__file__).with_name("0002_radiomics_wide_view.py")
    spec = importlib.util.spec_from_file_location("migration_0002", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.view_sql()


def view_sql() -> str:
    """0002's view with ``model`` and ``zone`` from the mask's segmentation."""
    sql = _view_0002()
    edits = (
        (
            "f.mask AS mask,\n",
            "f.mask AS mask, g.model AS model, g.label_name AS zone,\n",
        ),
        (
            "JOIN step_run s ON s.id = f.step_run_id\n",
            "JOIN step_run s ON s.id = f.step_run_id\n"
            "LEFT JOIN segmentation g ON g.id = f.segmentation_id\n",
        ),
        (
            "GROUP BY p.pseudo_id, f.image, f.mask,",
            "GROUP BY p.pseudo_id, f.image, f.mask, g.model, g.label_name,",
        ),
    )
    for old, new in edits:
        if sql.count(old) != 1:
            raise RuntimeError(f"migration 0002's view changed: {old!r} not found once")
        sql = sql.replace(old, new)
    return sql


def upgrade() -> None:
    op.execute("DROP VIEW radiomics_wide")
    op.execute(view_sql())


def downgrade() -> None:
    op.execute("DROP VIEW radiomics_wide")
    op.execute(_view_0002())
