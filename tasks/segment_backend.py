"""The segmentation interface: parameters, inputs, result and the backend protocol.

Every backend (:mod:`tasks.segment_nnunet`, :mod:`tasks.segment_taps`) implements
:class:`SegmentationBackend` on these types; :mod:`tasks.segment` picks and caches backends.
Images are SimpleITK images on the T2 grid (LPS, mm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from tasks.errors import InputError
from tasks.registry import SEGMENT

STEP = SEGMENT.name


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
    adc_unit
        The ADC unit the model was trained on (our ADC is in mm²/s and is converted):
        ``"mm2/s"``, ``"1e-3 mm2/s"`` (µm²/ms) or ``"1e-6 mm2/s"`` (µm²/s, PI-CAI's scanner
        ADC). ``"auto"``: read from the model's plans (the training ADC's median, by
        order of magnitude; :func:`tasks.segment_nnunet.model_adc_unit`).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    folds: tuple[int | str, ...] | None = None
    checkpoint: str = "checkpoint_final.pth"
    use_mirroring: bool = False
    tile_step_size: float = Field(0.5, gt=0, le=1)
    channel_map: dict[str, str] = Field(default_factory=dict)
    threads: int = Field(1, ge=1)
    adc_unit: Literal["auto", "mm2/s", "1e-3 mm2/s", "1e-6 mm2/s"] = "auto"


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
