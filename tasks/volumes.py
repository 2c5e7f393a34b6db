"""Build float32 SimpleITK volumes from the headers of chosen series, checking geometry first.

Geometry (LPS, mm): slices are sorted along the slice normal n = row x column cosines; the
origin is the first slice's ImagePositionPatient, the direction matrix has columns
(row cosines, column cosines, n), the in-plane spacing is PixelSpacing (column spacing along
x, row spacing along y) and the slice spacing is (last - first position along n) / (N - 1).
Voxel values are ``stored * RescaleSlope + RescaleIntercept`` (per file, or per frame of an
enhanced multi-frame file: a header with ``frame`` set reads that frame) as float32.

DWI: :func:`build_dwi_volumes` makes each b-volume as :mod:`tasks.dwi_trace` plans it
(b0 images, the scanner's trace images, or the geometric mean of the directional images);
the volume's ``note`` says which.

Every check raises :class:`~tasks.errors.InputError` naming the series folder (``label``):
inconsistent orientation or matrix within a series, slices not stacked along the normal,
fewer than two slice positions, non-uniform slice spacing (a step differing from the median
by more than 10 %, e.g. a missing slice), a b-value lacking slice positions, repeated
positions where none are allowed, unreadable or truncated pixel data, NaN/inf voxels and
all-zero images. Pixel data is read only after the header checks have passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from tasks.dicom_headers import DicomHeader, slice_normal
from tasks.dwi_trace import BPlan, TraceProblem, geometric_mean, plan_b_volumes
from tasks.errors import InputError
from tasks.registry import INGEST

STEP = INGEST.name  # the step's one name: tasks/registry.py
SPACING_TOL = 0.10
ORIENTATION_TOL = 1e-3


@dataclass(frozen=True)
class Volume:
    """One 3D float32 image with the files it was built from."""

    image: sitk.Image
    files: tuple[Path, ...]
    folders: tuple[str, ...]
    b_value: float | None
    repeats: int
    note: str


@dataclass(frozen=True)
class Stack:
    """Slice geometry of a set of files: distinct positions along the normal, ascending."""

    row: tuple[float, float, float]
    col: tuple[float, float, float]
    normal: tuple[float, float, float]
    positions: tuple[float, ...]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]


def _fail(label: str, problem: str) -> InputError:
    return InputError(problem, step=STEP, path=label)


def _projection(h: DicomHeader, normal: np.ndarray) -> float:
    return float(np.dot(np.asarray(h.position), normal))


def stack_geometry(headers: Sequence[DicomHeader], label: str) -> Stack:
    """Check and return the slice geometry of ``headers`` (positions may repeat)."""
    if not headers:
        raise _fail(label, "no images")
    first = headers[0]
    if any(h.orientation is None or h.position is None or not h.pixel_spacing for h in headers):
        raise _fail(label, "missing ImageOrientationPatient/ImagePositionPatient/PixelSpacing")
    orient = np.asarray(first.orientation, float)
    worst = max(float(np.max(np.abs(np.asarray(h.orientation) - orient))) for h in headers)
    if worst > ORIENTATION_TOL:
        raise _fail(
            label, f"inconsistent orientation within the series (cosines differ {worst:.3g})"
        )
    if len({(h.rows, h.columns, h.pixel_spacing) for h in headers}) != 1:
        raise _fail(label, "inconsistent matrix size or pixel spacing within the series")
    normal = slice_normal(first.orientation)  # type: ignore[arg-type]
    p0 = np.asarray(first.position, float)
    tol_in_plane = 0.1 * min(first.pixel_spacing)  # type: ignore[arg-type]
    for h in headers:
        offset = np.asarray(h.position, float) - p0
        shift = float(np.linalg.norm(offset - np.dot(offset, normal) * normal))
        if shift > tol_in_plane:
            raise _fail(
                label,
                f"slices not stacked along the slice normal ({h.image_name} shifted "
                f"{shift:.2f} mm in-plane)",
            )
    ordered = sorted(headers, key=lambda h: _projection(h, normal))
    tol = min(0.05, 0.05 * (first.slice_thickness or 1.0))
    positions: list[float] = []
    for h in ordered:
        value = _projection(h, normal)
        if not positions or value - positions[-1] > tol:
            positions.append(value)
    if len(positions) < 2:
        raise _fail(label, "only one slice position: not a 3D volume")
    steps = np.diff(positions)
    median = float(np.median(steps))
    for i, step in enumerate(steps):
        if abs(step - median) > SPACING_TOL * median:
            ratio = step / median
            hint = f": about {round(ratio) - 1} slice(s) missing" if ratio > 1.5 else ""
            raise _fail(
                label,
                f"non-uniform slice spacing: step {step:.2f} mm between slice positions "
                f"{positions[i]:.2f} and {positions[i + 1]:.2f} mm along the normal (median "
                f"{median:.2f} mm){hint}",
            )
    low = min(ordered, key=lambda h: _projection(h, normal))
    row_spacing, col_spacing = first.pixel_spacing  # type: ignore[misc]
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    return Stack(
        tuple(orient[:3]),  # type: ignore[arg-type]
        tuple(orient[3:]),  # type: ignore[arg-type]
        tuple(normal),  # type: ignore[arg-type]
        tuple(positions),
        (float(col_spacing), float(row_spacing), float(step)),
        tuple(float(v) for v in low.position),  # type: ignore[arg-type,union-attr]
    )


def _slot(stack: Stack, h: DicomHeader) -> int:
    value = _projection(h, np.asarray(stack.normal))
    return int(np.argmin(np.abs(np.asarray(stack.positions) - value)))


Item = tuple[str, DicomHeader]  # (series folder, file header)


def _group(stack: Stack, items: Sequence[Item]) -> list[list[Item]]:
    slots: list[list[Item]] = [[] for _ in stack.positions]
    order = sorted(items, key=lambda item: (item[0], item[1].path.name, item[1].frame or 0))
    for item in order:
        slots[_slot(stack, item[1])].append(item)
    return slots


class _Pixels:
    """Reads stored pixels; a multi-frame file is decoded once and its frames served from it."""

    def __init__(self) -> None:
        self.frames: dict[Path, np.ndarray] = {}

    def _decode(self, h: DicomHeader, label: str) -> np.ndarray:
        try:
            return pydicom.dcmread(h.path).pixel_array
        except Exception as exc:  # pydicom raises many types for truncated/undecodable data
            text = str(exc).replace(str(h.path), h.path.name)
            raise _fail(
                label, f"unreadable or truncated file {h.path.name}: {type(exc).__name__}: {text}"
            ) from exc

    def read(self, h: DicomHeader, label: str) -> np.ndarray:
        """One image as float32 ``stored * slope + intercept`` (its frame if ``h.frame``)."""
        if h.frame is None:
            pixels = self._decode(h, label)
        else:
            if h.path not in self.frames:
                self.frames[h.path] = self._decode(h, label)
            pixels = self.frames[h.path]
            if pixels.ndim == 3 and h.frame < pixels.shape[0]:
                pixels = pixels[h.frame]
            elif not (pixels.ndim == 2 and h.frame == 0):
                raise _fail(label, f"{h.image_name}: pixel array {pixels.shape} lacks this frame")
        if pixels.shape != (h.rows, h.columns):
            raise _fail(label, f"file {h.image_name}: pixel array {pixels.shape} is not one slice")
        slope, intercept = np.float32(h.rescale_slope), np.float32(h.rescale_intercept)
        return pixels.astype(np.float32) * slope + intercept


def _combine(slot: list[Item], pixels: _Pixels, plan: BPlan | None) -> np.ndarray:
    """One slice: the mean of its images, or for a directional plan the geometric mean over
    directions of the per-direction means."""
    if plan is None or plan.method != "geometric_mean":
        return np.mean([pixels.read(h, where) for where, h in slot], axis=0)
    planes = []
    for group in plan.groups:
        members = {id(h) for h in group}
        images = [pixels.read(h, where) for where, h in slot if id(h) in members]
        planes.append(np.mean(images, axis=0, dtype=np.float64))
    return geometric_mean(planes)


def _assemble(
    stack: Stack, slots: list[list[Item]], label: str, plan: BPlan | None = None
) -> sitk.Image:
    pixels = _Pixels()
    planes = [_combine(slot, pixels, plan) for slot in slots]
    array = np.stack(planes).astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise _fail(label, f"{bad} voxel(s) are NaN or infinite")
    if not np.any(array):
        raise _fail(label, "empty image: every voxel is zero")
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(stack.spacing)
    image.SetOrigin(stack.origin)
    image.SetDirection(tuple(np.column_stack([stack.row, stack.col, stack.normal]).ravel()))
    return image


def build_volume(
    headers: Sequence[DicomHeader], *, label: str, allow_repeats: bool = False
) -> Volume:
    """Build one volume from one series (T2W, ADC or computed high b).

    Parameters
    ----------
    headers
        The series' files. Each slice position must occur once unless ``allow_repeats``,
        in which case repeats are averaged.
    label
        Series folder (relative to the data root) used in messages.

    Raises
    ------
    InputError
        Any failed check (see the module docstring).
    """
    stack = stack_geometry(headers, label)
    slots = _group(stack, [(label, h) for h in headers])
    repeats = max(len(s) for s in slots)
    if repeats > 1 and not allow_repeats:
        raise _fail(label, f"{len(headers)} files for {len(slots)} slice positions (duplicates)")
    image = _assemble(stack, slots, label)
    b_values = {h.b_value for h in headers}
    b_value = b_values.pop() if len(b_values) == 1 else None
    files = tuple(dict.fromkeys(h.path for h in headers))
    return Volume(image, files, (label,), b_value, repeats, f"{len(stack.positions)} slices")


def build_dwi_volumes(
    series: Sequence[tuple[str, Sequence[DicomHeader]]], *, min_b_values: int = 2
) -> list[Volume]:
    """Build one volume per b-value (s/mm²) from one or more DWI series on one grid.

    Parameters
    ----------
    series
        ``(folder, headers)`` pairs, the primary series first; a header is one image (a file,
        or a frame of an enhanced file). All series must share the primary's slice positions.
        Images are planned per b-value over all series (:func:`tasks.dwi_trace.plan_b_volumes`:
        b0, scanner trace, or geometric mean of directions); within a series, the images used
        for a b-value (for each direction, where directional) must cover all slice
        positions. Images of the same b-value (and direction) at one position, repeats within
        a series or the same b in several series, are averaged.
    min_b_values
        Fewest distinct b-values accepted.

    Returns
    -------
    list of Volume
        Ascending b; ``repeats`` is the number of images averaged per slice (per direction
        for a geometric mean); ``note`` says how the volume was made.
    """
    if not series:
        raise InputError("no DWI series", step=STEP)
    for label, headers in series:
        if any(h.b_value is None for h in headers):
            raise _fail(label, "DWI file(s) without a b-value")
    primary_label, primary_headers = series[0]
    primary = stack_geometry(primary_headers, primary_label)
    stacks: dict[str, Stack] = {}
    owner: dict[int, str] = {}
    for label, headers in series:
        stack = stack_geometry(headers, label)
        if len(stack.positions) != len(primary.positions) or not np.allclose(
            stack.positions, primary.positions, atol=0.05
        ):
            raise _fail(
                label,
                f"slice positions ({len(stack.positions)}) differ from the primary DWI "
                f"series {primary_label} ({len(primary.positions)})",
            )
        stacks[label] = stack
        owner.update((id(h), label) for h in headers)
    try:
        plans = plan_b_volumes([h for _, headers in series for h in headers])
    except TraceProblem as exc:
        raise _fail(primary_label, str(exc)) from exc
    for plan in plans:
        for group in plan.groups:
            for label, stack in stacks.items():
                subset = [h for h in group if owner[id(h)] == label]
                covered = {_slot(stack, h) for h in subset}
                missing = [p for i, p in enumerate(stack.positions) if i not in covered]
                if subset and missing:
                    where = ", ".join(f"{p:.2f}" for p in missing[:5])
                    what = f"b{plan.b:g}" + (
                        f" direction {subset[0].diffusion_direction}"
                        if plan.method == "geometric_mean"
                        else ""
                    )
                    raise _fail(
                        label,
                        f"{what} has {len(covered)} of {len(stack.positions)} slice positions "
                        f"(missing at {where} mm along the normal): missing slice(s)",
                    )
    if len(plans) < min_b_values:
        found = ", ".join(f"b{p.b:g}" for p in plans) or "none"
        raise _fail(
            primary_label,
            f"DWI has {len(plans)} distinct b-value(s) ({found}), need {min_b_values}",
        )
    return [_b_volume(plan, owner, primary, primary_label) for plan in plans]


def _b_volume(plan: BPlan, owner: dict[int, str], primary: Stack, primary_label: str) -> Volume:
    items = [(owner[id(h)], h) for h in plan.images]
    folders = tuple(dict.fromkeys(label for label, _ in items))
    label = folders[0] if len(folders) == 1 else primary_label
    repeats = 0
    for group in plan.groups:
        slots = _group(primary, [(owner[id(h)], h) for h in group])
        repeats = max(repeats, max(len(s) for s in slots))
        if min(len(s) for s in slots) != max(len(s) for s in slots):
            raise _fail(label, f"b{plan.b:g}: unequal number of repeats across slice positions")
    image = _assemble(primary, _group(primary, items), label, plan)
    note = f"{plan.note}; {len(primary.positions)} slices"
    if repeats > 1:
        per = " per direction" if plan.method == "geometric_mean" else ""
        note += f", {repeats} images per slice{per} averaged (from {', '.join(folders)})"
    files = tuple(dict.fromkeys(h.path for _, h in items))
    return Volume(image, files, folders, plan.b, repeats, note)
