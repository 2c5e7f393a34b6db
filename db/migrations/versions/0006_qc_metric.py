"""Table ``qc_metric``: measured quality-control metrics per patient, model and metric.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05

Long form, like ``radiomics_feature``: one row per metric (``tasks.qc_metrics.METRICS``),
numeric ones in ``value``, text ones (the accepted registration stage, the b-values) in
``text``. The QC status is not stored: it is judged from these rows and the settings'
thresholds when read.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AutoString = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "qc_metric",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("patient_id", sa.Integer(), nullable=False),
        sa.Column("step_run_id", sa.Integer(), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("metric", AutoString(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("text", AutoString(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["patient_id"],
            ["patient.id"],
            name=op.f("fk_qc_metric_patient_id_patient"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["step_run_id"],
            ["step_run.id"],
            name=op.f("fk_qc_metric_step_run_id_step_run"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qc_metric")),
    )
    op.create_index("ix_qc_metric_patient_model", "qc_metric", ["patient_id", "model"])
    op.create_index(op.f("ix_qc_metric_step_run_id"), "qc_metric", ["step_run_id"])


def downgrade() -> None:
    op.drop_table("qc_metric")
