"""Per-exam preprocessing chain as Prefect tasks: one task run per step and exam.

Order (the users' study): b-value standardisation -> denoising -> N4 -> registration ->
ADC. Each step reads the previous step's files, writes its own atomically and is cached
and recorded through :func:`flows.steps.execute_step`. File names (BIDS-like entities)::

    <exam>/dwi/<p>_<s>_desc-standardized_b1000_dwi.nii.gz   b1000 (acquired or extrapolated)
    <exam>/anat/<p>_<s>_desc-denoised_T2w.nii.gz            T2 after anisotropic diffusion
    <exam>/dwi/<p>_<s>_b<b>_desc-denoised_dwi.nii.gz        DWI after SUSAN
    <exam>/anat/<p>_<s>_desc-n4_T2w.nii.gz                  T2 after N4 (+ _desc-n4_biasfield)
    <exam>/dwi/<p>_<s>_b<b>_desc-n4_dwi.nii.gz              DWI after N4 (one field for all b)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from prefect import task
from prefect.cache_policies import NONE

from flows.resources import apply_thread_limits
from flows.steps import FileRef, RunContext, execute_step, is_transient
from tasks.bias import N4Params, correct_bias_dwi, correct_bias_n4
from tasks.denoise import SusanParams, T2DenoiseParams, denoise_dwi, denoise_t2
from tasks.dwi import DwiFitParams, standardize_b1000
from tasks.io import write_image_atomic

B1000 = 1000.0


@dataclass(frozen=True)
class ExamImages:
    """The current images of one exam between steps: T2W and the DWI volumes (by role)."""

    t2w: FileRef
    dwi: tuple[FileRef, ...]


def b_label(b: float) -> str:
    """b-value as a file-name entity: 800 -> ``800``, 12.5 -> ``12p5``."""
    return f"{b:g}".replace(".", "p")


def derivative_path(
    exam_dir: Path, *, datatype: str, desc: str, suffix: str, b: float | None = None
) -> Path:
    """The one place output names are made: ``<exam>/<datatype>/<p>_<s>[_b<b>]_desc-…``."""
    prefix = f"{exam_dir.parent.name}_{exam_dir.name}"
    b_part = f"_b{b_label(b)}" if b is not None else ""
    return exam_dir / datatype / f"{prefix}{b_part}_desc-{desc}_{suffix}.nii.gz"


def _read(path: str | Path) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def dwi_refs(refs: list[FileRef]) -> dict[float, FileRef]:
    """``{b: ref}`` from refs whose role is ``dwi_b<b>`` (any suffix after the b-value)."""
    out = {}
    for ref in refs:
        if ref.role.startswith("dwi_b"):
            label = ref.role.removeprefix("dwi_b").split("_")[0]
            out[float(label.replace("p", "."))] = ref
    return out


def _run(
    ctx: RunContext,
    patient: str,
    step: str,
    version: str,
    inputs: list[FileRef],
    params: dict[str, Any],
    work: Callable[[], tuple[list[FileRef], dict[str, Any]]],
) -> list[FileRef]:
    apply_thread_limits(ctx.threads)
    outcome = execute_step(
        ctx, patient=patient, step=step, version=version, inputs=inputs, parameters=params, run=work
    )
    return list(outcome.outputs)


@task(
    name="standardize-b1000",
    task_run_name="b1000-{patient}",
    cache_policy=NONE,
    retries=1,
    retry_condition_fn=is_transient,
)
def standardize_task(
    patient: str, exam_dir: Path, images: ExamImages, ctx: RunContext, params: DwiFitParams
) -> ExamImages:
    """Add the b1000 volume (acquired or mono-exponentially extrapolated) to the DWI set."""
    refs = dwi_refs(list(images.dwi))

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        image, info = standardize_b1000({b: _read(r.path) for b, r in refs.items()}, params=params)
        path = derivative_path(exam_dir, datatype="dwi", desc="standardized", suffix="dwi", b=B1000)
        write_image_atomic(image, path)
        return [FileRef.of("dwi_b1000_standardized", path)], info

    out = _run(
        ctx,
        patient,
        "standardize_b1000",
        "1",
        list(images.dwi),
        params.model_dump(mode="json"),
        work,
    )
    kept = [r for b, r in sorted(refs.items()) if abs(b - B1000) > 1]
    return ExamImages(images.t2w, tuple(kept + out))


@task(
    name="denoise",
    task_run_name="denoise-{patient}",
    cache_policy=NONE,
    retries=1,
    retry_condition_fn=is_transient,
)
def denoise_task(
    patient: str,
    exam_dir: Path,
    images: ExamImages,
    ctx: RunContext,
    t2_params: T2DenoiseParams,
    susan: SusanParams,
) -> ExamImages:
    """T2: curvature anisotropic diffusion; DWI (every b and b1000): SUSAN per volume."""
    t2w, refs = images.t2w, dwi_refs(list(images.dwi))

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        t2_path = derivative_path(exam_dir, datatype="anat", desc="denoised", suffix="T2w")
        write_image_atomic(denoise_t2(_read(t2w.path), params=t2_params), t2_path)
        outputs = [FileRef.of("t2w_denoised", t2_path)]
        volumes = denoise_dwi({b: _read(r.path) for b, r in refs.items()}, params=susan)
        for b, image in sorted(volumes.items()):
            path = derivative_path(exam_dir, datatype="dwi", desc="denoised", suffix="dwi", b=b)
            write_image_atomic(image, path)
            outputs.append(FileRef.of(f"dwi_b{b_label(b)}_denoised", path))
        return outputs, {}

    params = {"t2": t2_params.model_dump(mode="json"), "susan": susan.model_dump(mode="json")}
    out = _run(ctx, patient, "denoise", "1", [t2w, *images.dwi], params, work)
    return ExamImages(out[0], tuple(out[1:]))


@task(
    name="n4",
    task_run_name="n4-{patient}",
    cache_policy=NONE,
    retries=1,
    retry_condition_fn=is_transient,
)
def n4_task(
    patient: str, exam_dir: Path, images: ExamImages, ctx: RunContext, params: N4Params
) -> ExamImages:
    """N4 on T2; one N4 field (from the lowest b) divided out of every DWI volume."""
    t2w, refs = images.t2w, dwi_refs(list(images.dwi))

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        corrected, field = correct_bias_n4(_read(t2w.path), params=params)
        t2_path = derivative_path(exam_dir, datatype="anat", desc="n4", suffix="T2w")
        field_path = derivative_path(exam_dir, datatype="anat", desc="n4", suffix="biasfield")
        write_image_atomic(corrected, t2_path)
        write_image_atomic(field, field_path)
        outputs = [FileRef.of("t2w_n4", t2_path), FileRef.of("t2w_biasfield", field_path)]
        volumes, dwi_field = correct_bias_dwi(
            {b: _read(r.path) for b, r in refs.items()}, params=params
        )
        dwi_field_path = derivative_path(exam_dir, datatype="dwi", desc="n4", suffix="biasfield")
        write_image_atomic(dwi_field, dwi_field_path)
        for b, image in sorted(volumes.items()):
            path = derivative_path(exam_dir, datatype="dwi", desc="n4", suffix="dwi", b=b)
            write_image_atomic(image, path)
            outputs.append(FileRef.of(f"dwi_b{b_label(b)}_n4", path))
        return outputs + [FileRef.of("dwi_biasfield", dwi_field_path)], {}

    out = _run(ctx, patient, "n4", "1", [t2w, *images.dwi], params.model_dump(mode="json"), work)
    return ExamImages(out[0], tuple(r for r in out if r.role.startswith("dwi_b")))
