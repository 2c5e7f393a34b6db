"""Evaluation flow: predicted gland masks against reference masks, per case and mean ± SD.

A reference folder holds, per exam, either one mask file named after the exam folder or
the original patient id (``DIR/ProstateX-0000.nii.gz``; the reference is named after DIR)
or a folder of that name with several masks (``DIR/ProstateX-0000/gland_Bosma22b.nii.gz``;
each file is a reference named after the file). Names are matched to pseudonymous patients
through the same keyed hash as ingest (patient folder or id), so no original identifier is
stored or needed. A case that cannot be compared (masks on different grids,
an unreadable file) is reported under ``errors``, naming the reference file, the model and
the patient; the other cases go on.

What a reference is comes from the words of its name (:func:`reference_kind`):
``gland_*`` (and any other name) is a whole gland, compared with every model's gland (any
non-zero label); ``zones_*`` (or ``t2_zones``) is zonal (:data:`REFERENCE_ZONES`: 1 = PZ,
2 = TZ), compared only with models that output zones: the gland (union of the zones) and
each zone the model names (``pz``, ``tz``; label ``label_name``); ``lesion_*`` is never a
gland reference. What is left out is listed under
``skipped`` with the reason. A rerun over the same reference folders replaces the earlier
run's rows for the patients and models it evaluates (another ``--pattern`` included).

Outputs under ``<output_root>/evaluation/``: ``metrics.csv`` (one row per case, model,
reference), ``summary.md`` and ``summary.csv`` (mean ± SD per model and reference), and one
QC figure per case with both outlines under the exam's ``figures/`` folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from prefect import flow
from prefect.logging import get_run_logger
from sqlmodel import Session

from db.queries import has_patient, latest_mask_paths
from db.record import record_evaluation_metrics, supersede_evaluations
from db.store import session_scope
from flows.qc import qc_figure_path
from flows.runners import SettingsTaskRunner
from flows.runs import pipeline_run, pseudonym_secret
from flows.segment import mask_paths
from flows.settings import load_settings
from flows.steps import engine_for
from tasks.derivatives import derivative_path
from tasks.errors import InputError
from tasks.evaluate import (
    METRICS,
    evaluate_masks,
    format_markdown_table,
    summarize,
    write_cases_csv,
    write_summary_csv,
)
from tasks.io import write_text_atomic
from tasks.pseudonym import pseudonymous_id
from tasks.qc import qc_figure

EVALUATION_DIR = "evaluation"
MASK_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
#: Reference kind by the first word of its name (``zones_Yuan23`` -> zones); else gland.
#: Label values of zonal reference masks (ProstateX / PI-CAI zonal annotations).
REFERENCE_ZONES = {1: "pz", 2: "tz"}
REFERENCE_KINDS = {
    "zones": "zones",
    "zone": "zones",
    "zonal": "zones",
    "lesion": "lesion",
    "lesions": "lesion",
}


@dataclass(frozen=True)
class Reference:
    """One reference mask: the exam name it belongs to, the reference's name, the file."""

    exam: str
    name: str
    path: Path


def _stem(path: Path) -> str | None:
    for suffix in MASK_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def find_references(folder: Path, pattern: str = "*") -> list[Reference]:
    """Reference masks under ``folder`` (layouts in the module docstring), sorted.

    ``pattern`` is a glob on the mask file name (e.g. ``gland_*``).

    Raises
    ------
    InputError
        If ``folder`` is not a folder or holds no mask.
    """
    if not folder.is_dir():
        raise InputError(f"reference folder {folder} does not exist", step="evaluate")
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and _stem(entry) and entry.match(pattern):
            found.append(Reference(_stem(entry), folder.name, entry))
        elif entry.is_dir():
            for mask in sorted(entry.iterdir()):
                if mask.is_file() and _stem(mask) and mask.match(pattern):
                    found.append(Reference(entry.name, _stem(mask), mask))
    if not found:
        raise InputError(
            f"no reference masks matching {pattern!r} in {folder}",
            step="evaluate",
            hint="name masks after the exam folder or patient id, e.g. ProstateX-0000.nii.gz",
        )
    return found


def reference_kind(name: str) -> str:
    """``lesion``, ``zones`` or ``gland``, from the words of a reference's name, in that
    order (``gland_Bosma22b``, ``zones_Yuan23``, ``t2_zones``, ``lesion_expert``; words split
    at ``_ - .``)."""
    kinds = {REFERENCE_KINDS.get(w.lower()) for w in re.split(r"[_\-.]", name)}
    return next((kind for kind in ("lesion", "zones") if kind in kinds), "gland")


def model_zones(mask_path: str, model: str) -> dict[str, int]:
    """``{zone name: label value}`` of a multi-label (zonal) model's mask, from its JSON
    sidecar; empty for a one-label model."""
    _, sidecar = mask_paths(Path(mask_path).parents[1], model)
    try:
        labels = json.loads(sidecar.read_text()).get("labels", {})
    except (OSError, ValueError):
        return {}
    if len(labels) < 2:
        return {}
    return {str(name).lower(): int(value) for value, name in labels.items()}


def _patient_of(session: Session, exam: str, key: str) -> str | None:
    """The pseudonymous id for an exam name (the patient folder or id) through the key.

    No folder name is stored, so the key is the only way from a name to a patient.
    """
    pseudo = pseudonymous_id(exam, key)
    return pseudo if has_patient(session, pseudo) else None


def _latest_masks(session: Session, patient: str) -> dict[str, str]:
    """``{model: mask path}`` of the newest segmentation of each model for a patient."""
    found = latest_mask_paths(session, patient)
    return {model: path for model, path in found.items() if Path(path).is_file()}


def _t2_of(mask_path: str) -> Path | None:
    """The preprocessed T2 of the exam of a mask (``<exam>/anat/<p>_<s>_desc-n4_T2w``)."""
    path = derivative_path(Path(mask_path).parents[1], "anat", suffix="T2w", desc="n4")
    return path if path.is_file() else None


def _evaluate_case(
    ref: Reference, patient: str, model: str, mask_path: str, zones: dict[str, int]
) -> list[dict[str, Any]]:
    """Metrics of one model's mask against one reference: the gland, then every zone of
    ``zones`` (model label values) the reference has (:data:`REFERENCE_ZONES`); the gland's
    case carries a QC figure with both outlines.

    Raises
    ------
    InputError
        The masks are not on one grid (or another problem ``evaluate_masks`` names).
    """
    prediction = sitk.ReadImage(mask_path, sitk.sitkUInt8)
    reference = sitk.ReadImage(str(ref.path), sitk.sitkUInt8)
    keys = {"patient": patient, "model": model, "reference": ref.name}
    case = keys | {"label_name": "gland"} | evaluate_masks(prediction, reference)
    per_zone = [
        keys
        | {"label_name": name}
        | evaluate_masks(prediction, reference, label=zones[name], reference_label=value)
        for value, name in REFERENCE_ZONES.items()
        if name in zones
    ]
    t2 = _t2_of(mask_path)
    if t2 is not None:
        figure = qc_figure_path(Path(mask_path).parents[1], model, ref.name)
        qc_figure(
            sitk.ReadImage(str(t2), sitk.sitkFloat32),
            prediction,
            figure,
            reference=reference,
            title=f"{patient} model {model} vs {ref.name}",
        )
        case["qc"] = str(figure)
    return [case, *per_zone]


@flow(name="evaluate", task_runner=SettingsTaskRunner())
def evaluate_flow(
    references: list[str],
    pattern: str = "*",
    models: list[str] | None = None,
    config_file: str | None = None,
    output_root: str | None = None,
) -> dict[str, Any]:
    """Compare every model's newest mask with every matching reference mask.

    Returns ``{"cases", "summary", "patients", "unmatched", "skipped", "errors",
    "folder"}`` (``patients``: how many patients were compared); metrics are also stored in
    the database (``evaluation_metric``) and written as CSV and Markdown.
    """
    settings = load_settings(config_file, output_root=output_root)
    logger = get_run_logger()
    found = [ref for folder in references for ref in find_references(Path(folder), pattern)]
    key = pseudonym_secret(settings).get_secret_value()
    cases: list[dict[str, Any]] = []
    unmatched: list[str] = []
    errors: list[str] = []
    skipped: dict[str, int] = {}  # reason -> references left out for it
    outcomes: list[dict[str, Any]] = []  # per case, for the pipeline run's status and summary
    command = f"evaluate {' '.join(references)}"
    with pipeline_run(settings, command=command) as (ctx, run):
        engine = engine_for(ctx.database_url)
        for ref in found:
            kind = reference_kind(ref.name)
            if kind == "lesion":
                _count(skipped, f"{ref.name}: a lesion mask, never compared as a gland")
                continue
            with session_scope(engine) as session:
                patient = _patient_of(session, ref.exam, key)
                masks = _latest_masks(session, patient) if patient else {}
            masks = {m: p for m, p in masks.items() if not models or m in models}
            if not masks:
                unmatched.append(f"{ref.name}: {ref.path.name} (no processed exam with a mask)")
                continue
            for model, mask_path in sorted(masks.items()):
                zones = model_zones(mask_path, model) if kind == "zones" else {}
                if kind == "zones" and not zones:
                    _count(
                        skipped,
                        f"{ref.name}: zonal, and model {model} outputs the whole gland only",
                    )
                    continue
                try:
                    found_cases = _evaluate_case(ref, patient, model, mask_path, zones)
                except (InputError, RuntimeError) as error:  # RuntimeError: unreadable file
                    problem = getattr(error, "problem", None) or str(error).strip()
                    errors.append(f"{ref.name}: {ref.path} vs {model} mask of {patient}: {problem}")
                    # the reference's path holds the exam's folder name: never logged or stored
                    safe = problem.replace(str(ref.path), f"the {ref.name} mask")
                    logger.error("%s vs model %s, patient %s: %s", ref.name, model, patient, safe)
                    failed = {"status": "error", "step": "evaluate", "error": safe}
                    outcomes.append({"patient": patient} | failed)
                    continue
                cases.extend(found_cases)
                outcomes.append({"patient": patient, "status": "ok"})
                with session_scope(engine) as session:
                    for case in found_cases:
                        record_evaluation_metrics(
                            session,
                            patient_pseudo_id=patient,
                            model=model,
                            reference=ref.name,
                            label_name=case["label_name"],
                            metrics={k: case[k] for k in METRICS},
                            pipeline_run_id=ctx.pipeline_run_id,
                        )
        with session_scope(engine) as session:
            supersede_evaluations(
                session,
                command=command,
                pipeline_run_id=ctx.pipeline_run_id,
                evaluated={(c["patient"], c["model"]) for c in cases},
            )
        summary = []
        groups = dict.fromkeys((c["model"], c["reference"], c["label_name"]) for c in cases)
        for model, name, label in sorted(groups, key=lambda g: (g[0], g[1], g[2] != "gland")):
            group = [
                c
                for c in cases
                if (c["model"], c["reference"], c["label_name"]) == (model, name, label)
            ]
            labels = {"model": model, "reference": name, "label_name": label}
            summary.append(labels | summarize(group))
        out = settings.output_root / EVALUATION_DIR
        write_cases_csv(out / "metrics.csv", cases)
        write_summary_csv(out / "summary.csv", summary)
        write_text_atomic(out / "summary.md", format_markdown_table(summary))
        patients = len({c["patient"] for c in cases})
        logger.info(
            "evaluated %d patients (%d model x reference cases); %d references unmatched, "
            "%d skipped; %d failed",
            patients,
            len(cases),
            len(unmatched),
            sum(skipped.values()),
            len(errors),
        )
        run.finish(outcomes)
    return {
        "cases": cases,
        "summary": summary,
        "patients": patients,
        "unmatched": unmatched,
        "skipped": [f"{why} ({n} mask{'s' * (n > 1)})" for why, n in skipped.items()],
        "errors": errors,
        "folder": str(out),
    }


def _count(counts: dict[str, int], reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1
