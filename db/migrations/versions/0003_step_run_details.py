"""Column ``step_run.details``: what a step measured about its own result (JSON).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

The registration step records there which T2 <-> DWI stage it accepted and why (similarity
before and after, scale factors, translation); the b1000 step records whether the image was
acquired or extrapolated and from which b-values. Nullable: rows of earlier runs have none.
A plain ``ADD COLUMN`` (no batch copy), so the ``radiomics_wide`` view over ``step_run``
stays valid on SQLite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("step_run", sa.Column("details", sa.JSON(), nullable=True))


def downgrade() -> None:
    # SQLite (>= 3.35) drops a column in place; the view does not name this column.
    op.drop_column("step_run", "details")
