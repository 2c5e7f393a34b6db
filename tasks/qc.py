"""QC figures: a T2 slice with the predicted (and reference) mask outlined (no Prefect).

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


def qc_figure(
    t2: sitk.Image,
    mask: sitk.Image,
    path: str | Path,
    *,
    reference: sitk.Image | None = None,
    title: str = "",
    size_px: int = 512,
) -> dict[str, Any]:
    """PNG of the T2 slice with the largest predicted mask area, the masks outlined.

    Left panel: the whole slice; right panel: zoomed on the outlines (their bounding box
    plus :data:`ZOOM_MARGIN_MM`). The predicted mask (every non-zero voxel) is outlined in
    orange, the reference (when given) in sky blue. Window: the 1st-99th percentile of the
    slice's T2 values. Orientation: radiological (module docstring).

    Slice choice: the index-``k`` slice (third index axis, as stored; axial for axial T2)
    with the most predicted voxels (lowest ``k`` on ties). An empty prediction is drawn, not
    refused, because that is when a QC figure matters most: it shows the reference's
    largest slice, or the middle slice without a reference (or with an empty one too), and
    says "prediction is empty" on the figure.

    Parameters
    ----------
    t2
        3D scalar T2 image.
    mask
        Predicted label image on the T2 grid.
    path
        Output PNG (folders are created; written atomically).
    reference
        Optional reference label image on the T2 grid.
    title
        Caption printed at the top; the caller decides what it says (pseudonymous ids only).
    size_px
        Height of the PNG in pixels; the width is twice that (two square panels).

    Returns
    -------
    dict
        ``slice`` (k), ``sha256`` of the PNG, ``path`` (str), ``empty`` (prediction empty),
        ``size`` ((width, height) in pixels).

    Outputs
    -------
    ``path``: RGBA PNG of ``2 * size_px`` x ``size_px`` pixels.

    Raises
    ------
    InputError
        Images that are not 3D scalar, or masks not on the T2 grid.
    """
    _check(t2, "t2")
    _check(mask, "mask")
    require_same_grid(t2, mask, what="mask vs t2", step=STEP)
    if reference is not None:
        _check(reference, "reference")
        require_same_grid(t2, reference, what="reference vs t2", step=STEP)
    if size_px < 64:
        raise InputError(f"size_px must be at least 64, got {size_px}", step=STEP)
    pred = sitk.GetArrayViewFromImage(mask) != 0
    ref = sitk.GetArrayViewFromImage(reference) != 0 if reference is not None else None
    areas = pred.sum(axis=(1, 2))
    empty = not areas.any()
    if not empty:
        k = int(np.argmax(areas))
    elif ref is not None and ref.any():
        k = int(np.argmax(ref.sum(axis=(1, 2))))
    else:
        k = pred.shape[0] // 2

    def as_image(values: np.ndarray) -> sitk.Image:
        image = sitk.GetImageFromArray(values.astype(np.uint8))
        image.CopyInformation(t2)
        return image

    t2_slice, spacing, edges = radiological_slice(t2, k)
    outlines = [(radiological_slice(as_image(pred), k)[0] > 0, PREDICTION_COLOUR)]
    if ref is not None:
        outlines.append((radiological_slice(as_image(ref), k)[0] > 0, REFERENCE_COLOUR))
    window = _window(t2_slice)

    dpi = 100
    figure = Figure(figsize=(2 * size_px / dpi, size_px / dpi), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    band = min(0.12, 28 / size_px)  # room for the title and legend
    full = figure.add_axes((0.0, 0.0, 0.5, 1.0 - band))
    zoomed = figure.add_axes((0.5, 0.0, 0.5, 1.0 - band))
    _panel(full, t2_slice, outlines, spacing, window, edges)
    limits = _zoom([m for m, _ in outlines], t2_slice.shape, spacing)
    _panel(zoomed, t2_slice, outlines, spacing, window, edges, limits)
    caption = (
        f"{title}  slice {k + 1}/{pred.shape[0]}" if title else f"slice {k + 1}/{pred.shape[0]}"
    )
    figure.text(0.01, 1.0 - band / 2, caption, color="white", fontsize=10, va="center")
    handles = [Line2D([], [], color=PREDICTION_COLOUR, label="prediction")]
    if reference is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOUR, label="reference"))
    figure.legend(
        handles=handles,
        loc="upper right",
        ncol=len(handles),
        frameon=False,
        labelcolor="white",
        fontsize=9,
    )
    if empty:
        full.text(
            0.5,
            0.08,
            "prediction is empty",
            color="#FF4040",
            fontsize=12,
            ha="center",
            transform=full.transAxes,
        )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="black")
    data = buffer.getvalue()
    sha = write_bytes_atomic(path, data)
    return {
        "slice": k,
        "sha256": sha,
        "path": str(path),
        "empty": empty,
        "size": (2 * size_px, size_px),
    }
