"""The commands that read the provenance database: ``status``, ``features``, ``volumes``,
``qc`` (the review list), ``report`` (the HTML cohort report), and ``db`` (its schema)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.settings import Settings


def status(args: argparse.Namespace, settings: Settings) -> int:
    from db.queries import patient_status
    from db.store import current_revision, make_engine, session_scope

    url = settings.resolved_database_url
    if current_revision(url) is None:
        print(f"prostate-cohort: no provenance database at {url}: nothing has run yet")
        return 1
    with session_scope(make_engine(url)) as session:
        patients = patient_status(session)
    if args.json:
        print(json.dumps({"patients": patients}, indent=2))
        return 0
    for p in patients:
        failed = [f"{step}: {s['error']}" for step, s in p["steps"].items() if s["error"]]
        done = sum(s["state"] == "completed" for s in p["steps"].values())
        line = f"  {p['patient']}: {done}/{len(p['steps'])} steps completed"
        print(line + (f"; FAILED {'; '.join(failed)}" if failed else ""))
    print(f"{len(patients)} patients")
    return 0


@contextmanager
def _analysis_session(settings: Settings) -> Iterator[Any]:
    """A session on the provenance database, or None (message printed) when there is none."""
    from sqlalchemy.engine import make_url

    from db.store import current_revision, make_engine, session_scope

    url = settings.resolved_database_url
    if current_revision(url) is None:
        shown = make_url(url).render_as_string(hide_password=True)
        print(f"prostate-cohort: no provenance database at {shown}: nothing has run yet")
        yield None
        return
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()


def _read_table(args: argparse.Namespace, settings: Settings, query: Any) -> Any:
    """``query(session)`` (a DataFrame), or an exit code: 2 when ``--out-file`` names no
    table format, 1 when there is no database yet (each with its message)."""
    from flows.exports import table_format

    try:
        if args.out_file is not None:
            table_format(args.out_file, args.format)
    except ValueError as error:
        print(f"prostate-cohort: {error}", file=sys.stderr)
        return 2
    with _analysis_session(settings) as session:
        return 1 if session is None else query(session)


def features(args: argparse.Namespace, settings: Settings) -> int:
    from db.queries import features as query_features
    from flows.exports import write_table

    filters = {
        "images": args.image,
        "zones": args.zone,
        "models": args.model,
        "feature_classes": args.feature_class,
        "patients": args.patient,
        "pipeline_run_id": args.run,
    }
    frame = _read_table(args, settings, lambda s: query_features(s, wide=args.wide, **filters))
    if isinstance(frame, int):
        return frame
    write_table(frame, args.out_file, fmt=args.format)
    print(f"{len(frame)} rows x {frame.shape[1]} columns -> {args.out_file}")
    return 0


def volumes(args: argparse.Namespace, settings: Settings) -> int:
    import pandas as pd

    from db.queries import volumes as query_volumes
    from flows.exports import write_table

    frame = _read_table(args, settings, query_volumes)
    if isinstance(frame, int):
        return frame
    shown = frame[["patient", "model", "label_name", "volume_ml", "voxel_count"]]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"{len(frame)} volumes (mL)")
    if args.out_file:
        write_table(frame, args.out_file, fmt=args.format)
    return 0


def qc(args: argparse.Namespace, settings: Settings) -> int:
    from flows.qc_review import review_list, review_text

    with _analysis_session(settings) as session:
        if session is None:
            return 1
        entries = review_list(session, settings.qc, patients=args.patient)
    if args.json:
        print(json.dumps({"exams": entries}, indent=2))
    elif not entries:
        print("no QC metrics recorded yet: run the pipeline first")
    else:
        print(review_text(entries, show_pass=args.all))
    return 0


def cohort_report(args: argparse.Namespace, settings: Settings) -> int:
    from flows.report_html import write_report

    path = Path(args.out_file or settings.output_root / "report.html")
    with _analysis_session(settings) as session:
        if session is None:
            return 1
        data = write_report(session, path, title=args.title, thresholds=settings.qc)
    print(f"report: {path} ({len(data.patients)} patients, {len(data.failures)} failures)")
    return 0


def db(args: argparse.Namespace, settings: Settings) -> int:
    from db.store import current_revision, head_revision, upgrade

    url = settings.resolved_database_url
    if args.db_command == "upgrade":
        upgrade(url)
    revision = current_revision(url)
    print(f"database schema revision: {revision or 'none'} (latest: {head_revision()})")
    return 0
