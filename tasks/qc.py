"""QC figures: the mask at apex, mid-gland and base on T2, b1000 and ADC (no Prefect).

Pure plotting on SimpleITK images with matplotlib's object API and the Agg canvas (no
pyplot state, safe in worker threads); PNGs are written atomically
(:func:`tasks.io.write_bytes_atomic`) and carry nothing but the pixels, the caller's title
and matplotlib's default ``Software`` tag: no patient identifier is added here.

Display orientation: **radiological convention**, whatever the storage order. Each slice is
flipped / transposed from its direction cosines so that, for an axial slice, the patient's
right is on the viewer's left and anterior is up (coronal: right on the left, superior up;
sagittal: anterior on the left, superior up). Letters at the panel edges name the patient
directions. Oblique slices are shown in their own plane, labelled by the nearest axis.
Pixels are drawn at their physical size (mm), so anisotropic in-plane spacing keeps its true
aspect ratio.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tasks.errors import InputError
from tasks.io import write_bytes_atomic
from tasks.measure import require_same_grid
from tasks.registry import QC

STEP = QC.name  # the step's one name: tasks/registry.py
#: Okabe-Ito colours (distinguishable with colour-vision deficiency).
PREDICTION_COLOUR = "#E69F00"  # orange
REFERENCE_COLOUR = "#56B4E9"  # sky blue
#: Robust display window: these percentiles of the slice's voxels map to black and white.
WINDOW_PERCENTILES = (1.0, 99.0)
#: Margin (mm) around the outlines in the zoomed panel.
ZOOM_MARGIN_MM = 10.0
# Patient axes in LPS: index 0 = x (R -> L), 1 = y (A -> P), 2 = z (I -> S).
_LOW = ("R", "A", "I")
_HIGH = ("L", "P", "S")


def _check(image: sitk.Image, what: str) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a 3D scalar image", step=STEP)


def radiological_slice(
    image: sitk.Image, k: int
) -> tuple[np.ndarray, tuple[float, float], dict[str, str]]:
    """Slice ``k`` (index axis 2, as stored) reoriented for display (module docstring).

    Returns
    -------
    array
        2D float64 array, row 0 at the top, column 0 on the left of the display.
    spacing
        (row spacing, column spacing) in mm.
    edges
        Patient direction at each edge: ``{"left", "right", "top", "bottom"}`` -> letter.
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    data = sitk.GetArrayViewFromImage(image)[k].astype(np.float64)  # rows = j, cols = i
    spacing = image.GetSpacing()
    axis_i, axis_j = (int(np.argmax(np.abs(direction[:, c]))) for c in (0, 1))
    col, row = 0, 1  # index axes shown along columns / rows
    if axis_j < axis_i:  # the axis nearer x (then y) goes along the columns
        data, col, row = data.T, 1, 0
        axis_i, axis_j = axis_j, axis_i
    col_axis, row_axis = axis_i, axis_j
    if direction[col_axis, col] < 0:  # columns run toward +x (L) or +y (P)
        data = data[:, ::-1]
    towards_bottom = direction[row_axis, row] if row_axis != 2 else -direction[row_axis, row]
    if towards_bottom < 0:  # rows run toward +y (P), or toward -z (I) for z
        data = data[::-1, :]
    top, bottom = (_LOW[row_axis], _HIGH[row_axis]) if row_axis != 2 else ("S", "I")
    edges = {"left": _LOW[col_axis], "right": _HIGH[col_axis], "top": top, "bottom": bottom}
    return np.ascontiguousarray(data), (spacing[row], spacing[col]), edges


def _window(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES))
    return (low, high) if high > low else (low - 1.0, low + 1.0)


def _zoom(masks: list[np.ndarray], shape: tuple[int, int], spacing: tuple[float, float]):
    """(x0, x1, y0, y1) in mm: the outlines' bounding box + margin, square, in the image."""
    height, width = shape[0] * spacing[0], shape[1] * spacing[1]
    union = np.zeros(shape, bool)
    for mask in masks:
        union |= mask
    if not union.any():
        return 0.0, width, height, 0.0
    rows, cols = np.nonzero(union)
    y0, y1 = rows.min() * spacing[0], (rows.max() + 1) * spacing[0]
    x0, x1 = cols.min() * spacing[1], (cols.max() + 1) * spacing[1]
    half = max(y1 - y0, x1 - x0) / 2 + ZOOM_MARGIN_MM
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    return cx - half, cx + half, cy + half, cy - half


def _panel(ax, t2, masks, spacing, window, edges, limits=None) -> None:
    height, width = t2.shape[0] * spacing[0], t2.shape[1] * spacing[1]
    ax.imshow(
        t2,
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        extent=(0, width, height, 0),
        interpolation="nearest",
    )
    xs = (np.arange(t2.shape[1]) + 0.5) * spacing[1]
    ys = (np.arange(t2.shape[0]) + 0.5) * spacing[0]
    for mask, colour in masks:
        if mask.any():
            ax.contour(
                xs, ys, mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2
            )
    if limits is not None:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
    ax.set_axis_off()
    style = {"color": "white", "fontsize": 9, "transform": ax.transAxes}
    ax.text(0.01, 0.5, edges["left"], ha="left", va="center", **style)
    ax.text(0.99, 0.5, edges["right"], ha="right", va="center", **style)
    ax.text(0.5, 0.99, edges["top"], ha="center", va="top", **style)
    ax.text(0.5, 0.01, edges["bottom"], ha="center", va="bottom", **style)


#: Outline colours of the mask's labels, in label order (Okabe-Ito, without the reference's).
LABEL_COLOURS = (PREDICTION_COLOUR, "#009E73", "#CC79A7", "#F0E442", "#D55E00", "#0072B2")
#: Where the three columns sit along the mask's inferior -> superior extent.
LEVELS = (("apex", 0.15), ("mid", 0.5), ("base", 0.85))


def level_slices(mask: np.ndarray, image: sitk.Image) -> list[int]:
    """Slice indices (axis 2) of apex, mid-gland and base: :data:`LEVELS` of the way
    through the slices holding ``mask`` (z, y, x), ordered inferior -> superior by their
    physical position; the middle slice three times for an empty mask."""
    held = np.flatnonzero(mask.any(axis=(1, 2)))
    if held.size == 0:
        return [mask.shape[0] // 2] * len(LEVELS)
    height = [image.TransformIndexToPhysicalPoint((0, 0, int(k)))[2] for k in held]
    ordered = held[np.argsort(height, kind="stable")]
    return [int(ordered[round(f * (len(ordered) - 1))]) for _, f in LEVELS]


def qc_figure(
    t2: sitk.Image,
    mask: sitk.Image,
    path: str | Path,
    *,
    b1000: sitk.Image | None = None,
    adc: sitk.Image | None = None,
    reference: sitk.Image | None = None,
    label_names: dict[int, str] | None = None,
    title: str = "",
    size_px: int = 256,
) -> dict[str, Any]:
    """PNG with the mask at apex, mid-gland and base (columns) on T2, b1000 and ADC (rows).

    Every panel shows the same T2-grid slice, zoomed on the outlines (their bounding box
    over the three slices plus :data:`ZOOM_MARGIN_MM`): each label of the mask outlined in
    its colour (:data:`LABEL_COLOURS`), the reference (when given) in sky blue. On the b1000
    and ADC rows the outline is the T2 mask's, so a misregistration shows as the outline off
    the gland. Window: 1st-99th percentile of each slice. Orientation: radiological (module
    docstring). An empty prediction is drawn, on the reference's levels when there is one,
    and says "prediction is empty".

    Parameters
    ----------
    t2, b1000, adc
        3D scalar images on the T2 grid (b1000 and ADC optional: rows left out).
    mask, reference
        Label images on the T2 grid (reference optional).
    label_names
        ``{value: name}`` of the mask's labels for the legend (default: "prediction").
    title
        Caption at the top; the caller decides what it says (pseudonymous ids only).
    size_px
        Side of one panel in pixels.

    Returns
    -------
    dict
        ``slices`` (apex, mid, base k), ``sha256``, ``path``, ``empty``, ``size`` (w, h px).

    Raises
    ------
    InputError
        Images that are not 3D scalar or not on the T2 grid.
    """
    _check(t2, "t2")
    rows = [("T2", t2)]
    for name, image in (("b1000", b1000), ("ADC", adc), ("mask", mask), ("reference", reference)):
        if image is not None:
            _check(image, name)
            require_same_grid(t2, image, what=f"{name} vs t2", step=STEP)
            if name in ("b1000", "ADC"):
                rows.append((name, image))
    if size_px < 64:
        raise InputError(f"size_px must be at least 64, got {size_px}", step=STEP)
    labels = sitk.GetArrayViewFromImage(mask)
    ref = sitk.GetArrayViewFromImage(reference) != 0 if reference is not None else None
    empty = not labels.any()
    chosen = labels != 0 if not empty or ref is None else ref
    slices = level_slices(chosen, t2)
    values = [int(v) for v in np.unique(labels) if v != 0]
    names = label_names or {}

    def shown(k: int, image: sitk.Image | None = None, values: np.ndarray | None = None):
        if values is not None:
            image = sitk.GetImageFromArray(values.astype(np.uint8))
            image.CopyInformation(t2)
        return radiological_slice(image, k)

    outlines = []  # per column: [(2D mask, colour)]
    for k in slices:
        column = [
            (shown(k, values=labels == v)[0] > 0, LABEL_COLOURS[i % len(LABEL_COLOURS)])
            for i, v in enumerate(values)
        ]
        if ref is not None:
            column.append((shown(k, values=ref)[0] > 0, REFERENCE_COLOUR))
        outlines.append(column)
    _, spacing, _ = shown(slices[0], t2)
    plane = shown(slices[0], t2)[0].shape
    limits = _zoom([m for column in outlines for m, _ in column], plane, spacing)

    dpi = 100
    band_px = 28
    width, height = len(LEVELS) * size_px, len(rows) * size_px + band_px
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    for r, (row_name, image) in enumerate(rows):
        for c, k in enumerate(slices):
            bottom = (len(rows) - 1 - r) * size_px / height
            ax = figure.add_axes((c / len(LEVELS), bottom, 1 / len(LEVELS), size_px / height))
            data, _, edges = shown(k, image)
            _panel(ax, data, outlines[c], spacing, _window(data), edges, limits)
            level = LEVELS[c][0]
            ax.text(
                0.03,
                0.03,
                f"{row_name} {level} (slice {k + 1})",
                color="white",
                fontsize=8,
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0},
                va="bottom",
                ha="left",
                transform=ax.transAxes,
            )
    top = 1.0 - band_px / 2 / height
    caption = title or "QC"
    figure.text(0.01, top, caption, color="white", fontsize=10, va="center")
    handles = [
        Line2D(
            [],
            [],
            color=LABEL_COLOURS[i % len(LABEL_COLOURS)],
            label=names.get(v, "prediction" if len(values) == 1 else str(v)),
        )
        for i, v in enumerate(values)
    ]
    if reference is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOUR, label="reference"))
    if handles:
        figure.legend(
            handles=handles,
            loc="upper right",
            ncol=len(handles),
            frameon=False,
            labelcolor="white",
            fontsize=9,
        )
    if empty:
        figure.text(
            0.5, top, "prediction is empty", color="#FF4040", fontsize=11, ha="center", va="center"
        )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="black")
    data = buffer.getvalue()
    sha = write_bytes_atomic(path, data)
    return {
        "slices": slices,
        "sha256": sha,
        "path": str(path),
        "empty": empty,
        "size": (width, height),
    }
