"""N4 bias correction against the synthetic generator's exact receive field.

One synthetic exam (cohort seed 0, index 0: Siemens, b = 50..1400, the noisiest DWI of the
first 16 exams) is generated, ingested and corrected once per module; the figures are
printed (``pytest -s``) and asserted with margins that a broken step cannot meet.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from phantom.exam import generate_exam
from phantom.plan import FAT, MUSCLE, plan_exam
from tasks.bias import (
    N4Params,
    correct_bias_dwi,
    correct_bias_n4,
    foreground_mask,
    shrink_factors_for,
)
from tasks.discover import discover_exams
from tasks.errors import InputError
from tasks.ingest import ingest_exam

PARAMS = N4Params(threads=1)


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(np.float64)


def _log_field_correlation(log_estimate: np.ndarray, log_truth: np.ndarray, inside) -> float:
    """Pearson r of two log fields inside a mask (both mean-centred: N4's scale is free)."""
    x = log_estimate[inside] - log_estimate[inside].mean()
    y = log_truth[inside] - log_truth[inside].mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


@pytest.fixture(scope="module")
def exam(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("bias")
    generated = generate_exam(root, plan_exam(0, 0))
    (found,) = discover_exams(root / "dicom")
    result = ingest_exam(found, out_dir=root / "out", key="k")
    assert result.status == "ok", result.error
    images = {"dwi": {}}
    for record in result.series:
        path = root / "out" / record.image
        if record.kind == "t2w":
            images["t2"] = sitk.ReadImage(str(path))
        elif record.kind == "dwi":
            images["dwi"][float(record.b_value)] = sitk.ReadImage(str(path))
    images["truth"] = generated.truth_dir
    images["truth_json"] = json.loads(generated.truth_json.read_text())
    return images


@pytest.fixture(scope="module")
def t2_result(exam: dict) -> tuple[sitk.Image, sitk.Image, float]:
    start = time.perf_counter()
    corrected, field = correct_bias_n4(exam["t2"], params=PARAMS)
    return corrected, field, time.perf_counter() - start


@pytest.fixture(scope="module")
def dwi_result(exam: dict) -> tuple[dict, sitk.Image]:
    return correct_bias_dwi(exam["dwi"], params=PARAMS)


def _truth(exam: dict, name: str) -> np.ndarray:
    return _array(sitk.ReadImage(str(Path(exam["truth"]) / f"{name}.nii.gz")))


def test_t2_field_matches_true_field(exam: dict, t2_result: tuple) -> None:
    _, field, seconds = t2_result
    body = _truth(exam, "t2_tissue") > 0
    r = _log_field_correlation(np.log(_array(field)), np.log(_truth(exam, "t2_bias")), body)
    print(f"\nT2 N4: r(log field, true log field) = {r:.3f} in the body, {seconds:.1f} s")
    assert r >= 0.75


def test_t2_tissue_non_uniformity_drops(exam: dict, t2_result: tuple) -> None:
    corrected, _, _ = t2_result
    tissue = _truth(exam, "t2_tissue")
    before, after = _array(exam["t2"]), _array(corrected)
    fat = tissue == FAT
    drop = 1 - _cv(after[fat]) / _cv(before[fat])
    muscle = tissue == MUSCLE
    print(
        f"\nT2 CV fat {_cv(before[fat]):.4f} -> {_cv(after[fat]):.4f} ({drop:.0%} lower); "
        f"muscle {_cv(before[muscle]):.4f} -> {_cv(after[muscle]):.4f} (noise-dominated)"
    )
    # Fat (T2 350, noise sigma ~8.5) shows the field; muscle (T2 90) is dominated by noise.
    assert drop >= 0.30
    assert _cv(after[muscle]) < _cv(before[muscle])


def test_outputs_are_full_resolution_float32_on_the_input_grid(exam: dict, t2_result) -> None:
    corrected, field, _ = t2_result
    for image in (corrected, field):
        assert image.GetSize() == exam["t2"].GetSize()
        assert image.GetOrigin() == exam["t2"].GetOrigin()
        assert image.GetSpacing() == exam["t2"].GetSpacing()
        assert image.GetDirection() == exam["t2"].GetDirection()
        assert image.GetPixelID() == sitk.sitkFloat32
    # The fit ran on a shrunk grid; the field is smooth at full resolution, not blocky.
    assert shrink_factors_for(exam["t2"], PARAMS) == (16, 16, 2)  # 8 mm grid, 0.5x0.5x3 mm T2
    log_field = np.log(_array(field))
    assert np.abs(np.diff(log_field, axis=2)).max() < 0.01  # per 0.5 mm step along x
    ratio = _array(exam["t2"]) / np.maximum(_array(corrected), 1e-6)
    inside = _array(corrected) > 1
    np.testing.assert_allclose(ratio[inside], _array(field)[inside], rtol=1e-4)


def test_dwi_field_from_lowest_b_matches_truth(exam: dict, dwi_result: tuple) -> None:
    _, field = dwi_result
    assert shrink_factors_for(exam["dwi"][min(exam["dwi"])], PARAMS) == (4, 4, 2)
    body = _truth(exam, "dwi_tissue") > 0
    r = _log_field_correlation(np.log(_array(field)), np.log(_truth(exam, "dwi_bias")), body)
    tissue = _truth(exam, "dwi_tissue")
    b0 = min(exam["dwi"])
    muscle = tissue == MUSCLE
    before, after = _array(exam["dwi"][b0])[muscle], _array(dwi_result[0][b0])[muscle]
    print(
        f"\nDWI N4 (fitted on b{b0:g}): r = {r:.3f}; muscle CV {_cv(before):.4f} -> "
        f"{_cv(after):.4f}"
    )
    assert r >= 0.75
    assert _cv(after) < _cv(before)


def test_dwi_correction_keeps_every_signal_ratio(exam: dict, dwi_result: tuple) -> None:
    corrected, field = dwi_result
    assert sorted(corrected) == sorted(exam["dwi"])
    b0 = min(exam["dwi"])
    raw0, cor0 = _array(exam["dwi"][b0]), _array(corrected[b0])
    valid = raw0 > 1
    for b in exam["dwi"]:
        raw_ratio = _array(exam["dwi"][b])[valid] / raw0[valid]
        corrected_ratio = _array(corrected[b])[valid] / cor0[valid]
        np.testing.assert_allclose(corrected_ratio, raw_ratio, rtol=1e-5, atol=1e-6)
        assert corrected[b].GetSize() == field.GetSize()


def test_foreground_mask_covers_the_body(exam: dict) -> None:
    mask = _array(foreground_mask(exam["t2"])) > 0
    body = _truth(exam, "t2_tissue") > 0
    covered = (mask & body).sum() / body.sum()
    spill = (mask & ~body).sum() / max(1, (~body).sum())
    print(f"\nforeground mask: {covered:.2%} of the body, {spill:.2%} of the air")
    assert covered > 0.99
    assert spill < 0.2


def test_bad_inputs_raise_input_errors(exam: dict) -> None:
    with pytest.raises(InputError, match="3D"):
        correct_bias_n4(exam["t2"][:, :, 0], params=PARAMS)
    wrong = sitk.Image([8, 8, 8], sitk.sitkUInt8)
    with pytest.raises(InputError, match="mask size"):
        correct_bias_n4(exam["t2"], params=PARAMS, mask=wrong)
    with pytest.raises(InputError, match="constant"):
        foreground_mask(sitk.Image([16, 16, 8], sitk.sitkFloat32))
    moved = sitk.Image(exam["dwi"][min(exam["dwi"])])
    moved.SetOrigin([v + 5.0 for v in moved.GetOrigin()])
    with pytest.raises(InputError, match="not on the grid"):
        correct_bias_dwi({0.0: exam["dwi"][min(exam["dwi"])], 800.0: moved}, params=PARAMS)
    with pytest.raises(ValueError):
        N4Params(iterations=())
