"""Every choice for one synthetic exam: :class:`ExamPlan`, drawn by :func:`plan_exam`.

Every random choice for one exam is drawn once, by :func:`plan_exam`, into a frozen
:class:`ExamPlan`. :func:`phantom.exam.generate_exam` is a pure function of the plan (its
noise comes from a generator seeded with the plan's seed and index), so the same plan always
gives byte-identical files, and tests change a choice with
``dataclasses.replace(plan, noise_sigma_dwi=0.0)``.

Also here: the vendors (:data:`VENDORS`), the tissue labels and their parameters
(:data:`TISSUES`) and the receive-field scale the plan's bias coefficients are normalised
with. Coordinates, anatomy, transforms and signal model: :mod:`phantom.exam`.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass

import numpy as np

from tasks.errors import InputError

VENDORS: tuple[str, ...] = ("siemens", "ge", "philips", "standard")

AIR, FAT, MUSCLE, RECTUM, PZ, TZ, LESION = range(7)
GLAND_LABELS = (PZ, TZ, LESION)


@dataclass(frozen=True)
class Tissue:
    """One tissue: T2W signal and DWI b=0 signal S0 (arbitrary units), ADC (mm²/s)."""

    name: str
    t2: float
    s0: float
    adc_mm2_s: float


#: Tissue parameters indexed by label (AIR = 0 ... LESION = 6).
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", 0.0, 0.0, 0.0),
    Tissue("fat", 350.0, 40.0, 0.3e-3),
    Tissue("muscle", 90.0, 300.0, 1.4e-3),
    Tissue("rectum", 120.0, 200.0, 1.0e-3),
    Tissue("pz", 330.0, 600.0, 1.6e-3),
    Tissue("tz", 180.0, 500.0, 1.2e-3),
    Tissue("lesion", 110.0, 550.0, 0.8e-3),
)

#: The receive field is a quadratic in (p - bias_center_mm) / BIAS_SCALE_MM, scaled so that
#: max |log bias| = BIAS_LOG_RANGE over the body.
BIAS_SCALE_MM = 100.0
BIAS_LOG_RANGE = 0.3

_LAST_NAMES = ("Jansen", "Smith", "Peeters", "Novak", "Rossi", "Larsen", "Dubois", "Visser")
_FIRST_NAMES = ("Jan", "Peter", "John", "Luca", "Erik", "Pierre", "Tomasz", "Henk")

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class ExamPlan:
    """Every choice for one synthetic exam. Lengths in mm, angles in degrees, LPS points.

    Body and pelvic fat are elliptic cylinders along z given by an (x, y) centre and
    semi-axes; the rectum is an elliptic cylinder whose centre (``rectum_center_mm`` at the
    gland's height) moves posteriorly by :data:`phantom.exam.RECTUM_TILT` mm per mm upwards;
    gland and TZ are axis-aligned ellipsoids; the lesion is a sphere (clipped to the PZ).
    ``motion_*`` hold one entry per b-value (same order as ``b_values``; the first, lowest b
    is the identity). ``dwi_to_t2_shear`` is (h_xy, h_xz, h_yz). ``bias_coefficients`` multiply
    (x, y, z, x², y², z², xy, xz, yz) of ``(p - bias_center_mm) / 100 mm``.
    ``messy_names`` gives folder names with spaces and dots; ``siemens_bvalue_ob`` writes the
    Siemens b-value as OB bytes; ``ge_bvalue_offset`` adds 1e9 to the GE b-value.
    """

    seed: int
    index: int
    patient_folder: str
    vendor: str
    field_strength_t: float
    b_values: tuple[int, ...]
    has_scanner_adc: bool
    has_lesion: bool
    obliquity_deg: float
    gland_center_mm: Vec3
    gland_semi_axes_mm: Vec3
    tz_center_mm: Vec3
    tz_semi_axes_mm: Vec3
    lesion_center_mm: Vec3
    lesion_radius_mm: float
    body_center_mm: tuple[float, float]
    body_semi_axes_mm: tuple[float, float]
    pelvic_fat_center_mm: tuple[float, float]
    pelvic_fat_semi_axes_mm: tuple[float, float]
    rectum_center_mm: tuple[float, float]
    rectum_semi_axes_mm: tuple[float, float]
    t2_center_mm: Vec3
    dwi_center_mm: Vec3
    noise_sigma_t2: float
    noise_sigma_dwi: float
    bias_center_mm: Vec3
    bias_coefficients: tuple[float, ...]
    motion_rotation_deg: tuple[Vec3, ...]
    motion_translation_mm: tuple[Vec3, ...]
    dwi_to_t2_rotation_deg: Vec3
    dwi_to_t2_translation_mm: Vec3
    dwi_to_t2_scale: Vec3
    dwi_to_t2_shear: Vec3
    patient_name: str
    patient_id: str
    birth_date: str
    accession: str
    study_date: str
    study_time: str
    messy_names: bool
    siemens_bvalue_ob: bool
    ge_bvalue_offset: bool


def plan_exam(seed: int, index: int) -> ExamPlan:
    """Draw every choice for exam ``index`` (0-based) of the cohort ``seed``.

    Deterministic: the generator is ``np.random.default_rng([seed, index])``. Structural
    choices follow the index so any few consecutive exams cover them: vendor =
    ``VENDORS[index % 4]``; b1000 unless ``index % 3 == 2``; a scanner ADC and a lesion for
    about half the exams, patterns chosen so 8 consecutive exams pair every vendor with and
    without each; messy folder names when ``index % 3 == 1``; Siemens b-values as OB bytes
    and GE b-values with the 1e9 offset on alternating visits of that vendor.

    Raises
    ------
    InputError
        If ``seed`` or ``index`` is negative.
    """
    if seed < 0 or index < 0:
        raise InputError(f"seed and index must be >= 0, got {seed}, {index}", step="synthetic")
    rng = np.random.default_rng([seed, index])

    def uniform(low: float, high: float, n: int = 3) -> tuple[float, ...]:
        return tuple(round(float(v), 4) for v in rng.uniform(low, high, n))

    field = float(rng.choice([1.5, 3.0]))
    b_values = [int(rng.choice([0, 50])), 400, 800]
    b_values += [1000] if index % 3 != 2 else []
    b_values += [1400] if rng.random() < 0.4 else []
    gland = np.array(uniform(-8, 8))
    a, b, c = (np.array([24.0, 18.0, 21.0]) * rng.uniform(0.9, 1.1, 3)).round(4)
    tz_center = gland + (0.0, -0.25 * b, 0.1 * c)
    phi = np.deg2rad(rng.uniform(-60, 60))  # lesion direction in the axial plane, 0 = posterior
    lesion_center = gland + 0.72 * np.array([a * np.sin(phi), b * np.cos(phi), 0.0])
    lesion_center[2] += rng.uniform(-0.35, 0.35) * c
    lesion_radius = (3 * rng.uniform(300, 1000) / (4 * np.pi)) ** (1 / 3)
    body_center = gland[:2] + (0.0, -15.0) + uniform(-5, 5, 2)
    body_semi = (*uniform(100, 120, 1), *uniform(80, 92, 1))
    rectum_semi = (15.0, 13.0)
    rectum_center = (gland[0] + uniform(-3, 3, 1)[0], gland[1] + b + 3.0 + rectum_semi[1])
    bias_center = gland + uniform(-20, 20)
    sigma_t2 = uniform(6, 12, 1)[0]
    pz_b800 = TISSUES[PZ].s0 * np.exp(-800 * TISSUES[PZ].adc_mm2_s)
    sigma_dwi = round(float(pz_b800 / rng.uniform(10, 20)), 4)
    n_b = len(b_values)
    rotations = [(0.0, 0.0, 0.0)] + [uniform(-2, 2) for _ in range(n_b - 1)]
    translations = [(0.0, 0.0, 0.0)] + [uniform(-2, 2) for _ in range(n_b - 1)]
    raw_bias = rng.normal(size=9)
    birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 9000)))
    study = datetime.date(2009, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 2900)))
    visit = index // len(VENDORS)
    plan = ExamPlan(
        seed=seed,
        index=index,
        patient_folder=f"SYN-{index + 1:04d}",
        vendor=VENDORS[index % len(VENDORS)],
        field_strength_t=field,
        b_values=tuple(b_values),
        has_scanner_adc=(index + visit) % 2 == 0,
        has_lesion=(index % 4 in (0, 3)) != (visit % 2 == 1),
        obliquity_deg=uniform(0, 10, 1)[0],
        gland_center_mm=_vec(gland),
        gland_semi_axes_mm=_vec((a, b, c)),
        tz_center_mm=_vec(tz_center),
        tz_semi_axes_mm=_vec((0.6 * a, 0.55 * b, 0.7 * c)),
        lesion_center_mm=_vec(lesion_center),
        lesion_radius_mm=round(float(lesion_radius), 4),
        body_center_mm=(round(float(body_center[0]), 4), round(float(body_center[1]), 4)),
        body_semi_axes_mm=body_semi,
        pelvic_fat_center_mm=(float(gland[0]), round(float(gland[1] + 12.0), 4)),
        pelvic_fat_semi_axes_mm=(round(float(a + 20.0), 4), round(float(b + 27.0), 4)),
        rectum_center_mm=(round(float(rectum_center[0]), 4), round(float(rectum_center[1]), 4)),
        rectum_semi_axes_mm=rectum_semi,
        t2_center_mm=_vec(gland + uniform(-3, 3)),
        dwi_center_mm=_vec(gland + uniform(-3, 3)),
        noise_sigma_t2=sigma_t2,
        noise_sigma_dwi=sigma_dwi,
        bias_center_mm=_vec(bias_center),
        bias_coefficients=(),
        motion_rotation_deg=tuple(rotations),
        motion_translation_mm=tuple(translations),
        dwi_to_t2_rotation_deg=uniform(-3, 3),
        dwi_to_t2_translation_mm=uniform(-4, 4),
        dwi_to_t2_scale=uniform(0.97, 1.03),
        dwi_to_t2_shear=uniform(-0.02, 0.02),
        patient_name=f"{_LAST_NAMES[rng.integers(8)]}^{_FIRST_NAMES[rng.integers(8)]}",
        patient_id=str(rng.integers(100_000_000, 1_000_000_000)),
        birth_date=birth.strftime("%Y%m%d"),
        accession=str(rng.integers(10_000_000, 100_000_000)),
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}",
        messy_names=index % 3 == 1,
        siemens_bvalue_ob=visit % 2 == 1,
        ge_bvalue_offset=visit % 2 == 0,
    )
    return _with_normalised_bias(plan, raw_bias)


def _vec(values: np.ndarray | tuple[float, ...]) -> Vec3:
    x, y, z = (round(float(v), 4) for v in values)
    return (x, y, z)


def _with_normalised_bias(plan: ExamPlan, raw: np.ndarray) -> ExamPlan:
    """Scale raw bias coefficients so max |log bias| = BIAS_LOG_RANGE over the body."""
    (bx, by), (sx, sy) = plan.body_center_mm, plan.body_semi_axes_mm
    gx, gy = np.meshgrid(np.linspace(-1, 1, 15), np.linspace(-1, 1, 15), indexing="ij")
    inside = gx**2 + gy**2 <= 1
    xs, ys = bx + sx * gx[inside], by + sy * gy[inside]
    zs = plan.gland_center_mm[2] + np.linspace(-35, 35, 5)
    points = np.stack([np.tile(xs, zs.size), np.tile(ys, zs.size), np.repeat(zs, xs.size)]).astype(
        float
    )
    log_unit = _bias_log(plan.bias_center_mm, tuple(raw), points)
    scale = BIAS_LOG_RANGE / np.abs(log_unit).max()
    coefficients = tuple(round(float(v * scale), 6) for v in raw)
    return dataclasses.replace(plan, bias_coefficients=coefficients)


def _bias_log(center: Vec3, coefficients: tuple[float, ...], points: np.ndarray) -> np.ndarray:
    offset = np.asarray(center, dtype=float).reshape((3,) + (1,) * (points.ndim - 1))
    x, y, z = (points - offset) / BIAS_SCALE_MM
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    return sum(a * t for a, t in zip(coefficients, terms, strict=True))
