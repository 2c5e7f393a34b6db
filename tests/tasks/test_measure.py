"""Tests for tasks.measure: volumes by voxel counting, pyradiomics features equal to a direct
pyradiomics call on the same files, shape against an ellipsoid's known volume, the settings
file and its hash, and every failure as an InputError (never zeros).

Images are small (40 x 40 x 10 voxels of 0.5 x 0.5 x 3 mm, like an axial prostate T2).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import featureextractor, firstorder

from tasks.errors import InputError
from tasks.measure import (
    DEFAULT_SETTINGS_FILE,
    GRID_TOLERANCE_VOXELS,
    Feature,
    extract_radiomics,
    grid_displacement_mm,
    load_radiomics_settings,
    mask_volume_ml,
    radiomics_settings_hash,
    require_same_grid,
)

SPACING = (0.5, 0.5, 3.0)  # x, y, z (mm)
SHAPE = (10, 40, 40)  # z, y, x
SEMI_AXES_MM = (7.0, 6.0, 11.0)  # x, y, z
CENTRE_MM = (9.75, 9.75, 13.5)  # x, y, z: the grid's centre


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@pytest.fixture(scope="module")
def settings() -> dict:
    return load_radiomics_settings()


def _image(array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _ellipsoid(semi_axes=SEMI_AXES_MM, centre=CENTRE_MM) -> np.ndarray:
    z, y, x = np.indices(SHAPE).astype(np.float64)
    coords = (x * SPACING[0], y * SPACING[1], z * SPACING[2])
    inside = sum(((c - m) / a) ** 2 for c, m, a in zip(coords, centre, semi_axes, strict=True))
    return inside <= 1.0


def _texture(seed: int, low: float, high: float) -> np.ndarray:
    """Smooth random texture in [low, high] plus a brighter ellipsoid: a tiny 'gland'."""
    rng = np.random.default_rng(seed)
    noise = sitk.GetArrayFromImage(
        sitk.SmoothingRecursiveGaussian(_image(rng.normal(size=SHAPE).astype(np.float32)), 1.0)
    )
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    values = low + (high - low) * (0.7 * noise + 0.3 * _ellipsoid())
    return values.astype(np.float32)


IMAGES = {  # image type -> voxel values in its units
    "t2w": lambda: _texture(1, 100.0, 900.0),  # arbitrary units
    "adc": lambda: _texture(2, 0.5e-3, 3.0e-3),  # mm²/s
    "b1000": lambda: _texture(3, 20.0, 400.0),  # arbitrary units
}


def _mask(labels: np.ndarray | None = None) -> sitk.Image:
    values = _ellipsoid().astype(np.uint8) if labels is None else labels.astype(np.uint8)
    return _image(values)


# ------------------------------------------------------------------------------ volume


def test_volume_counts_voxels_with_and_without_label() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(7, 9, 11)).astype(np.uint8)
    mask = _image(labels, spacing=(0.4, 0.7, 3.6))
    voxel_mm3 = 0.4 * 0.7 * 3.6
    count, ml = mask_volume_ml(mask)
    assert count == int((labels > 0).sum())
    assert ml == pytest.approx(count * voxel_mm3 / 1000.0, rel=1e-12)
    count2, ml2 = mask_volume_ml(mask, 2)
    assert count2 == int((labels == 2).sum()) and 0 < count2 < count
    assert ml2 == pytest.approx(count2 * voxel_mm3 / 1000.0, rel=1e-12)
    assert mask_volume_ml(mask, 7) == (0, 0.0)


def test_volume_rejects_bad_masks() -> None:
    with pytest.raises(InputError, match="3D scalar"):
        mask_volume_ml(sitk.Image([4, 4], sitk.sitkUInt8))
    values = np.zeros((2, 3, 4), np.float32)
    values[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        mask_volume_ml(_image(values))


# ------------------------------------------------------------------------------- grids


def test_same_grid_tolerance_is_a_fraction_of_a_voxel() -> None:
    image = _image(np.zeros(SHAPE, np.uint8))
    close = _image(np.zeros(SHAPE, np.uint8), origin=(0.01, -0.01, 0.02))
    require_same_grid(image, close, what="test")  # 0.024 mm: rounding, same grid
    assert grid_displacement_mm(image, close) == pytest.approx(math.sqrt(6e-4))
    tilted = sitk.Image(close)
    angle = 1e-3  # rad about z: the far corner moves by ~0.028 mm
    c, s = math.cos(angle), math.sin(angle)
    tilted.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    require_same_grid(image, tilted, what="test")
    limit = GRID_TOLERANCE_VOXELS * min(SPACING)
    for other in (
        _image(np.zeros(SHAPE, np.uint8), origin=(limit * 1.01, 0, 0)),
        _image(np.zeros(SHAPE, np.uint8), spacing=(0.5, 0.5, 3.1)),
        _image(np.zeros((10, 40, 41), np.uint8)),
    ):
        with pytest.raises(InputError, match="not on the same voxel grid"):
            require_same_grid(image, other, what="test")


# ---------------------------------------------------------------------------- settings


def test_settings_file_documents_each_image_type(settings: dict) -> None:
    assert set(settings) == {"t2w", "adc", "b1000"}
    t2, adc, b1000 = (settings[k]["setting"] for k in ("t2w", "adc", "b1000"))
    assert t2["normalize"] and b1000["normalize"] and not adc["normalize"]
    assert adc["binWidth"] == 5e-5  # mm²/s, on the raw ADC values
    assert t2["force2D"] and t2["force2Ddimension"] == 0
    assert t2["resampledPixelSpacing"] == [0.5, 0.5, 0]
    assert adc["resampledPixelSpacing"] == [2.0, 2.0, 0]
    assert "shape" in settings["t2w"]["featureClass"]
    assert "shape" not in settings["adc"]["featureClass"]
    for params in settings.values():
        assert params["imageType"] == {"Original": {}}
        assert {"firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm"} <= set(
            params["featureClass"]
        )
    assert "# " in DEFAULT_SETTINGS_FILE.read_text()  # the choices are explained in place


def test_settings_hash_tracks_every_setting(settings: dict, tmp_path: Path) -> None:
    hashes = {k: radiomics_settings_hash(v) for k, v in settings.items()}
    assert len(set(hashes.values())) == 3  # differs between image types
    assert radiomics_settings_hash(settings, "adc") == hashes["adc"]
    assert radiomics_settings_hash(load_radiomics_settings()["adc"]) == hashes["adc"]  # stable
    changed = copy.deepcopy(settings["adc"])
    changed["setting"]["binWidth"] = 4e-5
    assert radiomics_settings_hash(changed) != hashes["adc"]
    changed = copy.deepcopy(settings["t2w"])
    changed["featureClass"].pop("ngtdm")
    assert radiomics_settings_hash(changed) != hashes["t2w"]
    # a change in the common section of a file changes every image type's hash
    edited = tmp_path / "radiomics.yaml"
    edited.write_text(DEFAULT_SETTINGS_FILE.read_text().replace("padDistance: 5", "padDistance: 6"))
    rehashed = {k: radiomics_settings_hash(v) for k, v in load_radiomics_settings(edited).items()}
    assert all(rehashed[k] != hashes[k] for k in hashes)
    with pytest.raises(InputError, match="no radiomics settings for image type 'dce'"):
        radiomics_settings_hash(settings, "dce")


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("binWidth: 5.0e-5", "binWidth: 5e-5", "binWidth must be a positive number"),
        ("binWidth: 5.0e-5", "binWidth: 5.0e-5\n      binCount: 32", "binCount"),
        ("correctMask: false", "correctMask: true", "correctMask"),
        ("Original: {}", "Original: {}\n    LoG: {sigma: [1.0]}", "imageType"),
        ("padDistance: 5", "padDistance: -1", "rejected by pyradiomics"),
        ("  adc:\n    setting:", "  adc:\n    setting: [1]\n    other:", "must be mappings"),
    ],
)
def test_invalid_settings_are_input_errors(tmp_path: Path, old, new, problem) -> None:
    text = DEFAULT_SETTINGS_FILE.read_text()
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(InputError, match=problem):
        load_radiomics_settings(path)


def test_missing_settings_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_radiomics_settings(tmp_path / "absent.yaml")


# ------------------------------------------------------------------------- extraction


def _direct(image_path: Path, mask_path: Path, params: dict, label: int) -> dict[str, float]:
    """pyradiomics itself, on the files, with the same parameter dict."""
    extractor = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
    result = extractor.execute(str(image_path), str(mask_path), label=label)
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics_")}


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # pykwalify
@pytest.mark.parametrize("image_type", ["t2w", "adc", "b1000"])
def test_features_equal_direct_pyradiomics_on_files(
    image_type: str, settings: dict, tmp_path: Path
) -> None:
    labels = _ellipsoid().astype(np.uint8)
    labels[:, :, :20] *= 2  # two labels: extract the second
    image, mask = _image(IMAGES[image_type]()), _mask(labels)
    image_path, mask_path = tmp_path / "image.nii.gz", tmp_path / "mask.nii.gz"
    sitk.WriteImage(image, str(image_path))
    sitk.WriteImage(mask, str(mask_path))
    ours = extract_radiomics(image, mask, image_type=image_type, label=2, settings=settings)
    direct = _direct(image_path, mask_path, settings[image_type], label=2)
    assert all(isinstance(f, Feature) for f in ours)
    keyed = {f"original_{f.feature_class}_{f.feature}": f.value for f in ours}
    assert keyed.keys() == direct.keys()
    assert len(keyed) > 80
    for key, value in direct.items():
        assert keyed[key] == pytest.approx(value, rel=1e-12, abs=0.0), key
    classes = {f.feature_class for f in ours}
    assert classes == set(settings[image_type]["featureClass"])


def test_adc_features_are_in_mm2_per_s(settings: dict) -> None:
    adc = IMAGES["adc"]()
    features = extract_radiomics(_image(adc), _mask(), image_type="adc", settings=settings)
    mean = next(f.value for f in features if (f.feature_class, f.feature) == ("firstorder", "Mean"))
    assert 0.5e-3 < mean < 3.0e-3  # not normalised, not rescaled


def test_shape_volume_matches_the_ellipsoid(settings: dict) -> None:
    mask = _mask()
    features = {
        f.feature: f.value
        for f in extract_radiomics(
            _image(IMAGES["t2w"]()), mask, image_type="t2w", settings=settings
        )
        if f.feature_class == "shape"
    }
    count, ml = mask_volume_ml(mask)
    assert features["VoxelVolume"] == pytest.approx(ml * 1000.0, rel=1e-12)
    exact_mm3 = 4.0 / 3.0 * math.pi * math.prod(SEMI_AXES_MM)  # 1935.2 mm³
    assert features["VoxelVolume"] == pytest.approx(exact_mm3, rel=0.02)
    assert features["MeshVolume"] == pytest.approx(exact_mm3, rel=0.02)
    assert features["Maximum3DDiameter"] == pytest.approx(2 * max(SEMI_AXES_MM), rel=0.15)


def test_mask_within_rounding_of_the_grid_gives_the_same_features(settings: dict) -> None:
    image, mask = _image(IMAGES["t2w"]()), _mask()
    shifted = sitk.Image(mask)
    shifted.SetOrigin((0.01, 0.0, -0.01))
    a = extract_radiomics(image, mask, image_type="t2w", settings=settings)
    b = extract_radiomics(image, shifted, image_type="t2w", settings=settings)
    assert a == b


def _extract(image_type="t2w", image=None, mask=None, **kwargs):
    image = _image(IMAGES[image_type]()) if image is None else image
    return extract_radiomics(
        image, _mask() if mask is None else mask, image_type=image_type, **kwargs
    )


def test_extraction_errors_are_input_errors_never_zeros(settings: dict) -> None:
    with pytest.raises(InputError, match=r"label 3 not in the mask for t2w .*\[1\]"):
        _extract(label=3, settings=settings)
    with pytest.raises(InputError, match="not on the same voxel grid"):
        _extract(
            mask=_image(_ellipsoid().astype(np.uint8), origin=(0.5, 0.0, 0.0)), settings=settings
        )
    with pytest.raises(InputError, match="not on the same voxel grid"):
        _extract("adc", mask=_image(np.ones((10, 40, 41), np.uint8)), settings=settings)
    with pytest.raises(InputError, match="mask for b1000 is empty"):
        _extract("b1000", mask=_image(np.zeros(SHAPE, np.uint8)), settings=settings)
    single = np.zeros(SHAPE, np.uint8)
    single[5, 20, 20] = 1  # pyradiomics refuses a one-voxel region: its error, as ours
    with pytest.raises(InputError, match="pyradiomics failed on adc"):
        _extract("adc", mask=_image(single), settings=settings)
    nan_image = _image(IMAGES["t2w"]())
    nan_image[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="t2w image holds NaN"):
        _extract(image=nan_image, settings=settings)
    with pytest.raises(InputError, match="integer pixel type"):
        _extract(mask=_image(_ellipsoid().astype(np.float32)), settings=settings)
    with pytest.raises(InputError, match=r"image type 't2w'; known: \['dwi'\]"):
        _extract(image_type="t2w", settings={"dwi": settings["t2w"]})


def test_a_failed_feature_is_an_error_not_nan_or_zero(settings: dict, monkeypatch) -> None:
    """pyradiomics logs a failing feature and returns NaN for it: that must not pass."""

    def broken(self):
        raise ArithmeticError("simulated failure")

    monkeypatch.setattr(firstorder.RadiomicsFirstOrder, "getMeanFeatureValue", broken)
    with pytest.raises(InputError, match=r"non-finite .* on adc .*firstorder:Mean=nan"):
        _extract("adc", settings=settings)


def test_default_settings_are_loaded_when_none_given() -> None:
    features = _extract("b1000")
    assert {f.feature_class for f in features} == {
        "firstorder",
        "glcm",
        "glrlm",
        "glszm",
        "gldm",
        "ngtdm",
    }
