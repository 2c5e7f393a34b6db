"""The per-exam preprocessing chain as plain functions (images in, images out).

Order: denoising (:func:`denoise_exam`), N4 (:func:`correct_bias_exam`), motion correction of
every b-volume onto the lowest b and the checked T2 <-> DWI alignment
(:func:`register_exam`), then the b1000 image and the ADC map, each fitted on aligned
volumes (:func:`fit_maps`); :func:`preprocess_exam` runs them all in memory. The Prefect
tasks in ``flows/preprocess.py`` wrap the same functions step by step with file I/O and
provenance; the benchmarks call :func:`preprocess_exam`, so they time what runs.

Grids: *native* maps are on the lowest-b DWI grid (fitted on the motion-corrected volumes);
*T2-grid* maps are fitted on the acquired volumes resampled onto the T2 grid in one
interpolation each, through the composed map T2 -> lowest b -> volume b
(:func:`dwi_on_t2`), never by resampling an already resampled image.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import SimpleITK as sitk

from tasks.align import Alignment, align_dwi_to_t2
from tasks.bias import N4Params, correct_bias_dwi, correct_bias_n4
from tasks.denoise import SusanParams, T2DenoiseParams, denoise_dwi, denoise_t2
from tasks.dwi import DwiFitParams, compute_adc, standardize_b1000
from tasks.register import (
    RegistrationParams,
    motion_correct_dwi,
    resample_to_reference,
    transform_to_matrix,
)

T = TypeVar("T")


def denoise_exam(
    t2: sitk.Image,
    dwi: Mapping[float, sitk.Image],
    *,
    t2_params: T2DenoiseParams,
    susan: SusanParams,
) -> tuple[sitk.Image, dict[float, sitk.Image]]:
    """T2: curvature anisotropic diffusion; every DWI volume (b in s/mm²): SUSAN."""
    return denoise_t2(t2, params=t2_params), (denoise_dwi(dict(dwi), params=susan) if dwi else {})


@dataclass(frozen=True)
class BiasCorrected:
    """N4 results: the T2 and its field; the DWI volumes and their one shared field."""

    t2: sitk.Image
    t2_field: sitk.Image
    dwi: dict[float, sitk.Image]
    dwi_field: sitk.Image


def correct_bias_exam(
    t2: sitk.Image, dwi: Mapping[float, sitk.Image], *, params: N4Params
) -> BiasCorrected:
    """N4 on the T2; one N4 field, fitted on the lowest b, divided out of every DWI volume."""
    t2_corrected, t2_field = correct_bias_n4(t2, params=params)
    dwi_corrected, dwi_field = correct_bias_dwi(dict(dwi), params=params)
    return BiasCorrected(t2_corrected, t2_field, dwi_corrected, dwi_field)


@dataclass(frozen=True)
class RegisteredDwi:
    """Motion-corrected DWI, the per-b motion maps and the T2 -> DWI alignment.

    ``moco``: b (s/mm²) -> volume on the lowest-b grid; ``motion``: b -> map of lowest-b
    points to volume-b points (identity for the lowest b); ``alignment.transform``: T2
    points -> lowest-b DWI points (mm, LPS).
    """

    moco: dict[float, sitk.Image]
    motion: dict[float, sitk.AffineTransform]
    alignment: Alignment


def register_exam(
    t2: sitk.Image, dwi: Mapping[float, sitk.Image], *, params: RegistrationParams
) -> RegisteredDwi:
    """Rigid motion correction within the DWI, then the checked T2 <-> DWI alignment."""
    moco, motion = motion_correct_dwi(dict(dwi), params=params)
    alignment = align_dwi_to_t2(t2, moco[min(moco)], params=params)
    return RegisteredDwi(moco, motion, alignment)


def composed(t2_to_dwi: sitk.Transform, dwi_to_volume: sitk.Transform) -> sitk.AffineTransform:
    """The map T2 point -> volume-b point: ``dwi_to_volume(t2_to_dwi(p))``."""
    matrix = transform_to_matrix(dwi_to_volume) @ transform_to_matrix(t2_to_dwi)
    return sitk.AffineTransform(matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist())


def dwi_on_t2(
    dwi: Mapping[float, sitk.Image],
    motion: Mapping[float, sitk.Transform],
    t2_to_dwi: sitk.Transform,
    t2: sitk.Image,
    *,
    threads: int = 1,
) -> dict[float, sitk.Image]:
    """Every b-volume (its own acquired grid) on the T2 grid, each interpolated once (linear)."""
    return {
        b: resample_to_reference(image, t2, composed(t2_to_dwi, motion[b]), threads=threads)
        for b, image in dwi.items()
    }


@dataclass(frozen=True)
class FittedMaps:
    """b1000 and ADC on the native (lowest-b) grid and on the T2 grid.

    ADC in mm²/s (float32); b1000 in the DWI's signal units. ``b1000_info`` is
    :func:`tasks.dwi.standardize_b1000`'s record (acquired or extrapolated, b-values used).
    """

    b1000_native: sitk.Image
    b1000_t2: sitk.Image
    adc_native: sitk.Image
    adc_t2: sitk.Image
    b1000_info: dict[str, Any]


def fit_b1000(
    moco: Mapping[float, sitk.Image],
    on_t2: Mapping[float, sitk.Image],
    *,
    params: DwiFitParams,
) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    """b = ``params.target_b`` image on both grids: acquired if present, else extrapolated."""
    native, info = standardize_b1000(moco, params=params)
    on_t2_grid, _ = standardize_b1000(on_t2, params=params)
    return native, on_t2_grid, info


def fit_adc(
    moco: Mapping[float, sitk.Image],
    on_t2: Mapping[float, sitk.Image],
    *,
    params: DwiFitParams,
) -> tuple[sitk.Image, sitk.Image]:
    """ADC (mm²/s) on both grids from the acquired b-volumes."""
    return compute_adc(moco, params=params), compute_adc(on_t2, params=params)


def fit_maps(
    registered: RegisteredDwi,
    dwi: Mapping[float, sitk.Image],
    t2: sitk.Image,
    *,
    params: DwiFitParams,
    threads: int = 1,
) -> FittedMaps:
    """b1000 and ADC of one exam from its registered DWI (see the module docstring)."""
    on_t2 = dwi_on_t2(dwi, registered.motion, registered.alignment.transform, t2, threads=threads)
    b1000_native, b1000_t2, info = fit_b1000(registered.moco, on_t2, params=params)
    adc_native, adc_t2 = fit_adc(registered.moco, on_t2, params=params)
    return FittedMaps(b1000_native, b1000_t2, adc_native, adc_t2, info)


@dataclass(frozen=True)
class ChainParams:
    """The parameters of every step of :func:`preprocess_exam` (defaults: the pipeline's)."""

    t2_denoise: T2DenoiseParams = field(default_factory=T2DenoiseParams)
    susan: SusanParams = field(default_factory=SusanParams)
    n4: N4Params = field(default_factory=N4Params)
    registration: RegistrationParams = field(default_factory=RegistrationParams)
    dwi_fit: DwiFitParams = field(default_factory=DwiFitParams)


@dataclass(frozen=True)
class PreprocessedExam:
    """Every intermediate of one exam's chain (see :func:`preprocess_exam`)."""

    t2_denoised: sitk.Image
    dwi_denoised: dict[float, sitk.Image]
    bias: BiasCorrected
    registered: RegisteredDwi
    maps: FittedMaps


def _call(name: str, function: Callable[[], T]) -> T:
    return function()


def preprocess_exam(
    t2: sitk.Image,
    dwi: Mapping[float, sitk.Image],
    *,
    params: ChainParams | None = None,
    threads: int = 1,
    step: Callable[[str, Callable[[], Any]], Any] = _call,
) -> PreprocessedExam:
    """One exam's chain in memory: denoise -> N4 -> register -> b1000 and ADC fits.

    ``dwi`` maps acquired b-values (s/mm²) to volumes. ``step(name, function)`` runs each
    stage (``denoise``, ``n4``, ``register``, ``fit_maps``) and returns its result: a
    benchmark passes a timer there. The Prefect flow runs the same functions one task each.
    """
    params = params or ChainParams()
    t2_d, dwi_d = step(
        "denoise",
        lambda: denoise_exam(t2, dwi, t2_params=params.t2_denoise, susan=params.susan),
    )
    bias = step("n4", lambda: correct_bias_exam(t2_d, dwi_d, params=params.n4))
    registered = step(
        "register", lambda: register_exam(bias.t2, bias.dwi, params=params.registration)
    )
    maps = step(
        "fit_maps",
        lambda: fit_maps(registered, bias.dwi, bias.t2, params=params.dwi_fit, threads=threads),
    )
    return PreprocessedExam(t2_d, dwi_d, bias, registered, maps)
