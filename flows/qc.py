"""The QC step as a Prefect task: measured metrics and the 3-level figure, per exam and model.

Outputs (:mod:`tasks.derivatives`)::

    <exam>/figures/<p>_<s>_model-<m>_desc-qc_mask.png   apex/mid/base on T2, b1000, ADC
    <exam>/seg/<p>_<s>_model-<m>_qc.json                 the metrics (tasks.qc_metrics)

The metrics are recorded in ``qc_metric`` (long form) by the same transaction as the step
run; the status and reasons are judged when read (:mod:`flows.qc_review`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from sqlmodel import Session

from db.record import record_qc_metrics
from flows.preprocess import RegisteredImages, dwi_refs, t2_to_dwi_path
from flows.resources import apply_thread_limits
from flows.segment import mask_paths, model_label
from flows.steps import FileRef, RunContext, execute_step, step_task
from tasks.derivatives import derivative_path
from tasks.dwi import DwiFitParams
from tasks.io import write_json_atomic
from tasks.qc import qc_figure
from tasks.qc_metrics import QcImages, exam_qc_metrics
from tasks.register import load_transform
from tasks.registry import QC


def qc_figure_path(exam_dir: Path, label: str, reference: str | None = None) -> Path:
    """``<exam>/figures/<p>_<s>_model-<label>[_ref-<reference>]_desc-qc_mask.png``."""
    return derivative_path(
        exam_dir, "figures", suffix="mask", extension=".png", model=label, ref=reference, desc="qc"
    )


def qc_metrics_path(exam_dir: Path, label: str) -> Path:
    """``<exam>/seg/<p>_<s>_model-<label>_qc.json``."""
    return derivative_path(exam_dir, "seg", suffix="qc", extension=".json", model=label)


def _read(ref: FileRef | None) -> sitk.Image | None:
    return None if ref is None else sitk.ReadImage(ref.path, sitk.sitkFloat32)


@step_task(QC)
def qc_task(
    patient: str,
    exam_dir: Path,
    maps: dict[str, FileRef],
    registered: RegisteredImages,
    masks: Mapping[str, dict[str, FileRef]],
    model: str,
    ctx: RunContext,
    fit: DwiFitParams,
    adc_scanner: FileRef | None = None,
) -> FileRef:
    """QC metrics of ``model``'s mask and the exam (recorded), and its 3-level figure.

    ``maps``: the T2-grid images by role (``t2w``, ``dwi_b1000``, ``adc``); ``masks``: every
    model's segmentation outputs of this exam by model label (the others give the agreement
    metrics); ``fit``: the DWI fit settings (ADC clip range). Returns the figure.
    """
    label = model_label(model)
    mine = masks[label]
    others = {name: refs["mask"] for name, refs in sorted(masks.items()) if name != label}
    moco = dwi_refs(list(registered.moco))
    reference = moco[min(moco)] if moco else registered.hbv
    inputs = [
        maps["t2w"],
        *(maps[role] for role in ("dwi_b1000", "adc") if role in maps),
        *moco.values(),
        *([reference] if reference is not None and not moco else []),
        registered.t2_to_dwi,
        *([adc_scanner] if adc_scanner is not None else []),
        mine["mask"],
        mine["mask_json"],
        *others.values(),
    ]
    figure_path = qc_figure_path(exam_dir, label)
    metrics_path = qc_metrics_path(exam_dir, label)
    measured: dict[str, Any] = {}

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        t2, b1000, adc = (_read(maps.get(role)) for role in ("t2w", "dwi_b1000", "adc"))
        mask = sitk.ReadImage(mine["mask"].path, sitk.sitkUInt8)
        sidecar = json.loads(Path(mine["mask_json"].path).read_text())
        images = QcImages(
            t2=t2,
            mask=mask,
            adc=adc,
            b1000=b1000,
            dwi={b: _read(ref) for b, ref in moco.items()},
            dwi_reference=_read(reference),
            t2_to_dwi=load_transform(registered.t2_to_dwi.path),
            adc_scanner=_read(adc_scanner),
            others={name: sitk.ReadImage(ref.path, sitk.sitkUInt8) for name, ref in others.items()},
        )
        metrics = exam_qc_metrics(
            images,
            registration=registered.alignment,
            adc_range_mm2_s=fit.adc_range_mm2_s,
            uncertainty_mean=sidecar.get("uncertainty_mean"),
        )
        measured.update(metrics)
        write_json_atomic(metrics_path, {"model": label, "metrics": metrics})
        names = {int(k): v for k, v in sidecar.get("labels", {}).items()}
        figure = qc_figure(
            t2,
            mask,
            figure_path,
            b1000=b1000,
            adc=adc,
            label_names=names,
            title=f"{patient} model {label}",
        )
        outputs = [FileRef.of("qc", figure_path), FileRef.of("qc_json", metrics_path)]
        return outputs, {"slices": figure["slices"]}

    def on_record(session: Session, step_run_id: int) -> None:
        record_qc_metrics(
            session,
            patient_pseudo_id=patient,
            step_run_id=step_run_id,
            model=label,
            metrics=measured,
        )

    apply_thread_limits(ctx.threads)
    outcome = execute_step(
        ctx,
        patient=patient,
        step=QC.recorded(label),
        version=QC.version,
        inputs=inputs,
        parameters={
            "model": label,
            "others": sorted(others),
            "adc_range_mm2_s": list(fit.adc_range_mm2_s),
        },
        run=work,
        on_record=on_record,
    )
    return next(ref for ref in outcome.outputs if ref.role == "qc")


def exam_qc_images(exam_dir: Path, label: str, others: tuple[str, ...] = ()) -> QcImages:
    """The QC inputs of one exam and model read back from its output folder (the names
    :mod:`tasks.derivatives` gives them), for benchmarks and checks outside a run; exams
    with acquired DWI only (no computed-high-b stand-in)."""
    from tasks.derivatives import (
        exam_prefix,  # noqa: PLC0415
        parse_name,  # noqa: PLC0415
    )

    def image(datatype: str, **names: Any) -> sitk.Image | None:
        path = derivative_path(exam_dir, datatype, **names)
        return sitk.ReadImage(str(path), sitk.sitkFloat32) if path.is_file() else None

    dwi = {}
    for path in sorted((exam_dir / "dwi").glob("*_desc-moco_dwi.nii.gz")):
        b = parse_name(path.name, exam_prefix(exam_dir)).entities["b"]
        dwi[float(b)] = sitk.ReadImage(str(path), sitk.sitkFloat32)
    tfm = t2_to_dwi_path(exam_dir)
    masks = {name: mask_paths(exam_dir, name)[0] for name in (label, *others)}
    return QcImages(
        t2=image("anat", suffix="T2w", desc="n4"),
        mask=sitk.ReadImage(str(masks[label]), sitk.sitkUInt8),
        adc=image("dwi", suffix="adc", desc="fit", space="T2w"),
        b1000=image("dwi", suffix="dwi", b=1000, space="T2w"),
        dwi=dwi,
        dwi_reference=dwi[min(dwi)] if dwi else None,
        t2_to_dwi=load_transform(tfm) if tfm.is_file() else None,
        adc_scanner=image("dwi", suffix="adc"),
        others={name: sitk.ReadImage(str(masks[name]), sitk.sitkUInt8) for name in others},
    )
