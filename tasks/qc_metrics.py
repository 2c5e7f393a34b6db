"""Measured quality-control metrics of one exam and one mask (no Prefect, no database).

:func:`exam_qc_metrics` turns the images a run produced into a flat ``{name: value}`` record
(:data:`METRICS` lists every name with its unit and meaning); :mod:`tasks.qc_flags` judges
it. Values are floats, ``None`` where a metric does not apply (no acquired DWI, no scanner
ADC, one model), or a short string (the accepted registration stage, the b-values).

Conventions: physical space LPS, mm; index axis 2 is the T2's slice axis (axial for axial
T2), so "first slice" is the lowest index; volumes in mL; ADC in µm²/s (= 1e-6 mm²/s, the
unit scanners store) in the metrics, while the images stay in mm²/s.

Grids: ``t2``, ``mask``, ``adc`` and ``b1000`` on the T2 grid; ``dwi`` (acquired b-volumes
after motion correction) and ``adc_scanner`` on the DWI grid; ``t2_to_dwi`` maps T2 physical
points to DWI physical points (:func:`tasks.align.align_dwi_to_t2`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from tasks.errors import InputError
from tasks.measure import require_same_grid
from tasks.register import resample_to_reference
from tasks.registry import QC

STEP = QC.name

Value = float | str | None

#: Every metric: name -> (unit, meaning). The one definition the flags, the CLI and the
#: report read; ``dice_vs_<model>`` / ``volume_diff_ml_vs_<model>`` repeat per other model.
METRICS: dict[str, tuple[str, str]] = {
    # registration (the register step's recorded details)
    "reg_stage": ("", "accepted T2 <-> DWI stage: affine, rigid or identity"),
    "reg_similarity_identity": ("NMI", "T2 vs lowest-b DWI similarity in scanner coordinates"),
    "reg_similarity_accepted": ("NMI", "the same similarity after the accepted stage"),
    "reg_scale_deviation": ("fraction", "largest |scale factor - 1| of the accepted map"),
    "reg_translation_mm": ("mm", "length of the accepted map's translation of the region"),
    # alignment after registration, measured independently of it
    "residual_shift_mm": ("mm", "shift of the DWI on the T2 grid that best matches the T2"),
    # DWI
    "dwi_b_values": ("s/mm²", "acquired b-values used, comma separated"),
    "dwi_decay_ratio": ("ratio", "gland mean at the highest b / at the lowest b"),
    "dwi_decay_rises": ("count", "consecutive b pairs where the gland mean rises with b"),
    "dwi_lowb_snr": ("ratio", "lowest-b gland mean / standard deviation (MRIQC's snr)"),
    "adc_gland_median_um2_s": ("µm²/s", "median of our ADC in the gland"),
    "adc_vs_scanner_um2_s": ("µm²/s", "median signed difference ours - scanner in the gland"),
    "adc_vs_scanner_rel": ("fraction", "median signed (ours - scanner) / scanner in the gland"),
    "adc_clip_fraction": ("fraction", "gland voxels at the ADC clip limits"),
    # segmentation
    "volume_ml": ("mL", "gland volume (every labelled voxel)"),
    "components": ("count", "26-connected components of the mask"),
    "outside_largest_fraction": ("fraction", "mask volume outside the largest component"),
    "holes_ml": ("mL", "enclosed background inside the mask"),
    "touches_first_slice": ("0/1", "mask on the T2's first slice (gland may be cut off)"),
    "touches_last_slice": ("0/1", "mask on the T2's last slice (gland may be cut off)"),
    "touches_border": ("0/1", "mask on the in-plane edge of the T2 field of view"),
    "mask_slices": ("count", "T2 slices holding the mask"),
    "slice_coverage": ("fraction", "mask slices / T2 slices"),
    "edge_outside_ratio": ("ratio", "strongest T2 edge 1-5 mm outside the mask / at its outline"),
    "uncertainty_mean": ("probability", "mean 1 - p(predicted label) in the mask"),
    # image
    "t2_slice_spacing_mm": ("mm", "T2 slice spacing"),
    "t2_pixel_mm": ("mm", "largest T2 in-plane pixel size"),
    "dwi_slice_spacing_mm": ("mm", "DWI slice spacing"),
    "dwi_covers_mask": ("fraction", "mask voxels inside the DWI field of view"),
}
#: Agreement with another model's mask: prefix + the other model's label.
AGREEMENT_PREFIXES = ("dice_vs_", "volume_diff_ml_vs_")

#: Residual shift search: in-plane and through-plane half-ranges (mm) and the region margin.
SHIFT_RANGE_MM = 8.0
SHIFT_MARGIN_MM = 10.0
_NMI_BINS = 32


@dataclass(frozen=True)
class QcImages:
    """One exam's images for QC (grids and units: module docstring)."""

    t2: sitk.Image
    mask: sitk.Image
    adc: sitk.Image | None = None
    b1000: sitk.Image | None = None
    dwi: Mapping[float, sitk.Image] = field(default_factory=dict)
    """Acquired b-volumes (s/mm² -> image), motion corrected, DWI grid."""
    dwi_reference: sitk.Image | None = None
    """The DWI-grid image the T2 <-> DWI alignment used: the lowest b, or the computed high
    b of an exam without acquired b-values (PI-CAI)."""
    t2_to_dwi: sitk.Transform | None = None
    adc_scanner: sitk.Image | None = None
    others: Mapping[str, sitk.Image] = field(default_factory=dict)
    """Other models' label maps on the T2 grid, by model label."""


def exam_qc_metrics(
    images: QcImages,
    *,
    registration: Mapping[str, Any] | None = None,
    adc_range_mm2_s: tuple[float, float] = (0.0, 5e-3),
    uncertainty_mean: float | None = None,
) -> dict[str, Value]:
    """Every metric of :data:`METRICS` (``None`` where it does not apply).

    Parameters
    ----------
    registration
        The register step's details (:meth:`tasks.align.Alignment.details`).
    adc_range_mm2_s
        The fit's ADC clip range (mm²/s), for ``adc_clip_fraction``.
    uncertainty_mean
        From the segmentation step, for models that give probabilities.
    """
    t2, mask = images.t2, images.mask
    for name, image in (("t2", t2), ("mask", mask)):
        if image.GetDimension() != 3:
            raise InputError(f"QC: {name} must be a 3D image", step=STEP)
    require_same_grid(t2, mask, what="mask vs t2", step=STEP)
    gland = sitk.GetArrayFromImage(mask) > 0  # (z, y, x)
    out: dict[str, Value] = dict.fromkeys(METRICS)
    out.update(registration_metrics(registration))
    out.update(segmentation_metrics(mask))
    out["uncertainty_mean"] = _round(uncertainty_mean)
    out.update(_spacing_metrics(t2, images.dwi))
    for label, other in images.others.items():
        out.update(agreement_metrics(mask, other, label))
    if not gland.any():
        return out  # nothing to measure inside the gland
    out["edge_outside_ratio"] = _round(edge_outside_ratio(t2, gland), 3)
    if images.adc is not None:
        out.update(adc_metrics(images.adc, gland, adc_range_mm2_s))
    reference = images.dwi_reference
    if images.t2_to_dwi is not None and reference is not None:
        out["dwi_covers_mask"] = _round(dwi_coverage(mask, reference, images.t2_to_dwi))
        if images.dwi:
            out.update(decay_metrics(images.dwi, _mask_on(reference, mask, images.t2_to_dwi)))
        low = resample_to_reference(reference, t2, images.t2_to_dwi)
        out["residual_shift_mm"] = _round(residual_shift_mm(t2, low, gland), 2)
        if images.adc_scanner is not None and images.adc is not None:
            scanner = resample_to_reference(images.adc_scanner, t2, images.t2_to_dwi)
            out.update(scanner_adc_metrics(images.adc, scanner, gland))
    return out


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def registration_metrics(details: Mapping[str, Any] | None) -> dict[str, Value]:
    """The accepted stage, similarities, largest scale deviation and translation length."""
    if not details:
        return {}
    scales = details.get("scales") or [1.0, 1.0, 1.0]
    translation = details.get("translation_mm") or [0.0, 0.0, 0.0]
    return {
        "reg_stage": details.get("accepted_stage"),
        "reg_similarity_identity": _round(details.get("similarity_identity")),
        "reg_similarity_accepted": _round(details.get("similarity_accepted")),
        "reg_scale_deviation": _round(max(abs(float(s) - 1.0) for s in scales)),
        "reg_translation_mm": _round(float(np.linalg.norm(translation)), 2),
    }


def segmentation_metrics(mask: sitk.Image) -> dict[str, Value]:
    """Volume, components, holes, cut-off and coverage of the mask (every label = gland)."""
    binary = sitk.Cast(mask != 0, sitk.sitkUInt8)
    array = sitk.GetArrayViewFromImage(binary).astype(bool)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    count = int(array.sum())
    slices = array.any(axis=(1, 2))
    out: dict[str, Value] = {
        "volume_ml": round(count * voxel_ml, 3),
        "mask_slices": int(slices.sum()),
        "slice_coverage": _round(float(slices.mean())),
        "touches_first_slice": float(slices[0]),
        "touches_last_slice": float(slices[-1]),
        "touches_border": float(
            array[:, 0, :].any()
            or array[:, -1, :].any()
            or array[:, :, 0].any()
            or array[:, :, -1].any()
        ),
    }
    if count == 0:
        return out | {"components": 0.0, "outside_largest_fraction": None, "holes_ml": 0.0}
    components = sitk.ConnectedComponent(binary, True)  # 26-connected
    sizes = np.bincount(sitk.GetArrayViewFromImage(components).ravel())[1:]
    filled = ndimage.binary_fill_holes(array)  # holes: background not face-connected out
    return out | {
        "components": float(len(sizes)),
        "outside_largest_fraction": _round(1.0 - sizes.max() / count),
        "holes_ml": round(float((filled & ~array).sum()) * voxel_ml, 3),
    }


def agreement_metrics(mask: sitk.Image, other: sitk.Image, label: str) -> dict[str, Value]:
    """Dice of the two glands and the volume difference (mL, this minus the other)."""
    require_same_grid(mask, other, what=f"mask of {label} vs mask", step=STEP)
    a = sitk.GetArrayViewFromImage(mask) != 0
    b = sitk.GetArrayViewFromImage(other) != 0
    total = int(a.sum()) + int(b.sum())
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    dice = 2.0 * int((a & b).sum()) / total if total else None
    return {
        f"dice_vs_{label}": _round(dice),
        f"volume_diff_ml_vs_{label}": round((int(a.sum()) - int(b.sum())) * voxel_ml, 3),
    }


def adc_metrics(
    adc: sitk.Image, gland: np.ndarray, adc_range_mm2_s: tuple[float, float]
) -> dict[str, Value]:
    """Median ADC in the gland (µm²/s) and the fraction of gland voxels at the clip limits."""
    values = sitk.GetArrayViewFromImage(adc)[gland].astype(np.float64)
    low, high = adc_range_mm2_s
    tolerance = 1e-9  # mm²/s: the fit writes the limits exactly (float32)
    clipped = (values <= low + tolerance) | (values >= high * (1 - 1e-6))
    return {
        "adc_gland_median_um2_s": _round(float(np.median(values)) * 1e6, 1),
        "adc_clip_fraction": _round(float(clipped.mean())),
    }


def scanner_adc_metrics(
    adc: sitk.Image, scanner: sitk.Image, gland: np.ndarray
) -> dict[str, Value]:
    """Our ADC vs the scanner's (both mm²/s, T2 grid) over gland voxels the scanner fitted."""
    ours = sitk.GetArrayViewFromImage(adc)[gland].astype(np.float64)
    theirs = sitk.GetArrayViewFromImage(scanner)[gland].astype(np.float64)
    fitted = theirs > 0
    if not fitted.any():
        return {}
    difference = ours[fitted] - theirs[fitted]
    return {
        "adc_vs_scanner_um2_s": _round(float(np.median(difference)) * 1e6, 1),
        "adc_vs_scanner_rel": _round(float(np.median(difference / theirs[fitted]))),
    }


def _mask_on(reference: sitk.Image, mask: sitk.Image, t2_to_dwi: sitk.Transform) -> np.ndarray:
    """The T2-grid mask on ``reference``'s (DWI) grid: nearest neighbour, through the
    inverse of ``t2_to_dwi``."""
    dwi_to_t2 = t2_to_dwi.GetInverse()
    binary = sitk.Cast(mask != 0, sitk.sitkFloat32)
    on = resample_to_reference(binary, reference, dwi_to_t2, interpolator="nearest")
    return sitk.GetArrayViewFromImage(on) > 0.5


def dwi_coverage(mask: sitk.Image, dwi: sitk.Image, t2_to_dwi: sitk.Transform) -> float:
    """Fraction of the mask's voxel centres that map inside the DWI volume."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) != 0)[:, ::-1]  # (i, j, k)
    if len(index) == 0:
        return float("nan")
    step = max(1, len(index) // 20000)  # a sample is enough for a fraction
    size = np.asarray(dwi.GetSize())
    inside = 0
    for i, j, k in index[::step]:
        point = mask.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        continuous = dwi.TransformPhysicalPointToContinuousIndex(t2_to_dwi.TransformPoint(point))
        inside += bool(
            np.all(np.asarray(continuous) >= -0.5) and np.all(np.asarray(continuous) <= size - 0.5)
        )
    return inside / len(index[::step])


def decay_metrics(dwi: Mapping[float, sitk.Image], gland_on_dwi: np.ndarray) -> dict[str, Value]:
    """Gland mean per b (DWI grid): highest/lowest ratio, rises, and the lowest b's SNR."""
    if not gland_on_dwi.any():
        return {"dwi_b_values": _b_text(dwi)}
    means, snr = [], None
    for b in sorted(dwi):
        values = sitk.GetArrayViewFromImage(dwi[b])[gland_on_dwi].astype(np.float64)
        means.append(float(values.mean()))
        if snr is None:  # lowest b: mean / std (n - 1 in the denominator, as MRIQC)
            std = float(values.std(ddof=1)) if values.size > 1 else 0.0
            snr = values.mean() / std if std > 0 else float("nan")
    rises = sum(later > earlier for earlier, later in zip(means, means[1:], strict=False))
    return {
        "dwi_b_values": _b_text(dwi),
        "dwi_decay_ratio": _round(means[-1] / means[0]) if means[0] > 0 else None,
        "dwi_decay_rises": float(rises),
        "dwi_lowb_snr": _round(snr, 2),
    }


def _b_text(dwi: Mapping[float, sitk.Image]) -> str:
    return ",".join(f"{b:g}" for b in sorted(dwi))


def _spacing_metrics(t2: sitk.Image, dwi: Mapping[float, sitk.Image]) -> dict[str, Value]:
    out: dict[str, Value] = {
        "t2_slice_spacing_mm": round(t2.GetSpacing()[2], 3),
        "t2_pixel_mm": round(max(t2.GetSpacing()[:2]), 3),
    }
    if dwi:
        out["dwi_slice_spacing_mm"] = round(dwi[min(dwi)].GetSpacing()[2], 3)
    return out


def _quantise(values: np.ndarray) -> np.ndarray:
    """Bin index 0 .. bins-1 between the 1st and 99th percentile."""
    low, high = np.percentile(values, (1.0, 99.0))
    if high <= low:
        return np.zeros(values.shape, dtype=np.intp)
    scaled = (values - low) / (high - low) * _NMI_BINS
    return np.clip(scaled, 0, _NMI_BINS - 1).astype(np.intp)


def _nmi(a: np.ndarray, b: np.ndarray) -> float:
    """(H(A) + H(B)) / H(A, B) of two bin-index arrays."""
    joint = np.bincount(a * _NMI_BINS + b, minlength=_NMI_BINS * _NMI_BINS).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.reshape(_NMI_BINS, _NMI_BINS).sum(1), joint.reshape(_NMI_BINS, _NMI_BINS).sum(0)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    return (entropy(pa) + entropy(pb)) / entropy(joint)


def residual_shift_mm(t2: sitk.Image, dwi_on_t2: sitk.Image, gland: np.ndarray) -> float:
    """Length (mm) of the translation of the DWI (already on the T2 grid) that maximises its
    NMI with the T2 around the gland; 0 when the registration left them aligned.

    Region: the gland's bounding box plus :data:`SHIFT_MARGIN_MM`. Search: whole-voxel
    shifts up to :data:`SHIFT_RANGE_MM` in-plane (2 mm steps, then refined to the voxel;
    T2 sampled every ~1 mm in-plane) and up to one slice (within the range) through-plane.
    Exhaustive search rather than another optimiser, so a registration that converged to a
    wrong optimum shows here.
    """
    spacing = np.asarray(t2.GetSpacing(), dtype=float)[::-1]  # (z, y, x) mm
    t2_array = sitk.GetArrayViewFromImage(t2)
    dwi_array = sitk.GetArrayViewFromImage(dwi_on_t2)
    reach = np.minimum(np.floor(SHIFT_RANGE_MM / spacing), [1, 10**6, 10**6]).astype(int)
    margin = np.ceil(SHIFT_MARGIN_MM / spacing).astype(int)
    where = np.argwhere(gland)
    low = np.maximum(where.min(0) - margin, reach)
    high = np.minimum(where.max(0) + 1 + margin, np.asarray(gland.shape) - reach)
    if np.any(high <= low):
        return float("nan")
    stride = np.maximum(1, np.round(1.0 / spacing).astype(int))  # ~1 mm samples in-plane
    stride[0] = 1
    sampled = tuple(slice(a, b, s) for a, b, s in zip(low, high, stride, strict=True))
    fixed = _quantise(t2_array[sampled].astype(np.float64).ravel())
    levels = _quantise(dwi_array.astype(np.float64))  # one quantisation for every shift

    def score(shift: tuple[int, ...]) -> float:
        moved = tuple(
            slice(a + d, b + d, s) for a, b, d, s in zip(low, high, shift, stride, strict=True)
        )
        return _nmi(fixed, levels[moved].ravel())

    coarse = np.maximum(1, np.round(2.0 / spacing).astype(int))  # ~2 mm steps in-plane
    candidates = [
        (dz, dy, dx)
        for dz in range(-reach[0], reach[0] + 1)
        for dy in range(-reach[1], reach[1] + 1, coarse[1])
        for dx in range(-reach[2], reach[2] + 1, coarse[2])
    ]
    best = max(candidates, key=score)
    fine = [
        (best[0], best[1] + dy, best[2] + dx)
        for dy in range(-coarse[1] + 1, coarse[1])
        for dx in range(-coarse[2] + 1, coarse[2])
        if abs(best[1] + dy) <= reach[1] and abs(best[2] + dx) <= reach[2]
    ]
    best = max([best, *fine], key=score)
    return float(np.linalg.norm(np.asarray(best) * spacing))


#: Boundary check: half-width (mm) of the band around the outline, its bins, and the
#: in-plane Gaussian smoothing (mm) of the T2 before its gradient.
EDGE_BAND_MM = 5.0
EDGE_BIN_MM = 0.5
EDGE_SIGMA_MM = 1.0


def edge_outside_ratio(t2: sitk.Image, gland: np.ndarray) -> float:
    """How much stronger the T2 edges just outside the mask are than at its outline.

    For every voxel within :data:`EDGE_BAND_MM` of the outline (in-plane signed distance,
    slice by slice; > 0 outside), the in-plane T2 gradient magnitude (Gaussian
    :data:`EDGE_SIGMA_MM`) is averaged per :data:`EDGE_BIN_MM` distance bin. The result is
    the largest bin mean 1-5 mm outside divided by the mean within 1 mm of the outline:
    below 1 when the outline sits on the gland's edge, above 1 when a stronger edge lies
    outside (an under-segmented, eroded mask). The inside is not used: zone boundaries
    inside the gland are edges too.
    """
    spacing = np.asarray(t2.GetSpacing(), dtype=float)  # (x, y, z)
    image = sitk.GetArrayViewFromImage(t2).astype(np.float64)
    sigma = (0.0, EDGE_SIGMA_MM / spacing[1], EDGE_SIGMA_MM / spacing[0])
    smooth = ndimage.gaussian_filter(image, sigma)
    gy, gx = np.gradient(smooth, spacing[1], spacing[0], axis=(1, 2))
    gradient = np.hypot(gx, gy)
    edges = np.arange(-EDGE_BAND_MM, EDGE_BAND_MM + EDGE_BIN_MM / 2, EDGE_BIN_MM)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    for k in np.flatnonzero(gland.any(axis=(1, 2))):
        inside = gland[k]
        outside_d = ndimage.distance_transform_edt(~inside, sampling=(spacing[1], spacing[0]))
        inside_d = ndimage.distance_transform_edt(inside, sampling=(spacing[1], spacing[0]))
        signed = np.where(inside, -inside_d + spacing[0] / 2, outside_d - spacing[0] / 2)
        band = np.abs(signed) <= EDGE_BAND_MM
        which = np.digitize(signed[band], edges) - 1
        valid = (which >= 0) & (which < len(sums))
        np.add.at(sums, which[valid], gradient[k][band][valid])
        np.add.at(counts, which[valid], 1)
    centres = (edges[:-1] + edges[1:]) / 2
    at = (np.abs(centres) <= 1.0) & (counts > 0)
    beyond = (centres > 1.0) & (centres <= EDGE_BAND_MM) & (counts > 0)
    if not at.any() or not beyond.any():
        return float("nan")
    at_outline = sums[at].sum() / counts[at].sum()
    outside = (sums[beyond] / counts[beyond]).max()
    return float(outside / at_outline) if at_outline > 0 else float("nan")


def mean_uncertainty(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean ``1 - p(predicted label)`` over the labelled voxels.

    ``probabilities`` (labels + 1, z, y, x) and ``labels`` (z, y, x) on the T2 grid;
    ``None`` for an empty mask.
    """
    inside = labels > 0
    if not inside.any():
        return None
    chosen = np.take_along_axis(probabilities, labels[None].astype(np.intp), axis=0)[0]
    return float(1.0 - chosen[inside].mean())
