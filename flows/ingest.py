"""Ingest as a Prefect task and flow: one task run per exam, named by pseudonymous id.

The task wraps :func:`tasks.ingest.ingest_exam` through :func:`flows.steps.execute_step`
(cache + provenance) and records the study and every series (chosen or rejected, with the
reason) in the database. An exam with bad data fails its own task run with a clear
``InputError``; the other exams go on. So does an exam that discovery already marked with a
``problem`` (duplicated PI-CAI files, files of another patient, a bad manifest row): its
problem is its recorded error. The paths discovery skipped are returned for the terminal
and only counted, by reason, in the Prefect logs (they may name patients).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import SecretStr
from sqlmodel import Session

from db.record import clear_series, ensure_study, record_series
from flows.resources import apply_thread_limits
from flows.runners import SettingsTaskRunner
from flows.runs import pipeline_run, pseudonym_secret
from flows.settings import IngestSettings, load_settings
from flows.steps import FileRef, RunContext, execute_step, step_task
from tasks.derivatives import b_label, derivative_path
from tasks.discover import Discovery, Exam, discover
from tasks.errors import InputError
from tasks.ingest import (
    IngestResult,
    exam_dir,
    exam_ids,
    ingest_exam,
    relative_to_exam,
    role_file,
)
from tasks.io import sha256_file, sha256_files, write_json_atomic
from tasks.registry import INGEST

PATIENTS_DIR = "patients"


def patient_id_of(exam: Exam, key: str) -> str:
    """The pseudonymous patient id ingest gives this exam (see ``tasks.ingest.exam_ids``)."""
    return exam_ids(exam, key)[0]


def _source_files(exam: Exam) -> list[FileRef]:
    """Every input file, recorded by its path relative to the exam folder (``exam/...``;
    PI-CAI files by role) and its sha256: never the patient or study folder names."""
    root = Path(exam.root)
    named = [(f, relative_to_exam(exam, f)) for series in exam.series for f in series.files]
    named += [(path, role_file(role, path)) for role, path in exam.images]
    return [
        FileRef("source", f"exam/{name}", sha256_file(root / rel))
        for rel, name in sorted(named, key=lambda pair: pair[1])
    ]


def _rejected_files(exam: Exam, folder: str) -> list[Path]:
    """Source files of a rejected series (``folder`` relative to the exam), to hash."""
    root = Path(exam.root)
    return [
        root / f for s in exam.series if relative_to_exam(exam, s.folder) == folder for f in s.files
    ]


def _series_rows(exam: Exam, result: dict[str, Any], out_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for s in result["series"]:
        rows.append(
            {
                "kind": s["kind"],
                "b_value": s["b_value"],
                "selected": True,
                "selection_reason": s["reason"],
                "source": s["source"],
                "n_files": len(s["source_files"]),
                "source_sha256": s["source_sha256"],
                "source_files": [{"name": n, "sha256": h} for n, h in s["source_files"]],
                "shape": s["shape"],
                "spacing": s["spacing"],
                "origin": s["origin"],
                "direction": s["direction"],
                "image_path": str(out_dir / s["image"]),
                "image_sha256": s["image_sha256"],
            }
        )
    for r in result["rejected"]:
        files = _rejected_files(exam, r["source"])
        rows.append(
            {
                "kind": "ignored",
                "selected": False,
                "selection_reason": r["reason"],
                "source": r["source"],
                "n_files": len(files),
                "source_sha256": sha256_files(files),
                "source_files": [{"name": f.name, "sha256": sha256_file(f)} for f in files],
            }
        )
    return rows


def ingest_one(
    exam: Exam, *, patient: str, ctx: RunContext, key: SecretStr, params: IngestSettings
) -> dict[str, Any]:
    """Ingest one exam with caching and provenance; return the ingest result as a dict.

    Raises
    ------
    InputError
        The exam's data is unusable; the message names the series folder and the problem.
    """
    out_dir = ctx.output_root / PATIENTS_DIR
    _, session = exam_ids(exam, key.get_secret_value())
    sidecar = derivative_path(
        out_dir / exam_dir(patient, session), ".", suffix="ingest", extension=".json"
    )

    def run() -> tuple[list[FileRef], dict[str, Any]]:
        if exam.problem:  # found by discovery; nothing of the exam is ingested
            raise InputError(exam.problem, patient=patient, step=INGEST.name, details={"found": []})
        result: IngestResult = ingest_exam(
            exam, out_dir=out_dir, key=key.get_secret_value(), min_b_values=params.min_b_values
        )
        if result.status != "ok":
            found = result.to_dict()["found"]
            raise InputError(
                result.error or "ingest failed",
                patient=patient,
                step=INGEST.name,
                details={"found": found},
            )
        data = result.to_dict()
        write_json_atomic(sidecar, data)
        outputs = [FileRef.of(ingest_role(s), out_dir / s["image"]) for s in data["series"]]
        return outputs + [FileRef.of("ingest_json", sidecar)], data

    def on_record(session: Session, _step_run_id: int) -> None:
        data = json.loads(sidecar.read_text())
        study = ensure_study(session, patient_pseudo_id=patient, study_key=data["session"])
        clear_series(session, study_id=study.id)  # a re-ingest replaces, never appends
        for row in _series_rows(exam, data, out_dir):
            record_series(session, study_id=study.id, **row)

    outcome = execute_step(
        ctx,
        patient=patient,
        step=INGEST.name,
        version=INGEST.version,
        inputs=_source_files(exam),
        parameters=params.model_dump(mode="json"),
        run=run,
        on_record=on_record,
        cached_details=lambda refs: json.loads(sidecar.read_text()),
    )
    # ``source`` (the exam folder) is for the terminal only: it is never persisted.
    return outcome.details | {"source": exam.folder, "cached": outcome.status == "cached"}


def ingest_role(series: dict[str, Any]) -> str:
    """Artifact role of an ingested image, e.g. ``t2w``, ``dwi_b800``, ``adc_scanner``."""
    kind, b = series["kind"], series["b_value"]
    if kind == "t2w":
        return "t2w_raw"
    if kind == "adc":
        return "adc_scanner"
    if b is None:
        return kind
    return f"{'dwi' if kind == 'dwi' else 'computed_dwi'}_b{b_label(b)}_raw"


@step_task(INGEST)
def ingest_exam_task(
    exam: Exam, patient: str, ctx: RunContext, key: SecretStr, params: IngestSettings
) -> dict[str, Any]:
    """Prefect task: ingest one exam (see :func:`ingest_one`)."""
    apply_thread_limits(ctx.threads)
    result = ingest_one(exam, patient=patient, ctx=ctx, key=key, params=params)
    n = len(result["series"])
    word = "cached" if result["cached"] else "ingested"
    get_run_logger().info("%s %s: %d images", word, patient, n)
    return result


def error_entry(exam: Exam, patient: str, error: BaseException) -> dict[str, Any]:
    """The per-patient result for an exam whose ingest failed."""
    problem = error.problem if isinstance(error, InputError) else str(error)
    details = getattr(error, "details", None) or {}
    return {
        "patient": patient,
        "source": exam.folder,  # for the terminal; never persisted
        "status": "error",
        "error": problem,
        "series": [],
        "rejected": [],
        "found": details.get("found", []),
    }


def ingest_exams(
    exams: list[Exam], ctx: RunContext, key: SecretStr, params: IngestSettings
) -> list[dict[str, Any]]:
    """Submit one ingest task per exam on the flow's task runner; wait for all of them.

    Returns one entry per exam, in order: the ingest result, or an ``error`` entry for an
    exam whose task failed. A failed exam never stops the others.
    """
    patients = [patient_id_of(exam, key.get_secret_value()) for exam in exams]
    futures = [
        ingest_exam_task.submit(exam, patient, ctx, key, params)
        for exam, patient in zip(exams, patients, strict=True)
    ]
    results = []
    for exam, patient, future in zip(exams, patients, futures, strict=True):
        future.wait()
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            results.append(error_entry(exam, patient, outcome))
        else:
            results.append(outcome)
    return results


def discover_cohort(
    root: str | Path, *, manifest: str | None = None, follow_symlinks: bool = False
) -> Discovery:
    """:func:`tasks.discover.discover` for a flow: logs how many exams were found and how
    many paths were skipped, for what reasons (counts and fixed reasons only: the skipped
    paths may name patients and stay out of the Prefect logs)."""
    found = discover(root, manifest=manifest, follow_symlinks=follow_symlinks)
    get_run_logger().info("found %d exams; %s", len(found.exams), skipped_summary(found))
    return found


def skipped_summary(found: Discovery) -> str:
    """``skipped 2 paths (1 empty folder, 1 ...)``: counts by reason, no paths."""
    counts = found.skipped_by_reason()
    if not counts:
        return "skipped nothing"
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items())
    return f"skipped {len(found.skipped)} paths ({reasons})"


def skipped_entries(found: Discovery) -> list[dict[str, Any]]:
    """The skipped paths for the terminal (``path`` may name a patient: never persisted)."""
    return [{"path": s.path, "reason": s.reason, "files": s.files} for s in found.skipped]


@flow(name="ingest-cohort", task_runner=SettingsTaskRunner(), log_prints=False)
def ingest_flow(
    root: str,
    config_file: str | None = None,
    output_root: str | None = None,
    force: bool = False,
    manifest: str | None = None,
    follow_symlinks: bool = False,
) -> dict[str, Any]:
    """Discover the exams under ``root`` and ingest each; return ``{"patients": [...],
    "skipped": [...]}`` (``skipped``: paths that hold no exam, for the terminal only).

    Parameters are paths only (they are shown in the Prefect UI): no identifiers, no keys.
    The pseudonymisation key and every other setting come from the settings sources.
    ``manifest``: a CSV listing the exams (see :mod:`tasks.discover`); ``follow_symlinks``:
    search symbolic links to folders.
    """
    settings = load_settings(config_file, data_root=root, output_root=output_root)
    command = f"ingest {root}" + (f" --manifest {manifest}" if manifest else "")
    command += " --follow-symlinks" if follow_symlinks else ""
    with pipeline_run(settings, command=command, force=force) as (ctx, run):
        found = discover_cohort(
            settings.data_root, manifest=manifest, follow_symlinks=follow_symlinks
        )
        results = ingest_exams(found.exams, ctx, pseudonym_secret(settings), settings.steps.ingest)
        run.finish(results)
    return {"patients": results, "skipped": skipped_entries(found)}
