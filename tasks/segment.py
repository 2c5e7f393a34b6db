"""Segmentation backends: one small interface, an explicit registry, one loaded model per process.

A backend takes the preprocessed images of one exam on the T2 grid and returns a label map
on that same grid (same size, origin, spacing and direction; LPS), with the name of every
label. The flows never know which model runs: they call :func:`get_backend` with a model
spec from the settings and then ``backend.segment(inputs)``.

Model specs (``settings.segmentation.model``)
---------------------------------------------
``"demo"``
    The small nnU-Net v2 model trained on the synthetic cohort and committed under
    ``models/demo-nnunet`` (:mod:`tasks.segment_nnunet`).
``"taps"``
    The pretrained TAPS prostate model from the ``lavlab-taps`` package (T2 only;
    :mod:`tasks.segment_taps`).
a folder path
    Any trained nnU-Net v2 model folder (``dataset.json``, ``plans.json``, ``fold_X/``).

Backends are created once per (spec, parameters) and process and reused for every patient
(:func:`get_backend`), because loading a network costs seconds and GPU memory.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from tasks.errors import InputError

STEP = "segment"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL_DIR = REPO_ROOT / "models" / "demo-nnunet"


class SegmentationParams(BaseModel, frozen=True, extra="forbid"):
    """How a backend runs (not which model: that is the spec).

    Attributes
    ----------
    device
        ``"auto"``: CUDA when torch sees a GPU, else CPU; ``"cpu"``; ``"cuda"``.
    folds
        nnU-Net folds to ensemble (``None``: every ``fold_*`` folder of the model).
    checkpoint
        nnU-Net checkpoint file name inside each fold folder.
    use_mirroring
        nnU-Net test-time mirroring (8 passes in 3D: better, and 8x slower on CPU).
    tile_step_size
        nnU-Net sliding-window step as a fraction of the patch (0.5 = half overlap).
    channel_map
        nnU-Net channel name (from ``dataset.json``, e.g. ``"T2"``) -> our image role
        (``"t2w"``, ``"dwi_b1000"``, ``"adc"``). Unset names are matched by
        :data:`tasks.segment_nnunet.CHANNEL_ALIASES`.
    threads
        torch intra-op threads on CPU (workers x threads <= cores).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    folds: tuple[int | str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    use_mirroring: bool = False
    tile_step_size: float = Field(0.5, gt=0, le=1)
    channel_map: dict[str, str] = Field(default_factory=dict)
    threads: int = Field(1, ge=1)


@dataclass(frozen=True)
class SegmentationInputs:
    """One exam's images, all on the T2 grid (LPS, mm).

    ``t2w``: preprocessed T2W (arbitrary units); ``dwi_b1000``: b = 1000 s/mm² DWI resampled
    onto the T2 grid; ``adc``: ADC in mm²/s resampled onto the T2 grid. Backends that need
    fewer channels ignore the others.
    """

    t2w: sitk.Image
    dwi_b1000: sitk.Image | None = None
    adc: sitk.Image | None = None

    def by_role(self, role: str) -> sitk.Image:
        image = {"t2w": self.t2w, "dwi_b1000": self.dwi_b1000, "adc": self.adc}.get(role)
        if image is None:
            raise InputError(f"segmentation input {role!r} is missing", step=STEP)
        return image


@dataclass(frozen=True)
class SegmentationResult:
    """A label map on the T2 grid (uint8) with label names (``{1: "gland"}`` or zones).

    ``probabilities``, when a backend provides them, has shape (labels + 1, z, y, x) on
    the T2 grid. ``model`` names the model; ``model_hash`` is a sha256 over its files.
    """

    labels: sitk.Image
    label_names: dict[int, str]
    model: str
    model_hash: str
    probabilities: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)


class SegmentationBackend(Protocol):
    """What every backend offers: a name, a content hash of its model, whether it runs on a
    GPU (the flows then hold a GPU slot around ``segment``), and ``segment``."""

    name: str
    model_hash: str

    @property
    def uses_gpu(self) -> bool: ...

    def segment(self, inputs: SegmentationInputs) -> SegmentationResult: ...


def _make_nnunet(spec: str, params: SegmentationParams) -> SegmentationBackend:
    from tasks.segment_nnunet import NnUNetBackend  # noqa: PLC0415 - torch import is slow

    folder = DEMO_MODEL_DIR if spec == "demo" else Path(spec)
    return NnUNetBackend(folder, params=params, name="demo" if spec == "demo" else None)


def _make_taps(spec: str, params: SegmentationParams) -> SegmentationBackend:
    from tasks.segment_taps import TapsBackend  # noqa: PLC0415 - onnxruntime import is slow

    return TapsBackend(params=params)


#: Named backends; any other spec is an nnU-Net model folder.
BACKENDS: dict[str, Callable[[str, SegmentationParams], SegmentationBackend]] = {
    "demo": _make_nnunet,
    "taps": _make_taps,
}

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], SegmentationBackend] = {}
_CREATED: list[tuple[str, str]] = []


def get_backend(spec: str, params: SegmentationParams) -> SegmentationBackend:
    """The backend for ``spec``, created on first use in this process and then reused.

    Raises
    ------
    InputError
        If ``spec`` is neither a named backend nor an existing folder, or the model folder
        is incomplete or incompatible (raised by the backend).
    """
    _check_spec(spec)
    key = (str(Path(spec).resolve()) if spec not in BACKENDS else spec, params.model_dump_json())
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = BACKENDS.get(spec, _make_nnunet)(spec, params)
            _CREATED.append(key)
        return _LOADED[key]


def _check_spec(spec: str) -> None:
    if spec not in BACKENDS and not Path(spec).is_dir():
        raise InputError(
            f"segmentation model {spec!r} is neither one of {sorted(BACKENDS)} nor a folder",
            step=STEP,
            hint="set segmentation.model to 'demo', 'taps' or an nnU-Net v2 model folder",
        )


def check_model(spec: str, params: SegmentationParams) -> None:
    """Check, without loading a network, that ``spec`` names a usable model: ``taps`` with
    its package installed, or ``demo``/a folder holding a complete nnU-Net v2 model (files,
    channels, folds, checkpoints). The command line calls it before any work starts.

    Raises
    ------
    InputError
        Why the model cannot be used (what :func:`get_backend` would raise later).
    """
    _check_spec(spec)
    if spec == "taps":
        if importlib.util.find_spec("taps") is None:
            from tasks.segment_taps import PACKAGE  # noqa: PLC0415

            raise InputError(
                "the TAPS model package is not installed",
                step=STEP,
                hint=f"pip install {PACKAGE} (it ships the model; nothing is downloaded)",
            )
        return
    from tasks.segment_nnunet import check_model_folder  # noqa: PLC0415

    check_model_folder(DEMO_MODEL_DIR if spec == "demo" else Path(spec), params)


def backends_created() -> int:
    """How many backends this process has created (tests check reuse with it)."""
    return len(_CREATED)


def check_on_grid(image: sitk.Image, reference: sitk.Image, role: str) -> None:
    """Raise :class:`InputError` unless ``image`` lies exactly on ``reference``'s grid."""
    same = (
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4)
        and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        and np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)
    )
    if not same:
        raise InputError(
            f"{role} is not on the T2 grid (size {image.GetSize()} vs {reference.GetSize()})",
            step=STEP,
            hint="resample every channel onto the T2 grid before segmentation",
        )


def labels_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """uint8 label image from a (z, y, x) array, with ``reference``'s geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(np.uint8)))
    image.CopyInformation(reference)
    return image
