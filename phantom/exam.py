"""Deterministic synthetic prostate mpMRI exams written as real DICOM, with exact ground truth.

Every random choice for one exam is drawn once, by :func:`phantom.plan.plan_exam`, into a
frozen :class:`phantom.plan.ExamPlan`. :func:`generate_exam` is a pure function of the plan
(its noise comes from a generator seeded with the plan's seed and index), so the same plan
always gives byte-identical files, and tests change a choice with
``dataclasses.replace(plan, noise_sigma_dwi=0.0)``. This module renders the anatomy and the
physics; :mod:`phantom.dicom` writes the DICOM.

Coordinates and axis order
--------------------------
Physical coordinates are LPS (DICOM patient coordinates: +x patient left, +y posterior,
+z superior), in mm. Grids use ITK index order (x, y, z); numpy arrays here are (z, y, x), the
order ``sitk.GetArrayFromImage`` returns. "Anatomy space" is the physical space of the axial
T2-weighted series. The anatomy is defined analytically there (body = elliptic cylinder along
z, subcutaneous fat, muscle, pelvic fat, a rectum that curves posteriorly towards the sacrum
as it rises, prostate ellipsoid split into transition zone (TZ) and peripheral zone (PZ),
optional spherical lesion in the PZ). The rectum's tilt makes the anatomy vary along z
outside the gland too, as in a real pelvis, so that the through-plane position is
determined by more than the gland. (A bright urinary bladder above the gland was tried
and dropped: it raised the rigid DWI motion-correction error from ~0.15 to ~1 mm, because
its edges appear at low b and vanish at high b.) Tissue labels are evaluated at voxel
centres (no partial volume), so every voxel holds one tissue and the truth is exact.

Transform convention
--------------------
A DWI voxel of volume b at physical point y samples the anatomy at ``A @ M_b @ y``
(homogeneous 4x4, mm). ``M_b`` ("motion") maps volume b's physical space to the physical
space of the reference volume (the lowest b) and is the identity for the lowest b. ``A``
("dwi_to_t2") maps the reference DWI physical space to T2 (anatomy) physical space. An
ITK/elastix transform maps fixed points to moving points, so with fixed = reference DWI and
moving = volume b it should equal inv(M_b); with fixed = T2 and moving = reference DWI it
should equal inv(A); ``sitk.Resample(t2_image, dwi_reference, A)`` puts T2 data on the DWI
grid. Both are built about the gland centre c as ``T(c + t) @ R @ S @ H @ T(-c)`` with
``R = Rz @ Ry @ Rx`` (angles in degrees about the LPS axes), ``S = diag(scale)`` and
``H = [[1, h_xy, h_xz], [0, 1, h_yz], [0, 0, 1]]``; motion is rigid (S = H = I).

Signal model
------------
T2W at point p: ``T2[tissue(p)] * bias(p)``. DWI volume b at y:
``S0[tissue(A @ M_b @ y)] * exp(-b * ADC[tissue]) * bias(y)`` (b in s/mm², ADC in mm²/s).
``bias`` is a smooth receive-coil field defined in scanner (image physical) coordinates:
``exp(poly2((p - bias_center) / 100 mm))``, scaled so that max |log bias| = 0.3 over the body;
every DWI volume sees the same field. Noise is Rician (magnitude of signal plus complex
Gaussian noise of sigma ``noise_sigma_t2`` / ``noise_sigma_dwi``). Pixels are uint16
(rounded, clipped to 0..65535). The scanner ADC series is a log-linear least-squares fit over
all b of the noisy, moved DWI, in 1e-6 mm²/s, zero where the lowest-b signal is below
4 * noise sigma.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from phantom.dicom import (
    CORONAL,
    ORIENTATIONS,
    SAGITTAL,
    Grid,
    Volume,
    study_folder_name,
    write_exam_series,
)
from phantom.plan import (
    BIAS_SCALE_MM,
    FAT,
    GLAND_LABELS,
    LESION,
    MUSCLE,
    PZ,
    RECTUM,
    TISSUES,
    TZ,
    VENDORS,
    ExamPlan,
    Vec3,
    plan_exam,
)
from tasks.errors import InputError
from tasks.io import write_image_atomic, write_json_atomic

_T2 = np.array([t.t2 for t in TISSUES])
_S0 = np.array([t.s0 for t in TISSUES])
_ADC = np.array([t.adc_mm2_s for t in TISSUES])

T2_SIZE, T2_SPACING = (384, 384, 20), (0.5, 0.5, 3.0)
DWI_SIZE, DWI_SPACING = (128, 128, 20), (2.0, 2.0, 3.0)
PLANE_SIZE, PLANE_SPACING = (256, 256, 15), (0.7, 0.7, 4.0)  # sagittal and coronal T2
LOCALIZER_SIZE, LOCALIZER_SPACING = (256, 256, 1), (1.0, 1.0, 8.0)
BIAS_QUANTUM = 1e-3
ADC_MASK_SIGMAS = 4.0
SUBCUTANEOUS_FAT_MM = 20.0
#: Posterior shift of the rectum's centre per mm of height above the gland centre (mm/mm).
RECTUM_TILT = 0.35
_NOISE_STREAM = 1  # extra seed word: noise never shares the plan's random stream


@dataclass(frozen=True)
class SyntheticExam:
    """One generated exam: ``dicom_dir`` = <root>/dicom/<patient_folder>, truth beside it."""

    patient_folder: str
    dicom_dir: Path
    truth_dir: Path
    truth_json: Path
    plan: ExamPlan


def rotation_matrix(angles_deg: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """3x3 rotation ``Rz @ Ry @ Rx`` for angles (degrees) about the LPS x, y, z axes."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine_about(
    center: Vec3,
    rotation_deg: Vec3,
    translation_mm: Vec3,
    scale: Vec3 = (1.0, 1.0, 1.0),
    shear: Vec3 = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """4x4 ``T(c + t) @ R @ S @ H @ T(-c)`` (module docstring); points in mm."""
    h_xy, h_xz, h_yz = shear
    linear = (
        rotation_matrix(rotation_deg)
        @ np.diag(scale)
        @ np.array([[1.0, h_xy, h_xz], [0.0, 1.0, h_yz], [0.0, 0.0, 1.0]])
    )
    center_ = np.asarray(center, dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = center_ + np.asarray(translation_mm, dtype=float) - linear @ center_
    return affine


def motion_matrix(plan: ExamPlan, b_index: int) -> np.ndarray:
    """``M_b`` for ``plan.b_values[b_index]``: volume-b space -> reference DWI space (4x4)."""
    return affine_about(
        plan.gland_center_mm,
        plan.motion_rotation_deg[b_index],
        plan.motion_translation_mm[b_index],
    )


def dwi_to_t2_matrix(plan: ExamPlan) -> np.ndarray:
    """``A``: reference DWI physical space -> T2 (anatomy) physical space (4x4)."""
    return affine_about(
        plan.gland_center_mm,
        plan.dwi_to_t2_rotation_deg,
        plan.dwi_to_t2_translation_mm,
        plan.dwi_to_t2_scale,
        plan.dwi_to_t2_shear,
    )


def axial_direction(obliquity_deg: float) -> np.ndarray:
    """Axial stack tilted about the L-R axis: rows ~ +x, columns ~ +y, normal ~ +z."""
    return rotation_matrix((obliquity_deg, 0.0, 0.0))


def exam_grids(plan: ExamPlan) -> dict[str, Grid]:
    """All image grids of the exam (T2 and DWI share the oblique axial direction)."""
    axial = axial_direction(plan.obliquity_deg)
    center = plan.gland_center_mm
    return {
        "t2": Grid.centered(T2_SIZE, T2_SPACING, axial, plan.t2_center_mm),
        "dwi": Grid.centered(DWI_SIZE, DWI_SPACING, axial, plan.dwi_center_mm),
        "sagittal": Grid.centered(PLANE_SIZE, PLANE_SPACING, SAGITTAL, plan.t2_center_mm),
        "coronal": Grid.centered(PLANE_SIZE, PLANE_SPACING, CORONAL, plan.t2_center_mm),
        "localizer_axial": Grid.centered(LOCALIZER_SIZE, LOCALIZER_SPACING, np.eye(3), center),
        "localizer_sagittal": Grid.centered(LOCALIZER_SIZE, LOCALIZER_SPACING, SAGITTAL, center),
        "localizer_coronal": Grid.centered(LOCALIZER_SIZE, LOCALIZER_SPACING, CORONAL, center),
    }


def _inside_ellipse(
    x: np.ndarray, y: np.ndarray, center: Sequence[float], semi: Sequence[float]
) -> np.ndarray:
    return ((x - center[0]) / semi[0]) ** 2 + ((y - center[1]) / semi[1]) ** 2 <= 1.0


def _inside_ellipsoid(
    points: np.ndarray, center: Sequence[float], semi: Sequence[float]
) -> np.ndarray:
    x, y, z = points
    return (
        ((x - center[0]) / semi[0]) ** 2
        + ((y - center[1]) / semi[1]) ** 2
        + ((z - center[2]) / semi[2]) ** 2
    ) <= 1.0


def tissue_labels(plan: ExamPlan, points: np.ndarray) -> np.ndarray:
    """Tissue label (uint8, see :data:`TISSUES`) at each anatomy-space point.

    ``points`` has shape (3, ...) holding LPS x, y, z in mm; the result has shape ``...``.
    """
    x, y, z = points[0], points[1], points[2]
    labels = np.zeros(x.shape, dtype=np.uint8)
    inner = tuple(s - SUBCUTANEOUS_FAT_MM for s in plan.body_semi_axes_mm)
    labels[_inside_ellipse(x, y, plan.body_center_mm, plan.body_semi_axes_mm)] = FAT
    labels[_inside_ellipse(x, y, plan.body_center_mm, inner)] = MUSCLE
    labels[_inside_ellipse(x, y, plan.pelvic_fat_center_mm, plan.pelvic_fat_semi_axes_mm)] = FAT
    tilted_y = y - RECTUM_TILT * (z - plan.gland_center_mm[2])  # the rectum's cross-section
    labels[_inside_ellipse(x, tilted_y, plan.rectum_center_mm, plan.rectum_semi_axes_mm)] = RECTUM
    labels[_inside_ellipsoid(points, plan.gland_center_mm, plan.gland_semi_axes_mm)] = PZ
    labels[_inside_ellipsoid(points, plan.tz_center_mm, plan.tz_semi_axes_mm)] = TZ
    if plan.has_lesion:
        radius = (plan.lesion_radius_mm,) * 3
        lesion = _inside_ellipsoid(points, plan.lesion_center_mm, radius) & (labels == PZ)
        labels[lesion] = LESION
    return labels


def bias_field(plan: ExamPlan, grid: Grid) -> np.ndarray:
    """Multiplicative receive field on a grid's voxel centres, (z, y, x) float64.

    The field is defined in scanner (image physical) coordinates, so a grid's own points are
    used whatever the patient did. Values are rounded to multiples of :data:`BIAS_QUANTUM`
    (the rounded field is the one applied and saved, so truth stays exact and compresses).
    """
    # The quadratic in u = (p - center) / scale is a quadratic in the voxel index (i, j, k),
    # summed from small broadcast terms instead of evaluated on three full point arrays.
    a = np.asarray(plan.bias_coefficients, dtype=float)
    linear = a[:3]
    quad = np.array(
        [[a[3], a[6] / 2, a[7] / 2], [a[6] / 2, a[4], a[8] / 2], [a[7] / 2, a[8] / 2, a[5]]]
    )
    affine = grid.index_to_physical()
    n = affine[:3, :3] / BIAS_SCALE_MM
    u0 = (affine[:3, 3] - np.asarray(plan.bias_center_mm)) / BIAS_SCALE_MM
    g = n.T @ (linear + 2 * quad @ u0)
    q = n.T @ quad @ n
    nx, ny, nz = grid.size
    i = np.arange(nx, dtype=float)[None, None, :]
    j = np.arange(ny, dtype=float)[None, :, None]
    k = np.arange(nz, dtype=float)[:, None, None]
    log = (
        (linear @ u0 + u0 @ quad @ u0 + g[2] * k + q[2, 2] * k * k)
        + (g[1] * j + q[1, 1] * j * j + 2 * q[1, 2] * j * k)
        + (g[0] * i + q[0, 0] * i * i + 2 * q[0, 1] * i * j)
        + 2 * q[0, 2] * i * k
    )
    return np.round(np.exp(log) / BIAS_QUANTUM) * BIAS_QUANTUM


def _magnitude(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Rician magnitude |signal + n_re + i n_im| (noise sigma ``sigma``), as uint16."""
    if sigma > 0:
        real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
        signal = np.hypot(real, sigma * rng.standard_normal(signal.shape, dtype=np.float32))
    return np.clip(np.rint(signal), 0, 65535).astype(np.uint16)


def fit_scanner_adc(
    volumes: list[np.ndarray], b_values: tuple[int, ...], threshold: float
) -> np.ndarray:
    """Log-linear least-squares ADC over all b, in 1e-6 mm²/s (uint16), like a scanner map.

    ``volumes`` are (z, y, x) magnitude images in ``b_values`` order; voxels whose first
    (lowest-b) signal is at or below ``threshold`` are set to 0.
    """
    b = np.asarray(b_values, dtype=float)
    weights = (b - b.mean()) / np.sum((b - b.mean()) ** 2)
    logs = np.log(np.maximum(np.stack(volumes).astype(float), 1.0))
    adc = -np.tensordot(weights, logs, axes=1) * 1e6
    adc[volumes[0] <= threshold] = 0.0
    return np.clip(np.rint(adc), 0, 65535).astype(np.uint16)


CONVENTION = (
    "LPS mm, 4x4 row-major homogeneous matrices acting on column vectors. A DWI voxel of "
    "volume b at physical point y samples anatomy (T2 physical space) at dwi_to_t2 @ "
    "motion[b] @ y. motion[b] maps volume-b physical space to the reference (lowest-b) DWI "
    "physical space (identity for the lowest b); dwi_to_t2 maps reference DWI physical space "
    "to T2 physical space. An ITK/elastix transform (fixed points -> moving points) with "
    "fixed = reference DWI, moving = volume b equals inv(motion[b]); with fixed = T2, "
    "moving = reference DWI it equals inv(dwi_to_t2)."
)


def _check_plan(plan: ExamPlan) -> None:
    """Reject plans that :func:`generate_exam` cannot honour (e.g. after a bad ``replace``)."""
    n_b = len(plan.b_values)
    problems = []
    if plan.vendor not in VENDORS:
        problems.append(f"vendor {plan.vendor!r} is not one of {VENDORS}")
    if n_b < 2 or any(lo >= hi for lo, hi in itertools.pairwise(plan.b_values)):
        problems.append(f"b_values {plan.b_values} must be >= 2 strictly ascending values")
    if len(plan.motion_rotation_deg) != n_b or len(plan.motion_translation_mm) != n_b:
        problems.append("motion_rotation_deg / motion_translation_mm need one entry per b")
    elif any(plan.motion_rotation_deg[0]) or any(plan.motion_translation_mm[0]):
        problems.append("the lowest b is the motion reference: its motion must be zero")
    if plan.noise_sigma_t2 < 0 or plan.noise_sigma_dwi < 0:
        problems.append("noise sigmas must be >= 0")
    if len(plan.bias_coefficients) != 9:
        problems.append("bias_coefficients needs 9 values")
    if plan.patient_id == plan.patient_folder:
        problems.append("patient_id must differ from the folder name (pseudonymisation tests)")
    if problems:
        raise InputError(
            "; ".join(problems),
            patient=plan.patient_folder,
            step="synthetic",
            hint="start from plan_exam(seed, index) and change fields consistently",
        )


def _render_t2(plan: ExamPlan, grid: Grid, rng: np.random.Generator) -> Volume:
    """T2W image on a grid acquired in anatomy space (T2 session: scanner = anatomy)."""
    points = grid.points()
    signal = _T2[tissue_labels(plan, points)] * bias_field(plan, grid)
    return Volume(grid, _magnitude(signal, plan.noise_sigma_t2, rng))


def generate_exam(root: Path, plan: ExamPlan) -> SyntheticExam:
    """Write one exam's DICOM series and ground truth under ``root``.

    Parameters
    ----------
    root
        Cohort folder; created if missing. Existing files of this exam are overwritten.
    plan
        Choices from :func:`plan_exam`, possibly changed with ``dataclasses.replace``.

    Returns
    -------
    SyntheticExam
        Paths of the exam's DICOM and truth folders and of ``truth.json``.

    Raises
    ------
    InputError
        If the plan is inconsistent (see :func:`_check_plan`).

    Outputs
    -------
    ``<root>/dicom/<patient_folder>/<study folder>/<series folder>/<n>.dcm``: localizer
    (3 slices: axial, sagittal, coronal), sagittal T2, coronal T2, oblique axial T2W, DWI
    (vendor layout, see :mod:`phantom.dicom`), optional scanner ADC.
    ``<root>/truth/<patient_folder>/``: on the T2 grid ``t2_tissue`` (labels of
    :data:`TISSUES`), ``t2_gland_mask``, ``t2_zones`` (1 = PZ incl. lesion, 2 = TZ),
    ``t2_lesion_mask`` (with a lesion), ``t2_bias``, ``adc_true_t2`` (mm²/s); on the reference
    DWI grid ``dwi_tissue``, ``dwi_gland_mask``, ``dwi_bias``, ``adc_true_dwi`` (mm²/s),
    ``s0_true_dwi`` (S0 * bias) and ``b1000_true_dwi`` (S0 * bias * exp(-1000 ADC)), all
    noise- and motion-free ``.nii.gz``; and ``truth.json``.
    """
    _check_plan(plan)
    root = Path(root)
    dicom_dir = root / "dicom" / plan.patient_folder
    truth_dir = root / "truth" / plan.patient_folder
    grids = exam_grids(plan)
    rng = np.random.default_rng([plan.seed, plan.index, _NOISE_STREAM])

    t2_points = grids["t2"].points()
    t2_labels = tissue_labels(plan, t2_points)
    t2_bias = bias_field(plan, grids["t2"])
    del t2_points
    t2 = Volume(grids["t2"], _magnitude(_T2[t2_labels] * t2_bias, plan.noise_sigma_t2, rng))
    sagittal = _render_t2(plan, grids["sagittal"], rng)
    coronal = _render_t2(plan, grids["coronal"], rng)
    localizer = [_render_t2(plan, grids[f"localizer_{o}"], rng) for o in ORIENTATIONS]

    dwi_grid = grids["dwi"]
    dwi_bias = bias_field(plan, dwi_grid)
    dwi_to_t2 = dwi_to_t2_matrix(plan)
    dwi_labels = []
    dwi = []
    for b_index, b_value in enumerate(plan.b_values):
        labels = tissue_labels(plan, dwi_grid.points(dwi_to_t2 @ motion_matrix(plan, b_index)))
        signal = _S0[labels] * np.exp(-b_value * _ADC[labels]) * dwi_bias
        dwi.append(Volume(dwi_grid, _magnitude(signal, plan.noise_sigma_dwi, rng), b_value))
        dwi_labels.append(labels)
    adc = None
    if plan.has_scanner_adc:
        threshold = ADC_MASK_SIGMAS * plan.noise_sigma_dwi
        adc = Volume(dwi_grid, fit_scanner_adc([v.pixels for v in dwi], plan.b_values, threshold))

    series = write_exam_series(
        dicom_dir / study_folder_name(plan),
        plan,
        localizer=localizer,
        sagittal=sagittal,
        coronal=coronal,
        t2=t2,
        dwi=dwi,
        adc=adc,
    )
    truth_json = _write_truth(
        truth_dir, plan, grids, t2_labels, t2_bias, dwi_labels[0], dwi_bias, series
    )
    return SyntheticExam(plan.patient_folder, dicom_dir, truth_dir, truth_json, plan)


def generate_cohort(root: Path, n_patients: int, seed: int = 0) -> list[SyntheticExam]:
    """Generate exams ``plan_exam(seed, i)`` for i in 0..n_patients-1 under ``root``."""
    if n_patients < 0:
        raise InputError(f"n_patients must be >= 0, got {n_patients}", step="synthetic")
    return [generate_exam(root, plan_exam(seed, index)) for index in range(n_patients)]


def _write_truth(
    truth_dir: Path,
    plan: ExamPlan,
    grids: dict[str, Grid],
    t2_labels: np.ndarray,
    t2_bias: np.ndarray,
    dwi_labels: np.ndarray,
    dwi_bias: np.ndarray,
    series: list[dict[str, object]],
) -> Path:
    """Write the truth images and ``truth.json``; return the JSON's path."""
    t2_grid, dwi_grid = grids["t2"], grids["dwi"]
    gland = np.isin(t2_labels, GLAND_LABELS)
    zones = np.where(np.isin(t2_labels, (PZ, LESION)), 1, np.where(t2_labels == TZ, 2, 0))
    s0 = _S0[dwi_labels] * dwi_bias
    images = {
        "t2_tissue": (t2_grid, t2_labels),
        "t2_gland_mask": (t2_grid, gland.astype(np.uint8)),
        "t2_zones": (t2_grid, zones.astype(np.uint8)),
        "t2_bias": (t2_grid, t2_bias.astype(np.float32)),
        "adc_true_t2": (t2_grid, _ADC[t2_labels].astype(np.float32)),
        "dwi_tissue": (dwi_grid, dwi_labels),
        "dwi_gland_mask": (dwi_grid, np.isin(dwi_labels, GLAND_LABELS).astype(np.uint8)),
        "dwi_bias": (dwi_grid, dwi_bias.astype(np.float32)),
        "adc_true_dwi": (dwi_grid, _ADC[dwi_labels].astype(np.float32)),
        "s0_true_dwi": (dwi_grid, s0.astype(np.float32)),
        "b1000_true_dwi": (dwi_grid, (s0 * np.exp(-1000 * _ADC[dwi_labels])).astype(np.float32)),
    }
    if plan.has_lesion:
        images["t2_lesion_mask"] = (t2_grid, (t2_labels == LESION).astype(np.uint8))
    hashes = {
        f"{name}.nii.gz": write_image_atomic(grid.image(array), truth_dir / f"{name}.nii.gz")
        for name, (grid, array) in images.items()
    }
    voxel_ml = float(np.prod(T2_SPACING)) / 1000.0
    truth = {
        "seed": plan.seed,
        "index": plan.index,
        "patient_folder": plan.patient_folder,
        "vendor": plan.vendor,
        "field_strength_t": plan.field_strength_t,
        "b_values": list(plan.b_values),
        "has_scanner_adc": plan.has_scanner_adc,
        "has_lesion": plan.has_lesion,
        "obliquity_deg": plan.obliquity_deg,
        "series": series,
        "noise_sigma": {"t2": plan.noise_sigma_t2, "dwi": plan.noise_sigma_dwi},
        "tissues": {
            t.name: {"label": label, "t2": t.t2, "s0": t.s0, "adc_mm2_s": t.adc_mm2_s}
            for label, t in enumerate(TISSUES)
        },
        "transforms": {
            "convention": CONVENTION,
            "motion": {
                str(b): motion_matrix(plan, i).tolist() for i, b in enumerate(plan.b_values)
            },
            "dwi_to_t2": dwi_to_t2_matrix(plan).tolist(),
        },
        "bias": {
            "definition": "exp(sum(c_i * term_i(u))), u = (p - center_mm) / scale_mm, "
            "p in image physical (scanner) coordinates",
            "terms": ["x", "y", "z", "x2", "y2", "z2", "xy", "xz", "yz"],
            "coefficients": list(plan.bias_coefficients),
            "center_mm": list(plan.bias_center_mm),
            "scale_mm": BIAS_SCALE_MM,
        },
        "grids": {name: grid.as_dict() for name, grid in grids.items()},
        "gland_center_mm": list(plan.gland_center_mm),
        "gland_volume_ml": {
            "analytic": 4.0 / 3.0 * np.pi * float(np.prod(plan.gland_semi_axes_mm)) / 1000.0,
            "t2_voxels": int(gland.sum()) * voxel_ml,
        },
        "lesion_volume_ml": (
            int((t2_labels == LESION).sum()) * voxel_ml if plan.has_lesion else None
        ),
        "identifiers": {
            "patient_name": plan.patient_name,
            "patient_id": plan.patient_id,
            "birth_date": plan.birth_date,
            "accession": plan.accession,
        },
        "files": hashes,
        "plan": asdict(plan),
    }
    write_json_atomic(truth_dir / "truth.json", truth)
    return truth_dir / "truth.json"
