"""QC status of one exam from its metrics: ``pass``, ``review`` or ``fail``, with reasons.

Thresholds are settings (:class:`QcThresholds`, the ``qc`` section), applied when the
review list is read, so changing one needs no recomputation. Defaults come from the phantom
and the real exams (``benchmarks/bench_qc.py``, ``benchmarks/results/qc.md``). ``fail`` is
kept for results that cannot be used as they are (an empty mask, a volume no prostate has,
DWI signal that does not fall with b, a gland mostly outside the DWI); everything else that
crosses a threshold asks for a ``review``. Cohort-relative outliers: a robust z-score
``0.6745 (x - median) / MAD`` of the gland volume and of its median ADC against every exam of
the same model so far, once there are :attr:`QcThresholds.outlier_min_exams` of them.
Metric names and units: :data:`tasks.qc_metrics.METRICS`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.qc_metrics import AGREEMENT_PREFIXES, Value

Status = Literal["pass", "review", "fail"]
STATUS_ORDER: dict[str, int] = {"fail": 0, "review": 1, "pass": 2}
#: Metrics compared with the cohort (robust z-score).
OUTLIER_METRICS = ("volume_ml", "adc_gland_median_um2_s")


class QcThresholds(BaseModel):
    """Where a metric asks for a review (or fails the exam). Units as in the metric names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    residual_shift_mm: float = Field(3.0, gt=0, description="review above: DWI off the T2")
    reg_translation_mm: float = Field(6.0, gt=0, description="review above: large correction")
    reg_scale_deviation: float = Field(0.05, gt=0, description="review above: stretched map")
    volume_ml_review: tuple[float, float] = Field((15.0, 150.0), description="review outside")
    volume_ml_fail: tuple[float, float] = Field((3.0, 400.0), description="fail outside")
    outside_largest_fraction: float = Field(0.01, ge=0, description="review above")
    holes_ml: float = Field(0.5, ge=0, description="review above")
    edge_outside_ratio: float = Field(
        1.05, gt=0, description="review above: a stronger T2 edge outside the outline"
    )
    dice_vs_other_model: float = Field(0.8, ge=0, le=1, description="review below")
    volume_vs_other_model: float = Field(
        0.2, gt=0, description="review above |volume / other model's - 1|"
    )
    uncertainty_mean: float = Field(0.2, ge=0, le=1, description="review above")
    dwi_lowb_snr: float = Field(1.5, ge=0, description="review below")
    adc_vs_scanner_rel: float = Field(0.15, gt=0, description="review above (absolute)")
    adc_clip_fraction: float = Field(0.05, ge=0, le=1, description="review above")
    dwi_covers_mask_review: float = Field(0.95, ge=0, le=1, description="review below")
    dwi_covers_mask_fail: float = Field(0.5, ge=0, le=1, description="fail below")
    t2_slice_spacing_mm: float = Field(4.5, gt=0, description="review above")
    t2_pixel_mm: float = Field(1.0, gt=0, description="review above")
    dwi_slice_spacing_mm: float = Field(5.5, gt=0, description="review above")
    outlier_z: float = Field(3.5, gt=0, description="review above |robust z|")
    outlier_min_exams: int = Field(10, ge=3, description="cohort size before outliers count")


@dataclass(frozen=True)
class CohortStats:
    """Median and MAD of :data:`OUTLIER_METRICS` over the exams of one model so far."""

    n: int
    median: dict[str, float] = field(default_factory=dict)
    mad: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Iterable[Mapping[str, Value]]) -> CohortStats:
        records = list(records)
        median, mad = {}, {}
        for name in OUTLIER_METRICS:
            values = np.array(
                [r[name] for r in records if isinstance(r.get(name), int | float)], dtype=float
            )
            if values.size:
                median[name] = float(np.median(values))
                mad[name] = float(np.median(np.abs(values - median[name])))
        return cls(n=len(records), median=median, mad=mad)

    def z(self, name: str, value: float) -> float | None:
        """Robust z-score, ``None`` without a spread to compare against."""
        mad = self.mad.get(name)
        if not mad:
            return None
        return 0.6745 * (value - self.median[name]) / mad


@dataclass(frozen=True)
class Verdict:
    status: Status
    reasons: tuple[str, ...]


def _number(metrics: Mapping[str, Value], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if isinstance(value, int | float) else None


def judge(
    metrics: Mapping[str, Value],
    thresholds: QcThresholds | None = None,
    cohort: CohortStats | None = None,
) -> Verdict:
    """The exam's status and every reason, failures first (module docstring)."""
    t = thresholds or QcThresholds()
    fail: list[str] = []
    review: list[str] = []
    get = lambda name: _number(metrics, name)  # noqa: E731 - local shorthand

    volume = get("volume_ml")
    if volume is not None and volume == 0:
        fail.append("mask is empty")
    elif volume is not None:
        if not t.volume_ml_fail[0] <= volume <= t.volume_ml_fail[1]:
            fail.append(f"gland volume {volume:.1f} mL outside {_range(t.volume_ml_fail)} mL")
        elif not t.volume_ml_review[0] <= volume <= t.volume_ml_review[1]:
            review.append(f"gland volume {volume:.1f} mL outside {_range(t.volume_ml_review)} mL")
    ratio = get("dwi_decay_ratio")
    if ratio is not None and ratio >= 1:
        fail.append(f"DWI gland signal does not fall with b (b-max/b-min {ratio:.2f})")
    elif (get("dwi_decay_rises") or 0) > 0:
        review.append(f"DWI gland signal rises between {get('dwi_decay_rises'):.0f} b pair(s)")
    covers = get("dwi_covers_mask")
    if covers is not None and covers < t.dwi_covers_mask_fail:
        fail.append(f"DWI covers {covers:.0%} of the mask")
    elif covers is not None and covers < t.dwi_covers_mask_review:
        review.append(f"DWI covers {covers:.0%} of the mask")

    def above(name: str, limit: float, text: str, unit: str = "") -> None:
        value = get(name)
        if value is not None and value > limit:
            review.append(f"{text} {value:g}{unit} > {limit:g}{unit}")

    def below(name: str, limit: float, text: str, unit: str = "") -> None:
        value = get(name)
        if value is not None and value < limit:
            review.append(f"{text} {value:g}{unit} < {limit:g}{unit}")

    above("residual_shift_mm", t.residual_shift_mm, "DWI off the T2 by", " mm")
    if metrics.get("reg_stage") == "identity":
        review.append("registration kept the scanner coordinates (no stage accepted)")
    above("reg_translation_mm", t.reg_translation_mm, "registration moved the DWI", " mm")
    above("reg_scale_deviation", t.reg_scale_deviation, "registration scaled by 1 +-")
    if (get("touches_first_slice") or 0) > 0:
        review.append("mask on the first T2 slice: gland may be cut off")
    if (get("touches_last_slice") or 0) > 0:
        review.append("mask on the last T2 slice: gland may be cut off")
    if (get("touches_border") or 0) > 0:
        review.append("mask on the edge of the T2 field of view")
    components = get("components") or 0
    outside = get("outside_largest_fraction") or 0
    if components > 1 and outside > t.outside_largest_fraction:
        review.append(f"mask in {components:.0f} pieces, {outside:.1%} outside the largest")
    above("holes_ml", t.holes_ml, "holes in the mask", " mL")
    edge = get("edge_outside_ratio")
    if edge is not None and edge > t.edge_outside_ratio:
        review.append(
            f"T2 edge 1-5 mm outside the outline {edge:g}x the edge at it: under-segmented?"
        )
    dice_prefix, volume_prefix = AGREEMENT_PREFIXES
    for name in sorted(metrics):
        if name.startswith(dice_prefix):
            below(name, t.dice_vs_other_model, f"Dice with {name[len(dice_prefix) :]}")
        difference = get(name) if name.startswith(volume_prefix) else None
        other = volume - difference if volume is not None and difference is not None else None
        if other and abs(difference / other) > t.volume_vs_other_model:
            review.append(f"volume {difference / other:+.0%} vs model {name[len(volume_prefix) :]}")
    above("uncertainty_mean", t.uncertainty_mean, "mean uncertainty in the mask")
    below("dwi_lowb_snr", t.dwi_lowb_snr, "lowest-b SNR")
    relative = get("adc_vs_scanner_rel")
    if relative is not None and abs(relative) > t.adc_vs_scanner_rel:
        review.append(f"ADC differs from the scanner's by {relative:+.0%} in the gland")
    above("adc_clip_fraction", t.adc_clip_fraction, "fraction of gland ADC at the clip limits")
    above("t2_slice_spacing_mm", t.t2_slice_spacing_mm, "T2 slice spacing", " mm")
    above("t2_pixel_mm", t.t2_pixel_mm, "T2 pixel", " mm")
    above("dwi_slice_spacing_mm", t.dwi_slice_spacing_mm, "DWI slice spacing", " mm")
    if cohort is not None and cohort.n >= t.outlier_min_exams:
        for name in OUTLIER_METRICS:
            value = get(name)
            z = cohort.z(name, value) if value is not None else None
            if z is not None and abs(z) > t.outlier_z:
                review.append(f"{name} {value:g} is a cohort outlier (robust z {z:+.1f})")
    status: Status = "fail" if fail else "review" if review else "pass"
    return Verdict(status, tuple(fail + review))


def _range(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:g}-{bounds[1]:g}"
