"""Mono-exponential DWI model: ADC maps and b-value standardisation (pure functions, no Prefect).

Model: ``S(b) = S0 * exp(-b * ADC)`` with b in s/mm² and ADC in mm²/s. Arrays are
``[n_b, ...]`` stacks of volumes, each volume (z, y, x) as ``sitk.GetArrayFromImage`` returns
it; images are 3D SimpleITK images on one grid, keyed by their acquired b-value.

Choices (evidence in ``tests/tasks/test_dwi.py``, ``benchmarks/results/adc_scanner.md``
from ``benchmarks/bench_adc_scanner.py`` and ``benchmarks/results/bvalue.md`` from
``benchmarks/bench_bvalue.py``):

* Fit: log-linear least squares *with* an intercept (S0 is fitted, not taken from the
  lowest-b image). Default ``"ols"``: unweighted, which weighs the b-range evenly as vendor
  ADC maps do, and radiologists read ADC against those maps. Real prostate decay is not
  mono-exponential, so the weighting decides *which* slope is reported. Median signed
  difference to the scanner's ADC map in the gland, on the DWI grid
  (``adc_scanner.md``): ProstateX-0000 (reference mask) +3.5 % (ols) vs +8.3 % (wlls);
  ProstateX-0218 (TAPS gland, series 8 only) -3.9 % (ols) vs -0.5 % (wlls). OLS is the one
  estimator within ±5 % on both; the tests assert it (0000 gland and central box, 0218
  central box). ``"wlls"`` weights each log-signal by the squared *predicted* signal (OLS
  start, then re-weighted; Veraart et al. 2013, NeuroImage 81:335, who show that weights
  from the *measured* signal bias the fit): S² weights favour the low-b end, which puts
  ProstateX-0000 above the scanner map. Trade-off: on synthetic mono-exponential exams with
  Rician noise both are unbiased (median signed error within ±1 %), but ``"wlls"`` reaches
  the Cramér-Rao precision (within 1.1x) and OLS does not (more than 1.15x;
  ``test_adc_accuracy_on_synthetic_exams``). Where a high b sits near the noise floor the
  gap is large: synthetic exam 0 (b 50-1400) has a median absolute ADC error of 6.4 % (ols)
  vs 3.8 % (wlls) raw and 4.6 % vs 2.4 % after SUSAN (printed by the tests in
  ``tests/tasks/test_dwi.py``). Use ``estimator="wlls"`` where precision against a
  mono-exponential model matters more than agreement with vendor maps. Predicting
  ProstateX-0218's b1400 (a separate acquisition, TE 72 vs 60 ms) from b100-800 misses by
  24.9 % (ols) vs 26.9 % (wlls) (``bvalue.md``).
* b-values: values below ``low_b_cutoff`` (50 s/mm², PI-RADS v2.1's preferred low b of
  50-100) carry perfusion; they are left out when at least ``min_fit_b_values`` b-values
  remain, and kept otherwise (so a 0/400/800 exam keeps b0 rather than fitting two
  points). Dropping b0 of ProstateX-0218 (0/100/400/800) lowers the b1400 prediction error
  from 28.2 % to 24.9 % (ols; ``bvalue.md``). The scanner's map of that exam appears to fit
  b0 too: OLS over every acquired b agrees with it better (gland +1.6 %, median absolute
  difference 1.6 % vs 4.4 % without b0; ``adc_scanner.md``); set ``b_values`` to every
  acquired b to reproduce a vendor map that fits b0.
* Noise floor: signals at or below a floor are excluded from a voxel's fit (``"exclude"``)
  or raised to it (``"clip"``); voxels left with one usable b are fitted on clipped signals
  (an ADC lower bound); voxels whose lowest fitted b is at the floor are background:
  S0 = ADC = 0. The floor is a fraction of the 99th percentile of the lowest-b volume by
  default, because prostate DWI fields of view often hold no air to measure noise in
  (ProstateX-0218's lies entirely within the body); with a known noise sigma (e.g. from a
  background region or a noise scan) it is ``floor_sigmas * sigma``.
* Outputs are float32; ADC is stored in mm²/s (not x1e6, not int16-clipped), clipped to
  ``adc_range_mm2_s``. Which b-values were fitted is :func:`select_b_values` (record it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field, model_validator

from tasks.errors import InputError

STEP = "dwi"
B_TOLERANCE = 0.5  # s/mm²: an acquired b within this of the target counts as the target
FIT_CHUNK_VOXELS = 1 << 16  # voxels fitted per vectorised pass


class DwiFitParams(BaseModel, frozen=True, extra="forbid"):
    """Mono-exponential fit settings.

    Attributes
    ----------
    b_values
        Explicit acquired b-values (s/mm²) to fit; ``None`` applies ``low_b_cutoff``.
    low_b_cutoff
        b-values below this (s/mm²) are dropped to avoid perfusion, when at least
        ``min_fit_b_values`` remain.
    min_fit_b_values
        Fewest b-values the cutoff may leave.
    estimator
        ``"ols"`` (default): unweighted log-linear, the convention of vendor ADC maps;
        ``"wlls"``: log-linear, weights = predicted signal² (iterated; less noisy, unbiased
        on mono-exponential data); ``"wlls_measured"``: weights = measured signal².
    wlls_iterations
        Re-weighting passes after the OLS start (``"wlls"`` only).
    noise_floor
        ``"fraction"``: floor = ``floor_fraction`` x 99th percentile of the lowest fitted-b
        volume (inside ``mask`` when given); ``"sigma"``: floor = ``floor_sigmas`` x
        ``noise_sigma``.
    floor_fraction
        See ``noise_floor``.
    noise_sigma
        Magnitude-noise sigma in signal units (required with ``noise_floor="sigma"``).
    floor_sigmas
        See ``noise_floor``.
    floor_handling
        ``"exclude"`` signals at or below the floor from the voxel's fit, or ``"clip"`` them
        up to it.
    adc_range_mm2_s
        ADC clip range (mm²/s); also bounds the ADC used for extrapolation.
    target_b
        b-value (s/mm²) of the standardised high-b image.
    keep_acquired_target
        Keep an acquired ``target_b`` image as it is (default) rather than replacing it by
        the fit's prediction. The prediction pools every b-value and is less noisy (on
        synthetic exams its error against the noise-free truth is about half the acquired
        image's); keeping the acquired image keeps its own contrast and noise texture.
    """

    b_values: tuple[float, ...] | None = None
    low_b_cutoff: float = Field(50.0, ge=0)
    min_fit_b_values: int = Field(3, ge=2)
    estimator: Literal["wlls", "wlls_measured", "ols"] = "ols"
    wlls_iterations: int = Field(2, ge=1, le=20)
    noise_floor: Literal["fraction", "sigma"] = "fraction"
    floor_fraction: float = Field(0.01, ge=0, lt=1)
    noise_sigma: float | None = Field(None, gt=0)
    floor_sigmas: float = Field(1.0, ge=0)
    floor_handling: Literal["exclude", "clip"] = "exclude"
    adc_range_mm2_s: tuple[float, float] = (0.0, 5e-3)
    target_b: float = Field(1000.0, gt=0)
    keep_acquired_target: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> DwiFitParams:
        low, high = self.adc_range_mm2_s
        if not low < high:
            raise ValueError(f"adc_range_mm2_s must be increasing, got {self.adc_range_mm2_s}")
        if self.noise_floor == "sigma" and self.noise_sigma is None:
            raise ValueError("noise_floor='sigma' needs noise_sigma")
        if self.b_values is not None and len(set(self.b_values)) < 2:
            raise ValueError("b_values must name at least two distinct b-values")
        return self


def select_b_values(acquired: Sequence[float], params: DwiFitParams) -> tuple[float, ...]:
    """The acquired b-values (ascending, s/mm²) that the fit uses.

    Raises
    ------
    InputError
        Fewer than two distinct b-values, or an explicit b-value that was not acquired.
    """
    available = sorted({float(b) for b in acquired})
    if len(available) < 2:
        raise InputError(f"need >= 2 distinct b-values, got {available}", step=STEP)
    if params.b_values is not None:
        chosen = []
        for wanted in sorted(set(params.b_values)):
            match = [b for b in available if abs(b - wanted) <= B_TOLERANCE]
            if not match:
                raise InputError(
                    f"b{wanted:g} requested but acquired b-values are {available}",
                    step=STEP,
                    hint="set DwiFitParams.b_values to acquired values, or None",
                )
            chosen.append(match[0])
        return tuple(chosen)
    high = [b for b in available if b >= params.low_b_cutoff]
    return tuple(high) if len(high) >= params.min_fit_b_values else tuple(available)


def noise_floor_value(
    signals: np.ndarray, b_values: Sequence[float], *, params: DwiFitParams, mask=None
) -> float:
    """The floor (signal units) at or below which a signal is not trusted (module docstring)."""
    if params.noise_floor == "sigma":
        return float(params.floor_sigmas * params.noise_sigma)  # type: ignore[operator]
    lowest = np.asarray(signals)[int(np.argmin(b_values))]
    values = lowest[np.asarray(mask, dtype=bool)] if mask is not None else lowest
    values = values.astype(np.float64, copy=False)
    if values.size == 0:
        return 0.0
    return float(params.floor_fraction * np.percentile(values, 99.0))


def _weighted_line(
    logs: np.ndarray, b: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel weighted fit of ``log S = a - b * adc``; returns (a, adc), NaN if singular.

    ``logs`` and ``weights`` are ``[n_b, n_vox]``, ``b`` is ``[n_b, 1]``; the sums run over
    the few b-values as whole-row operations (contiguous, no ``[n_b, n_vox]`` temporaries).
    """
    sw = np.zeros(logs.shape[1:])
    sb, sbb, sy, sby = (np.zeros_like(sw) for _ in range(4))
    for row, b_value in enumerate(b[:, 0]):
        w = weights[row]
        wy = w * logs[row]
        sw += w
        sb += b_value * w
        sbb += (b_value * b_value) * w
        sy += wy
        sby += b_value * wy
    det = sw * sbb - sb * sb
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (sw * sby - sb * sy) / det
        intercept = (sy - slope * sb) / sw
    singular = ~(np.abs(det) > 1e-12 * np.maximum(sw * sbb, 1e-300))
    slope[singular] = np.nan
    intercept[singular] = np.nan
    return intercept, -slope


def _fit_log_linear(
    values: np.ndarray, b: np.ndarray, usable: np.ndarray, params: DwiFitParams
) -> tuple[np.ndarray, np.ndarray]:
    """(log S0, adc) for [n_b, n_vox] positive ``values``; ``usable`` masks points in/out."""
    logs = np.log(values)
    base = usable.astype(np.float64)
    if params.estimator == "wlls_measured":
        return _weighted_line(logs, b, base * values * values)
    intercept, adc = _weighted_line(logs, b, base)
    if params.estimator == "ols":
        return intercept, adc
    low, high = params.adc_range_mm2_s
    for _ in range(params.wlls_iterations):
        predicted = intercept - b * np.clip(adc, low, high)
        # weights = predicted S², scaled per voxel (the solution is scale-invariant)
        weights = base * np.exp(2.0 * (predicted - np.nanmax(predicted, axis=0)))
        new_intercept, new_adc = _weighted_line(logs, b, weights)
        ok = np.isfinite(new_adc)
        intercept = np.where(ok, new_intercept, intercept)
        adc = np.where(ok, new_adc, adc)
    return intercept, adc


def fit_monoexponential(
    signals: np.ndarray,
    b_values: Sequence[float],
    *,
    params: DwiFitParams,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``S = S0 exp(-b ADC)`` per voxel over the b-values :func:`select_b_values` picks.

    Parameters
    ----------
    signals
        ``[n_b, ...]`` magnitudes (any units), one volume per entry of ``b_values``;
        volumes are (z, y, x) when they come from ``sitk.GetArrayFromImage``.
    b_values
        b-value (s/mm²) of each ``signals`` entry.
    params
        See :class:`DwiFitParams`.
    mask
        Optional boolean array of shape ``signals.shape[1:]``; voxels outside get S0 = ADC = 0.

    Returns
    -------
    s0, adc
        float64 arrays of shape ``signals.shape[1:]``: S0 in signal units, ADC in mm²/s
        clipped to ``params.adc_range_mm2_s``. Background voxels (module docstring) are 0.

    Raises
    ------
    InputError
        Mismatched shapes, non-finite signals, or unusable b-values.
    """
    data = np.asarray(signals)
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float64)
    b_all = np.asarray(b_values, dtype=np.float64)
    if data.ndim < 2 or data.shape[0] != b_all.size:
        raise InputError(f"signals {data.shape} do not match {b_all.size} b-values", step=STEP)
    if not np.isfinite(data).all():
        raise InputError("signals contain NaN or infinite values", step=STEP)
    chosen = select_b_values(b_all, params)
    rows = [int(np.flatnonzero(np.abs(b_all - b) <= B_TOLERANCE)[0]) for b in chosen]
    shape = data.shape[1:]
    inside = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    if inside.shape != shape:
        raise InputError(f"mask {inside.shape} does not match volumes {shape}", step=STEP)
    b = np.asarray(chosen)[:, None]
    fitted = data[rows]
    floor = noise_floor_value(fitted, chosen, params=params, mask=mask)
    # Only voxels whose lowest fitted b is above the floor are fitted; the rest are
    # background (S0 = ADC = 0), so they are left out of the arithmetic altogether.
    fit_here = np.flatnonzero(inside & (fitted[0] > np.float64(floor)))
    fitted = fitted.reshape(len(rows), -1)
    low, high = params.adc_range_mm2_s
    s0_flat = np.zeros(fit_here.size)
    adc_flat = np.zeros(fit_here.size)
    # Voxel chunks keep every temporary small (cache-sized, reused by the allocator).
    for start in range(0, fit_here.size, FIT_CHUNK_VOXELS):
        chunk = slice(start, start + FIT_CHUNK_VOXELS)
        log_s0, adc = _fit_voxels(fitted[:, fit_here[chunk]], b, floor, params)
        s0_flat[chunk] = np.exp(np.nan_to_num(log_s0, nan=-np.inf))
        adc_flat[chunk] = np.clip(np.nan_to_num(adc, nan=low), low, high)
    s0_map = np.zeros(shape)
    adc_map = np.zeros(shape)
    s0_map.reshape(-1)[fit_here] = s0_flat
    adc_map.reshape(-1)[fit_here] = adc_flat
    return s0_map, adc_map


def _fit_voxels(
    signals: np.ndarray, b: np.ndarray, floor: float, params: DwiFitParams
) -> tuple[np.ndarray, np.ndarray]:
    """(log S0, ADC) of ``[n_b, n_vox]`` signals whose lowest b is above ``floor``."""
    values = signals.astype(np.float64)
    above = values > floor
    if params.floor_handling == "exclude":
        usable = above & (above.sum(0) >= 2)
        usable[:, ~usable.any(0)] = True  # < 2 usable points: fit clipped signals
    else:
        usable = np.ones_like(above)
    positive_floor = max(floor, np.finfo(np.float64).tiny)
    return _fit_log_linear(np.maximum(values, positive_floor), b, usable, params)


def predict_signal(s0: np.ndarray, adc: np.ndarray, b: float) -> np.ndarray:
    """``S0 * exp(-b * ADC)``: signal at ``b`` (s/mm²) for ADC in mm²/s."""
    return np.asarray(s0) * np.exp(-float(b) * np.asarray(adc))


def through_origin_adc(signals: np.ndarray, b_values: Sequence[float]) -> np.ndarray:
    """ADC (mm²/s) by the widely used through-origin formula, for comparison only.

    ``ADC = -sum_i x_i log(S_i / S_min) / sum_i x_i**2`` with ``x_i = b_i - b_min`` and
    ``S_min`` the lowest-b signal: a line through the origin, no intercept. Non-decaying
    voxels (ADC < 0) and voxels with ``S_min <= 0`` give 0; points with ``S_i <= 0`` are
    left out (the log is undefined). Not clipped above, float64.
    """
    data = np.asarray(signals, dtype=np.float64)
    b = np.asarray(b_values, dtype=np.float64)
    order = np.argsort(b)
    data, b = data[order], b[order]
    x = (b[1:] - b[0]).reshape((-1,) + (1,) * (data.ndim - 1))
    reference = data[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(data[1:] / reference)
        valid = (data[1:] > 0) & (reference > 0)
        numerator = np.where(valid, x * ratio, 0.0).sum(0)
        denominator = np.where(valid, x * x, 0.0).sum(0)
        adc = -numerator / denominator
    adc = np.nan_to_num(adc, nan=0.0, posinf=0.0, neginf=0.0)
    return np.where(reference > 0, np.maximum(adc, 0.0), 0.0)


def _stack(images: Mapping[float, sitk.Image]) -> tuple[np.ndarray, list[float], sitk.Image]:
    """Check one grid; return ``[n_b, z, y, x]`` (ascending b; the images' pixel type),
    b-values and the reference image."""
    if len(images) < 1:
        raise InputError("no DWI volumes", step=STEP)
    b_values = sorted(float(b) for b in images)
    reference = images[min(images, key=float)]
    for b in images:
        image = images[b]
        same = (
            image.GetSize() == reference.GetSize()
            and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
            and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-4)
        )
        if not same:
            raise InputError(
                f"b{float(b):g} is not on the grid of the lowest-b volume",
                step=STEP,
                hint="resample all b-volumes onto one grid (motion correction) first",
            )
    by_b = {float(b): image for b, image in images.items()}
    data = np.stack([sitk.GetArrayViewFromImage(by_b[b]) for b in b_values])
    return data, b_values, reference


def _image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.CopyInformation(reference)
    return image


def _mask(mask: sitk.Image | np.ndarray | None) -> np.ndarray | None:
    if mask is None:
        return None
    return (sitk.GetArrayFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)) > 0


def compute_adc(
    images: Mapping[float, sitk.Image],
    *,
    params: DwiFitParams,
    mask: sitk.Image | np.ndarray | None = None,
) -> sitk.Image:
    """ADC map of a multi-b DWI, float32 in **mm²/s** (not x1e6), on the DWI grid.

    Parameters
    ----------
    images
        Acquired b-value (s/mm²) -> 3D magnitude image, all on one grid (motion-corrected).
    params
        See :class:`DwiFitParams`; :func:`select_b_values` tells which b-values were used.
    mask
        Optional mask (image or (z, y, x) array); ADC is 0 outside.

    Raises
    ------
    InputError
        Volumes on different grids, non-finite voxels, fewer than two b-values.
    """
    data, b_values, reference = _stack(images)
    _, adc = fit_monoexponential(data, b_values, params=params, mask=_mask(mask))
    return _image(adc, reference)


def standardize_b1000(
    images: Mapping[float, sitk.Image],
    *,
    params: DwiFitParams,
    mask: sitk.Image | np.ndarray | None = None,
) -> tuple[sitk.Image, dict[str, Any]]:
    """High-b image at ``params.target_b``: the acquired one if present, else extrapolated.

    Parameters
    ----------
    images
        Acquired b-value (s/mm²) -> 3D magnitude image, all on one grid.
    params
        See :class:`DwiFitParams` (``target_b``, ``keep_acquired_target``, fit settings).
    mask
        Optional mask (image or (z, y, x) array); the prediction is 0 outside.

    Returns
    -------
    image
        float32 on the DWI grid, in the input's signal units.
    info
        ``method`` (``"acquired"`` or ``"extrapolated"``; ``"fitted"`` when the acquired
        target was replaced), ``target_b``, ``acquired_b``, and for a prediction
        ``fit_b_values``, ``estimator``, ``noise_floor`` (signal units) and ``zero_voxels``
        (background or outside the mask).

    Raises
    ------
    InputError
        Volumes on different grids, non-finite voxels, fewer than two b-values.
    """
    data, b_values, reference = _stack(images)
    info: dict[str, Any] = {"target_b": params.target_b, "acquired_b": b_values}
    match = [b for b in b_values if abs(b - params.target_b) <= B_TOLERANCE]
    if match and params.keep_acquired_target:
        kept = next(img for b, img in images.items() if float(b) == match[0])
        info.update(method="acquired", b_value=match[0])
        return sitk.Cast(kept, sitk.sitkFloat32), info
    inside = _mask(mask)
    s0, adc = fit_monoexponential(data, b_values, params=params, mask=inside)
    chosen = select_b_values(b_values, params)
    rows = [b_values.index(b) for b in chosen]
    info.update(
        method="fitted" if match else "extrapolated",
        fit_b_values=list(chosen),
        estimator=params.estimator,
        noise_floor=noise_floor_value(data[rows], chosen, params=params, mask=inside),
        zero_voxels=int(np.count_nonzero(s0 == 0)),
    )
    return _image(predict_signal(s0, adc, params.target_b), reference), info
