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

import re
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
from tasks.dwi import DwiFitParams, compute_adc, standardize_b1000
from tasks.io import write_image_atomic
from tasks.register import (
    RegistrationParams,
    align_dwi_to_t2,
    load_transform,
    motion_correct_dwi,
    resample_to_reference,
    save_transform,
)

B1000 = 1000.0
_DWI_ROLE = re.compile(r"^dwi_b(?P<b>\d+(?:p\d+)?)(?:_|$)")


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
        match = _DWI_ROLE.match(ref.role)
        if match:
            out[float(match["b"].replace("p", "."))] = ref
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
    return ExamImages(out[0], tuple(dwi_refs(out).values()))


@dataclass(frozen=True)
class RegisteredImages:
    """After registration: motion-corrected DWI on the lowest-b grid, the T2->DWI map and
    the b1000 volume resampled onto the T2 grid."""

    t2w: FileRef
    dwi: tuple[FileRef, ...]
    t2_to_dwi: FileRef
    dwi_b1000: FileRef


@task(
    name="register",
    task_run_name="register-{patient}",
    cache_policy=NONE,
    retries=1,
    retry_condition_fn=is_transient,
)
def register_task(
    patient: str, exam_dir: Path, images: ExamImages, ctx: RunContext, params: RegistrationParams
) -> RegisteredImages:
    """Elastix: each b rigidly to the lowest b; T2<->DWI affine; b1000 onto the T2 grid."""
    t2w, refs = images.t2w, dwi_refs(list(images.dwi))

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        volumes = {b: _read(r.path) for b, r in refs.items()}
        corrected, transforms = motion_correct_dwi(volumes, params=params)
        outputs = []
        for b, image in sorted(corrected.items()):
            path = derivative_path(exam_dir, datatype="dwi", desc="moco", suffix="dwi", b=b)
            write_image_atomic(image, path)
            outputs.append(FileRef.of(f"dwi_b{b_label(b)}_moco", path))
            tfm = exam_dir / "xfm" / f"{path.name.removesuffix('.nii.gz')}_to-lowb.tfm"
            save_transform(transforms[b], tfm)
            outputs.append(FileRef.of(f"xfm_b{b_label(b)}_to_lowb", tfm))
        t2 = _read(t2w.path)
        alignment = align_dwi_to_t2(t2, corrected[min(corrected)], params=params)
        tfm = exam_dir / "xfm" / f"{exam_dir.parent.name}_{exam_dir.name}_from-T2w_to-dwi.tfm"
        save_transform(alignment.transform, tfm)
        outputs.append(FileRef.of("xfm_t2_to_dwi", tfm))
        b1000 = resample_to_reference(
            corrected[B1000], t2, alignment.transform, threads=params.threads
        )
        prefix = f"{exam_dir.parent.name}_{exam_dir.name}"
        path = exam_dir / "dwi" / f"{prefix}_space-T2w_b1000_dwi.nii.gz"
        write_image_atomic(b1000, path)
        outputs.append(FileRef.of("dwi_b1000", path))
        return outputs, {}

    out = _run(
        ctx, patient, "register", "1", [t2w, *images.dwi], params.model_dump(mode="json"), work
    )
    return RegisteredImages(
        t2w=t2w,
        dwi=tuple(r for r in dwi_refs(out).values() if r.role.endswith("_moco")),
        t2_to_dwi=next(r for r in out if r.role == "xfm_t2_to_dwi"),
        dwi_b1000=next(r for r in out if r.role == "dwi_b1000"),
    )


@task(
    name="adc",
    task_run_name="adc-{patient}",
    cache_policy=NONE,
    retries=1,
    retry_condition_fn=is_transient,
)
def adc_task(
    patient: str,
    exam_dir: Path,
    images: RegisteredImages,
    acquired_b: tuple[float, ...],
    ctx: RunContext,
    params: DwiFitParams,
) -> dict[str, FileRef]:
    """ADC (mm²/s, float32) from the co-registered ACQUIRED b-volumes; also on the T2 grid.

    An extrapolated b1000 is never part of the fit (it is itself a fit of these volumes).
    """
    refs = {
        b: r
        for b, r in dwi_refs(list(images.dwi)).items()
        if any(abs(b - a) <= 1 for a in acquired_b)
    }

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        adc = compute_adc({b: _read(r.path) for b, r in refs.items()}, params=params)
        prefix = f"{exam_dir.parent.name}_{exam_dir.name}"
        native = exam_dir / "dwi" / f"{prefix}_desc-fit_adc.nii.gz"
        write_image_atomic(adc, native)
        t2 = _read(images.t2w.path)
        on_t2 = resample_to_reference(adc, t2, load_transform(images.t2_to_dwi.path))
        t2_grid = exam_dir / "dwi" / f"{prefix}_space-T2w_desc-fit_adc.nii.gz"
        write_image_atomic(on_t2, t2_grid)
        return [FileRef.of("adc_native", native), FileRef.of("adc", t2_grid)], {}

    inputs = [*refs.values(), images.t2w, images.t2_to_dwi]
    out = _run(
        ctx,
        patient,
        "adc",
        "1",
        inputs,
        params.model_dump(mode="json") | {"fit_b_values": sorted(refs)},
        work,
    )
    return {r.role: r for r in out} | {"t2w": images.t2w, "dwi_b1000": images.dwi_b1000}
