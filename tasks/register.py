"""elastix registration: rigid within DWI, affine T2 <-> DWI, resampling onto the T2 grid.

Pure functions on SimpleITK images (no Prefect); elastix (itk-elastix) runs internally on
``itk`` images built from them.

Conventions
-----------
Physical coordinates are LPS, in mm. Image sizes and indices are ITK order (x, y, z); numpy
arrays are (z, y, x). Every transform returned here is an ITK transform in the ITK/elastix
sense: it maps points of the *fixed* image's physical space to the *moving* image's physical
space, so ``sitk.Resample(moving, fixed, transform)`` puts the moving image on the fixed grid.
:func:`transform_to_matrix` turns one into the 4x4 homogeneous matrix of that same map.
With the synthetic ground truth (``tasks.synthetic``): for fixed = reference DWI and moving =
volume b the matrix should equal ``inv(M_b)``; :func:`align_dwi_to_t2` always returns the
T2 -> DWI map, which should equal ``inv(A)``, whichever way round elastix was run.

Cost and caching
----------------
The first ``itk.ParameterObject`` of a process loads the elastix wrapping (8-30 s measured);
later ones are free. Parameter objects are therefore built once per process and parameter
set (a module-level cache behind a lock, :func:`parameter_object`) and only read afterwards,
so threads of one worker can share them; :func:`warm_up` pays the load at worker start.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from tasks.errors import InputError

STEP = "register"

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline3,
}
_INITIALISERS = {"geometry": "GeometricalCenter", "mass": "CenterOfGravity"}


class RegistrationParams(BaseModel, frozen=True):
    """elastix settings for the rigid (DWI b -> lowest b) and affine (T2 <-> DWI) steps.

    Attributes
    ----------
    metric
        elastix metric for both steps (mutual information suits the contrast change between
        b-values and between T2 and DWI).
    rigid_resolutions, affine_resolutions
        Pyramid levels (elastix smoothing pyramid, factors 2^(n-1) .. 1 in voxels).
    rigid_iterations, affine_iterations
        Adaptive stochastic gradient descent iterations per level.
    spatial_samples
        Random fixed-image samples per iteration (``NumberOfSpatialSamples``).
    histogram_bins
        Mattes MI histogram bins.
    affine_direction
        ``"t2_fixed"``: fixed = T2, moving = DWI reference; ``"dwi_fixed"``: fixed = DWI
        reference, moving = T2 (the result is inverted). The default is the direction with
        the lower measured target registration error (see ``tests/tasks/test_register.py``
        and ``benchmarks/results/preprocess.md``).
    initialisation
        ``"none"`` (identity: both series share the scanner's coordinates),
        ``"geometry"`` (align image centres) or ``"mass"`` (align intensity centroids).
    rigid_fixed_mask
        Restrict the rigid metric to the body of the reference DWI (Otsu foreground), so
        samples are not wasted on background noise.
    threads
        Threads for elastix and for SimpleITK resampling (set explicitly per call).
    final_interpolator
        Interpolator of :func:`motion_correct_dwi` and the default of
        :func:`resample_to_reference`: ``"linear"`` never overshoots (no negative signal or
        ADC next to edges); ``"bspline"`` is sharper.
    """

    metric: Literal["AdvancedMattesMutualInformation", "AdvancedNormalizedCorrelation"] = (
        "AdvancedMattesMutualInformation"
    )
    rigid_resolutions: int = Field(3, ge=1, le=6)
    rigid_iterations: int = Field(250, ge=1)
    affine_resolutions: int = Field(3, ge=1, le=6)
    affine_iterations: int = Field(250, ge=1)
    spatial_samples: int = Field(2048, ge=64)
    final_spatial_samples: int = Field(8192, ge=64)
    histogram_bins: int = Field(32, ge=8)
    affine_direction: Literal["t2_fixed", "dwi_fixed"] = "t2_fixed"
    initialisation: Literal["none", "geometry", "mass"] = "none"
    affine_stages: tuple[Literal["rigid", "affine"], ...] = ("rigid", "affine")
    rigid_fixed_mask: bool = True
    threads: int = Field(1, ge=1)
    final_interpolator: Literal["linear", "bspline", "nearest"] = "linear"


@dataclass(frozen=True)
class Registration:
    """Result of one elastix run.

    ``transform`` maps fixed physical points (LPS mm) to moving physical points (an ITK
    ``AffineTransform``; rigid results have an orthonormal matrix). ``elastix_map`` is
    elastix's transform parameter map (for provenance); ``seconds`` the wall time.
    """

    transform: sitk.AffineTransform
    elastix_maps: tuple[dict[str, tuple[str, ...]], ...] = field(repr=False)
    seconds: float


_LOCK = threading.Lock()
_PARAMETER_OBJECTS: dict[str, Any] = {}
_CREATED: list[str] = []  # keys, in creation order (the cache's history, for tests/bench)


def _itk() -> Any:
    import itk  # noqa: PLC0415 - lazy: importing itk-elastix is slow and not always needed

    return itk


def _parameter_map(
    kind: Literal["rigid", "affine"], params: RegistrationParams, *, first: bool = True
) -> dict[str, str | tuple[str, ...]]:
    rigid = kind == "rigid"
    resolutions = params.rigid_resolutions if rigid else params.affine_resolutions
    iterations = params.rigid_iterations if rigid else params.affine_iterations
    entries = {
        "Metric": params.metric,
        "NumberOfResolutions": str(resolutions),
        "MaximumNumberOfIterations": str(iterations),
        "NumberOfSpatialSamples": tuple(
            [str(params.spatial_samples)] * (resolutions - 1) + [str(params.final_spatial_samples)]
        ),
        "NumberOfHistogramBins": str(params.histogram_bins),
        "ImageSampler": "RandomCoordinate",
        "NewSamplesEveryIteration": "true",
        "Interpolator": "LinearInterpolator",
        "ResultImagePixelType": "float",
        "WriteResultImage": "false",
        "HowToCombineTransforms": "Compose",
        "ErodeMask": "false",
        "AutomaticTransformInitialization": "false",
    }
    if params.initialisation != "none" and not rigid and first:
        entries["AutomaticTransformInitialization"] = "true"
        entries["AutomaticTransformInitializationMethod"] = _INITIALISERS[params.initialisation]
    return entries


def parameter_object(kind: Literal["rigid", "affine"], params: RegistrationParams) -> Any:
    """The process-wide ``itk.ParameterObject`` for ``kind`` and ``params`` (built once).

    Built from elastix's default ``rigid`` / ``affine`` map with the entries of ``params``;
    later calls with equal parameters return the same object. Treat it as read-only.
    """
    key = f"{kind}:{params.model_dump_json()}"
    with _LOCK:
        cached = _PARAMETER_OBJECTS.get(key)
        if cached is None:
            itk = _itk()
            cached = itk.ParameterObject.New()
            stages = ["rigid"] if kind == "rigid" else list(params.affine_stages)
            for stage in stages:
                resolutions = (
                    params.rigid_resolutions if kind == "rigid" else params.affine_resolutions
                )
                default = cached.GetDefaultParameterMap(stage, resolutions)
                for name, value in _parameter_map(kind, params, first=stage == stages[0]).items():
                    default[name] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
                cached.AddParameterMap(default)
            _PARAMETER_OBJECTS[key] = cached
            _CREATED.append(key)
    return cached


def parameter_objects_created() -> int:
    """How many parameter objects this process has built (one per kind and parameter set)."""
    with _LOCK:
        return len(_CREATED)


def warm_up(params: RegistrationParams | None = None) -> float:
    """Build the rigid and affine parameter objects now (at worker start); return seconds."""
    start = time.perf_counter()
    params = params or RegistrationParams()
    parameter_object("rigid", params)
    parameter_object("affine", params)
    return time.perf_counter() - start


def _to_itk(image: sitk.Image, pixel: str = "F") -> Any:
    itk = _itk()
    dtype = np.float32 if pixel == "F" else np.uint8
    out = itk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayViewFromImage(image), dtype))
    out.SetOrigin(tuple(float(v) for v in image.GetOrigin()))
    out.SetSpacing(tuple(float(v) for v in image.GetSpacing()))
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    out.SetDirection(itk.GetMatrixFromArray(direction))
    return out


def _itk_affine(transform: sitk.Transform) -> Any:
    """A linear SimpleITK transform as an ``itk.AffineTransform[itk.D, 3]`` (same map)."""
    itk = _itk()
    matrix = transform_to_matrix(transform)
    out = itk.AffineTransform[itk.D, 3].New()
    out.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(matrix[:3, :3])))
    out.SetTranslation([float(v) for v in matrix[:3, 3]])
    return out


def _check_3d(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a 3D scalar image", step=STEP)
    if min(image.GetSize()) < 4:
        raise InputError(
            f"{what} is too small to register: size {image.GetSize()}",
            step=STEP,
            hint="elastix needs at least 4 voxels along every axis",
        )


def _linear_to_affine(transform: Any, fixed: sitk.Image) -> sitk.AffineTransform:
    """An ITK (elastix combination) transform, known to be linear, as a SimpleITK affine.

    Evaluated at the fixed image's centre ``c`` and ``c + e_i`` (mm), so the matrix, the
    translation and the composition order of elastix's stages come from the transform itself.
    """
    size = np.array(fixed.GetSize(), dtype=float)
    center = np.array(fixed.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))
    mapped_center = np.array(transform.TransformPoint([float(v) for v in center]))
    matrix = np.empty((3, 3))
    for axis in range(3):
        point = center.copy()
        point[axis] += 1.0
        matrix[:, axis] = np.array(transform.TransformPoint([float(v) for v in point]))
        matrix[:, axis] -= mapped_center
    affine = sitk.AffineTransform(3)
    affine.SetCenter(center.tolist())
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation((mapped_center - center).tolist())
    return affine


def _run_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    kind: Literal["rigid", "affine"],
    params: RegistrationParams,
    fixed_mask: sitk.Image | None,
    initial: sitk.Transform | None = None,
) -> Registration:
    _check_3d(fixed, "fixed image")
    _check_3d(moving, "moving image")
    start = time.perf_counter()
    itk = _itk()
    fixed_itk, moving_itk = _to_itk(fixed), _to_itk(moving)
    method = itk.ElastixRegistrationMethod[type(fixed_itk), type(moving_itk)].New()
    method.SetFixedImage(fixed_itk)
    method.SetMovingImage(moving_itk)
    method.SetParameterObject(parameter_object(kind, params))
    method.SetNumberOfThreads(params.threads)
    method.SetLogToConsole(False)
    if fixed_mask is not None:
        if fixed_mask.GetSize() != fixed.GetSize():
            raise InputError("fixed_mask is not on the fixed image's grid", step=STEP)
        method.SetFixedMask(_to_itk(sitk.Cast(fixed_mask != 0, sitk.sitkUInt8), "UC"))
    if initial is not None:
        method.SetExternalInitialTransform(_itk_affine(initial))
    try:
        method.UpdateLargestPossibleRegion()
    except RuntimeError as exc:
        raise InputError(
            f"elastix {kind} registration failed: {str(exc).strip().splitlines()[-1]}",
            step=STEP,
            hint="check that the images overlap and hold signal (mask not empty)",
        ) from exc
    result = method.GetTransformParameterObject()
    maps = [result.GetParameterMap(i) for i in range(result.GetNumberOfParameterMaps())]
    elastix_maps = tuple({k: tuple(m[k]) for k in m.keys()} for m in maps)  # noqa: SIM118
    transform = _linear_to_affine(method.GetCombinationTransform(), fixed)
    return Registration(transform, elastix_maps, time.perf_counter() - start)


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    params: RegistrationParams,
    fixed_mask: sitk.Image | None = None,
) -> Registration:
    """Rigid (6 dof) elastix registration; the transform maps fixed -> moving points (mm).

    Raises
    ------
    InputError
        Images that are not 3D, a mask on another grid, or an elastix failure.
    """
    return _run_elastix(fixed, moving, "rigid", params, fixed_mask)


def register_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    params: RegistrationParams,
    fixed_mask: sitk.Image | None = None,
) -> Registration:
    """Affine (12 dof) elastix registration; the transform maps fixed -> moving points (mm)."""
    return _run_elastix(fixed, moving, "affine", params, fixed_mask)


def motion_correct_dwi(
    images: dict[float, sitk.Image], *, params: RegistrationParams
) -> tuple[dict[float, sitk.Image], dict[float, sitk.AffineTransform]]:
    """Register every b-volume rigidly to the lowest b and resample it onto that grid.

    Parameters
    ----------
    images
        b-value (s/mm²) -> 3D volume, LPS; ideally bias-corrected already.
    params
        Registration settings; ``rigid_fixed_mask`` masks the metric to the body.

    Returns
    -------
    (corrected, transforms)
        float32 volumes on the lowest-b grid, and per b the reference -> volume-b transform
        (identity for the lowest b), i.e. ``inv(M_b)`` in the synthetic convention.
    """
    if not images:
        raise InputError("no DWI volumes given", step=STEP)
    reference_b = min(images)
    reference = sitk.Cast(images[reference_b], sitk.sitkFloat32)
    mask = None
    if params.rigid_fixed_mask and len(images) > 1:
        from tasks.bias import foreground_mask  # noqa: PLC0415 - only needed here

        mask = foreground_mask(reference, threads=params.threads)
    corrected: dict[float, sitk.Image] = {reference_b: reference}
    transforms: dict[float, sitk.AffineTransform] = {reference_b: sitk.AffineTransform(3)}
    for b in sorted(images):
        if b == reference_b:
            continue
        result = register_rigid(reference, images[b], params=params, fixed_mask=mask)
        transforms[b] = result.transform
        corrected[b] = resample_to_reference(
            images[b], reference, result.transform, interpolator=params.final_interpolator,
            threads=params.threads,
        )
    return corrected, transforms


def align_dwi_to_t2(
    t2: sitk.Image, dwi_ref: sitk.Image, *, params: RegistrationParams
) -> Registration:
    """Affine registration of the reference DWI to the T2W; returns the T2 -> DWI map.

    Run as ``params.affine_direction`` says; with ``"dwi_fixed"`` the result is inverted, so
    the returned transform always maps T2 physical points to DWI physical points and
    ``resample_to_reference(dwi, t2, transform)`` puts DWI (or ADC) on the T2 grid.
    """
    if params.affine_direction == "t2_fixed":
        return register_affine(t2, dwi_ref, params=params)
    result = register_affine(dwi_ref, t2, params=params)
    inverse = sitk.AffineTransform(result.transform.GetInverse())
    return Registration(inverse, result.elastix_maps, result.seconds)


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform,
    *,
    interpolator: Literal["linear", "bspline", "nearest"] = "linear",
    threads: int = 1,
) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid through ``transform`` (reference -> image).

    The output (float32, 0 outside ``image``) has exactly ``reference``'s size, origin,
    spacing and direction, as every channel of the segmentation model must.
    """
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetTransform(transform)
    resampler.SetInterpolator(_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetNumberOfThreads(threads)
    out = resampler.Execute(image)
    out.CopyInformation(reference)
    return out


def transform_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of an affine-type ITK transform, mapping fixed -> moving (mm).

    ``p_moving = M @ [x, y, z, 1]`` for a fixed physical point (LPS). Composite and
    non-linear transforms are rejected.
    """
    if transform.GetDimension() != 3 or not transform.IsLinear():
        raise InputError(f"not a 3D linear transform: {transform.GetName()}", step=STEP)
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    out = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        out[:3, axis] = np.array(transform.TransformPoint(unit)) - origin
    out[:3, 3] = origin
    return out


def as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The same linear map as an ITK ``AffineTransform`` (kept as is when it already is one)."""
    if transform.GetName() == "AffineTransform":
        return sitk.AffineTransform(transform)
    matrix = transform_to_matrix(transform)
    return sitk.AffineTransform(matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist())


def save_transform(transform: sitk.Transform, path: str | Path) -> Path:
    """Write ``transform`` as an ITK ``.tfm`` text file atomically (affine form); return path.

    The file keeps the fixed -> moving direction; read it back with :func:`load_transform`
    (or ``sitk.ReadTransform``, ANTs, 3D Slicer).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = as_affine(transform)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tfm", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteTransform(affine, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_transform(path: str | Path) -> sitk.AffineTransform:
    """Read a transform written by :func:`save_transform` as an ITK ``AffineTransform``."""
    path = Path(path)
    if not path.is_file():
        raise InputError("transform file not found", step=STEP, path=path)
    transform = sitk.ReadTransform(str(path))
    if transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform).GetNthTransform(0)
    return sitk.AffineTransform(transform)
