"""Tests for tasks.evaluate against an independent numpy/scipy implementation written here:
overlaps by counting voxels, surface distances by a Euclidean distance transform with the
voxel spacing (``scipy.ndimage.distance_transform_edt(sampling=...)``) on surface voxels.
Also: known distances in mm on anisotropic grids, SimpleITK's Hausdorff filter, the
empty-mask conventions, grid checks, labels, the NaN-aware summary and the tables.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from tasks.errors import InputError
from tasks.evaluate import (
    METRICS,
    evaluate_labels,
    evaluate_masks,
    format_cases_csv,
    format_markdown_table,
    format_summary_csv,
    summarize,
    write_cases_csv,
    write_summary_csv,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "labels").is_dir(),
    reason=f"real ProstateX sample data not found at {DATA} (tests need ../shared/data)",
)
ANISOTROPIC = (0.5, 0.5, 3.0)  # x, y, z mm: a prostate T2
SHAPE = (10, 40, 40)  # z, y, x


def _image(array: np.ndarray, spacing=ANISOTROPIC, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array).astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _ellipsoid(centre_mm, semi_axes_mm, spacing=ANISOTROPIC, shape=SHAPE) -> np.ndarray:
    z, y, x = np.indices(shape).astype(np.float64)
    coords = (x * spacing[0], y * spacing[1], z * spacing[2])
    return (
        sum(((c - m) / a) ** 2 for c, m, a in zip(coords, centre_mm, semi_axes_mm, strict=True))
        <= 1.0
    )


def _blob(seed: int, shape=SHAPE, threshold=0.6) -> np.ndarray:
    """A random, non-convex blob (smoothed noise above a threshold)."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), (1, 3, 3))
    return noise > threshold * noise.std()


# ----------------------------------------------------- independent reference implementation


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with a face-neighbour outside it (outside the array counts)."""
    eroded = ndimage.binary_erosion(
        mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0
    )
    return mask & ~eroded


def _directed(a: np.ndarray, b: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance (mm) from each surface voxel of a to the nearest surface voxel of b."""
    distance_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing_zyx)
    return distance_to_b[_surface(a)]


def _reference(pred: np.ndarray, ref: np.ndarray, spacing_xyz) -> dict[str, float]:
    spacing_zyx = tuple(reversed(spacing_xyz))
    tp = float((pred & ref).sum())
    d_pr, d_rp = _directed(pred, ref, spacing_zyx), _directed(ref, pred, spacing_zyx)
    voxel_ml = math.prod(spacing_xyz) / 1000.0
    return {
        "dice": 2 * tp / (pred.sum() + ref.sum()),
        "iou": tp / (pred | ref).sum(),
        "sensitivity": tp / ref.sum(),
        "precision": tp / pred.sum(),
        "hd": max(d_pr.max(), d_rp.max()),
        "hd95": max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
        "volume_pred_ml": pred.sum() * voxel_ml,
        "volume_ref_ml": ref.sum() * voxel_ml,
        "volume_diff_ml": (pred.sum() - ref.sum()) * voxel_ml,
        "volume_diff_pct": 100.0 * (pred.sum() - ref.sum()) / ref.sum(),
    }


def _assert_matches(metrics: dict, expected: dict) -> None:
    assert set(metrics) == set(METRICS)
    for key, value in expected.items():
        # MONAI returns distances as float32: 1e-6 relative; everything else float64
        rel = 1e-6 if key in ("hd", "hd95") else 1e-12
        assert metrics[key] == pytest.approx(float(value), rel=rel, abs=1e-12), key


CASES = {
    "shifted ellipsoids": (
        lambda: _ellipsoid((10.0, 9.5, 13.0), (6.0, 5.0, 10.0)),
        lambda: _ellipsoid((11.2, 9.0, 15.5), (5.0, 5.5, 9.0)),
    ),
    "random blobs": (lambda: _blob(1), lambda: _blob(2)),
    "blob touching the border": (lambda: _blob(3, threshold=0.0), lambda: _blob(3, threshold=0.3)),
    "nested": (
        lambda: _ellipsoid((10.0, 10.0, 13.5), (4.0, 4.0, 6.0)),
        lambda: _ellipsoid((10.0, 10.0, 13.5), (7.0, 7.0, 11.0)),
    ),
}


@pytest.mark.parametrize("spacing", [ANISOTROPIC, (0.7, 0.4, 2.0)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_metrics_match_an_independent_implementation(case: str, spacing) -> None:
    pred, ref = (make() for make in CASES[case])
    assert pred.any() and ref.any() and not (pred == ref).all()
    metrics = evaluate_masks(_image(pred, spacing), _image(ref, spacing))
    _assert_matches(metrics, _reference(pred, ref, spacing))


def test_distances_are_in_mm_on_anisotropic_grids() -> None:
    box = np.zeros(SHAPE, bool)
    box[2:5, 10:20, 10:20] = True
    moved_z = np.roll(box, 2, axis=0)  # two 3 mm slices
    moved_x = np.roll(box, 2, axis=2)  # two 0.5 mm pixels
    along_z = evaluate_masks(_image(box), _image(moved_z))
    along_x = evaluate_masks(_image(box), _image(moved_x))
    assert along_z["hd"] == pytest.approx(6.0) and along_z["hd95"] == pytest.approx(6.0)
    assert along_x["hd"] == pytest.approx(1.0) and along_x["hd95"] == pytest.approx(1.0)
    assert along_z["dice"] == pytest.approx(1 / 3) and along_x["dice"] == pytest.approx(0.8)


def test_hausdorff_agrees_with_simpleitk_on_convex_shapes() -> None:
    """SimpleITK's filter measures between voxel sets, not surfaces: equal for these."""
    pred = _image(_ellipsoid((10.0, 9.5, 13.0), (6.0, 5.0, 10.0)))
    ref = _image(_ellipsoid((11.2, 9.0, 15.5), (5.0, 5.5, 9.0)))
    check = sitk.HausdorffDistanceImageFilter()
    check.Execute(pred, ref)
    assert evaluate_masks(pred, ref)["hd"] == pytest.approx(check.GetHausdorffDistance(), rel=1e-6)


def test_identical_masks_are_perfect() -> None:
    blob = _image(_blob(4))
    metrics = evaluate_masks(blob, blob)
    assert {k: metrics[k] for k in ("dice", "iou", "sensitivity", "precision")} == dict.fromkeys(
        ("dice", "iou", "sensitivity", "precision"), 1.0
    )
    assert metrics["hd"] == 0.0 and metrics["hd95"] == 0.0 and metrics["volume_diff_ml"] == 0.0


def test_empty_mask_conventions() -> None:
    empty = _image(np.zeros(SHAPE))
    blob = _image(_blob(5))
    both = evaluate_masks(empty, empty)
    no_pred = evaluate_masks(empty, blob)
    no_ref = evaluate_masks(blob, empty)
    nan = math.isnan
    assert both["dice"] == 1.0 and both["iou"] == 1.0
    assert all(nan(both[k]) for k in ("sensitivity", "precision", "hd", "hd95", "volume_diff_pct"))
    assert both["volume_pred_ml"] == both["volume_ref_ml"] == both["volume_diff_ml"] == 0.0
    assert no_pred["dice"] == 0.0 and no_pred["iou"] == 0.0 and no_pred["sensitivity"] == 0.0
    assert all(nan(no_pred[k]) for k in ("precision", "hd", "hd95"))
    assert no_pred["volume_diff_pct"] == -100.0
    assert no_pred["volume_diff_ml"] == -no_pred["volume_ref_ml"] < 0
    assert no_ref["dice"] == 0.0 and no_ref["iou"] == 0.0 and no_ref["precision"] == 0.0
    assert all(nan(no_ref[k]) for k in ("sensitivity", "hd", "hd95", "volume_diff_pct"))
    assert no_ref["volume_diff_ml"] == no_ref["volume_pred_ml"] > 0
    # the summary leaves the undefined values out and says over how many cases it is
    summary = summarize([both, no_pred, no_ref, evaluate_masks(blob, blob)])
    assert summary["n_cases"] == 4
    assert summary["dice"]["n"] == 4 and summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["hd"]["n"] == 1 and summary["hd"]["mean"] == 0.0 and nan(summary["hd"]["sd"])
    assert summary["precision"] == {
        "mean": pytest.approx(0.5),
        "sd": pytest.approx(0.7071067811865476),
        "n": 2,
    }


def test_grids_must_match_and_are_never_resampled() -> None:
    pred = _blob(6)
    with pytest.raises(InputError, match="not on the same voxel grid"):
        evaluate_masks(_image(pred), _image(pred, origin=(0.5, 0.0, 0.0)))  # one pixel off
    with pytest.raises(InputError, match="not on the same voxel grid"):
        evaluate_masks(_image(pred), _image(pred, spacing=(0.5, 0.5, 3.3)))
    with pytest.raises(InputError, match="not on the same voxel grid"):
        evaluate_masks(_image(pred), _image(pred[:, :, :-1]))
    # header rounding (0.01 mm, far below the tolerance) is the same grid: same numbers
    exact = evaluate_masks(_image(pred), _image(_blob(7)))
    rounded = evaluate_masks(_image(pred), _image(_blob(7), origin=(0.01, 0.0, -0.01)))
    assert rounded == exact


def test_labels_and_pixel_types() -> None:
    rng = np.random.default_rng(8)
    zones_pred = np.where(_blob(9), rng.integers(1, 3, SHAPE), 0)
    zones_ref = np.where(_blob(10), rng.integers(1, 3, SHAPE), 0)
    pred, ref = _image(zones_pred), _image(zones_ref)
    per_label = evaluate_labels(pred, ref, {1: "peripheral", 2: "transition"})
    assert set(per_label) == {"peripheral", "transition", "gland"}
    for value, name in ((1, "peripheral"), (2, "transition")):
        _assert_matches(
            per_label[name], _reference(zones_pred == value, zones_ref == value, ANISOTROPIC)
        )
    _assert_matches(per_label["gland"], _reference(zones_pred > 0, zones_ref > 0, ANISOTROPIC))
    assert evaluate_labels(pred, ref, {1: "gland"}) == {"gland": per_label["peripheral"]}
    float_ref = sitk.Cast(ref, sitk.sitkFloat32)  # a reference stored as float 0/1/2
    assert evaluate_masks(pred, float_ref) == per_label["gland"]
    assert evaluate_masks(pred, ref, label=2, reference_label=2) == per_label["transition"]
    for bad in ({}, {0: "background"}, {1: "a", 2: "a"}, {1: "gland", 2: "tz"}):
        with pytest.raises(InputError):
            evaluate_labels(pred, ref, bad)


# ------------------------------------------------------------------------------ summary


def test_summary_is_nan_aware_mean_and_sample_sd() -> None:
    cases = [
        {"patient": "P1", "dice": 0.8, "hd": 10.0},
        {"patient": "P2", "dice": 0.9, "hd": float("nan")},
        {"patient": "P3", "dice": 0.7, "hd": None},
        {"patient": "P4", "dice": 0.6},
    ]
    summary = summarize(cases, metrics=("dice", "hd", "iou"))
    assert summary["n_cases"] == 4
    assert set(summary) == {"n_cases", "dice", "hd", "iou"}
    assert summary["dice"]["mean"] == pytest.approx(0.75)
    assert summary["dice"]["sd"] == pytest.approx(np.std([0.8, 0.9, 0.7, 0.6], ddof=1))
    assert summary["dice"]["n"] == 4
    hd = summary["hd"]
    assert hd["mean"] == 10.0 and hd["n"] == 1 and math.isnan(hd["sd"])
    assert summary["iou"]["n"] == 0 and math.isnan(summary["iou"]["mean"])
    empty = summarize([])
    assert empty["n_cases"] == 0 and empty["dice"]["n"] == 0


def test_markdown_table_reads_like_a_paper() -> None:
    cases = [
        {"dice": 0.80, "hd": 11.0},
        {"dice": 0.84, "hd": float("nan")},
        {"dice": 0.82, "hd": 12.0},
    ]
    one = summarize(cases)
    table = format_markdown_table(one)
    lines = table.splitlines()
    assert lines[0] == "| Metric | mean ± SD |"
    assert "| Dice | 0.82 ± 0.02 |" in lines
    assert "| Hausdorff distance (mm) | 11.50 ± 0.71 (n=2) |" in lines
    assert "| IoU (Jaccard) | n/a |" in lines
    assert lines[-1] == "| Patients | 3 |"
    two = format_markdown_table(
        [{"model": "taps", "reference": "A"} | one, {"model": "demo", "reference": "A"} | one],
        metrics=("dice",),
        digits=3,
    )
    assert two.splitlines()[0] == "| Metric | taps / A | demo / A |"
    assert "| Dice | 0.820 ± 0.020 | 0.820 ± 0.020 |" in two


def test_csv_helpers_round_trip(tmp_path: Path) -> None:
    cases = [
        {"patient": "P1", "dice": 0.8, "hd": float("nan")},
        {"patient": "P2", "dice": 0.9, "hd": 4.0, "note": "x"},
    ]
    rows = list(csv.DictReader(io.StringIO(format_cases_csv(cases))))
    assert rows[0] == {"patient": "P1", "dice": "0.8", "hd": "NaN", "note": ""}
    assert float(rows[1]["hd"]) == 4.0
    summary = {"model": "taps"} | summarize(cases, metrics=("dice", "hd"))
    long = list(csv.DictReader(io.StringIO(format_summary_csv(summary, metrics=("dice", "hd")))))
    assert [r["metric"] for r in long] == ["dice", "hd"]
    assert long[0]["model"] == "taps" and float(long[0]["mean"]) == pytest.approx(0.85)
    assert long[1]["n"] == "1" and long[1]["sd"] == "NaN" and long[1]["n_cases"] == "2"
    path = tmp_path / "out" / "summary.csv"
    digest = write_summary_csv(path, [summary], metrics=("dice", "hd"))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        write_cases_csv(tmp_path / "cases.csv", cases)
        == hashlib.sha256((tmp_path / "cases.csv").read_bytes()).hexdigest()
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.csv"]  # no temp files


# ---------------------------------------------------------------------------- real data


@pytest.mark.realdata
@needs_data
def test_two_gland_references_of_prostatex_0000_agree() -> None:
    """README of the sample data: the two AI gland masks agree at Dice 0.96, 44.3/43.2 mL.

    Their headers differ (direction cosines 2.4e-4 apart, 0.056 mm at the far corner), which
    is rounding, not a different grid: the comparison must run, not refuse.
    """
    labels = DATA / "labels" / "ProstateX-0000"
    bosma = sitk.ReadImage(str(labels / "gland_Bosma22b.nii.gz"))
    guerbet = sitk.ReadImage(str(labels / "gland_Guerbet23.nii.gz"))
    metrics = evaluate_masks(bosma, guerbet)
    assert metrics["dice"] == pytest.approx(0.96, abs=0.005)
    assert metrics["volume_pred_ml"] == pytest.approx(44.3, abs=0.05)
    assert metrics["volume_ref_ml"] == pytest.approx(43.2, abs=0.05)
    pred = sitk.GetArrayFromImage(bosma) > 0
    ref = sitk.GetArrayFromImage(guerbet) > 0
    _assert_matches(metrics, _reference(pred, ref, bosma.GetSpacing()))


@pytest.mark.realdata
@needs_data
def test_two_zonal_references_of_prostatex_0000_per_zone() -> None:
    """Per-zone evaluation on real zonal masks (1 = PZ, 2 = TZ): HeviAI23 vs Yuan23, each
    zone and the gland (union) against the independent implementation on the same voxels."""
    labels = DATA / "labels" / "ProstateX-0000"
    hevi = sitk.ReadImage(str(labels / "zones_HeviAI23.nii.gz"))
    yuan = sitk.ReadImage(str(labels / "zones_Yuan23.nii.gz"))
    per_label = evaluate_labels(hevi, yuan, {1: "pz", 2: "tz"})
    assert sorted(per_label) == ["gland", "pz", "tz"]
    a, b = sitk.GetArrayFromImage(hevi), sitk.GetArrayFromImage(yuan)
    for name, value in (("pz", 1), ("tz", 2)):
        assert (a == value).sum() > 1000 and (b == value).sum() > 1000  # both zones present
        _assert_matches(per_label[name], _reference(a == value, b == value, hevi.GetSpacing()))
    _assert_matches(per_label["gland"], _reference(a > 0, b > 0, hevi.GetSpacing()))
    # two independent AI annotations of one exam: close zones, a closer gland
    assert per_label["gland"]["dice"] > max(per_label["pz"]["dice"], per_label["tz"]["dice"])
    assert min(per_label["pz"]["dice"], per_label["tz"]["dice"]) > 0.8
