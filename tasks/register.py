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
With the synthetic ground truth (``phantom.exam``): for fixed = reference DWI and moving =
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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from tasks.errors import InputError
from tasks.io import write_text_atomic
from tasks.registry import REGISTER

STEP = REGISTER.name  # the step's one name: tasks/registry.py

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline3,
}
_INITIALISERS = {"geometry": "GeometricalCenter", "mass": "CenterOfGravity"}


class RegistrationParams(BaseModel, frozen=True, extra="forbid"):
    """elastix settings for the rigid (DWI b -> lowest b) and affine (T2 <-> DWI) steps.

    Defaults were chosen by target registration error (TRE) against the synthetic ground
    truth and by the similarity to the identity on real exams; the T2 <-> DWI figures are in
    ``benchmarks/results/align.md`` (``benchmarks/bench_align.py``).

    Attributes
    ----------
    metric
        elastix metric for both steps (mutual information suits the contrast change between
        b-values and between T2 and DWI).
    rigid_resolutions, affine_resolutions
        Levels of elastix's smoothing pyramid; level ``l`` of ``n`` has schedule factor
        ``2^(n-1-l)`` along axes whose spacing is below 1.4x the finest one, and 1 along
        thick-slice axes (z of a 0.5x0.5x3 mm T2 or a 2x2x3 mm DWI), which are never
        smoothed (:func:`pyramid_schedule`).
    rigid_iterations, affine_iterations
        Adaptive stochastic gradient descent iterations per level: within the DWI (rigid)
        and for T2 <-> DWI (both of its stages).
    spatial_samples, final_spatial_samples
        Random fixed-image samples per iteration on the coarse levels and on the finest
        level, within the DWI. A smaller budget (150 iterations, 1024 / 4096 samples) fails
        the 0.5 mm motion-correction bound of ``tests/tasks/test_register.py`` on the
        phantom's noisiest volume (b1400, raw DWI); on the pipeline's denoised inputs it
        did as well as this one (``benchmarks/results/registration_budget.md``).
    affine_spatial_samples, affine_final_spatial_samples
        The same for T2 <-> DWI. There 150 iterations with 1024 / 4096 samples gave the
        phantom the same TRE and the real exams the same accepted stages as 250 with
        2048 / 8192 (``benchmarks/results/registration_budget.md``).
    rigid_histogram_bins, affine_histogram_bins
        Mattes MI histogram bins within the DWI and for T2 <-> DWI.
    affine_direction
        ``"dwi_fixed"`` (default): fixed = DWI reference, moving = T2, result inverted;
        ``"t2_fixed"``: fixed = T2, moving = DWI reference (``tests/tasks/test_register.py``
        compares the two on the phantom).
    initialisation
        ``"none"`` (identity: both series share the scanner's coordinates),
        ``"geometry"`` (align image centres) or ``"mass"`` (align intensity centroids).
    affine_stages
        elastix stages of the T2 <-> DWI step, run in sequence, each starting from the last;
        :mod:`tasks.align` judges each stage's result against the identity.
    affine_in_plane_only
        The affine stage keeps the matrix entries that involve z (the slice axis of axial
        series) fixed: with 3 mm slices an unconstrained affine stretched the slice axis by
        7-10 % on the phantom (true scales within 3 %) and 8 % on ProstateX-0000.
    affine_matrix_scale
        elastix optimiser scale of the free matrix entries (translations: 1).
    rigid_fixed_mask
        Restrict the rigid metric to the body of the reference DWI (Otsu foreground), so
        samples are not wasted on background noise.
    region_radius_mm
        T2 <-> DWI metric and acceptance region: DWI body within this in-plane radius (mm)
        of the T2 field of view's centre, inside the T2 slab (:mod:`tasks.align`).
    region_slab_margin_mm
        That region leaves out this much (mm) at either end of the T2 slab.
    max_scale_deviation
        A T2 <-> DWI stage whose scale factors (singular values) leave ``1 +- this`` is
        rejected as implausible (series of one exam share the scanner's geometry).
    min_similarity_gain
        A stage is accepted only if its normalised mutual information exceeds the
        identity's by at least this much.
    similarity_bins
        Histogram bins of that similarity.
    threads
        Threads for elastix and for SimpleITK resampling (set explicitly per call).
    final_interpolator
        Interpolator of :func:`motion_correct_dwi` and the default of
        :func:`resample_to_reference`: ``"linear"`` never overshoots (no negative signal or
        ADC next to edges); ``"bspline"`` is sharper.
    """

    metric: Literal["AdvancedMattesMutualInformation", "NormalizedMutualInformation"] = (
        "AdvancedMattesMutualInformation"
    )
    rigid_resolutions: int = Field(3, ge=1, le=6)
    rigid_iterations: int = Field(250, ge=1)
    affine_resolutions: int = Field(3, ge=1, le=6)
    affine_iterations: int = Field(150, ge=1)
    spatial_samples: int = Field(2048, ge=64)
    final_spatial_samples: int = Field(8192, ge=64)
    affine_spatial_samples: int = Field(1024, ge=64)
    affine_final_spatial_samples: int = Field(4096, ge=64)
    rigid_histogram_bins: int = Field(32, ge=4)
    affine_histogram_bins: int = Field(16, ge=4)
    affine_direction: Literal["t2_fixed", "dwi_fixed"] = "dwi_fixed"
    initialisation: Literal["none", "geometry", "mass"] = "none"
    affine_stages: tuple[Literal["rigid", "affine"], ...] = Field(("rigid", "affine"), min_length=1)
    rigid_fixed_mask: bool = True
    affine_in_plane_only: bool = True
    affine_matrix_scale: float = Field(1e4, gt=0)
    region_radius_mm: float = Field(50.0, gt=0)
    region_slab_margin_mm: float = Field(0.0, ge=0)
    max_scale_deviation: float = Field(0.07, ge=0, lt=1)
    min_similarity_gain: float = Field(0.0, ge=0)
    similarity_bins: int = Field(32, ge=8)
    threads: int = Field(1, ge=1)
    final_interpolator: Literal["linear", "bspline", "nearest"] = "linear"


@dataclass(frozen=True)
class Registration:
    """Result of one elastix run.

    ``transform`` maps fixed physical points (LPS mm) to moving physical points (an ITK
    ``AffineTransform``; rigid results have an orthonormal matrix). ``elastix_maps`` are
    elastix's transform parameter maps, one per stage (for provenance); ``seconds`` the
    wall time.
    """

    transform: sitk.AffineTransform
    elastix_maps: tuple[dict[str, tuple[str, ...]], ...] = field(repr=False)
    seconds: float


Kind = Literal["rigid", "affine"]
Schedule = tuple[int, ...]

_LOCK = threading.Lock()
_PARAMETER_OBJECTS: dict[str, Any] = {}
_CREATED: list[str] = []  # cache keys in creation order (what tests and the benchmark count)


_ITK_LOCK = threading.Lock()
_ITK: dict[str, Any] = {}


def _itk() -> Any:
    """The ``itk`` module with everything used here loaded, once per process, under a lock.

    itk loads its wrappings lazily on first attribute access, which is not thread-safe: two
    Prefect threads registering at once failed with "module 'itk' has no attribute
    'ElastixRegistrationMethod'" and a half-imported torch. So the first caller loads them all
    (and converts one tiny image, which imports itk's optional array back ends) while others
    wait.
    """
    with _ITK_LOCK:
        if "itk" not in _ITK:
            import itk  # noqa: PLC0415 - lazy: loading itk-elastix costs seconds

            itk.ParameterObject.New()
            image = itk.GetImageFromArray(np.zeros((4, 4, 4), dtype=np.float32))
            itk.ElastixRegistrationMethod[type(image), type(image)]
            itk.GetImageFromArray(np.zeros((4, 4, 4), dtype=np.uint8))
            itk.GetMatrixFromArray(np.eye(3))
            _ITK["itk"] = itk
        return _ITK["itk"]


def set_itk_threads(threads: int) -> None:
    """Set itk's global default thread count, if this module has loaded itk already.

    Takes the loading lock: touching ``itk`` while another thread is importing it fails
    ("partially initialized module 'itk'"). Not loaded yet: nothing to do, because
    :func:`flows.resources.apply_thread_limits` also sets the environment variable itk reads.
    """
    with _ITK_LOCK:
        if "itk" in _ITK:
            _ITK["itk"].MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)


def pyramid_schedule(spacing: tuple[float, ...], levels: int) -> Schedule:
    """elastix pyramid schedule (levels x 3 factors, x y z) for an image of ``spacing`` (mm).

    Axes whose spacing is at least 1.4x the finest one (thick slices) keep factor 1.
    """
    finest = min(spacing)
    return tuple(
        2 ** (levels - 1 - level) if s < 1.4 * finest else 1
        for level in range(levels)
        for s in spacing
    )


# AffineTransform parameters: matrix row-major (a11 ... a33, LPS), then translation (mm).
# In-plane only: the entries that involve z (the slice axis of axial series) stay fixed.
_THROUGH_PLANE = (2, 5, 6, 7, 8)


def _affine_scales(params: RegistrationParams) -> tuple[str, ...]:
    """elastix optimiser scales of the affine stage: large = parameter held still."""
    scales = [params.affine_matrix_scale] * 9 + [1.0] * 3
    if params.affine_in_plane_only:
        for index in _THROUGH_PLANE:
            scales[index] = 1e12
    return tuple(f"{v:g}" for v in scales)


def _parameter_map(
    kind: Kind,
    params: RegistrationParams,
    fixed: Schedule,
    moving: Schedule,
    *,
    first: bool,
    stage: str = "rigid",
) -> dict[str, str | tuple[str, ...]]:
    rigid = kind == "rigid"
    levels = params.rigid_resolutions if rigid else params.affine_resolutions
    iterations = params.rigid_iterations if rigid else params.affine_iterations
    coarse, final = (
        (params.spatial_samples, params.final_spatial_samples)
        if rigid
        else (params.affine_spatial_samples, params.affine_final_spatial_samples)
    )
    samples = [coarse] * (levels - 1) + [final]
    entries: dict[str, str | tuple[str, ...]] = {
        "Metric": params.metric,
        "NumberOfResolutions": str(levels),
        "FixedImagePyramidSchedule": tuple(str(f) for f in fixed),
        "MovingImagePyramidSchedule": tuple(str(f) for f in moving),
        "MaximumNumberOfIterations": str(iterations),
        "NumberOfSpatialSamples": tuple(str(n) for n in samples),
        "NumberOfHistogramBins": str(
            params.rigid_histogram_bins if rigid else params.affine_histogram_bins
        ),
        "ImageSampler": "RandomCoordinate",
        "NewSamplesEveryIteration": "true",
        "Interpolator": "LinearInterpolator",
        "WriteResultImage": "false",
        "HowToCombineTransforms": "Compose",
        "ErodeMask": "false",
        "AutomaticTransformInitialization": "false",
    }
    if stage == "affine" and not rigid:
        entries["AutomaticScalesEstimation"] = "false"
        entries["Scales"] = _affine_scales(params)
    if params.initialisation != "none" and not rigid and first:
        entries["AutomaticTransformInitialization"] = "true"
        entries["AutomaticTransformInitializationMethod"] = _INITIALISERS[params.initialisation]
    return entries


def parameter_object(
    kind: Kind,
    params: RegistrationParams,
    *,
    fixed_spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
    moving_spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> Any:
    """The process-wide ``itk.ParameterObject`` for one step, parameter set and grid shape.

    Built once from elastix's default ``rigid`` / ``affine`` maps with the entries of
    ``params`` and the pyramid schedules of the two spacings (a cohort has few distinct
    schedules); later calls with equal arguments return the same object. Read-only.
    """
    levels = params.rigid_resolutions if kind == "rigid" else params.affine_resolutions
    fixed = pyramid_schedule(tuple(fixed_spacing), levels)
    moving = pyramid_schedule(tuple(moving_spacing), levels)
    key = f"{kind}:{fixed}:{moving}:{params.model_dump_json()}"
    with _LOCK:
        cached = _PARAMETER_OBJECTS.get(key)
        if cached is None:
            cached = _itk().ParameterObject.New()
            stages = ["rigid"] if kind == "rigid" else list(params.affine_stages)
            for number, stage in enumerate(stages):
                entries = _parameter_map(
                    kind, params, fixed, moving, first=number == 0, stage=stage
                )
                elastix_map = cached.GetDefaultParameterMap(stage, levels)
                for name, value in entries.items():
                    elastix_map[name] = value if isinstance(value, tuple) else (value,)
                cached.AddParameterMap(elastix_map)
            _PARAMETER_OBJECTS[key] = cached
            _CREATED.append(key)
    return cached


def parameter_objects_created() -> int:
    """How many parameter objects this process has built (one per step, params, schedule)."""
    with _LOCK:
        return len(_CREATED)


def warm_up(params: RegistrationParams | None = None) -> float:
    """Load elastix now (at worker start), building the default objects; return seconds."""
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


def _check_3d(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a 3D scalar image", step=STEP)
    if min(image.GetSize()) < 4:
        raise InputError(
            f"{what} is too small to register: size {image.GetSize()}",
            step=STEP,
            hint="elastix needs at least 4 voxels along every axis",
        )


def _elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    kind: Kind,
    params: RegistrationParams,
    fixed_mask: sitk.Image | None,
) -> tuple[Any, Registration]:
    """Run elastix; return the finished registration method and its :class:`Registration`."""
    start = time.perf_counter()
    itk = _itk()
    fixed_itk, moving_itk = _to_itk(fixed), _to_itk(moving)
    method = itk.ElastixRegistrationMethod[type(fixed_itk), type(moving_itk)].New()
    method.SetFixedImage(fixed_itk)
    method.SetMovingImage(moving_itk)
    method.SetParameterObject(
        parameter_object(
            kind, params, fixed_spacing=fixed.GetSpacing(), moving_spacing=moving.GetSpacing()
        )
    )
    method.SetNumberOfThreads(params.threads)
    method.SetLogToConsole(False)
    if fixed_mask is not None:
        if fixed_mask.GetSize() != fixed.GetSize():
            raise InputError("fixed_mask is not on the fixed image's grid", step=STEP)
        method.SetFixedMask(_to_itk(sitk.Cast(fixed_mask != 0, sitk.sitkUInt8), "UC"))
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
    combined = method.GetCombinationTransform()
    transform = _affine(_matrix_of(lambda p: combined.TransformPoint([float(v) for v in p])))
    return method, Registration(transform, elastix_maps, time.perf_counter() - start)


def _run_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    kind: Kind,
    params: RegistrationParams,
    fixed_mask: sitk.Image | None,
) -> Registration:
    _check_3d(fixed, "fixed image")
    _check_3d(moving, "moving image")
    return _elastix(fixed, moving, kind, params, fixed_mask)[1]


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

        mask = foreground_mask(reference, classes=3, threads=params.threads)
    corrected: dict[float, sitk.Image] = {reference_b: reference}
    transforms: dict[float, sitk.AffineTransform] = {reference_b: sitk.AffineTransform(3)}
    for b in sorted(images):
        if b == reference_b:
            continue
        result = register_rigid(reference, images[b], params=params, fixed_mask=mask)
        transforms[b] = result.transform
        corrected[b] = resample_to_reference(
            images[b],
            reference,
            result.transform,
            interpolator=params.final_interpolator,
            threads=params.threads,
        )
    return corrected, transforms


def elastix_default_affine(fixed: sitk.Image, moving: sitk.Image) -> sitk.AffineTransform:
    """elastix's default affine parameter map, unmasked, one thread: the baseline a
    straightforward script gets. Returns the fixed -> moving map (mm)."""
    itk = _itk()
    fixed_itk, moving_itk = _to_itk(fixed), _to_itk(moving)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine"))
    method = itk.ElastixRegistrationMethod[type(fixed_itk), type(moving_itk)].New()
    method.SetFixedImage(fixed_itk)
    method.SetMovingImage(moving_itk)
    method.SetParameterObject(parameters)
    method.SetNumberOfThreads(1)
    method.SetLogToConsole(False)
    method.UpdateLargestPossibleRegion()
    combined = method.GetCombinationTransform()
    return _affine(_matrix_of(lambda p: combined.TransformPoint([float(v) for v in p])))


def register_stages(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    params: RegistrationParams,
    fixed_mask: sitk.Image | None = None,
) -> tuple[Registration, list[sitk.AffineTransform]]:
    """Run ``params.affine_stages`` in one elastix call; also return each stage's result.

    The k-th transform of the list is the map after stage k (stages 1..k composed), fixed
    -> moving points (mm); the last one equals the returned registration's transform.
    """
    _check_3d(fixed, "fixed image")
    _check_3d(moving, "moving image")
    method, result = _elastix(fixed, moving, "affine", params, fixed_mask)
    cumulative: list[sitk.AffineTransform] = []
    total = np.eye(4)
    # itk-elastix lists the stages last first; the combined map is T_last(...T_first(x))
    for n in reversed(range(method.GetNumberOfTransforms())):
        stage = method.GetNthTransform(n)
        own = _matrix_of(lambda p, t=stage: t.TransformPoint([float(v) for v in p]))
        total = own @ total
        cumulative.append(_affine(total))
    return result, cumulative


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


def _matrix_of(transform_point: Callable[[tuple[float, ...]], Any]) -> np.ndarray:
    """4x4 matrix of a linear point map, from the images of the origin and unit vectors."""
    origin = np.asarray(transform_point((0.0, 0.0, 0.0)), dtype=float)
    out = np.eye(4)
    for axis, unit in enumerate(np.eye(3)):
        out[:3, axis] = np.asarray(transform_point(tuple(unit)), dtype=float) - origin
    out[:3, 3] = origin
    return out


def _affine(matrix: np.ndarray) -> sitk.AffineTransform:
    return sitk.AffineTransform(matrix[:3, :3].ravel().tolist(), matrix[:3, 3].tolist())


def transform_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous matrix of a linear ITK transform; it maps fixed -> moving (mm, LPS).

    ``p_moving = M @ [x, y, z, 1]`` for a fixed physical point. For the results of this
    module: motion ``reference DWI -> volume b`` (truth ``inv(M_b)``) and
    :func:`align_dwi_to_t2` ``T2 -> DWI`` (truth ``inv(A)``). Non-linear transforms raise.
    """
    if transform.GetDimension() != 3 or not transform.IsLinear():
        raise InputError(f"not a 3D linear transform: {transform.GetName()}", step=STEP)
    return _matrix_of(transform.TransformPoint)


def mask_points_mm(mask: sitk.Image) -> np.ndarray:
    """LPS points (mm), shape (n, 3), of the voxel centres where ``mask`` is non-zero."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) != 0)[:, ::-1].astype(float)
    direction = np.array(mask.GetDirection(), dtype=float).reshape(3, 3)
    return (index * np.array(mask.GetSpacing())) @ direction.T + np.array(mask.GetOrigin())


def registration_error_mm(estimated: np.ndarray, truth: np.ndarray, points: np.ndarray) -> float:
    """Mean target registration error (mm): mean ``|E p - T p|`` over points (n, 3), 4x4s."""
    homogeneous = np.c_[points, np.ones(len(points))]
    offsets = homogeneous @ (np.asarray(estimated) - np.asarray(truth)).T
    return float(np.linalg.norm(offsets[:, :3], axis=1).mean())


def as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The same linear map as an ITK ``AffineTransform`` (copied when it already is one)."""
    if transform.GetName() == "AffineTransform":
        return sitk.AffineTransform(transform)
    return _affine(transform_to_matrix(transform))


def save_transform(transform: sitk.Transform, path: str | Path) -> str:
    """Write ``transform`` as an ITK ``.tfm`` text file, atomically; return its sha256.

    Written as ``AffineTransform_double_3_3`` with shortest round-trip decimals, so
    :func:`load_transform` (or ``sitk.ReadTransform``, ANTs, 3D Slicer) gets the identical
    fixed -> moving map back.
    """
    affine = as_affine(transform)
    text = (
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        f"Parameters: {' '.join(repr(float(v)) for v in affine.GetParameters())}\n"
        f"FixedParameters: {' '.join(repr(float(v)) for v in affine.GetFixedParameters())}\n"
    )
    return write_text_atomic(path, text)


def load_transform(path: str | Path) -> sitk.AffineTransform:
    """Read a linear ITK transform file (e.g. from :func:`save_transform`) as an affine."""
    if not Path(path).is_file():
        raise InputError("transform file not found", step=STEP, path=path)
    return as_affine(sitk.ReadTransform(str(path)))
