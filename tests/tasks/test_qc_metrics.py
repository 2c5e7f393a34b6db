"""Exact checks of the QC metrics on small synthetic images, and of the flags they raise."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from tasks.qc_flags import CohortStats, QcThresholds, judge
from tasks.qc_metrics import (
    METRICS,
    QcImages,
    agreement_metrics,
    decay_metrics,
    exam_qc_metrics,
    mean_uncertainty,
    residual_shift_mm,
    segmentation_metrics,
)

SPACING = (1.0, 1.0, 3.0)  # mm
SHAPE = (12, 60, 60)  # z, y, x


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    return image


def _ball(centre=(6, 30, 30), radius_mm=12.0) -> np.ndarray:
    z, y, x = np.indices(SHAPE).astype(float)
    d = np.sqrt(((z - centre[0]) * 3) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    return (d <= radius_mm).astype(np.uint8)


def _t2() -> sitk.Image:
    rng = np.random.default_rng(0)
    z, y, x = np.indices(SHAPE)
    texture = 100 + 40 * np.sin(x / 3.0) * np.cos(y / 4.0) + 30 * (x > 35)
    return _image((texture + 200 * _ball() + rng.normal(0, 5, SHAPE)).astype(np.float32))


def test_segmentation_metrics_count_pieces_holes_and_cut_off() -> None:
    labels = _ball()
    labels[6, 30, 30] = 0  # one enclosed hole voxel (3 mm³)
    labels[0, 2:5, 0:5] = 1  # a second piece on the first slice and the edge
    m = segmentation_metrics(_image(labels))
    assert m["components"] == 2 and m["holes_ml"] == pytest.approx(0.003)
    assert m["touches_first_slice"] == 1 and m["touches_last_slice"] == 0
    assert m["touches_border"] == 1
    assert m["outside_largest_fraction"] == pytest.approx(15 / (labels > 0).sum(), abs=1e-4)
    assert m["volume_ml"] == pytest.approx((labels > 0).sum() * 3 / 1000, abs=1e-3)


def test_agreement_is_dice_and_the_volume_difference() -> None:
    a, b = _ball(), _ball(centre=(6, 30, 33))
    m = agreement_metrics(_image(a), _image(b), "other")
    overlap = int((a & b).sum())
    assert m["dice_vs_other"] == pytest.approx(2 * overlap / (a.sum() + b.sum()), abs=1e-4)
    assert m["volume_diff_ml_vs_other"] == pytest.approx((int(a.sum()) - int(b.sum())) * 0.003)


def test_decay_ratio_rises_and_snr() -> None:
    gland = _ball() > 0
    dwi = {b: _image(np.full(SHAPE, s, np.float32)) for b, s in ((0, 100.0), (500, 60.0))}
    dwi[1000] = _image(np.full(SHAPE, 70.0, np.float32))  # rises: wrong b-value order
    m = decay_metrics(dwi, gland)
    assert m["dwi_b_values"] == "0,500,1000"
    assert m["dwi_decay_ratio"] == pytest.approx(0.7) and m["dwi_decay_rises"] == 1
    assert m["dwi_lowb_snr"] is None  # no spread: undefined, not a number


@pytest.mark.parametrize("shift_mm", [(0.0, 0.0), (4.0, 0.0), (0.0, -5.0), (3.0, 4.0)])
def test_residual_shift_finds_a_known_translation(shift_mm) -> None:
    t2 = _t2()
    moved = sitk.Resample(
        t2, t2, sitk.TranslationTransform(3, (*shift_mm, 0.0)), sitk.sitkLinear, 0.0
    )
    found = residual_shift_mm(t2, moved, _ball() > 0)
    assert found == pytest.approx(float(np.hypot(*shift_mm)), abs=1.01)


def test_mean_uncertainty_is_one_minus_the_chosen_probability() -> None:
    labels = np.array([[0, 1, 1]])  # (y, x); probabilities (labels + 1, y, x)
    p = np.array([[[0.9, 0.2, 0.4]], [[0.1, 0.8, 0.6]]])
    assert mean_uncertainty(p, labels) == pytest.approx(0.3)
    assert mean_uncertainty(p, np.zeros_like(labels)) is None


def test_every_metric_is_reported_and_a_clean_exam_passes() -> None:
    t2, mask = _t2(), _image(_ball())
    adc = _image(np.full(SHAPE, 1.2e-3, np.float32))
    dwi = {0.0: t2, 800.0: _image(sitk.GetArrayFromImage(t2) * 0.4)}
    images = QcImages(
        t2=t2,
        mask=mask,
        adc=adc,
        b1000=t2,
        dwi=dwi,
        dwi_reference=dwi[0.0],
        t2_to_dwi=sitk.AffineTransform(3),
        adc_scanner=_image(np.full(SHAPE, 1.1e-3, np.float32)),
    )
    registration = {"accepted_stage": "rigid", "scales": [1, 1, 1], "translation_mm": [1, 0, 0]}
    m = exam_qc_metrics(images, registration=registration, uncertainty_mean=0.05)
    assert set(m) == set(METRICS)
    assert m["adc_gland_median_um2_s"] == pytest.approx(1200, abs=0.1)
    assert m["adc_vs_scanner_rel"] == pytest.approx(0.1 / 1.1, abs=1e-3)
    assert m["residual_shift_mm"] == 0 and m["dwi_covers_mask"] == 1
    assert m["dwi_decay_ratio"] == pytest.approx(0.4, abs=1e-3)
    assert m["reg_stage"] == "rigid" and m["reg_translation_mm"] == 1
    assert judge(m, QcThresholds(volume_ml_review=(5, 150))).status == "pass", judge(m)


def test_flags_fail_first_then_review_with_reasons() -> None:
    metrics = {
        "volume_ml": 2.0,
        "dwi_decay_ratio": 1.2,
        "residual_shift_mm": 4.5,
        "touches_last_slice": 1.0,
        "adc_vs_scanner_rel": -0.3,
        "dice_vs_taps": 0.6,
        "volume_diff_ml_vs_taps": -1.0,  # 2 mL vs 3 mL
    }
    verdict = judge(metrics)
    assert verdict.status == "fail"
    assert verdict.reasons[0].startswith("gland volume 2.0 mL outside")
    assert "DWI gland signal does not fall with b" in verdict.reasons[1]
    assert any("DWI off the T2 by 4.5 mm" in r for r in verdict.reasons)
    assert any("Dice with taps 0.6" in r for r in verdict.reasons)
    assert any("-30%" in r for r in verdict.reasons)
    assert "volume -33% vs model taps" in verdict.reasons
    assert judge({"residual_shift_mm": 4.5}, QcThresholds(residual_shift_mm=5)).status == "pass"


def test_cohort_outliers_need_enough_exams() -> None:
    cohort = [{"volume_ml": v} for v in (30, 35, 40, 42, 45, 50, 38, 36, 44, 41)]
    stats = CohortStats.of(cohort)
    assert stats.n == 10 and stats.median["volume_ml"] == 40.5
    far = judge({"volume_ml": 140.0}, cohort=stats)
    assert any("cohort outlier" in r for r in far.reasons)
    few = CohortStats.of(cohort[:5])
    assert not any("cohort outlier" in r for r in judge({"volume_ml": 140.0}, cohort=few).reasons)
