"""T2W <-> DWI alignment that is checked on every exam: elastix stages judged against identity.

The series of one MRI exam share the scanner's coordinates, so the identity map is already
close; a registration must earn its place. :func:`align_dwi_to_t2` runs elastix (rigid,
then affine from the rigid result) with its metric restricted to the region that matters
(:func:`alignment_region`), then accepts the highest-ranked stage that is plausible and
improves the similarity over the identity; otherwise the rigid stage, else the identity.
Every candidate's similarity, scale factors and displacement are returned
(:meth:`Alignment.details`) so the provenance database records what was accepted and why.

Conventions
-----------
Physical coordinates are LPS, mm. The returned transform maps T2 physical points to DWI
physical points (``resample_to_reference(dwi, t2, transform)`` puts DWI on the T2 grid).
Similarity is normalised mutual information ``(H(A) + H(B)) / H(A, B)`` (1 = independent,
2 = identical up to a one-to-one intensity map) between the lowest-b DWI and the T2 mapped
onto the DWI grid, over the voxels of the alignment region.

Evidence for the defaults (``benchmarks/bench_align.py``, ``benchmarks/results/align.md``):
the region, the scale bound and the acceptance rule were set on the phantom and on
ProstateX-0000 / -0218, where an unrestricted affine stretched one exam by 29 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from tasks.errors import InputError
from tasks.register import (
    Registration,
    RegistrationParams,
    register_stages,
    transform_to_matrix,
)
from tasks.registry import REGISTER

STEP = REGISTER.name  # the step's one name: tasks/registry.py

Stage = Literal["affine", "rigid", "identity"]
STAGE_ORDER: tuple[Stage, ...] = ("affine", "rigid", "identity")


@dataclass(frozen=True)
class Candidate:
    """One stage's T2 -> DWI map with its checks."""

    stage: Stage
    transform: sitk.AffineTransform
    similarity: float
    scales: tuple[float, float, float]
    displacement_mm: float
    """Mean distance (mm) that the map moves the region's points, against the identity."""
    translation_mm: tuple[float, float, float]
    """Displacement (mm, LPS) of the region's centroid."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "similarity": round(self.similarity, 6),
            "scales": [round(s, 5) for s in self.scales],
            "displacement_mm": round(self.displacement_mm, 3),
            "translation_mm": [round(t, 3) for t in self.translation_mm],
        }


@dataclass(frozen=True)
class Alignment:
    """The accepted T2 -> DWI map and the evidence for it."""

    transform: sitk.AffineTransform
    stage: Stage
    reason: str
    candidates: tuple[Candidate, ...]
    region_voxels: int
    elastix_maps: tuple[dict[str, tuple[str, ...]], ...] = field(repr=False)
    seconds: float

    def candidate(self, stage: Stage) -> Candidate:
        return next(c for c in self.candidates if c.stage == stage)

    def details(self) -> dict[str, Any]:
        """JSON-able record for provenance: accepted stage, reason, per-stage checks."""
        accepted = self.candidate(self.stage)
        return {
            "accepted_stage": self.stage,
            "reason": self.reason,
            "similarity_metric": "normalised mutual information",
            "similarity_identity": round(self.candidate("identity").similarity, 6),
            "similarity_accepted": round(accepted.similarity, 6),
            "scales": [round(s, 5) for s in accepted.scales],
            "translation_mm": [round(t, 3) for t in accepted.translation_mm],
            "displacement_mm": round(accepted.displacement_mm, 3),
            "region_voxels": self.region_voxels,
            "stages": {c.stage: c.as_dict() for c in self.candidates},
        }


def alignment_region(
    t2: sitk.Image, dwi_ref: sitk.Image, *, params: RegistrationParams
) -> sitk.Image:
    """Mask (uint8, DWI grid) of the voxels the metric and the acceptance look at.

    The DWI body (Otsu foreground) inside the T2 slab, less ``params.region_slab_margin_mm``
    at either end, and within ``params.region_radius_mm`` (in the T2's slice plane) of the
    T2 field of view's centre: prostate T2 is planned on the gland, so this keeps the pelvis
    around it and drops air, coil and the body wall. The slab margin keeps the metric away
    from the T2's first and last slices, where stretching along the slice axis would move
    samples out of the T2 and change the metric without matching any anatomy.
    """
    from tasks.bias import foreground_mask  # noqa: PLC0415 - avoid a module-level cycle

    body = sitk.GetArrayFromImage(foreground_mask(dwi_ref, classes=3, threads=params.threads)) > 0
    points = _grid_points(dwi_ref)
    direction = np.array(t2.GetDirection(), dtype=float).reshape(3, 3)
    size = np.array(t2.GetSize(), dtype=float)
    spacing = np.array(t2.GetSpacing(), dtype=float)
    centre_index = (size - 1) / 2
    centre = np.array(t2.GetOrigin()) + direction @ (centre_index * spacing)
    local = (points - centre) @ direction  # coordinates along the T2's axes (mm)
    half_slab = size[2] * spacing[2] / 2 - params.region_slab_margin_mm
    in_plane = np.hypot(local[:, 0], local[:, 1]) <= params.region_radius_mm
    in_slab = np.abs(local[:, 2]) <= half_slab
    region = body & (in_plane & in_slab).reshape(body.shape)
    image = sitk.GetImageFromArray(region.astype(np.uint8))
    image.CopyInformation(dwi_ref)
    return image


def _grid_points(image: sitk.Image) -> np.ndarray:
    """LPS points (mm) of every voxel centre, in numpy (z, y, x) raveled order."""
    nx, ny, nz = image.GetSize()
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1).astype(float)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    return (index * np.array(image.GetSpacing())) @ direction.T + np.array(image.GetOrigin())


def normalised_mutual_information(a: np.ndarray, b: np.ndarray, *, bins: int = 32) -> float:
    """``(H(a) + H(b)) / H(a, b)`` of paired samples, each clipped to its 0.5-99.5 percentiles."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size < bins or a.size != b.size:
        raise InputError(f"too few paired samples for a similarity: {a.size}", step=STEP)

    def binned(values: np.ndarray) -> np.ndarray:
        low, high = np.percentile(values, [0.5, 99.5])
        scaled = (np.clip(values, low, high) - low) / max(high - low, 1e-12)
        return np.minimum((scaled * bins).astype(np.int64), bins - 1)

    joint = np.bincount(binned(a) * bins + binned(b), minlength=bins * bins).astype(np.float64)
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    grid = joint.reshape(bins, bins)
    return (entropy(grid.sum(1)) + entropy(grid.sum(0))) / entropy(joint)


def similarity(
    t2: sitk.Image,
    dwi_ref: sitk.Image,
    t2_to_dwi: sitk.Transform,
    region: sitk.Image,
    *,
    bins: int = 32,
    threads: int = 1,
) -> float:
    """NMI between ``dwi_ref`` and the T2 mapped onto its grid, over ``region`` (DWI grid).

    The T2 is smoothed in-plane to the DWI's resolution first (Gaussian, sigma = half the
    DWI's in-plane spacing), so that resampling it onto the coarser grid does not alias.
    Voxels that map outside the T2 are left out.
    """
    sigma = 0.5 * min(dwi_ref.GetSpacing()[:2])
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(t2, sitk.sitkFloat32), [sigma, sigma, 0.01])
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(dwi_ref)
    resampler.SetTransform(sitk.AffineTransform(t2_to_dwi).GetInverse())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float("nan"))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetNumberOfThreads(threads)
    mapped = sitk.GetArrayFromImage(resampler.Execute(smooth))
    inside = (sitk.GetArrayFromImage(region) > 0) & np.isfinite(mapped)
    dwi = sitk.GetArrayFromImage(dwi_ref)
    return normalised_mutual_information(mapped[inside], dwi[inside], bins=bins)


def _candidate(
    stage: Stage,
    transform: sitk.AffineTransform,
    t2: sitk.Image,
    dwi_ref: sitk.Image,
    region: sitk.Image,
    points: np.ndarray,
    params: RegistrationParams,
) -> Candidate:
    matrix = transform_to_matrix(transform)
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    moved = points @ matrix[:3, :3].T + matrix[:3, 3]
    centroid = points.mean(0)
    shift = matrix[:3, :3] @ centroid + matrix[:3, 3] - centroid
    value = similarity(
        t2, dwi_ref, transform, region, bins=params.similarity_bins, threads=params.threads
    )
    return Candidate(
        stage=stage,
        transform=transform,
        similarity=value,
        scales=(float(scales[0]), float(scales[1]), float(scales[2])),
        displacement_mm=float(np.linalg.norm(moved - points, axis=1).mean()),
        translation_mm=(float(shift[0]), float(shift[1]), float(shift[2])),
    )


def choose_stage(candidates: list[Candidate], params: RegistrationParams) -> tuple[Stage, str]:
    """The stage to accept and why (rule in the module docstring).

    A registered stage is acceptable when its scales lie within ``1 +- max_scale_deviation``
    and its similarity exceeds the identity's by at least ``min_similarity_gain``; the
    first acceptable one in :data:`STAGE_ORDER` wins, else the identity.
    """
    by_stage = {c.stage: c for c in candidates}
    identity = by_stage["identity"].similarity
    rejected = []
    for stage in STAGE_ORDER[:-1]:
        if stage not in by_stage:
            continue
        c = by_stage[stage]
        deviation = max(abs(s - 1.0) for s in c.scales)
        if deviation > params.max_scale_deviation:
            scales = "/".join(f"{s:.3f}" for s in c.scales)
            rejected.append(f"{stage} scales {scales} outside 1 +- {params.max_scale_deviation:g}")
            continue
        gain = c.similarity - identity
        if gain < params.min_similarity_gain:
            rejected.append(
                f"{stage} NMI {c.similarity:.4f} does not improve on identity {identity:.4f}"
            )
            continue
        why = f"{stage} NMI {c.similarity:.4f} > identity {identity:.4f}"
        return stage, "; ".join([*rejected, why])
    return "identity", "; ".join([*rejected, "kept the scanner-coordinate identity"])


def align_dwi_to_t2(
    t2: sitk.Image, dwi_ref: sitk.Image, *, params: RegistrationParams
) -> Alignment:
    """T2 -> DWI map of the exam: elastix stages, each checked against the identity.

    Parameters
    ----------
    t2
        Axial T2W (3D, LPS), after denoising and N4.
    dwi_ref
        Reference DWI volume (the lowest b, motion-corrected grid), 3D, LPS.
    params
        Registration settings (stages, region radius, scale bound, acceptance gain).

    Returns
    -------
    Alignment
        ``transform`` maps T2 points to DWI points (mm); ``stage``/``reason`` say which
        stage was accepted; :meth:`Alignment.details` is the provenance record.

    Raises
    ------
    InputError
        Images that are not 3D, an empty alignment region, or an elastix failure.
    """
    region = alignment_region(t2, dwi_ref, params=params)
    region_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(region)))
    if region_voxels < 64:
        raise InputError(
            f"T2 and DWI barely overlap: {region_voxels} DWI body voxels near the T2's centre",
            step=STEP,
            hint="check that the T2W and DWI series belong to one exam and cover the pelvis",
        )
    points = _grid_points(dwi_ref)[sitk.GetArrayViewFromImage(region).ravel() > 0]
    registration = _register(t2, dwi_ref, region, params)
    candidates = [
        _candidate(stage, transform, t2, dwi_ref, region, points, params)
        for stage, transform in registration.stages
    ]
    identity = sitk.AffineTransform(3)
    candidates.append(_candidate("identity", identity, t2, dwi_ref, region, points, params))
    stage, reason = choose_stage(candidates, params)
    accepted = next(c for c in candidates if c.stage == stage)
    return Alignment(
        transform=accepted.transform,
        stage=stage,
        reason=reason,
        candidates=tuple(candidates),
        region_voxels=region_voxels,
        elastix_maps=registration.result.elastix_maps,
        seconds=registration.result.seconds,
    )


@dataclass(frozen=True)
class _Staged:
    result: Registration
    stages: list[tuple[Stage, sitk.AffineTransform]]


def _register(
    t2: sitk.Image, dwi_ref: sitk.Image, region: sitk.Image, params: RegistrationParams
) -> _Staged:
    """Run elastix's stages in the configured direction; every stage as a T2 -> DWI map."""
    if params.affine_direction == "t2_fixed":
        on_t2 = sitk.Resample(region, t2, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        result, stages = register_stages(t2, dwi_ref, params=params, fixed_mask=on_t2)
        maps = stages
    else:
        result, stages = register_stages(dwi_ref, t2, params=params, fixed_mask=region)
        maps = [sitk.AffineTransform(t.GetInverse()) for t in stages]
    names: list[Stage] = list(params.affine_stages)  # type: ignore[arg-type]
    return _Staged(result, list(zip(names, maps, strict=True)))


def gland_region(gland_t2: sitk.Image, dwi: sitk.Image, margin_mm: float) -> sitk.Image:
    """Evaluation region: a T2-grid gland mask on the DWI grid, dilated by ``margin_mm`` (mm).

    The mask is carried over through scanner coordinates (identity).
    """
    on_dwi = sitk.Resample(
        sitk.Cast(gland_t2 > 0, sitk.sitkFloat32), dwi, sitk.Transform(), sitk.sitkLinear, 0.0
    )
    inside = sitk.Cast(on_dwi >= 0.5, sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(inside)):
        return inside
    distance = sitk.SignedMaurerDistanceMap(
        inside, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return sitk.Cast(distance <= margin_mm, sitk.sitkUInt8)
