"""Which images make each b-volume of a DWI: b0 images, scanner trace images, or a trace made
here as the geometric mean of the directional images.

A prostate DWI usually stores trace (isotropic) images. Some scanners store, for a b-value,
only one image per diffusion direction (GE tensor/DWI series, Philips and Siemens DTI), or the
directional images next to the trace (Philips' isotropic image "I", Siemens TRACEW). Per
b-value (s/mm², images grouped by b rounded to 0.1):

* b = 0 (including Philips' 0.001 ... 0.004, see ``tasks.dicom_headers.B0_MAX``): every image
  is used; repeats at one slice position are averaged.
* the scanner's trace images exist (:func:`tasks.dicom_headers.diffusion_role` ``trace``):
  they are used and the directional images of that b are ignored.
* only directional images: they are grouped by gradient direction (sign ignored, directions
  within ``DIRECTION_TOL_DEGREES`` are one direction) and the trace image is the voxel-wise
  geometric mean over the directions, ``exp(mean(log S_d))``, computed in float64 after
  rescale, after averaging repeats of one direction; negative values are clipped to 0
  first (a zero in any direction gives 0). At least ``MIN_DIRECTIONS`` directions are
  needed, and every directional image needs a gradient direction.

For isotropic direction sets the geometric mean is ``S0 exp(-b MD)``, the trace-weighted
image the scanners compute. How each b-volume was made is in :attr:`BPlan.note` (e.g.
``b1000: geometric mean of 6 directions``, ``b800: scanner trace image``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tasks.dicom_headers import DicomHeader, diffusion_role

MIN_DIRECTIONS = 3
DIRECTION_TOL_DEGREES = 1.0

Method = Literal["b0", "trace", "geometric_mean"]


class TraceProblem(ValueError):
    """The images of a b-value cannot make one b-volume (message says why)."""


@dataclass(frozen=True)
class BPlan:
    """How one b-volume is made.

    ``groups``: the images used, one group per gradient direction for ``geometric_mean``
    (repeats of a direction are averaged before the geometric mean), a single group
    otherwise (all averaged). ``ignored``: directional images left out because the scanner's
    trace image of that b exists.
    """

    b: float
    method: Method
    groups: tuple[tuple[DicomHeader, ...], ...]
    ignored: int

    @property
    def images(self) -> tuple[DicomHeader, ...]:
        return tuple(h for group in self.groups for h in group)

    @property
    def note(self) -> str:
        if self.method == "b0":
            return "b0: unweighted images"
        if self.method == "geometric_mean":
            return f"b{self.b:g}: geometric mean of {len(self.groups)} directions"
        extra = f" ({self.ignored} directional images ignored)" if self.ignored else ""
        return f"b{self.b:g}: scanner trace image{extra}"


def b_key(b: float) -> float:
    """How b-values (s/mm²) are grouped: rounded to 0.1."""
    return round(float(b), 1)


def _by_direction(images: Sequence[DicomHeader]) -> list[list[DicomHeader]]:
    """Group images by gradient direction (antiparallel directions are one direction)."""
    limit = math.cos(math.radians(DIRECTION_TOL_DEGREES))
    groups: list[tuple[np.ndarray, list[DicomHeader]]] = []
    for h in images:
        vector = np.asarray(h.diffusion_direction, float)
        for axis, members in groups:
            if abs(float(np.dot(axis, vector))) >= limit:
                members.append(h)
                break
        else:
            groups.append((vector, [h]))
    return [members for _, members in groups]


def plan_b_volumes(headers: Sequence[DicomHeader]) -> list[BPlan]:
    """One :class:`BPlan` per b-value of a DWI's images, ascending b.

    Raises
    ------
    TraceProblem
        An image without b-value, directional images without a gradient direction, or
        fewer than ``MIN_DIRECTIONS`` directions where no trace image exists.
    """
    by_b: dict[float, list[DicomHeader]] = {}
    for h in headers:
        if h.b_value is None:
            raise TraceProblem(f"{h.image_name} has no b-value")
        by_b.setdefault(b_key(h.b_value), []).append(h)
    plans = []
    for b, images in sorted(by_b.items()):
        roles = {id(h): diffusion_role(h) for h in images}
        if b == 0:
            plans.append(BPlan(b, "b0", (tuple(images),), 0))
            continue
        trace = tuple(h for h in images if roles[id(h)] == "trace")
        directional = [h for h in images if roles[id(h)] == "directional"]
        if trace:
            plans.append(BPlan(b, "trace", (trace,), len(directional)))
            continue
        unknown = sum(h.diffusion_direction is None for h in directional)
        if unknown:
            raise TraceProblem(
                f"b{b:g}: {unknown} directional image(s) without a gradient direction and no "
                "trace image: cannot form the trace"
            )
        groups = _by_direction(directional)
        if len(groups) < MIN_DIRECTIONS:
            raise TraceProblem(
                f"b{b:g}: directional images in {len(groups)} direction(s) and no trace image; "
                f"a trace needs at least {MIN_DIRECTIONS}"
            )
        plans.append(BPlan(b, "geometric_mean", tuple(tuple(g) for g in groups), 0))
    return plans


def geometric_mean(planes: Sequence[np.ndarray]) -> np.ndarray:
    """Voxel-wise geometric mean (float64) of same-shape arrays; negatives clipped to 0."""
    stack = np.clip(np.stack([np.asarray(p, np.float64) for p in planes]), 0.0, None)
    with np.errstate(divide="ignore"):
        return np.exp(np.mean(np.log(stack), axis=0))
