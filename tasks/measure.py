"""Mask volume and pyradiomics features (pure functions on SimpleITK images, no Prefect).

Conventions: images are 3D SimpleITK images in LPS physical space (mm); a mask is an
integer label image on exactly the image's grid (:func:`require_same_grid`; masks are never
resampled here); volumes are in mL (1 mL = 1000 mm³).

Radiomics: the settings live in ``tasks/radiomics.yaml``, one section per image type
(``t2w``, ``adc``, ``b1000``), each documented there (normalisation, bin width in the image's
units, in-plane resampling, forced 2D texture for 0.5 x 0.5 x 3 mm voxels, feature classes).
:func:`load_radiomics_settings` resolves them into one plain pyradiomics parameter dict per
image type, :func:`radiomics_settings_hash` fingerprints one of them, and
:func:`extract_radiomics` runs ``featureextractor.RadiomicsFeatureExtractor`` with exactly
that dict. pyradiomics logs and continues when a feature fails (the value becomes NaN);
here every failure, and every non-finite value, is an :class:`~tasks.errors.InputError`
naming the image type: a feature is never replaced by zero or silently dropped.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import radiomics
import SimpleITK as sitk
import yaml
from radiomics import featureextractor

from tasks.errors import InputError
from tasks.registry import RADIOMICS

STEP = RADIOMICS.name  # the step's one name: tasks/registry.py
#: The documented settings shipped with the package.
DEFAULT_SETTINGS_FILE = Path(__file__).with_name("radiomics.yaml")
#: Two grids are the same grid when their sizes are equal and every voxel centre of one lies
#: within this fraction of the smallest voxel spacing of the same voxel of the other. The
#: voxel-to-physical map is affine, so the largest displacement is at a corner of the grid.
#: Header rounding is far below it: ProstateX-0000's Bosma22b gland mask (NIfTI written by
#: another tool, direction cosines 2.4e-4 off) lies 0.056 mm = 0.11 pixel from the DICOM T2
#: grid at the farthest corner; its other masks 5e-6 mm. At < 0.5 voxel, voxel (i, j, k) of
#: one grid is the nearest voxel of the other, so comparing arrays directly IS the
#: nearest-neighbour correspondence: nothing needs resampling, and nothing is resampled.
GRID_TOLERANCE_VOXELS = 0.25
_SECTIONS = ("imageType", "featureClass", "setting")
_CLASSES = {"firstorder", "shape", "glcm", "glrlm", "glszm", "gldm", "ngtdm"}

radiomics.setVerbosity(logging.WARNING)  # stderr handler: warnings and errors only
logging.getLogger("radiomics").setLevel(logging.WARNING)  # no INFO records at all


@dataclass(frozen=True, slots=True)
class Feature:
    """One radiomics value in long form: ``glcm`` / ``Contrast`` / value (image units)."""

    feature_class: str
    feature: str
    value: float


# ------------------------------------------------------------------------------ grids


def grid_displacement_mm(image: sitk.Image, other: sitk.Image) -> float:
    """Largest distance (mm) between the same voxel's centre in two grids of equal size."""
    size = image.GetSize()
    worst = 0.0
    for corner in itertools.product((0, 1), repeat=image.GetDimension()):
        index = [float(c * (n - 1)) for c, n in zip(corner, size, strict=True)]
        a = np.asarray(image.TransformContinuousIndexToPhysicalPoint(index))
        b = np.asarray(other.TransformContinuousIndexToPhysicalPoint(index))
        worst = max(worst, float(np.linalg.norm(a - b)))
    return worst


def require_same_grid(image: sitk.Image, other: sitk.Image, *, what: str, step: str = STEP) -> None:
    """Raise :class:`InputError` unless ``other`` lies on ``image``'s voxel grid.

    Same grid: equal dimension and size, and every voxel centre within
    :data:`GRID_TOLERANCE_VOXELS` x the smallest spacing of ``image``
    (:func:`grid_displacement_mm`). ``what`` names the pair in the message (e.g.
    ``"mask vs t2w image"``).
    """
    if image.GetDimension() != other.GetDimension() or image.GetSize() != other.GetSize():
        problem = (
            f"size {other.GetSize()} vs {image.GetSize()}"
            if image.GetDimension() == other.GetDimension()
            else f"dimension {other.GetDimension()} vs {image.GetDimension()}"
        )
    else:
        shift = grid_displacement_mm(image, other)
        limit = GRID_TOLERANCE_VOXELS * min(image.GetSpacing())
        if shift <= limit:
            return
        problem = (
            f"voxel centres up to {shift:.4g} mm apart (limit {limit:.3g} mm = "
            f"{GRID_TOLERANCE_VOXELS} voxel); spacing {_fmt(other.GetSpacing())} vs "
            f"{_fmt(image.GetSpacing())}, origin {_fmt(other.GetOrigin())} vs "
            f"{_fmt(image.GetOrigin())}"
        )
    raise InputError(
        f"{what}: not on the same voxel grid: {problem}",
        step=step,
        hint="resample explicitly (nearest neighbour for masks) onto one grid first",
    )


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _on_grid(image: sitk.Image, mask: sitk.Image) -> sitk.Image:
    """``mask`` carrying exactly ``image``'s geometry (call after :func:`require_same_grid`)."""
    same = (
        mask.GetSpacing() == image.GetSpacing()
        and mask.GetOrigin() == image.GetOrigin()
        and mask.GetDirection() == image.GetDirection()
    )
    if same:
        return mask
    copied = sitk.Image(mask)
    copied.CopyInformation(image)
    return copied


def _check_scalar_3d(image: sitk.Image, what: str, step: str = STEP) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} must be a 3D scalar image, got dimension {image.GetDimension()} with "
            f"{image.GetNumberOfComponentsPerPixel()} components",
            step=step,
        )


# ----------------------------------------------------------------------------- volume


def mask_volume_ml(mask: sitk.Image, label: int | None = None) -> tuple[int, float]:
    """Voxel count and volume (mL) of one label, or of every non-zero voxel.

    Parameters
    ----------
    mask
        3D scalar label image (any pixel type).
    label
        Label value to count; ``None`` counts every non-zero voxel.

    Returns
    -------
    count, volume_ml
        Number of voxels, and ``count x voxel volume (mm³) / 1000``; the voxel volume is the
        product of the spacings (the direction matrix is orthonormal).

    Raises
    ------
    InputError
        If ``mask`` is not a 3D scalar image or holds non-finite values.
    """
    _check_scalar_3d(mask, "mask")
    values = sitk.GetArrayViewFromImage(mask)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError("mask holds NaN or infinite values", step=STEP)
    count = int(np.count_nonzero(values if label is None else values == label))
    voxel_mm3 = math.prod(mask.GetSpacing())
    return count, count * voxel_mm3 / 1000.0


# --------------------------------------------------------------------------- settings


def _merge(common: Mapping[str, Any], section: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(common))
    for key, value in section.items():
        if key in ("setting", "featureClass"):
            merged[key] = {**(merged.get(key) or {}), **copy.deepcopy(value or {})}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _validate(params: dict[str, Any], image_type: str, source: str) -> None:
    def fail(problem: str) -> InputError:
        return InputError(
            f"radiomics settings for {image_type!r}: {problem}", step=STEP, path=source
        )

    if set(params) - set(_SECTIONS):
        raise fail(f"unknown sections {sorted(set(params) - set(_SECTIONS))}")
    if params.get("imageType") != {"Original": {}}:
        raise fail(f"imageType must be {{Original: {{}}}}, got {params.get('imageType')}")
    classes = params.get("featureClass") or {}
    if not classes or set(classes) - _CLASSES:
        raise fail(f"featureClass must name some of {sorted(_CLASSES)}, got {sorted(classes)}")
    setting = params.get("setting") or {}
    width = setting.get("binWidth")
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise fail(f"setting binWidth must be a positive number in image units, got {width!r}")
    if "binCount" in setting:
        raise fail("binCount is not allowed: bins have a fixed width (binWidth) per image type")
    if setting.get("correctMask"):
        raise fail("correctMask must be false: masks are never resampled onto images silently")
    if "geometryTolerance" in setting:
        raise fail("geometryTolerance is not allowed (it changes ITK's process-wide tolerance)")
    try:  # pyradiomics' own schema check (types, ranges, names)
        _extractor(params)
    except Exception as exc:  # noqa: BLE001 - any rejection is a settings error
        raise fail(f"rejected by pyradiomics: {exc}") from exc


#: pyradiomics is not thread-safe: its schema check (pykwalify) failed with YAML parse
#: errors when two Prefect threads built extractors at once, and a failed feature is only
#: logged to the shared "radiomics" logger, so concurrent extractions would see each
#: other's errors. Every extractor construction and extraction holds this lock; parallel
#: patients in separate processes (process workers, Dask) are not affected.
_PYRADIOMICS = threading.RLock()


def _extractor(params: Mapping[str, Any]) -> featureextractor.RadiomicsFeatureExtractor:
    """``RadiomicsFeatureExtractor`` from a copy of ``params`` (it validates them)."""
    with _PYRADIOMICS, warnings.catch_warnings():  # pykwalify uses load_module()
        warnings.filterwarnings("ignore", message=".*load_module", category=DeprecationWarning)
        return featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(dict(params)))


def load_radiomics_settings(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Read a radiomics settings file into ``{image type: pyradiomics parameter dict}``.

    Parameters
    ----------
    path
        YAML file laid out as ``tasks/radiomics.yaml`` (``common`` + ``images.<type>``);
        ``None`` reads that shipped, documented file.

    Returns
    -------
    dict
        Image type (``t2w``, ``adc``, ``b1000``, ...) -> the merged parameter dict
        ``{"imageType", "featureClass", "setting"}`` that ``RadiomicsFeatureExtractor``
        accepts as it is. Plain JSON-serialisable data.

    Raises
    ------
    InputError
        Missing or unreadable file, wrong layout, an image type other than ``Original``,
        no or unknown feature classes, no positive ``binWidth``, ``binCount``,
        ``correctMask: true``, ``geometryTolerance``, or settings pyradiomics rejects.
    """
    source = Path(path) if path is not None else DEFAULT_SETTINGS_FILE
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read radiomics settings: {exc}", step=STEP, path=source) from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), dict) or not raw["images"]:
        raise InputError(
            "radiomics settings need an 'images' mapping (one section per image type)",
            step=STEP,
            path=source,
        )
    if set(raw) - {"common", "images"}:
        raise InputError(
            f"unknown top-level keys {sorted(set(raw) - {'common', 'images'})}",
            step=STEP,
            path=source,
        )
    common = raw.get("common") or {}
    resolved = {}
    for image_type, section in raw["images"].items():
        for name, part in (("common", common), (f"images.{image_type}", section or {})):
            parts = (
                [part, *(part.get(k) or {} for k in _SECTIONS)] if isinstance(part, dict) else []
            )
            if not parts or not all(isinstance(p, dict) for p in parts):
                raise InputError(
                    f"radiomics settings: {name} and its {'/'.join(_SECTIONS)} must be mappings",
                    step=STEP,
                    path=source,
                )
        params = _merge(common, section or {})
        _validate(params, str(image_type), str(source))
        resolved[str(image_type)] = params
    return resolved


def _settings_for(settings: Mapping[str, Any], image_type: str) -> dict[str, Any]:
    if image_type not in settings:
        raise InputError(
            f"no radiomics settings for image type {image_type!r}; known: {sorted(settings)}",
            step=STEP,
            hint="add a section under 'images' in the radiomics settings file",
        )
    return dict(settings[image_type])


def radiomics_settings_hash(
    settings_for_image: Mapping[str, Any], image_type: str | None = None
) -> str:
    """sha256 (hex) of the canonical JSON of one image type's effective settings.

    Canonical JSON: sorted keys, no whitespace, NaN/inf refused. Pass either one image
    type's parameter dict, or the whole :func:`load_radiomics_settings` result together
    with ``image_type``.
    """
    params = (
        _settings_for(settings_for_image, image_type)
        if image_type is not None
        else settings_for_image
    )
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------- extraction


class _Collect(logging.Handler):
    """Keep the radiomics logger's error records (a failed feature is logged, then NaN)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip().splitlines()[-1][:300])


@contextmanager
def _radiomics_errors() -> Iterator[_Collect]:
    handler = _Collect()
    logger = logging.getLogger("radiomics")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _parse(key: str) -> tuple[str, str] | None:
    """``original_glcm_Contrast`` -> (``glcm``, ``Contrast``); None for diagnostics."""
    if key.startswith("diagnostics_"):
        return None
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "original":
        raise ValueError(f"unexpected pyradiomics feature name {key!r}")
    return parts[1], parts[2]


def extract_radiomics(
    image: sitk.Image,
    mask: sitk.Image,
    *,
    image_type: str,
    label: int = 1,
    settings: Mapping[str, Any] | None = None,
) -> list[Feature]:
    """pyradiomics features of ``image`` inside ``mask == label``, in long form.

    Parameters
    ----------
    image
        3D scalar image in the units its settings section expects (``adc``: mm²/s).
    mask
        3D integer label image on ``image``'s grid (:func:`require_same_grid`).
    image_type
        Section of the settings to use (``t2w``, ``adc``, ``b1000``).
    label
        Mask value of the region; overrides the ``label`` setting.
    settings
        :func:`load_radiomics_settings` result; ``None`` loads the shipped file.

    Returns
    -------
    list of Feature
        One entry per feature (``feature_class`` e.g. ``glcm``, ``feature`` e.g.
        ``Contrast``), in pyradiomics' order; ``diagnostics_*`` entries are left out.

    Raises
    ------
    InputError
        Unknown image type; image not 3D scalar or not finite; mask not 3D scalar, not on the
        image's grid, empty, or without ``label``; any pyradiomics error; any feature that is
        NaN or infinite (the message names the image type and the features).
    """
    params = _settings_for(load_radiomics_settings() if settings is None else settings, image_type)
    _check_scalar_3d(image, f"{image_type} image")
    _check_scalar_3d(mask, f"mask for {image_type}")
    require_same_grid(image, mask, what=f"mask vs {image_type} image")
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise InputError(f"{image_type} image holds NaN or infinite voxels", step=STEP)
    labels = sitk.GetArrayViewFromImage(mask)
    if labels.dtype.kind not in "iub":
        raise InputError(
            f"mask for {image_type} must have an integer pixel type, got "
            f"{mask.GetPixelIDTypeAsString()}",
            step=STEP,
        )
    if not labels.any():
        raise InputError(f"mask for {image_type} is empty: no region to measure", step=STEP)
    present = np.unique(labels)
    if label not in present:
        raise InputError(
            f"label {label} not in the mask for {image_type} (labels present: "
            f"{[int(v) for v in present if v != 0]})",
            step=STEP,
        )
    mask = _on_grid(image, mask)
    with _PYRADIOMICS, _radiomics_errors() as errors:
        try:
            extractor = _extractor(params)
            result = extractor.execute(image, mask, label=int(label))
        except Exception as exc:  # noqa: BLE001 - pyradiomics raises many types
            raise InputError(
                f"pyradiomics failed on {image_type} (label {label}): {exc}", step=STEP
            ) from exc
    features, bad = [], []
    for key, raw in result.items():
        parsed = _parse(key)
        if parsed is None:
            continue
        value = float(np.asarray(raw, dtype=np.float64))
        if not math.isfinite(value):
            bad.append(f"{parsed[0]}:{parsed[1]}={value}")
        features.append(Feature(parsed[0], parsed[1], value))
    if bad or errors.messages:
        detail = "; ".join(errors.messages[:3])
        raise InputError(
            f"pyradiomics gave {len(bad)} non-finite feature(s) on {image_type} (label "
            f"{label}): {', '.join(bad[:8])}"
            + (f"; pyradiomics errors: {detail}" if detail else ""),
            step=STEP,
            hint="check the region (size, constant intensity) and the settings section",
        )
    if not features:
        raise InputError(f"pyradiomics returned no features for {image_type}", step=STEP)
    return features
