"""Per-exam preprocessing chain as Prefect tasks: one task run per step and exam.

Order: denoising -> N4 -> registration (motion correction, checked T2 <-> DWI alignment)
-> b-value standardisation -> ADC, so that every voxel-wise fit sees aligned b-volumes
(:mod:`tasks.chain`). Each step reads the previous step's files, writes its own atomically
and is cached and recorded through :func:`flows.steps.execute_step`. File names
(:mod:`tasks.derivatives`)::

    <exam>/anat/<p>_<s>_desc-denoised_T2w.nii.gz            T2 after anisotropic diffusion
    <exam>/dwi/<p>_<s>_b<b>_desc-denoised_dwi.nii.gz        DWI after SUSAN
    <exam>/anat/<p>_<s>_desc-n4_T2w.nii.gz                  T2 after N4 (+ _desc-n4_biasfield)
    <exam>/dwi/<p>_<s>_b<b>_desc-n4_dwi.nii.gz              DWI after N4 (one field for all b)
    <exam>/dwi/<p>_<s>_b<b>_desc-moco_dwi.nii.gz            DWI on the lowest-b grid
    <exam>/xfm/<p>_<s>_b<b>_to-lowb.tfm, ..._from-T2w_to-dwi.tfm   ITK transforms (mm, LPS)
    <exam>/dwi/<p>_<s>_b1000_desc-standardized_dwi.nii.gz   b1000, lowest-b grid
    <exam>/dwi/<p>_<s>_space-T2w_b1000_dwi.nii.gz           b1000, T2 grid
    <exam>/dwi/<p>_<s>_desc-fit_adc.nii.gz                  ADC (mm²/s), lowest-b grid
    <exam>/dwi/<p>_<s>_space-T2w_desc-fit_adc.nii.gz        ADC (mm²/s), T2 grid
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from flows.resources import apply_thread_limits
from flows.steps import FileRef, RunContext, execute_step, step_task
from tasks.align import align_dwi_to_t2
from tasks.bias import N4Params
from tasks.chain import (
    correct_bias_exam,
    denoise_exam,
    dwi_on_t2,
    fit_adc,
    fit_b1000,
    register_exam,
)
from tasks.denoise import SusanParams, T2DenoiseParams, denoise_dwi
from tasks.derivatives import b_from_label, b_label, derivative_path
from tasks.dwi import DwiFitParams, select_b_values
from tasks.errors import InputError
from tasks.io import write_image_atomic
from tasks.register import (
    RegistrationParams,
    load_transform,
    resample_to_reference,
    save_transform,
)
from tasks.registry import ADC, B1000, DENOISE, N4, REGISTER, StepSpec

B1000_S_MM2 = 1000.0
_DWI_ROLE = re.compile(r"^dwi_b(?P<b>\d+(?:p\d+)?)(?:_|$)")


@dataclass(frozen=True)
class ExamImages:
    """The current images of one exam between steps: T2W and the DWI volumes (by role).

    An exam without acquired DWI (PI-CAI layout: T2W, scanner ADC, computed high-b "hbv")
    has ``dwi=()`` and the high-b image as ``hbv``; ``adc_scanner`` is carried along
    unchanged (the scanner's ADC map, mm²/s), and the steps that need acquired b-values
    use these instead and say so in their recorded details.
    """

    t2w: FileRef
    dwi: tuple[FileRef, ...]
    hbv: FileRef | None = None
    adc_scanner: FileRef | None = None

    def inputs(self) -> list[FileRef]:
        return [self.t2w, *self.dwi, *([self.hbv] if self.hbv else [])]


def _read(path: str | Path) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def dwi_refs(refs: list[FileRef]) -> dict[float, FileRef]:
    """``{b: ref}`` from refs whose role is ``dwi_b<b>`` (any suffix after the b-value)."""
    out = {}
    for ref in refs:
        match = _DWI_ROLE.match(ref.role)
        if match:
            out[b_from_label(match["b"])] = ref
    return out


def _run(
    ctx: RunContext,
    patient: str,
    spec: StepSpec,
    inputs: list[FileRef],
    params: dict[str, Any],
    work: Callable[[], tuple[list[FileRef], dict[str, Any]]],
) -> tuple[list[FileRef], dict[str, Any]]:
    """Outputs and recorded details (also on a cache hit) of one step."""
    apply_thread_limits(ctx.threads)
    outcome = execute_step(
        ctx,
        patient=patient,
        step=spec.name,
        version=spec.version,
        inputs=inputs,
        parameters=params,
        run=work,
    )
    return list(outcome.outputs), dict(outcome.details or {})


@step_task(DENOISE)
def denoise_task(
    patient: str,
    exam_dir: Path,
    images: ExamImages,
    ctx: RunContext,
    t2_params: T2DenoiseParams,
    susan: SusanParams,
) -> ExamImages:
    """T2: curvature anisotropic diffusion; DWI (every acquired b, or the hbv): SUSAN."""
    t2w, refs = images.t2w, dwi_refs(list(images.dwi))

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        t2, volumes = denoise_exam(
            _read(t2w.path),
            {b: _read(r.path) for b, r in refs.items()},
            t2_params=t2_params,
            susan=susan,
        )
        t2_path = derivative_path(exam_dir, datatype="anat", desc="denoised", suffix="T2w")
        write_image_atomic(t2, t2_path)
        outputs = [FileRef.of("t2w_denoised", t2_path)]
        for b, image in sorted(volumes.items()):
            path = derivative_path(exam_dir, datatype="dwi", desc="denoised", suffix="dwi", b=b)
            write_image_atomic(image, path)
            outputs.append(FileRef.of(f"dwi_b{b_label(b)}_denoised", path))
        if images.hbv is not None:
            hbv = denoise_dwi({0.0: _read(images.hbv.path)}, params=susan)[0.0]
            path = derivative_path(exam_dir, datatype="dwi", desc="denoised", suffix="hbv")
            write_image_atomic(hbv, path)
            outputs.append(FileRef.of("hbv_denoised", path))
        return outputs, {}

    params = {"t2": t2_params.model_dump(mode="json"), "susan": susan.model_dump(mode="json")}
    out = _run(ctx, patient, DENOISE, images.inputs(), params, work)[0]
    return _next_images(out, images)


def _next_images(out: list[FileRef], before: ExamImages) -> ExamImages:
    """The images a step passes on: its T2, its DWI volumes, its hbv; the scanner ADC."""
    return ExamImages(
        t2w=out[0],
        dwi=tuple(dwi_refs(out).values()),
        hbv=next((r for r in out if r.role.startswith("hbv_")), None),
        adc_scanner=before.adc_scanner,
    )


@step_task(N4)
def n4_task(
    patient: str, exam_dir: Path, images: ExamImages, ctx: RunContext, params: N4Params
) -> ExamImages:
    """N4 on T2; one N4 field (from the lowest b) divided out of every DWI volume."""
    t2w, refs = images.t2w, dwi_refs(list(images.dwi))

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        # no acquired DWI (PI-CAI): the DWI field is fitted on the hbv itself
        dwi = {b: _read(r.path) for b, r in refs.items()} or {
            0.0: _read(_hbv(images, N4.name).path)
        }
        bias = correct_bias_exam(_read(t2w.path), dwi, params=params)
        t2_path = derivative_path(exam_dir, datatype="anat", desc="n4", suffix="T2w")
        field_path = derivative_path(exam_dir, datatype="anat", desc="n4", suffix="biasfield")
        write_image_atomic(bias.t2, t2_path)
        write_image_atomic(bias.t2_field, field_path)
        outputs = [FileRef.of("t2w_n4", t2_path), FileRef.of("t2w_biasfield", field_path)]
        dwi_field_path = derivative_path(exam_dir, datatype="dwi", desc="n4", suffix="biasfield")
        write_image_atomic(bias.dwi_field, dwi_field_path)
        for b, image in sorted(bias.dwi.items()):
            if refs:
                path = derivative_path(exam_dir, datatype="dwi", desc="n4", suffix="dwi", b=b)
                role = f"dwi_b{b_label(b)}_n4"
            else:
                path = derivative_path(exam_dir, datatype="dwi", desc="n4", suffix="hbv")
                role = "hbv_n4"
            write_image_atomic(image, path)
            outputs.append(FileRef.of(role, path))
        return outputs + [FileRef.of("dwi_biasfield", dwi_field_path)], {}

    out = _run(ctx, patient, N4, images.inputs(), params.model_dump(mode="json"), work)[0]
    return _next_images(out, images)


@dataclass(frozen=True)
class RegisteredImages:
    """After registration: the N4-corrected DWI on their own grids, the same motion-corrected
    onto the lowest-b grid, the per-b motion maps, the T2 -> DWI map; after the b1000 step
    also the b1000 image on the T2 grid."""

    t2w: FileRef
    dwi: tuple[FileRef, ...]
    moco: tuple[FileRef, ...]
    motion: tuple[FileRef, ...]
    t2_to_dwi: FileRef
    dwi_b1000: FileRef | None = None
    hbv: FileRef | None = None
    adc_scanner: FileRef | None = None
    alignment: dict[str, Any] = field(default_factory=dict, compare=False)
    """The register step's recorded details (:meth:`tasks.align.Alignment.details`)."""

    def inputs(self) -> list[FileRef]:
        """Every file the DWI fits read."""
        extra = [r for r in (self.hbv, self.adc_scanner) if r is not None and not self.dwi]
        return [self.t2w, *self.dwi, *self.moco, *self.motion, self.t2_to_dwi, *extra]


def t2_to_dwi_path(exam_dir: Path) -> Path:
    """The T2 -> DWI map (ITK, LPS): ``xfm/<p>_<s>_from-T2w_to-dwi.tfm``."""
    return derivative_path(exam_dir, "xfm", suffix=None, extension=".tfm", to="dwi", **_FROM_T2)


_FROM_T2 = {"from": "T2w"}  # "from" is a Python keyword


@step_task(REGISTER)
def register_task(
    patient: str, exam_dir: Path, images: ExamImages, ctx: RunContext, params: RegistrationParams
) -> RegisteredImages:
    """Elastix: each b rigidly to the lowest b; the checked T2 <-> DWI alignment.

    The accepted stage, the similarities before and after, the scale factors and the
    translation are recorded as the step's details (:meth:`tasks.align.Alignment.details`).
    """
    t2w, refs = images.t2w, dwi_refs(list(images.dwi))
    if not refs:
        return _register_hbv(patient, exam_dir, images, ctx, params)

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        volumes = {b: _read(r.path) for b, r in refs.items()}
        registered = register_exam(_read(t2w.path), volumes, params=params)
        outputs = []
        for b, image in sorted(registered.moco.items()):
            path = derivative_path(exam_dir, datatype="dwi", desc="moco", suffix="dwi", b=b)
            write_image_atomic(image, path)
            outputs.append(FileRef.of(f"dwi_b{b_label(b)}_moco", path))
            tfm = derivative_path(exam_dir, "xfm", suffix=None, extension=".tfm", b=b, to="lowb")
            save_transform(registered.motion[b], tfm)
            outputs.append(FileRef.of(f"xfm_b{b_label(b)}_to_lowb", tfm))
        tfm = t2_to_dwi_path(exam_dir)
        save_transform(registered.alignment.transform, tfm)
        outputs.append(FileRef.of("xfm_t2_to_dwi", tfm))
        return outputs, registered.alignment.details()

    inputs = [t2w, *images.dwi]
    out, details = _run(ctx, patient, REGISTER, inputs, params.model_dump(mode="json"), work)
    return RegisteredImages(
        t2w=t2w,
        dwi=tuple(images.dwi),
        moco=tuple(r for r in dwi_refs(out).values() if r.role.endswith("_moco")),
        motion=tuple(r for r in out if r.role.startswith("xfm_b")),
        t2_to_dwi=next(r for r in out if r.role == "xfm_t2_to_dwi"),
        alignment=details,
    )


def _hbv(images: ExamImages | RegisteredImages, step: str) -> FileRef:
    """The computed high-b image of an exam without acquired DWI (an error if it has none)."""
    if images.hbv is None:
        raise InputError(
            "no DWI: neither acquired b-volumes nor a computed high-b image", step=step
        )
    return images.hbv


_NO_B_VALUES = "no acquired b-values (T2W, scanner ADC and computed high b only, e.g. PI-CAI)"


def _register_hbv(
    patient: str, exam_dir: Path, images: ExamImages, ctx: RunContext, params: RegistrationParams
) -> RegisteredImages:
    """Registration of an exam without acquired DWI: the checked T2 <-> DWI alignment with
    the hbv as the DWI reference; no motion correction (one volume)."""
    hbv = _hbv(images, REGISTER.name)

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        alignment = align_dwi_to_t2(_read(images.t2w.path), _read(hbv.path), params=params)
        tfm = t2_to_dwi_path(exam_dir)
        save_transform(alignment.transform, tfm)
        skipped = f"motion correction skipped: {_NO_B_VALUES}; the hbv is the DWI reference"
        return [FileRef.of("xfm_t2_to_dwi", tfm)], alignment.details() | {"skipped": skipped}

    inputs = [images.t2w, hbv]
    out, details = _run(ctx, patient, REGISTER, inputs, params.model_dump(mode="json"), work)
    return RegisteredImages(
        t2w=images.t2w,
        dwi=(),
        moco=(),
        motion=(),
        t2_to_dwi=out[0],
        hbv=hbv,
        adc_scanner=images.adc_scanner,
        alignment=details,
    )


_XFM_ROLE = re.compile(r"^xfm_b(?P<b>\d+(?:p\d+)?)_to_lowb$")


def _load_registered(
    images: RegisteredImages, threads: int
) -> tuple[dict[float, sitk.Image], dict[float, sitk.Image], sitk.Image]:
    """(motion-corrected volumes, the volumes on the T2 grid, the T2) of one exam."""
    moco = {b: _read(r.path) for b, r in dwi_refs(list(images.moco)).items()}
    motion = {}
    for ref in images.motion:
        match = _XFM_ROLE.match(ref.role)
        if match:
            motion[b_from_label(match["b"])] = load_transform(ref.path)
    native = {b: _read(r.path) for b, r in dwi_refs(list(images.dwi)).items()}
    t2 = _read(images.t2w.path)
    t2_to_dwi = load_transform(images.t2_to_dwi.path)
    return moco, dwi_on_t2(native, motion, t2_to_dwi, t2, threads=threads), t2


@step_task(B1000)
def standardize_task(
    patient: str, exam_dir: Path, images: RegisteredImages, ctx: RunContext, params: DwiFitParams
) -> RegisteredImages:
    """b1000 (acquired, or extrapolated from the motion-corrected b-volumes) on both grids.

    Details recorded: ``method`` (acquired / extrapolated), the b-values fitted.
    """

    if not images.dwi:
        return _hbv_as_b1000(patient, exam_dir, images, ctx, params)

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        moco, on_t2, _ = _load_registered(images, ctx.threads)
        native, t2_grid, info = fit_b1000(moco, on_t2, params=params)
        path = derivative_path(
            exam_dir, datatype="dwi", desc="standardized", suffix="dwi", b=B1000_S_MM2
        )
        write_image_atomic(native, path)
        on_t2_path = derivative_path(exam_dir, "dwi", suffix="dwi", space="T2w", b=B1000_S_MM2)
        write_image_atomic(t2_grid, on_t2_path)
        outputs = [FileRef.of("b1000_native", path), FileRef.of("dwi_b1000", on_t2_path)]
        return outputs, info

    out = _run(ctx, patient, B1000, images.inputs(), params.model_dump(mode="json"), work)[0]
    return replace(images, dwi_b1000=next(r for r in out if r.role == "dwi_b1000"))


def _on_t2(ref: FileRef, images: RegisteredImages, threads: int) -> sitk.Image:
    """One image of the DWI space resampled onto the T2 grid through the alignment."""
    t2 = _read(images.t2w.path)
    transform = load_transform(images.t2_to_dwi.path)
    return resample_to_reference(_read(ref.path), t2, transform, threads=threads)


def _stand_in(
    patient: str,
    exam_dir: Path,
    images: RegisteredImages,
    ctx: RunContext,
    params: DwiFitParams,
    *,
    spec: StepSpec,
    source: FileRef,
    suffix: str,
    desc: str | None,
    role: str,
    method: str,
    why: str,
) -> FileRef:
    """An exam without acquired b-values: step ``spec`` records why it was skipped and writes
    ``source`` (the hbv or the scanner ADC) on the T2 grid as its output ``role``."""

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        path = derivative_path(exam_dir, "dwi", suffix=suffix, space="T2w", desc=desc)
        write_image_atomic(_on_t2(source, images, ctx.threads), path)
        return [FileRef.of(role, path)], {"method": method, "skipped": why}

    inputs = [images.t2w, source, images.t2_to_dwi]
    return _run(ctx, patient, spec, inputs, params.model_dump(mode="json"), work)[0][0]


def _hbv_as_b1000(
    patient: str, exam_dir: Path, images: RegisteredImages, ctx: RunContext, params: DwiFitParams
) -> RegisteredImages:
    """No acquired b-values: the computed high-b image (hbv) is the high-b channel."""
    b1000 = _stand_in(
        patient,
        exam_dir,
        images,
        ctx,
        params,
        spec=B1000,
        source=_hbv(images, B1000.name),
        suffix="hbv",
        desc=None,
        role="dwi_b1000",
        method="computed high b (hbv)",
        why=f"b1000 standardisation skipped: {_NO_B_VALUES}",
    )
    return replace(images, dwi_b1000=b1000)


def _scanner_adc(
    patient: str, exam_dir: Path, images: RegisteredImages, ctx: RunContext, params: DwiFitParams
) -> dict[str, FileRef]:
    """No acquired b-values: the scanner's ADC map (mm²/s) stands for the fitted one."""
    adc = images.adc_scanner
    if adc is None or images.dwi_b1000 is None:
        raise InputError(f"no ADC: {_NO_B_VALUES} and no scanner ADC map", step=ADC.name)
    on_t2 = _stand_in(
        patient,
        exam_dir,
        images,
        ctx,
        params,
        spec=ADC,
        source=adc,
        suffix="adc",
        desc="scanner",
        role="adc",
        method="scanner ADC map",
        why=f"ADC fit skipped: {_NO_B_VALUES}; the scanner's ADC map is used",
    )
    return {"adc_native": adc, "adc": on_t2, "t2w": images.t2w, "dwi_b1000": images.dwi_b1000}


@step_task(ADC)
def adc_task(
    patient: str, exam_dir: Path, images: RegisteredImages, ctx: RunContext, params: DwiFitParams
) -> dict[str, FileRef]:
    """ADC (mm²/s, float32) from the co-registered acquired b-volumes, on both grids.

    Only acquired b-values are fitted (an extrapolated b1000 is itself a fit of them).
    """
    if images.dwi_b1000 is None:
        raise ValueError("adc_task needs the b1000 step's output (run standardize_task first)")
    if not images.dwi:
        return _scanner_adc(patient, exam_dir, images, ctx, params)

    def work() -> tuple[list[FileRef], dict[str, Any]]:
        moco, on_t2, _ = _load_registered(images, ctx.threads)
        native, t2_grid = fit_adc(moco, on_t2, params=params)
        native_path = derivative_path(exam_dir, "dwi", suffix="adc", desc="fit")
        write_image_atomic(native, native_path)
        t2_path = derivative_path(exam_dir, "dwi", suffix="adc", desc="fit", space="T2w")
        write_image_atomic(t2_grid, t2_path)
        outputs = [FileRef.of("adc_native", native_path), FileRef.of("adc", t2_path)]
        return outputs, {"fit_b_values": list(select_b_values(sorted(moco), params))}

    out = _run(ctx, patient, ADC, images.inputs(), params.model_dump(mode="json"), work)[0]
    return {r.role: r for r in out} | {"t2w": images.t2w, "dwi_b1000": images.dwi_b1000}
