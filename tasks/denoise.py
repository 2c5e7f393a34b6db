"""Denoising: T2W curvature anisotropic diffusion and DWI SUSAN (pure functions, no Prefect).

Conventions: images are 3D SimpleITK images in LPS physical space (mm); numpy volumes are
(z, y, x) as ``sitk.GetArrayFromImage`` returns them, so spacings passed with arrays are
``spacing_zyx`` (mm), the reverse of ``image.GetSpacing()``. Outputs are float32 on exactly
the input grid.

T2W: ``CurvatureAnisotropicDiffusionImageFilter`` (Whitaker & Xue 2001) with an explicit
time step. ITK's explicit scheme is stable only for ``dt <= min spacing / 2**(D + 1)``
(:func:`stable_time_step`; 0.03125 for a 0.5 mm T2). With the filter's default 0.0625 on a
0.5 mm T2, ITK warns and the result oscillates instead of converging (measured: flat-region
noise variance back at the input's level after 20 iterations, no overflow), so ``"auto"``
uses the stable step and a given step above it is refused. At one thread the filter runs as
:func:`tasks.curvature_diffusion.curvature_diffusion` (numpy, the same voxels, faster), at
more threads as ITK's multi-threaded filter.

DWI: SUSAN (Smith & Brady 1997) exactly as FSL's ``susan`` computes it, per 3D volume, with
``sigma = fwhm / sqrt(8 ln 2)`` (nipype passes ``fwhm`` and converts it the same way):

* spatial weight ``K(d) = exp(-|d * s|**2 / (2 sigma**2))`` over integer offsets ``d`` with
  ``|d_i| <= ceil(c * sigma / s_i)``, ``c = 2`` in 3D; in 2D the in-plane reach uses
  ``c = 4`` and z collapses to the slice itself. ``K`` is not normalised; the centre
  (``K = 1``) is included.
* brightness weight ``B = exp(-(I_n - I_c)**2 / bt**2)`` (divisor ``bt**2``, not ``2 bt**2``);
  with a USAN image, ``I`` in ``B`` comes from that image.
* output ``sum(K B I_n) / sum(K B)`` over the neighbours inside the image (no padding); if
  ``use_median`` and ``sum(K B) < 1.5`` (an isolated voxel: almost no similar neighbours),
  the median of the 3x3x3 (3D) or 3x3 (2D) in-image neighbours excluding the centre.

Small, deliberate differences from the FSL binary: FSL looks ``B`` up in a table whose
intensity step is (max - min) / 16384 and accumulates in float32, here ``B`` is exact and
sums are float64 (cast to float32 at the end); FSL's robust range (negative ``bt``) is its
histogram estimate of the 2nd/98th percentiles, here ``np.percentile``.
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field, PositiveFloat

from tasks.curvature_diffusion import curvature_diffusion
from tasks.errors import InputError
from tasks.registry import DENOISE

STEP = DENOISE.name  # the step's one name: tasks/registry.py
FWHM_TO_SIGMA = 1.0 / math.sqrt(8.0 * math.log(2.0))  # sigma = fwhm / 2.3548...
MEDIAN_TRIGGER = 1.5  # FSL: use the local median when sum(K * B) < 1.5


# ------------------------------------------------------------------------------------- T2W


class T2DenoiseParams(BaseModel, frozen=True, extra="forbid"):
    """Curvature anisotropic diffusion of the T2W image.

    Attributes
    ----------
    iterations
        Diffusion iterations (explicit time steps).
    conductance
        Edge threshold relative to the image's mean gradient magnitude (ITK's conductance
        parameter, dimensionless); larger smooths more across edges.
    time_step
        ``"auto"``: :func:`stable_time_step` of the image spacing. A number (in the filter's
        units, mm when the image spacing is used) is accepted only up to that limit.
    threads
        1: the numpy filter (:mod:`tasks.curvature_diffusion`, single-threaded); more: ITK's
        filter with that many threads (set explicitly, never the global default). Both give
        the same voxels.
    """

    iterations: int = Field(5, ge=1, le=100)
    conductance: float = Field(1.0, gt=0)
    time_step: Literal["auto"] | PositiveFloat = "auto"
    threads: int = Field(1, ge=1)


def stable_time_step(spacing: Sequence[float]) -> float:
    """Largest stable time step ``min(spacing) / 2**(D + 1)``, D = ``len(spacing)`` (mm).

    E.g. 0.03125 for a (0.5, 0.5, 3.0) mm T2 and 0.125 for a (2, 2, 3) mm DWI.
    """
    return float(min(spacing)) / 2.0 ** (len(spacing) + 1)


def resolve_time_step(image: sitk.Image, params: T2DenoiseParams) -> float:
    """The time step :func:`denoise_t2` uses for ``image`` (for provenance).

    Raises
    ------
    InputError
        If a numeric ``params.time_step`` exceeds :func:`stable_time_step`.
    """
    limit = stable_time_step(image.GetSpacing())
    if params.time_step == "auto":
        return limit
    step = float(params.time_step)
    if step > limit * (1 + 1e-9):
        raise InputError(
            f"time step {step:g} exceeds the stable limit {limit:g} for spacing "
            f"{tuple(round(s, 4) for s in image.GetSpacing())} mm",
            step=STEP,
            hint="use time_step='auto' or a value <= min spacing / 2**(D+1)",
        )
    return step


def denoise_t2(image: sitk.Image, *, params: T2DenoiseParams) -> sitk.Image:
    """Curvature anisotropic diffusion of a T2W image (float32 in, float32 out).

    ``image`` is a 3D T2W image (spacing in mm), cast to float32; the result is float32 on
    the same grid in the same intensity units. The step used is :func:`resolve_time_step`.

    Raises
    ------
    InputError
        Non-3D image, non-finite voxels, or a time step above the stable limit.
    """
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got {image.GetDimension()}D", step=STEP)
    step = resolve_time_step(image, params)
    source = sitk.Cast(image, sitk.sitkFloat32)
    if not np.isfinite(sitk.GetArrayViewFromImage(source)).all():
        raise InputError("T2W image has NaN or infinite voxels", step=STEP)
    if params.threads == 1:  # the same voxels as ITK's filter, in a quarter of the time
        values = curvature_diffusion(
            sitk.GetArrayViewFromImage(source),
            source.GetSpacing()[::-1],
            iterations=params.iterations,
            conductance=params.conductance,
            time_step=step,
        )
        out = sitk.GetImageFromArray(values)
        out.CopyInformation(source)
        return out
    flt = sitk.CurvatureAnisotropicDiffusionImageFilter()
    flt.SetNumberOfIterations(params.iterations)
    flt.SetConductanceParameter(params.conductance)
    flt.SetTimeStep(step)
    flt.SetNumberOfThreads(params.threads)
    return flt.Execute(source)


# ------------------------------------------------------------------------------------ SUSAN


class SusanParams(BaseModel, frozen=True, extra="forbid"):
    """SUSAN settings for DWI volumes.

    Attributes
    ----------
    fwhm_mm
        Spatial kernel FWHM (mm); ``sigma = fwhm / 2.3548``. 4 mm on 2x2x3 mm DWI reaches two
        voxels along each axis. Much smaller kernels (2 mm on 2 mm voxels) make
        ``sum(K B) < 1.5`` almost everywhere, so SUSAN turns into the 3x3x3 median (it raised
        lesion ADC by 13-15 % on synthetic exams; 4 mm: median -0.1 to +5 %).
    brightness_threshold
        ``bt`` in the volume's intensity units. ``None``: ``bt_median_fraction`` x the median
        inside the mask, or, without a mask, inside the foreground (voxels above 10 % of the
        2nd-98th percentile range, FSL FEAT's brain threshold), computed per volume.
        Negative: FSL's rule, (98th - 2nd percentile) / 10 of the volume.
    bt_median_fraction
        Fraction of the median used when ``brightness_threshold`` is ``None`` (0.75, the
        convention of nipype's ``create_susan_smooth`` and FEAT).
    dimension
        3: fully 3D kernel; 2: within-slice only.
    use_median
        Replace isolated voxels (``sum(K B) < 1.5``) by the local median.
    backend
        ``"auto"``: FSL via nipype when ``susan`` is on PATH, else native; ``"native"``;
        ``"fsl"`` (an error when ``susan`` is missing).
    """

    fwhm_mm: float = Field(4.0, gt=0)
    brightness_threshold: float | None = None
    bt_median_fraction: float = Field(0.75, gt=0)
    dimension: Literal[2, 3] = 3
    use_median: bool = True
    backend: Literal["auto", "native", "fsl"] = "auto"


def resolve_brightness_threshold(
    volume: np.ndarray, *, params: SusanParams, mask: np.ndarray | None = None
) -> float:
    """The ``bt`` SUSAN uses for ``volume`` (intensity units), per :class:`SusanParams`.

    A negative configured threshold is returned as FSL's (98th - 2nd percentile) / 10.

    Raises
    ------
    InputError
        If the mask (or foreground) is empty or the resulting ``bt`` is not positive.
    """
    values = np.asarray(volume, dtype=np.float64)
    bt = params.brightness_threshold
    low, high = (float(v) for v in np.percentile(values, [2.0, 98.0]))
    if bt is not None and bt < 0:
        bt = (high - low) / 10.0
    elif bt is None:
        if mask is not None:
            inside = values[np.asarray(mask, dtype=bool)]
        else:
            inside = values[values > low + 0.1 * (high - low)]
        if inside.size == 0:
            raise InputError("no voxels to take the SUSAN brightness median from", step=STEP)
        bt = params.bt_median_fraction * float(np.median(inside))
    if not bt > 0:
        raise InputError(
            f"SUSAN brightness threshold must be > 0, got {bt}",
            step=STEP,
            hint="check the mask and the volume's intensities, or set brightness_threshold",
        )
    return float(bt)


def _reach(spacing_zyx: Sequence[float], sigma: float, dimension: int) -> tuple[int, int, int]:
    """Kernel half-widths (z, y, x) in voxels, as FSL's ``gaussian_kernel3D`` sizes them."""
    sz, sy, sx = (float(s) for s in spacing_zyx)
    if dimension == 3:
        return tuple(math.ceil(2.0 * sigma / s) for s in (sz, sy, sx))  # type: ignore[return-value]
    return 0, math.ceil(4.0 * sigma / sy), math.ceil(4.0 * sigma / sx)


def _shifted(offset: int, size: int) -> tuple[slice, slice]:
    """(target, source) slices so that target[i] pairs with source[i] = target[i] + offset."""
    if offset >= 0:
        return slice(0, size - offset), slice(offset, size)
    return slice(-offset, size), slice(0, size + offset)


def _local_median(volume: np.ndarray, where: np.ndarray, dimension: int) -> np.ndarray:
    """Median of the in-image 3x3x3 (3D) / 3x3 (2D) neighbours of ``where``, centre excluded."""
    pad_z = 1 if dimension == 3 else 0
    padded = np.pad(volume, ((pad_z, pad_z), (1, 1), (1, 1)), constant_values=np.nan)
    z, y, x = np.nonzero(where)
    offsets = [
        d for d in itertools.product(range(-pad_z, pad_z + 1), (-1, 0, 1), (-1, 0, 1)) if any(d)
    ]
    neighbours = np.stack(
        [padded[z + pad_z + dz, y + 1 + dy, x + 1 + dx] for dz, dy, dx in offsets]
    )
    return np.nanmedian(neighbours, axis=0)


def susan_native(
    volume: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    fwhm_mm: float,
    bt: float,
    dimension: Literal[2, 3] = 3,
    use_median: bool = True,
    usan: np.ndarray | None = None,
    usan_bt: float | None = None,
) -> np.ndarray:
    """SUSAN smoothing of one 3D volume, exactly as FSL defines it (module docstring).

    ``volume`` is (z, y, x) with voxel size ``spacing_zyx`` (mm); ``fwhm_mm`` is the spatial
    FWHM (mm), ``bt`` the brightness threshold (intensity units), ``dimension`` 3 or 2
    (within slices), ``use_median`` the fallback for ``sum(K B) < 1.5``. An optional
    ``usan`` image (z, y, x) sets ``B`` instead of ``volume`` (threshold ``usan_bt``, default
    ``bt``); the averaged values still come from ``volume``. Returns float32 (z, y, x).

    Vectorised: one pass of array slicing per pair of opposite kernel offsets, in two reused
    scratch buffers.
    """
    source = np.asarray(volume, dtype=np.float64)
    if source.ndim != 3:
        raise InputError(f"SUSAN needs a 3D (z, y, x) volume, got shape {source.shape}", step=STEP)
    if not (fwhm_mm > 0 and bt > 0) or dimension not in (2, 3):
        raise InputError(f"bad SUSAN settings fwhm={fwhm_mm}, bt={bt}, dim={dimension}", step=STEP)
    reference = source if usan is None else np.asarray(usan, dtype=np.float64)
    if reference.shape != source.shape:
        raise InputError(f"USAN shape {reference.shape} != volume {source.shape}", step=STEP)
    inv_bt2 = 1.0 / float(usan_bt if usan is not None and usan_bt else bt) ** 2
    sigma = fwhm_mm * FWHM_TO_SIGMA
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    num = source.copy()  # the centre: K = 1, B = 1
    den = np.ones_like(source)
    # Two scratch buffers reused for every offset (fresh whole-volume temporaries per
    # offset cost more than the arithmetic); the results are bit-identical to plain numpy.
    weight_buffer, term_buffer = np.empty(source.size), np.empty(source.size)
    reach = _reach(spacing, sigma, dimension)
    for offset in itertools.product(*(range(-r, r + 1) for r in reach)):
        if offset <= (0, 0, 0):
            continue  # each pair (p, p + d) is weighted once and credited to both voxels
        distance2 = float(np.sum((np.asarray(offset) * spacing) ** 2))
        kernel = math.exp(-distance2 / (2.0 * sigma * sigma))
        pairs = [_shifted(o, n) for o, n in zip(offset, source.shape, strict=True)]
        here = tuple(t for t, _ in pairs)
        there = tuple(s for _, s in pairs)
        shape = reference[here].shape
        weight = weight_buffer[: math.prod(shape)].reshape(shape)
        term = term_buffer[: weight.size].reshape(shape)
        # weight = kernel * exp(-(I_there - I_here)**2 / bt**2)
        np.subtract(reference[there], reference[here], out=weight)
        np.multiply(weight, weight, out=weight)
        np.multiply(weight, -inv_bt2, out=weight)
        np.exp(weight, out=weight)
        np.multiply(weight, kernel, out=weight)
        num[here] += np.multiply(weight, source[there], out=term)
        den[here] += weight
        num[there] += np.multiply(weight, source[here], out=term)
        den[there] += weight
    result = num / den
    if use_median:
        isolated = den < MEDIAN_TRIGGER
        if isolated.any() and source.size > 1:
            result[isolated] = _local_median(source, isolated, dimension)
    return result.astype(np.float32)


def susan_fsl(
    volume: np.ndarray,
    spacing_zyx: Sequence[float],
    *,
    fwhm_mm: float,
    bt: float,
    dimension: Literal[2, 3] = 3,
    use_median: bool = True,
) -> np.ndarray:
    """SUSAN by FSL's ``susan`` through ``nipype.interfaces.fsl.SUSAN`` (same arguments and
    result as :func:`susan_native`).

    The volume goes to a temporary NIfTI carrying its spacing (FSL sizes the kernel from the
    header's voxel dimensions) and comes back as float32 (z, y, x). Raises
    :class:`InputError` when ``susan`` is not on PATH.
    """
    if shutil.which("susan") is None:
        raise InputError(
            "FSL 'susan' is not on PATH",
            step=STEP,
            hint="install FSL and put $FSLDIR/bin on PATH, or use backend='native'",
        )
    image = sitk.GetImageFromArray(np.asarray(volume, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_zyx))))
    with tempfile.TemporaryDirectory(prefix="susan-") as folder:
        source, target = Path(folder) / "in.nii.gz", Path(folder) / "out.nii.gz"
        sitk.WriteImage(image, str(source))
        node = susan_interface(
            source, target, fwhm_mm=fwhm_mm, bt=bt, dimension=dimension, use_median=use_median
        )
        node.run(cwd=folder)
        smoothed = sitk.ReadImage(str(target), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(smoothed)


def susan_interface(
    in_file: Path,
    out_file: Path,
    *,
    fwhm_mm: float,
    bt: float,
    dimension: Literal[2, 3] = 3,
    use_median: bool = True,
):  # -> nipype.interfaces.fsl.SUSAN (imported lazily: nipype is slow to import)
    """The configured nipype ``SUSAN`` interface (its ``.cmdline`` is the FSL call)."""
    from nipype.interfaces.fsl import SUSAN

    return SUSAN(
        in_file=str(in_file),
        out_file=str(out_file),
        fwhm=float(fwhm_mm),
        brightness_threshold=float(bt),
        dimension=int(dimension),
        use_median=int(bool(use_median)),
        output_type="NIFTI_GZ",
    )


SusanBackend = Callable[..., np.ndarray]
#: The SUSAN implementations by name (the registry the CLI and flows read).
SUSAN_BACKENDS: dict[str, SusanBackend] = {"native": susan_native, "fsl": susan_fsl}


def resolve_susan_backend(backend: Literal["auto", "native", "fsl"]) -> str:
    """``"native"`` or ``"fsl"``: ``auto`` picks FSL only when ``susan`` is on PATH.

    Raises
    ------
    InputError
        ``backend="fsl"`` without ``susan`` on PATH.
    """
    available = shutil.which("susan") is not None
    if backend == "auto":
        return "fsl" if available else "native"
    if backend == "fsl" and not available:
        raise InputError(
            "SUSAN backend 'fsl' requested but FSL 'susan' is not on PATH",
            step=STEP,
            hint="install FSL (and set FSLDIR), or use backend='auto' or 'native'",
        )
    return backend


def _mask_array(mask: sitk.Image | np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    array = sitk.GetArrayFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
    if array.shape != shape:
        raise InputError(f"mask shape {array.shape} != image shape {shape}", step=STEP)
    return array.astype(bool)


def denoise_dwi(
    images: Mapping[float, sitk.Image],
    *,
    params: SusanParams,
    mask: sitk.Image | np.ndarray | None = None,
) -> dict[float, sitk.Image]:
    """SUSAN-smooth every DWI volume separately (one ``bt`` per volume).

    ``images`` maps b-value (s/mm²) to 3D images on one grid; the result has the same keys
    and float32 images with the input geometry. ``mask`` (image or (z, y, x) array) only
    selects the voxels of the brightness-threshold median (:func:`resolve_brightness_threshold`
    gives each volume's ``bt`` for provenance). The backend is resolved once for all volumes.

    Raises
    ------
    InputError
        No images, mismatched grids, bad mask, or an unavailable backend.
    """
    if not images:
        raise InputError("no DWI volumes to denoise", step=STEP)
    backend = SUSAN_BACKENDS[resolve_susan_backend(params.backend)]
    reference = next(iter(images.values()))
    out: dict[float, sitk.Image] = {}
    for b_value, image in images.items():
        if image.GetSize() != reference.GetSize() or not np.allclose(
            image.GetSpacing(), reference.GetSpacing()
        ):
            raise InputError(f"b{b_value:g} is not on the grid of the other volumes", step=STEP)
        volume = sitk.GetArrayFromImage(image).astype(np.float32)
        inside = _mask_array(mask, volume.shape)
        bt = resolve_brightness_threshold(volume, params=params, mask=inside)
        smoothed = backend(
            volume,
            tuple(reversed(image.GetSpacing())),
            fwhm_mm=params.fwhm_mm,
            bt=bt,
            dimension=params.dimension,
            use_median=params.use_median,
        )
        result = sitk.GetImageFromArray(smoothed.astype(np.float32))
        result.CopyInformation(image)
        out[b_value] = result
    return out
