"""N4 bias-field correction of T2W and DWI images (pure SimpleITK functions, no Prefect).

The receive-coil field multiplies every image by a smooth, positive field ``B(p)``. N4
(Tustison et al. 2010) estimates ``log B`` as a cubic B-spline so that the log-intensity
histogram inside a foreground mask is as sharp as possible. Its cost grows with the number of
voxels, so the field is fitted on a *shrunk* copy of the image inside a foreground mask, and
the B-spline is then evaluated on the *full-resolution* grid
(``GetLogBiasFieldAsImage(full_image)``) and divided out. On a 384x384x20 T2 (0.5 mm
in-plane) this takes seconds instead of many minutes (``benchmarks/bench_preprocess.py``);
the field is smooth (knots centimetres apart), so fitting it on an 8 mm grid loses nothing
measurable (``benchmarks/bench_n4_grid.py``).

Conventions: images are 3D SimpleITK images in LPS physical space (mm); sizes, spacings and
shrink factors are in ITK index order (x, y, z); numpy arrays from
``sitk.GetArrayFromImage`` are (z, y, x). Outputs are float32 on exactly the input grid.
N4's field has an arbitrary global scale; here the log field is shifted to mean zero inside
the fitting mask, so corrected intensities stay in the input's range and units.

DWI: the field is estimated once, on the lowest b-value (highest SNR, most anatomy), and the
same field divides every b-volume (:func:`correct_bias_dwi`), because the coil sensitivity
is the same for all b-values of one acquisition, a fit on noisy high-b volumes is worse
(correlation with the true log field on 5 synthetic exams: 0.93-0.99 fitted on the lowest
b, 0.76-0.98 fitted on b800), and
one common field leaves every ratio ``S_b / S_0`` (hence ADC) unchanged. The field is
fixed in scanner coordinates, so correct DWI *before* motion correction resamples volumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field, model_validator
from scipy import ndimage

from tasks.errors import InputError
from tasks.registry import N4

STEP = N4.name  # the step's one name: tasks/registry.py
#: Components of the thresholded image smaller than this fraction of the largest are noise.
MIN_COMPONENT_FRACTION = 0.01


class N4Params(BaseModel, frozen=True, extra="forbid"):
    """N4 settings. Defaults were chosen by measurement on synthetic and ProstateX exams.

    Attributes
    ----------
    shrink_factors
        Integer shrink per axis (x, y, z) for the fit. ``None`` (default) derives it from
        ``target_spacing_mm``: ``max(1, floor(target / spacing))`` per axis, i.e. (16, 16, 2)
        for a 0.5x0.5x3 mm T2 and (4, 4, 2) for a 2x2x3 mm DWI. Fixed factors ignore spacing.
    target_spacing_mm
        Spacing (mm) the fit grid approaches when ``shrink_factors`` is ``None``. The final
        knots are about 50 mm apart, so an 8 mm grid still puts 6 samples per span: on the
        phantom it fits the true field as well as 4 mm; on the real exams its field
        correlates 0.96-0.99 with the 4 mm one, the T2 <-> DWI alignment accepts the same
        stages, at a fifth of the time; 12 mm loses accuracy
        (``benchmarks/results/n4_grid.md``).
    iterations
        Maximum iterations per fitting level; its length is the number of levels (the
        B-spline mesh doubles its resolution at each level). Three levels (final knot
        spacing ~50 mm) fitted the synthetic field best (r 0.99 vs 0.85-0.94 with four,
        which starts to absorb anatomy). On real exams N4 stops at the cap, not at
        ``convergence_threshold``; 20 per level fitted the phantom as well as 50 in half the
        time on real exams, but changed ProstateX-0218's accepted T2 <-> DWI stage (affine
        to rigid), so 50 stays (``benchmarks/results/n4_grid.md``).
    convergence_threshold
        Stop a level when the coefficient of variation of the field change drops below this.
    spline_distance_mm
        Initial B-spline knot spacing (mm), as ANTs' ``-b [distance]``: each axis gets
        ``ceil(extent / distance)`` spans (at least 1), i.e. spans + 3 control points.
        300 mm gives one span for both a 192 mm T2 and a 256 mm DWI field of view (final
        knots 48 and 64 mm apart); 200 mm gave the DWI two spans and a field that absorbed
        anatomy (DWI r 0.70-0.98 vs 0.93-0.99). ``None``: 4 control points per axis.
    spline_order
        B-spline order of the field.
    histogram_bins
        Bins of the log-intensity histogram that N4 sharpens.
    bias_fwhm
        Full width at half maximum of the Gaussian that models the field's blur of the
        log-intensity histogram (N4's default; 0.05-0.1 fitted the synthetic fields but
        left N4 idle on real ProstateX images: flat field after one iteration).
    wiener_noise
        Wiener filter noise for the histogram deconvolution.
    mask_method
        Mask when none is given: ``"body"``: :func:`foreground_mask` with ``classes=3``
        (everything above air, dark muscle and fat included); ``"bright"``: ``classes=2``
        (above one Otsu threshold; on ProstateX-0000's T2 it drops the dark obturator
        muscles); ``"none"``: every voxel with positive intensity.
    mask_smoothing_mm
        Gaussian sigma (mm) applied before the Otsu threshold of :func:`foreground_mask`.
    threads
        ITK threads for this step. N4's internal B-spline fitter follows ITK's process-wide
        default thread count, so the step sets that default for the duration of the call
        (concurrent steps in one process should use one value).
    """

    shrink_factors: tuple[int, int, int] | None = None
    target_spacing_mm: float = Field(8.0, gt=0)
    iterations: tuple[int, ...] = (50, 50, 50)
    convergence_threshold: float = Field(1e-3, gt=0)
    spline_distance_mm: float | None = Field(300.0, gt=0)
    spline_order: int = Field(3, ge=1, le=3)
    histogram_bins: int = Field(200, ge=10)
    bias_fwhm: float = Field(0.15, gt=0)
    wiener_noise: float = Field(0.01, gt=0)
    mask_method: Literal["body", "bright", "none"] = "body"
    mask_smoothing_mm: float = Field(2.0, ge=0)
    threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> N4Params:
        if not self.iterations or min(self.iterations) < 1:
            raise ValueError(f"iterations must be non-empty and >= 1, got {self.iterations}")
        if self.shrink_factors is not None and min(self.shrink_factors) < 1:
            raise ValueError(f"shrink_factors must be >= 1, got {self.shrink_factors}")
        return self


def _check_image(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} must be a 3D scalar image, got dimension {image.GetDimension()} with "
            f"{image.GetNumberOfComponentsPerPixel()} components",
            step=STEP,
            hint="split multi-volume series (e.g. by b-value) before bias correction",
        )
    if min(image.GetSize()) < 1 or image.GetNumberOfPixels() < 8:
        raise InputError(f"{what} is empty: size {image.GetSize()}", step=STEP)


def shrink_factors_for(image: sitk.Image, params: N4Params) -> tuple[int, int, int]:
    """Shrink factors (x, y, z) the fit uses for ``image`` (see :class:`N4Params`)."""
    if params.shrink_factors is not None:
        factors = params.shrink_factors
    else:
        factors = tuple(
            max(1, int(math.floor(params.target_spacing_mm / s + 1e-6))) for s in image.GetSpacing()
        )
    # Never shrink an axis below 4 voxels (the B-spline needs support).
    x, y, z = (max(1, min(f, n // 4)) for f, n in zip(factors, image.GetSize(), strict=True))
    return x, y, z


def foreground_mask(
    image: sitk.Image, *, classes: Literal[2, 3] = 3, smoothing_mm: float = 2.0, threads: int = 1
) -> sitk.Image:
    """Foreground mask: Otsu on a smoothed log image, large components, holes filled.

    Otsu (``classes - 1`` thresholds) runs on ``log(1 + I)`` after Gaussian smoothing (sigma
    ``smoothing_mm``); the mask is above the lowest threshold. ``classes=3`` cuts between
    air and the darkest tissue (the body); ``classes=2`` keeps only the brighter part (a
    single Otsu threshold fell between dark muscle and bright fat on ProstateX-0000's T2).
    Connected components of at least :data:`MIN_COMPONENT_FRACTION` of the largest are
    kept (a gland ringed by dark fat can be its own component), and holes are filled in 3D
    and slice by slice (index z).

    Parameters
    ----------
    image
        3D scalar image, any pixel type, LPS.
    classes
        Otsu classes (2: one threshold; 3: the lower of two).
    smoothing_mm
        Gaussian sigma in mm (0 = none).
    threads
        ITK threads for the filters.

    Returns
    -------
    sitk.Image
        uint8 mask (1 = body) on the image's grid.

    Raises
    ------
    InputError
        If the image is not 3D scalar or holds no foreground (constant image).
    """
    _check_image(image, "image")
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    if not np.isfinite(values).all() or float(values.max()) <= float(values.min()):
        raise InputError("image is constant or not finite: no foreground", step=STEP)
    log_image = sitk.GetImageFromArray(np.log1p(np.maximum(values, 0.0)))
    log_image.CopyInformation(image)
    if smoothing_mm > 0:
        smoother = sitk.SmoothingRecursiveGaussianImageFilter()
        smoother.SetSigma(smoothing_mm)
        smoother.SetNumberOfThreads(threads)
        log_image = smoother.Execute(log_image)
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(classes - 1)
    otsu.SetNumberOfHistogramBins(128)
    otsu.SetNumberOfThreads(threads)
    otsu.Execute(log_image)
    mask = log_image > otsu.GetThresholds()[0]
    relabel = sitk.RelabelComponentImageFilter()
    relabel.SetSortByObjectSize(True)
    relabel.SetNumberOfThreads(threads)
    components = sitk.ConnectedComponentImageFilter()
    components.SetNumberOfThreads(threads)
    labels = sitk.GetArrayFromImage(relabel.Execute(components.Execute(mask)))
    sizes = relabel.GetSizeOfObjectsInPixels()
    if not sizes:
        raise InputError("no foreground found by the Otsu threshold", step=STEP)
    keep = sum(1 for size in sizes if size >= MIN_COMPONENT_FRACTION * sizes[0])
    filled = (labels > 0) & (labels <= keep)  # (z, y, x)
    filled = ndimage.binary_fill_holes(filled)
    for k in range(filled.shape[0]):
        filled[k] = ndimage.binary_fill_holes(filled[k])
    out = sitk.GetImageFromArray(filled.astype(np.uint8))
    out.CopyInformation(image)
    return out


@contextmanager
def _process_threads(threads: int) -> Iterator[None]:
    """Set ITK's process-wide default thread count for a block (N4's B-spline fitter uses it).

    Nothing changes when it already is ``threads`` (the pipeline sets it once per worker
    process): changing it while other threads run ITK filters is not safe.
    """
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if previous == threads:
        yield
        return
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _control_points(image: sitk.Image, params: N4Params) -> list[int]:
    if params.spline_distance_mm is None:
        return [params.spline_order + 1] * 3
    extents = [n * s for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    spans = [max(1, math.ceil(e / params.spline_distance_mm)) for e in extents]
    return [s + params.spline_order for s in spans]


def _fit_mask(image: sitk.Image, mask: sitk.Image | None, params: N4Params) -> sitk.Image:
    """The mask N4 fits in: the given or computed foreground, restricted to positive voxels."""
    if mask is None:
        if params.mask_method in ("body", "bright"):
            mask = foreground_mask(
                image,
                classes=3 if params.mask_method == "body" else 2,
                smoothing_mm=params.mask_smoothing_mm,
                threads=params.threads,
            )
        else:
            mask = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
            mask.CopyInformation(image)
    else:
        _check_image(mask, "mask")
        if mask.GetSize() != image.GetSize():
            raise InputError(
                f"mask size {mask.GetSize()} differs from image size {image.GetSize()}",
                step=STEP,
                hint="give a mask on the image's own grid",
            )
        mask = sitk.Cast(mask != 0, sitk.sitkUInt8)
        mask.CopyInformation(image)
    # N4 works on log intensities: zero or negative voxels cannot take part in the fit.
    fit = sitk.And(mask, sitk.Cast(image > 0, sitk.sitkUInt8))
    if int(sitk.GetArrayViewFromImage(fit).sum()) < 64:
        raise InputError(
            "fewer than 64 positive voxels inside the mask: nothing to fit a bias field to",
            step=STEP,
            hint="check the mask and the image intensities",
        )
    return fit


def estimate_log_bias(
    image: sitk.Image, *, params: N4Params, mask: sitk.Image | None = None
) -> tuple[sitk.Image, sitk.Image]:
    """Fit N4 on the shrunk image and return the full-resolution log field and the fit mask.

    Returns
    -------
    (log_bias, fit_mask)
        ``log_bias``: float32 on ``image``'s grid, shifted to mean 0 inside the fit mask;
        ``fit_mask``: uint8 on ``image``'s grid.
    """
    _check_image(image, "image")
    image = sitk.Cast(image, sitk.sitkFloat32)
    with _process_threads(params.threads):
        return _estimate(image, mask, params)


def _estimate(
    image: sitk.Image, mask: sitk.Image | None, params: N4Params
) -> tuple[sitk.Image, sitk.Image]:
    fit_mask = _fit_mask(image, mask, params)
    factors = list(shrink_factors_for(image, params))
    small = sitk.Shrink(image, factors)
    small_mask = sitk.Shrink(fit_mask, factors)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(params.iterations))
    n4.SetConvergenceThreshold(params.convergence_threshold)
    n4.SetNumberOfControlPoints(_control_points(image, params))
    n4.SetSplineOrder(params.spline_order)
    n4.SetNumberOfHistogramBins(params.histogram_bins)
    n4.SetBiasFieldFullWidthAtHalfMaximum(params.bias_fwhm)
    n4.SetWienerFilterNoise(params.wiener_noise)
    n4.SetNumberOfThreads(params.threads)
    n4.Execute(small, small_mask)
    values = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image)).astype(np.float32)
    values -= values[sitk.GetArrayViewFromImage(fit_mask) > 0].mean()
    log_bias = sitk.GetImageFromArray(values)
    log_bias.CopyInformation(image)
    return log_bias, fit_mask


def apply_bias(image: sitk.Image, bias_field: sitk.Image) -> sitk.Image:
    """``image / bias_field`` voxel by voxel (same size), float32 on ``image``'s grid."""
    if image.GetSize() != bias_field.GetSize():
        raise InputError(
            f"bias field size {bias_field.GetSize()} differs from image size {image.GetSize()}",
            step=STEP,
        )
    values = sitk.GetArrayViewFromImage(image).astype(np.float32)
    out = sitk.GetImageFromArray(values / sitk.GetArrayViewFromImage(bias_field))
    out.CopyInformation(image)
    return sitk.Cast(out, sitk.sitkFloat32)


def correct_bias_n4(
    image: sitk.Image, *, params: N4Params, mask: sitk.Image | None = None
) -> tuple[sitk.Image, sitk.Image]:
    """N4 bias-field correction fitted on a shrunk image, applied at full resolution.

    Parameters
    ----------
    image
        3D scalar image (T2W or one DWI volume), LPS, any pixel type.
    params
        N4 settings (:class:`N4Params`).
    mask
        Optional mask on ``image``'s grid (non-zero = fit here); default
        :func:`foreground_mask` (see ``params.mask_method``).

    Returns
    -------
    (corrected, bias_field)
        float32 images on exactly ``image``'s grid: ``corrected = image / bias_field``;
        ``bias_field = exp(log_bias)`` with mean log 0 inside the fit mask.

    Raises
    ------
    InputError
        Not a 3D scalar image, a mask on another grid, or no positive voxels to fit.
    """
    log_bias, _ = estimate_log_bias(image, params=params, mask=mask)
    bias_field = sitk.GetImageFromArray(np.exp(sitk.GetArrayViewFromImage(log_bias)))
    bias_field.CopyInformation(image)
    return apply_bias(image, bias_field), bias_field


def correct_bias_dwi(
    images: dict[float, sitk.Image], *, params: N4Params, mask: sitk.Image | None = None
) -> tuple[dict[float, sitk.Image], sitk.Image]:
    """Estimate one field on the lowest b-value and divide it out of every b-volume.

    Why one field: the coil sensitivity is a property of the acquisition, identical for all
    b-values; high-b volumes have little signal and Rician noise, so a fit on them is worse;
    and dividing every volume by the same field keeps each ratio ``S_b / S_0`` (so the ADC)
    exactly as acquired. Run this before motion correction (the field is fixed in scanner
    coordinates, the volumes are on one grid).

    Parameters
    ----------
    images
        b-value (s/mm²) -> 3D volume; all on one grid (same size, origin, spacing, direction).
    params, mask
        As for :func:`correct_bias_n4`; ``mask`` is on the DWI grid.

    Returns
    -------
    (corrected, bias_field)
        Corrected float32 volumes keyed like ``images`` and the float32 field (DWI grid).

    Raises
    ------
    InputError
        No volumes, or volumes on different grids.
    """
    if not images:
        raise InputError("no DWI volumes given", step=STEP)
    reference_b = min(images)
    reference = images[reference_b]
    for b, volume in images.items():
        _check_image(volume, f"DWI b={b:g}")
        same = volume.GetSize() == reference.GetSize() and all(
            np.allclose(getattr(volume, g)(), getattr(reference, g)(), atol=1e-4)
            for g in ("GetOrigin", "GetSpacing", "GetDirection")
        )
        if not same:
            raise InputError(
                f"DWI b={b:g} is not on the grid of b={reference_b:g}",
                step=STEP,
                hint="all b-volumes of one DWI series must share one grid",
            )
    _, bias_field = correct_bias_n4(reference, params=params, mask=mask)
    return {b: apply_bias(volume, bias_field) for b, volume in images.items()}, bias_field
