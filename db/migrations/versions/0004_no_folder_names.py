"""Remove the exam folder names stored before (they often are the PatientID and the date).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Up to 0003 the database held each exam's folder relative to the data root
(``study.source``, e.g. ``ProstateX-0000/07-07-2011``: PatientID and study date), series
folders and source files under it, absolute source paths in the ingest step's inputs, and
error texts that named the folder. This migration:

* sets ``study.source`` to NULL (the column becomes nullable and is no longer written);
* rewrites ``series.source`` and ``series.source_files`` names relative to the exam folder
  (PI-CAI files ``<patient>_<study>_<role>.mha`` become ``<role>.mha``);
* rewrites the ingest step's source inputs to ``exam/<path relative to the exam>``;
* replaces the exam folder, and each of its parts of six or more characters, by ``<exam>`` in
  ``step_run.error``, ``step_run.details`` and ``pipeline_run.summary``.

What it removed cannot come back: the downgrade only makes ``study.source`` required again
(empty strings). Sidecar files written before (``*_ingest.json``) are rewritten by the next
run (the ingest step's version changed).
"""

import json
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PICAI = re.compile(
    r"^[^_]+_[^_]+_(?P<role>t2w|adc|hbv|sag|cor)(?P<suffix>\.(?:mha|nii\.gz|nii))$", re.IGNORECASE
)


def _relative(name: str, folder: str) -> str:
    """A root-relative (or absolute) path as recorded now: relative to the exam folder."""
    base = name.rsplit("/", 1)[-1]
    picai = _PICAI.match(base)
    if picai:
        return f"{picai['role'].lower()}{picai['suffix']}"
    if name == folder:
        return "."
    marker = folder + "/"
    if marker in name:
        return name.split(marker, 1)[1]
    return base


def _scrub(text: str, folder: str) -> str:
    parts = [folder, *sorted((p for p in folder.split("/") if len(p) >= 6), key=len, reverse=True)]
    for part in parts:
        text = text.replace(part, "<exam>")
    return text


def _json(value):
    return value if not isinstance(value, str) else json.loads(value)


def upgrade() -> None:
    bind = op.get_bind()
    studies = bind.execute(sa.text("SELECT id, patient_id, source FROM study")).all()
    for study_id, patient_id, folder in studies:
        if not folder:
            continue
        rows = bind.execute(
            sa.text("SELECT id, source, source_files FROM series WHERE study_id = :s"),
            {"s": study_id},
        ).all()
        for series_id, source, files in rows:
            files = [{**f, "name": _relative(f["name"], folder)} for f in (_json(files) or [])]
            bind.execute(
                sa.text(
                    "UPDATE series SET source = :source, source_files = :files WHERE id = :i"
                ).bindparams(sa.bindparam("files", type_=sa.JSON)),
                {"source": _relative(source, folder), "files": files, "i": series_id},
            )
        runs = bind.execute(
            sa.text("SELECT id, step, inputs, error, details FROM step_run WHERE patient_id = :p"),
            {"p": patient_id},
        ).all()
        for run_id, step, inputs, error, details in runs:
            inputs = _json(inputs) or []
            if step == "ingest":
                inputs = [
                    {**i, "path": "exam/" + _relative(i["path"], folder)}
                    if i.get("role") == "source"
                    else i
                    for i in inputs
                ]
            details = _json(details)
            bind.execute(
                sa.text(
                    "UPDATE step_run SET inputs = :inputs, error = :error, details = :details "
                    "WHERE id = :i"
                ).bindparams(
                    sa.bindparam("inputs", type_=sa.JSON), sa.bindparam("details", type_=sa.JSON)
                ),
                {
                    "inputs": inputs,
                    "error": _scrub(error, folder) if error else error,
                    "details": None
                    if details is None
                    else json.loads(_scrub(json.dumps(details), folder)),
                    "i": run_id,
                },
            )
        for run_id, summary in bind.execute(
            sa.text("SELECT id, summary FROM pipeline_run WHERE summary IS NOT NULL")
        ).all():
            scrubbed = json.loads(_scrub(json.dumps(_json(summary)), folder))
            bind.execute(
                sa.text("UPDATE pipeline_run SET summary = :s WHERE id = :i").bindparams(
                    sa.bindparam("s", type_=sa.JSON)
                ),
                {"s": scrubbed, "i": run_id},
            )
    with op.batch_alter_table("study") as batch:  # migrations run with SQLite FKs off
        batch.alter_column("source", existing_type=sa.String(), nullable=True)
    bind.execute(sa.text("UPDATE study SET source = NULL"))


def downgrade() -> None:
    op.get_bind().execute(sa.text("UPDATE study SET source = '' WHERE source IS NULL"))
    with op.batch_alter_table("study") as batch:
        batch.alter_column("source", existing_type=sa.String(), nullable=False)
