"""Tests for tasks.dwi: exact fits on noise-free phantoms, accuracy on synthetic exams with
exact truth (motion off, Rician noise on), and ProstateX-0000 against the scanner's ADC map.

Synthetic exams 0 (b 50/400/800/1000/1400, acquired b1000) and 2 (b 0/400/800, no b1000) of
cohort seed 0 are read from their DICOM with the ingest's own volume builder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from phantom.exam import generate_exam
from phantom.plan import plan_exam
from tasks.denoise import SusanParams, denoise_dwi
from tasks.dicom_headers import read_headers
from tasks.dwi import (
    DwiFitParams,
    compute_adc,
    fit_monoexponential,
    predict_signal,
    select_b_values,
    standardize_b1000,
    through_origin_adc,
)
from tasks.errors import InputError
from tasks.ingest import adc_scale
from tasks.volumes import build_dwi_volumes, build_volume

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "dicom").is_dir(),
    reason=f"real ProstateX sample data not found at {DATA} (tests need ../shared/data)",
)
DEFAULT = DwiFitParams()

# --------------------------------------------------------------------- noise-free phantoms


def _phantom(b_values: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    s0 = rng.uniform(200, 900, (3, 4, 5))
    adc = rng.uniform(0.3e-3, 3.0e-3, (3, 4, 5))
    signals = np.stack([predict_signal(s0, adc, b) for b in b_values])
    return signals, s0, adc


@pytest.mark.parametrize("estimator", ["wlls", "wlls_measured", "ols"])
def test_exact_on_noise_free_data(estimator: str) -> None:
    b_values = (0.0, 100.0, 400.0, 800.0)
    signals, s0, adc = _phantom(b_values)
    fit_s0, fit_adc = fit_monoexponential(
        signals, b_values, params=DwiFitParams(estimator=estimator, floor_fraction=0.0)
    )
    np.testing.assert_allclose(fit_adc, adc, rtol=1e-9)
    np.testing.assert_allclose(fit_s0, s0, rtol=1e-9)  # S0 extrapolated: b0 was left out
    np.testing.assert_allclose(through_origin_adc(signals, b_values), adc, rtol=1e-9)


def test_through_origin_formula_and_non_decaying_voxels() -> None:
    b_values = (50.0, 400.0, 800.0)
    signals = np.array([[100.0, 100.0, 50.0], [60.0, 120.0, 0.0], [40.0, 150.0, 10.0]])
    x = np.array([350.0, 750.0])
    expected = -(x[0] * np.log(60 / 100) + x[1] * np.log(40 / 100)) / (x @ x)
    adc = through_origin_adc(signals, b_values)
    assert adc[0] == pytest.approx(expected)
    assert adc[1] == 0.0  # rising signal: non-decaying voxel -> 0
    assert adc[2] == pytest.approx(np.log(50 / 10) / 750)  # the zero at b400 is left out


def test_b_value_selection() -> None:
    assert select_b_values((0, 100, 400, 800), DEFAULT) == (100, 400, 800)
    assert select_b_values((0, 400, 800), DEFAULT) == (0, 400, 800)  # two would be too few
    assert select_b_values((0, 50, 400, 800, 1000), DEFAULT) == (50, 400, 800, 1000)
    assert select_b_values((800, 0, 400), DwiFitParams(b_values=(0, 800))) == (0, 800)
    with pytest.raises(InputError, match="b1400 requested"):
        select_b_values((0, 400, 800), DwiFitParams(b_values=(0, 1400)))
    with pytest.raises(InputError, match="2 distinct"):
        select_b_values((800,), DEFAULT)
    with pytest.raises(ValueError, match="noise_sigma"):
        DwiFitParams(noise_floor="sigma")


def test_noise_floor_handling() -> None:
    b_values = (50.0, 400.0, 800.0)
    b = np.asarray(b_values)
    decaying = [float(predict_signal(500.0, 1.2e-3, value)) for value in b_values]
    signals = np.stack(
        [
            decaying,  # clean: every point above the floor
            [500.0, 150.0, 0.0],  # b800 at the floor: left out of this voxel's fit
            [500.0, 8.0, 0.0],  # one usable point: fitted on signals clipped to the floor
            [3.0, 2.0, 1.0],  # lowest b at the floor: background
            decaying,  # outside the mask below
        ],
        axis=1,
    )
    params = DwiFitParams(
        noise_floor="sigma",
        noise_sigma=5.0,
        floor_sigmas=2.0,
        estimator="ols",
        adc_range_mm2_s=(0.0, 1e-2),
    )
    s0, adc = fit_monoexponential(signals, b_values, params=params)
    assert adc[0] == pytest.approx(1.2e-3) and s0[0] == pytest.approx(500.0)
    assert adc[1] == pytest.approx(np.log(500 / 150) / 350)
    slope = np.polyfit(b, np.log([500.0, 10.0, 10.0]), 1)[0]
    assert adc[2] == pytest.approx(-slope)  # a lower bound on the true, faster decay
    assert s0[3] == 0.0 and adc[3] == 0.0
    clip = params.model_copy(update={"floor_handling": "clip"})
    assert fit_monoexponential(signals, b_values, params=clip)[1][1] == pytest.approx(
        -np.polyfit(b, np.log([500.0, 150.0, 10.0]), 1)[0]
    )
    mask = np.array([True, True, True, True, False])
    s0_m, adc_m = fit_monoexponential(signals, b_values, params=params, mask=mask)
    assert s0_m[4] == 0.0 and adc_m[4] == 0.0 and adc_m[0] == adc[0]
    capped = params.model_copy(update={"adc_range_mm2_s": (0.0, 1e-3)})
    assert fit_monoexponential(signals, b_values, params=capped)[1].max() == 1e-3


def test_images_on_different_grids_are_refused() -> None:
    a = sitk.Image(4, 4, 3, sitk.sitkFloat32) + 100
    b = sitk.Image(4, 4, 3, sitk.sitkFloat32) + 50
    b.SetSpacing((2.0, 2.0, 3.0))
    with pytest.raises(InputError, match="not on the grid"):
        compute_adc({0.0: a, 800.0: b}, params=DEFAULT)


# --------------------------------------------------------------------- synthetic exams


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("dwi")
    cases = {}
    for index in (0, 2):
        plan = plan_exam(0, index)
        still = ((0.0, 0.0, 0.0),) * len(plan.b_values)
        plan = dataclasses.replace(plan, motion_rotation_deg=still, motion_translation_mm=still)
        exam = generate_exam(root / f"exam{index}", plan)
        entry = next(
            e for e in json.loads(exam.truth_json.read_text())["series"] if e["kind"] == "dwi"
        )
        folder = exam.dicom_dir / entry["folder"]
        volumes = build_dwi_volumes([(entry["folder"], read_headers(sorted(folder.iterdir())))])
        images = {v.b_value: v.image for v in volumes}  # as tasks.ingest builds them

        def truth(name: str, folder: Path = exam.truth_dir) -> np.ndarray:
            return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{name}.nii.gz")))

        cases[index] = {
            "plan": plan,
            "images": images,
            "gland": truth("dwi_gland_mask") > 0,
            "adc": truth("adc_true_dwi").astype(np.float64),
            "s0": truth("s0_true_dwi").astype(np.float64),
            "b1000": truth("b1000_true_dwi").astype(np.float64),
        }
    return cases


def _median_abs_rel(value: np.ndarray, truth: np.ndarray, where: np.ndarray) -> float:
    return float(np.median(np.abs(value[where] - truth[where]) / truth[where]))


def _crlb_median_abs_rel(case: dict, b_values: tuple[float, ...]) -> float:
    """Median |relative ADC error| an efficient unbiased estimator reaches (Cramér-Rao)."""
    gland = case["gland"]
    adc, s0 = case["adc"][gland], case["s0"][gland]
    b = np.asarray(b_values)[:, None]
    e2 = np.exp(-2 * b * adc)
    a, c, d = e2.sum(0), (b * e2).sum(0), (b * b * e2).sum(0)
    std = case["plan"].noise_sigma_dwi * np.sqrt(a / (s0**2 * (a * d - c * c))) / adc
    draws = np.random.default_rng(0).standard_normal((40, std.size)) * std
    return float(np.median(np.abs(draws), axis=1).mean())


WLLS = DwiFitParams(estimator="wlls")


def _median_signed_rel(value: np.ndarray, truth: np.ndarray, where: np.ndarray) -> float:
    return float(np.median((value[where] - truth[where]) / truth[where]))


def test_adc_accuracy_on_synthetic_exams(synthetic: dict) -> None:
    """Precision on mono-exponential exams with Rician noise. ``estimator="wlls"`` is passed
    explicitly: the efficiency and <= 3 % bounds are properties of the S²-weighted fit, not
    of the default OLS (chosen to agree with vendor ADC maps; tasks/dwi.py). OLS is as
    unbiased but less precise; its figures are printed and bounded by the efficiency check."""
    figures = {}
    for index, case in synthetic.items():
        adc = sitk.GetArrayFromImage(compute_adc(case["images"], params=WLLS))
        error = _median_abs_rel(adc, case["adc"], case["gland"])
        bound = _crlb_median_abs_rel(case, select_b_values(case["images"], WLLS))
        ols = sitk.GetArrayFromImage(compute_adc(case["images"], params=DEFAULT))
        ols_error = _median_abs_rel(ols, case["adc"], case["gland"])
        signed = _median_signed_rel(adc, case["adc"], case["gland"])
        ols_signed = _median_signed_rel(ols, case["adc"], case["gland"])
        figures[index] = (error, bound, ols_error, signed, ols_signed)
        assert error <= 1.10 * bound  # efficient: at the Cramér-Rao precision
        assert abs(signed) <= 0.01  # unbiased despite Rician noise
        assert ols_error > 1.15 * bound  # the efficiency check can fail
        assert abs(ols_signed) <= 0.01  # OLS: unbiased too, only noisier
    for index, (error, bound, ols_error, signed, ols_signed) in figures.items():
        print(
            f"exam {index}: median |rel ADC error| wlls {error:.2%} (signed {signed:+.2%}; "
            f"Cramér-Rao {bound:.2%}); default {DEFAULT.estimator} {ols_error:.2%} "
            f"(signed {ols_signed:+.2%})"
        )
    assert DEFAULT.estimator == "ols"
    assert figures[2][0] <= 0.03  # raw wlls fit, b 0/400/800


def test_adc_after_susan_within_3_percent(synthetic: dict) -> None:
    """wlls explicitly: on this exam (b1400 near the noise floor) only the S²-weighted fit
    stays within 3 % after SUSAN; the default OLS's figure is printed (about 4.6 %)."""
    case = synthetic[0]  # the noisiest: sigma 16 and a b1400 near the noise floor
    smoothed = denoise_dwi(case["images"], params=SusanParams(backend="native"))
    adc = compute_adc(smoothed, params=WLLS)
    assert adc.GetPixelID() == sitk.sitkFloat32
    assert adc.GetOrigin() == case["images"][50.0].GetOrigin()
    values = sitk.GetArrayFromImage(adc)
    error = _median_abs_rel(values, case["adc"], case["gland"])
    ols = sitk.GetArrayFromImage(compute_adc(smoothed, params=DEFAULT))
    ols_error = _median_abs_rel(ols, case["adc"], case["gland"])
    ols_signed = _median_signed_rel(ols, case["adc"], case["gland"])
    print(
        f"exam 0 after SUSAN (fwhm 4 mm): median |rel ADC error| wlls {error:.2%}, "
        f"default {DEFAULT.estimator} {ols_error:.2%} (signed {ols_signed:+.2%})"
    )
    assert error <= 0.03
    assert abs(ols_signed) <= 0.01
    assert 5e-4 < float(np.median(values[case["gland"]])) < 3e-3  # stored in mm²/s


def test_ours_not_worse_than_through_origin(synthetic: dict) -> None:
    """wlls explicitly: the weighted fit is never less precise than the through-origin
    formula; OLS is not (exam 0, with b1400 near the noise floor: printed)."""
    for index, case in synthetic.items():
        b_values = sorted(case["images"])
        stack = np.stack([sitk.GetArrayFromImage(case["images"][b]) for b in b_values])
        origin = np.clip(through_origin_adc(stack, b_values), *DEFAULT.adc_range_mm2_s)
        ours = sitk.GetArrayFromImage(compute_adc(case["images"], params=WLLS))
        ols = sitk.GetArrayFromImage(compute_adc(case["images"], params=DEFAULT))
        e_ours = _median_abs_rel(ours, case["adc"], case["gland"])
        e_ols = _median_abs_rel(ols, case["adc"], case["gland"])
        e_origin = _median_abs_rel(origin, case["adc"], case["gland"])
        print(
            f"exam {index}: wlls {e_ours:.2%}, default {DEFAULT.estimator} {e_ols:.2%} vs "
            f"through-origin {e_origin:.2%}"
        )
        assert e_ours <= e_origin


def test_b1000_extrapolated_without_acquired_b1000(synthetic: dict) -> None:
    case = synthetic[2]
    image, info = standardize_b1000(case["images"], params=DEFAULT)
    assert info["method"] == "extrapolated" and info["fit_b_values"] == [0.0, 400.0, 800.0]
    assert image.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    gland, truth = case["gland"], case["b1000"]
    error = _median_abs_rel(values, truth, gland)
    signed = float(np.median((values[gland] - truth[gland]) / truth[gland]))
    print(f"exam 2 extrapolated b1000 vs truth: median |rel error| {error:.2%} ({signed:+.2%})")
    assert error <= 0.05 and abs(signed) <= 0.01


def test_b1000_acquired_is_kept(synthetic: dict) -> None:
    case = synthetic[0]
    image, info = standardize_b1000(case["images"], params=DEFAULT)
    assert info["method"] == "acquired" and info["b_value"] == 1000.0
    acquired = sitk.GetArrayFromImage(case["images"][1000.0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), acquired)
    fitted, fitted_info = standardize_b1000(
        case["images"], params=DwiFitParams(keep_acquired_target=False)
    )
    assert fitted_info["method"] == "fitted"
    gland, truth = case["gland"], case["b1000"]
    kept_error = _median_abs_rel(acquired.astype(np.float64), truth, gland)
    fit_error = _median_abs_rel(sitk.GetArrayFromImage(fitted).astype(np.float64), truth, gland)
    print(f"exam 0 b1000 vs truth: acquired {kept_error:.2%}, fitted instead {fit_error:.2%}")
    assert fit_error < kept_error


# ------------------------------------------------------------------ real data: ProstateX

X0000 = DATA / "dicom" / "ProstateX-0000" / "07-07-2011"
X0218 = DATA / "dicom" / "ProstateX-0218" / "02-18-2011"
GLAND_0000 = DATA / "labels" / "ProstateX-0000" / "gland_Bosma22b.nii.gz"


def _folder(exam: Path, prefix: str) -> Path:
    (folder,) = [p for p in exam.iterdir() if p.name.startswith(prefix)]
    return folder


def _real_dwi(exam: Path, *prefixes: str) -> dict[float, sitk.Image]:
    """b -> volume of the given series (primary first) built as ingest builds them."""
    pairs = []
    for prefix in prefixes:
        folder = _folder(exam, prefix)
        pairs.append((folder.name, read_headers(sorted(folder.iterdir()))))
    return {v.b_value: v.image for v in build_dwi_volumes(pairs)}


def _scanner_adc(exam: Path, prefix: str) -> np.ndarray:
    """The scanner's ADC map in mm²/s, (z, y, x) on the DWI grid."""
    folder = _folder(exam, prefix)
    image = build_volume(read_headers(sorted(folder.iterdir())), label=folder.name).image
    scale, _ = adc_scale(image)
    return sitk.GetArrayFromImage(image).astype(np.float64) * scale


def _central_box(shape: tuple[int, ...]) -> np.ndarray:
    nz, ny, nx = shape
    region = np.zeros(shape, bool)
    region[nz // 4 : nz - nz // 4, ny // 4 : ny - ny // 4, nx // 4 : nx - nx // 4] = True
    return region


def _median_rel_to_scanner(
    images: dict[float, sitk.Image], scanner: np.ndarray, region: np.ndarray, params: DwiFitParams
) -> float:
    adc = sitk.GetArrayFromImage(compute_adc(images, params=params)).astype(np.float64)
    where = region & (scanner > 0)  # the scanner zeroes voxels it judged to be noise
    return float(np.median((adc[where] - scanner[where]) / scanner[where]))


@pytest.mark.realdata
@needs_data
def test_prostatex_0000_adc_against_scanner() -> None:
    """Our ADC vs the scanner's ADC map (series 7, 1e-6 mm²/s) in the central region.

    Bound: the scanner map is itself a log-linear fit of the same three images, so the
    difference comes from how b-values are weighted where decay is not mono-exponential.
    Any positively weighted least-squares slope lies, voxel by voxel, between the steepest
    and the shallowest two-point slope, so the median relative difference must lie between
    the medians of those two envelopes (computed here) for every estimator, and the default
    (OLS, the vendors' convention) must agree within 5 %.
    """
    images = _real_dwi(X0000, "6.")
    assert sorted(images) == [50.0, 400.0, 800.0]
    scanner = _scanner_adc(X0000, "7.")
    region = _central_box(scanner.shape) & (scanner > 0)

    def median_rel(adc: np.ndarray) -> float:
        return float(np.median((adc[region] - scanner[region]) / scanner[region]))

    ours = _median_rel_to_scanner(images, scanner, region, DEFAULT)
    wlls = _median_rel_to_scanner(images, scanner, region, DwiFitParams(estimator="wlls"))
    logs = {
        b: np.log(np.maximum(sitk.GetArrayFromImage(img).astype(np.float64), 1.0))
        for b, img in images.items()
    }
    pairs = [(logs[lo] - logs[hi]) / (hi - lo) for lo, hi in ((50, 400), (50, 800), (400, 800))]
    low, high = median_rel(np.min(pairs, axis=0)), median_rel(np.max(pairs, axis=0))
    print(
        f"ProstateX-0000 ADC vs scanner over {region.sum()} central voxels: median relative "
        f"difference {ours:+.2%} (default {DEFAULT.estimator}), {wlls:+.2%} (wlls); "
        f"two-point envelope [{low:+.2%}, {high:+.2%}]"
    )
    assert low < ours < high and low < wlls < high
    assert abs(ours) <= 0.05


@pytest.mark.realdata
@pytest.mark.skipif(not GLAND_0000.is_file(), reason=f"{GLAND_0000} not found")
@needs_data
def test_prostatex_0000_default_adc_in_gland_against_scanner() -> None:
    """Inside the reference gland (mapped onto the DWI grid through scanner coordinates),
    the default fit agrees with the scanner's ADC map within 5 % (median signed); the
    S²-weighted fit does not (benchmarks/results/adc_scanner.md)."""
    images = _real_dwi(X0000, "6.")
    scanner = _scanner_adc(X0000, "7.")
    reference = images[50.0]
    mask = sitk.Cast(sitk.ReadImage(str(GLAND_0000)) > 0, sitk.sitkFloat32)
    moved = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    gland = sitk.GetArrayFromImage(moved) >= 0.5
    assert 3000 < int((gland & (scanner > 0)).sum()) < 4500  # ~44 mL of 12 mm³ voxels
    ours = _median_rel_to_scanner(images, scanner, gland, DEFAULT)
    wlls = _median_rel_to_scanner(images, scanner, gland, DwiFitParams(estimator="wlls"))
    print(f"ProstateX-0000 gland ADC vs scanner: {ours:+.2%} (default), {wlls:+.2%} (wlls)")
    assert abs(ours) <= 0.05
    assert wlls > 0.05


@pytest.mark.realdata
@needs_data
def test_prostatex_0218_one_acquisition_adc_against_scanner() -> None:
    """Series 8 alone (b 0/100/400/800, TE 60 ms), as ingest selects it, against its
    scanner ADC (series 9) in the central box (the gland needs a segmentation model; the
    benchmark reports it)."""
    images = _real_dwi(X0218, "8.")
    assert sorted(images) == [0.0, 100.0, 400.0, 800.0]
    scanner = _scanner_adc(X0218, "9.")
    ours = _median_rel_to_scanner(images, scanner, _central_box(scanner.shape), DEFAULT)
    print(f"ProstateX-0218 (series 8) central-box ADC vs scanner: {ours:+.2%} (default)")
    assert abs(ours) <= 0.05


@pytest.mark.realdata
@needs_data
def test_prostatex_0218_mixing_acquisitions_is_wrong() -> None:
    """Merging the TE 72 ms b100/b500/b1400 series (17-19) into series 8 (TE 60 ms), as
    ingest did before one acquisition per fit, fits one S0 across two echo times: the ADC
    falls far below the scanner's, whichever estimator is used."""
    merged = _real_dwi(X0218, "8.", "17.", "18.", "19.")
    assert sorted(merged) == [0.0, 100.0, 400.0, 500.0, 800.0, 1400.0]
    scanner = _scanner_adc(X0218, "9.")
    region = _central_box(scanner.shape)
    figures = {
        name: _median_rel_to_scanner(merged, scanner, region, DwiFitParams(estimator=name))
        for name in ("ols", "wlls")
    }
    print(f"ProstateX-0218 merged series 8+17+18+19 vs scanner: {figures}")
    assert all(value < -0.05 for value in figures.values())
