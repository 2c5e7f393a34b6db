"""Segmentation, volume and radiomics as Prefect tasks: one task run per step, exam and
model (QC: :mod:`flows.qc`).

Each model's outputs carry a ``model-<name>`` entity, so several models can be run on the
same exam and compared::

    <exam>/seg/<p>_<s>_space-T2w_model-<m>_dseg.nii.gz   label map on the T2 grid (uint8)
    <exam>/seg/<p>_<s>_space-T2w_model-<m>_dseg.json     label names, model and its sha256
    <exam>/seg/<p>_<s>_model-<m>_radiomics.csv           features, long form

The model's content hash is part of every cache key, so a retrained model recomputes.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from sqlmodel import Session

from db.queries import segmentation_ids
from db.record import record_radiomics_features, record_segmentation
from flows.gpu import gpu_slot
from flows.resources import apply_thread_limits
from flows.settings import SegmentationSettings
from flows.steps import FileRef, RunContext, execute_step, step_task
from tasks.derivatives import derivative_path
from tasks.errors import InputError
from tasks.io import write_image_atomic, write_json_atomic, write_text_atomic
from tasks.measure import (
    extract_radiomics,
    load_radiomics_settings,
    mask_volume_ml,
    radiomics_settings_hash,
)
from tasks.qc_metrics import mean_uncertainty
from tasks.registry import RADIOMICS, SEGMENT, StepSpec
from tasks.segment import BACKENDS, SegmentationInputs, SegmentationParams, get_backend

#: T2-grid images a backend may read, by role.
SEGMENTATION_ROLES = ("t2w", "dwi_b1000", "adc")
#: Images features are extracted from: our role -> the name stored with each feature.
RADIOMICS_IMAGES = {"t2w": "t2w", "adc": "adc", "dwi_b1000": "b1000"}
#: Label value recorded for the union of all labels of a multi-label (zonal) model.
WHOLE_GLAND_LABEL = 0


def model_label(spec: str) -> str:
    """File-name-safe name of a model spec: ``demo``, ``demozones``, ``taps`` or the
    folder's name."""
    name = spec if spec in BACKENDS else Path(spec).name
    return re.sub(r"[^A-Za-z0-9]+", "", name) or "model"


def segmentation_params(settings: SegmentationSettings, threads: int) -> SegmentationParams:
    """The backend parameters from the settings (``folds`` ``"all"``: every fold folder)."""
    folds = None if "all" in settings.folds else tuple(settings.folds)
    return SegmentationParams(
        device=settings.device,
        folds=folds,
        checkpoint=settings.checkpoint,
        use_mirroring=settings.use_mirroring,
        tile_step_size=settings.tile_step_size,
        channel_map=dict(settings.channel_map),
        threads=threads,
        adc_unit=settings.adc_unit,
    )


def mask_paths(exam_dir: Path, label: str) -> tuple[Path, Path]:
    """A model's mask on the T2 grid and its JSON sidecar (labels, volumes) in an exam."""
    names = {"suffix": "dseg", "space": "T2w", "model": label}
    return (
        derivative_path(exam_dir, "seg", **names),
        derivative_path(exam_dir, "seg", extension=".json", **names),
    )


def _read(ref: FileRef | None) -> sitk.Image | None:
    return None if ref is None else sitk.ReadImage(ref.path, sitk.sitkFloat32)


def _masks(labels: sitk.Image, names: dict[int, str]) -> dict[str, tuple[sitk.Image, int]]:
    """``{label name: (mask image, label value)}``; multi-label maps add the whole gland."""
    masks = {name: (labels, value) for value, name in sorted(names.items())}
    if len(names) > 1:
        masks["gland"] = (sitk.Cast(labels > 0, sitk.sitkUInt8), 1)
    return masks


@step_task(SEGMENT)
def segment_task(
    patient: str,
    exam_dir: Path,
    images: dict[str, FileRef],
    model: str,
    ctx: RunContext,
    params: SegmentationParams,
) -> dict[str, FileRef]:
    """Segment the gland with ``model``; record the mask and the volume of every label (mL).

    ``images`` holds the T2-grid inputs by role (``t2w``, ``dwi_b1000``, ``adc``; other
    roles are ignored).
    Returns the mask and its JSON sidecar by role (``mask``, ``mask_json``).
    """
    apply_thread_limits(ctx.threads)
    label = model_label(model)
    inputs = [images[role] for role in SEGMENTATION_ROLES if role in images]
    try:
        backend = get_backend(model, params)
    except InputError as error:  # a missing or broken model: on record for this patient
        parameters = params.model_dump(mode="json") | {"model": label}
        record_failure(ctx, patient, SEGMENT, label, inputs, parameters, error)
        raise
    path, sidecar = mask_paths(exam_dir, label)
    made: dict[str, Any] = {}

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        inputs = SegmentationInputs(
            t2w=_read(images["t2w"]),
            dwi_b1000=_read(images.get("dwi_b1000")),
            adc=_read(images.get("adc")),
        )
        with gpu_slot(backend.uses_gpu):  # one of the "gpu" limit's slots while on the GPU
            result = backend.segment(inputs)
        sha = write_image_atomic(result.labels, path)
        volumes = {
            name: mask_volume_ml(mask, value)
            for name, (mask, value) in _masks(result.labels, result.label_names).items()
        }
        made.update(
            model=result.model,
            model_hash=result.model_hash,
            labels={str(k): v for k, v in result.label_names.items()},
            volumes_ml={name: ml for name, (_n, ml) in volumes.items()},
        )
        if result.probabilities is not None:
            labels = sitk.GetArrayViewFromImage(result.labels)
            made["uncertainty_mean"] = mean_uncertainty(result.probabilities, labels)
        write_json_atomic(sidecar, made | {"mask_sha256": sha, "space": "T2w"})
        made["counts"] = volumes
        made["sha"] = sha
        return [FileRef.of("mask", path), FileRef.of("mask_json", sidecar)], {}

    def on_record(session: Session, step_run_id: int) -> None:
        values = {name: value for value, name in _label_names(made["labels"]).items()}
        for name, (count, ml) in made["counts"].items():
            record_segmentation(
                session,
                patient_pseudo_id=patient,
                step_run_id=step_run_id,
                model=label,
                model_hash=made["model_hash"],
                mask_path=path,
                mask_sha256=made["sha"],
                label=values.get(name, WHOLE_GLAND_LABEL),
                label_name=name,
                voxel_count=count,
                volume_ml=ml,
            )

    parameters = params.model_dump(mode="json") | {
        "model": label,
        "model_hash": backend.model_hash,
    }
    outcome = execute_step(
        ctx,
        patient=patient,
        step=SEGMENT.recorded(label),
        version=SEGMENT.version,
        inputs=inputs,
        parameters=parameters,
        run=work,
        on_record=on_record,
    )
    return {ref.role: ref for ref in outcome.outputs}


def record_failure(
    ctx: RunContext,
    patient: str,
    spec: StepSpec,
    model: str,
    inputs: list[FileRef],
    parameters: dict[str, Any],
    error: Exception,
) -> None:
    """Record ``error`` as a failed run of step ``spec`` for ``model`` (a failure before the
    step's work)."""

    def fail() -> tuple[list[FileRef], dict[str, Any]]:
        raise error

    try:
        execute_step(
            ctx,
            patient=patient,
            step=spec.recorded(model),
            version=spec.version,
            inputs=inputs,
            parameters=parameters,
            run=fail,
        )
    except type(error):
        pass  # recorded; the caller re-raises the original


def _label_names(labels: dict[str, str]) -> dict[int, str]:
    return {int(k): v for k, v in labels.items()}


def _features_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=["image", "mask", "feature_class", "feature", "value", "settings_hash"]
    )
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


@step_task(RADIOMICS)
def radiomics_task(
    patient: str,
    exam_dir: Path,
    images: dict[str, FileRef],
    segmentation: dict[str, FileRef],
    model: str,
    ctx: RunContext,
    settings_file: str | None = None,
) -> FileRef:
    """pyradiomics features of T2, ADC and b1000 inside every label of the mask.

    Features are stored in long form in the database (linked to the segmentation row) and
    in a CSV beside the mask. An extraction error fails the step; it is never zeros.
    """
    apply_thread_limits(ctx.threads)
    label = model_label(model)
    path = derivative_path(exam_dir, "seg", suffix="radiomics", extension=".csv", model=label)
    mask_ref = segmentation["mask"]
    inputs = [mask_ref, *(images[r] for r in RADIOMICS_IMAGES if r in images)]
    try:
        settings = load_radiomics_settings(settings_file)
    except InputError as error:  # a bad settings file: on record for this patient
        record_failure(ctx, patient, RADIOMICS, label, inputs, {"model": label}, error)
        raise
    names = _label_names(json.loads(Path(segmentation["mask_json"].path).read_text())["labels"])
    rows: list[dict[str, Any]] = []

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        labels = sitk.ReadImage(mask_ref.path, sitk.sitkUInt8)
        for role, image_name in RADIOMICS_IMAGES.items():
            if role not in images:
                continue
            image = sitk.ReadImage(images[role].path, sitk.sitkFloat32)
            digest = radiomics_settings_hash(settings, image_name)
            for mask_name, (mask, value) in _masks(labels, names).items():
                for feature in extract_radiomics(
                    image, mask, image_type=image_name, label=value, settings=settings
                ):
                    rows.append(
                        {
                            "image": image_name,
                            "mask": mask_name,
                            "feature_class": feature.feature_class,
                            "feature": feature.feature,
                            "value": feature.value,
                            "settings_hash": digest,
                        }
                    )
        write_text_atomic(path, _features_csv(rows))
        return [FileRef.of("radiomics_csv", path)], {}

    def on_record(session: Session, step_run_id: int) -> None:
        by_name = segmentation_ids(session, mask_sha256=mask_ref.sha256, model=label)
        groups: dict[tuple[str, str, str], dict[tuple[str, str], float]] = {}
        for row in rows:
            key = (row["image"], row["mask"], row["settings_hash"])
            groups.setdefault(key, {})[(row["feature_class"], row["feature"])] = row["value"]
        for (image_name, mask_name, digest), features in groups.items():
            record_radiomics_features(
                session,
                patient_pseudo_id=patient,
                step_run_id=step_run_id,
                image=image_name,
                mask=f"{label}:{mask_name}",
                features=features,
                settings_hash=digest,
                segmentation_id=by_name.get(mask_name),
            )

    outcome = execute_step(
        ctx,
        patient=patient,
        step=RADIOMICS.recorded(label),
        version=RADIOMICS.version,
        inputs=inputs,
        parameters={"model": label, "settings": settings},
        run=work,
        on_record=on_record,
    )
    return outcome.outputs[0]


def resolve_models(specs: list[str], *, demo: bool) -> list[str]:
    """Model specs to run: ``auto`` is the demo model on the demo cohort, TAPS on real exams.

    Folder specs are made absolute; duplicates are dropped (order kept).
    """
    resolved = []
    for spec in specs:
        if spec == "auto":
            spec = "demo" if demo else "taps"
        elif spec not in BACKENDS:
            spec = str(Path(spec).expanduser().resolve())
        if spec not in resolved:
            resolved.append(spec)
    return resolved
