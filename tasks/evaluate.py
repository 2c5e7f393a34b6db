"""Segmentation agreement metrics, per case and as mean ± SD (pure functions, no Prefect).

A predicted and a reference mask are compared voxel by voxel on ONE grid: they must share
size, spacing, origin and direction (within file-format rounding,
:func:`tasks.measure.require_same_grid`); otherwise :class:`~tasks.errors.InputError`.
Nothing is resampled here, so a metric never silently depends on an interpolation.

Metrics (keys of :func:`evaluate_masks`; P = predicted voxels, R = reference voxels):

* ``dice`` 2|P∩R| / (|P|+|R|), ``iou`` |P∩R| / |P∪R|, ``sensitivity`` |P∩R| / |R|,
  ``precision`` |P∩R| / |P|: SimpleITK's ``LabelOverlapMeasuresImageFilter`` (Dice,
  Jaccard, 1 - false negative error, 1 - false discovery rate).
* ``hd`` and ``hd95`` (mm): symmetric Hausdorff distance and its 95th-percentile variant
  between the mask *surfaces* (voxels of the mask with a face-neighbour outside it), in
  physical units from the voxel spacing: ``max(d(P→R), d(R→P))`` of the maximum resp. the
  95th percentile (linear interpolation) of each directed set of surface distances. Both
  come from MONAI's ``compute_hausdorff_distance`` (already a pinned dependency for the TAPS
  backend; the same surface definition and code for both numbers, so HD95 <= HD always).
  SimpleITK's ``HausdorffDistanceImageFilter`` measures between whole voxel sets instead;
  it agrees for the maximum on ordinary shapes but has no percentile, and mixing the two
  definitions could report HD95 > HD. MedPy's ``hd95`` pools both directions before the
  percentile, so its HD95 can be slightly lower than this one; say which when comparing.
* ``volume_pred_ml``, ``volume_ref_ml`` (mL), ``volume_diff_ml`` (prediction minus
  reference), ``volume_diff_pct`` (100 x difference / reference volume).

Empty masks (conventions, tested):

======================  =====  =====  ===========  =========  ========  ===============
case                    dice   iou    sensitivity  precision  hd, hd95  volume_diff_pct
======================  =====  =====  ===========  =========  ========  ===============
both empty              1.0    1.0    NaN (0/0)    NaN (0/0)  NaN       NaN
prediction empty        0.0    0.0    0.0          NaN (0/0)  NaN       -100
reference empty         0.0    0.0    NaN (0/0)    0.0        NaN       NaN
======================  =====  =====  ===========  =========  ========  ===============

A distance to an empty surface is undefined, so it is NaN (not inf, not 0); :func:`summarize`
leaves NaN out of mean ± SD and reports how many cases each metric is over (``n``), so a
mean HD over fewer cases than the Dice is visible, never hidden.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from tasks.errors import InputError
from tasks.io import write_text_atomic
from tasks.measure import mask_volume_ml, require_same_grid

STEP = "evaluate"
#: Per-case metric keys, in table order.
METRICS = (
    "dice",
    "iou",
    "hd",
    "hd95",
    "sensitivity",
    "precision",
    "volume_pred_ml",
    "volume_ref_ml",
    "volume_diff_ml",
    "volume_diff_pct",
)
#: Row names (with units) for tables.
METRIC_LABELS = {
    "dice": "Dice",
    "iou": "IoU (Jaccard)",
    "hd": "Hausdorff distance (mm)",
    "hd95": "HD95 (mm)",
    "sensitivity": "Sensitivity (recall)",
    "precision": "Precision",
    "volume_pred_ml": "Volume, prediction (mL)",
    "volume_ref_ml": "Volume, reference (mL)",
    "volume_diff_ml": "Volume difference (mL)",
    "volume_diff_pct": "Volume difference (%)",
}
NAN = float("nan")


# --------------------------------------------------------------------------- per case


def _binary(mask: sitk.Image, label: int | None, what: str) -> sitk.Image:
    """uint8 0/1 image of ``mask == label`` (``None``: non-zero), on ``mask``'s grid."""
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a 3D scalar image", step=STEP)
    values = sitk.GetArrayViewFromImage(mask)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputError(f"{what} holds NaN or infinite values", step=STEP)
    chosen = values != 0 if label is None else values == label
    binary = sitk.GetImageFromArray(chosen.astype(np.uint8))
    binary.CopyInformation(mask)
    return binary


def _surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]):
    """(hd, hd95) in mm with MONAI (module docstring); both masks non-empty."""
    import torch  # noqa: PLC0415 - heavy (torch + MONAI, seconds): only when evaluating
    from monai.metrics import compute_hausdorff_distance  # noqa: PLC0415

    y_pred = torch.from_numpy(pred[None, None])
    y_ref = torch.from_numpy(ref[None, None])
    out = []
    for percentile in (None, 95.0):
        with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal call
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy")
            value = compute_hausdorff_distance(
                y_pred,
                y_ref,
                include_background=True,
                distance_metric="euclidean",
                percentile=percentile,
                spacing=list(spacing_zyx),
            )
        out.append(float(value.reshape(-1)[0]))
    return out[0], out[1]


def evaluate_masks(
    prediction: sitk.Image,
    reference: sitk.Image,
    *,
    label: int | None = None,
    reference_label: int | None = None,
) -> dict[str, float]:
    """Agreement of a predicted with a reference mask on the same grid.

    Parameters
    ----------
    prediction, reference
        3D scalar label images (any pixel type) on one grid (module docstring).
    label
        Prediction value to compare; ``None`` (default): every non-zero voxel.
    reference_label
        Reference value to compare; ``None``: same as ``label``.

    Returns
    -------
    dict
        :data:`METRICS` -> float: ratios in [0, 1], distances in mm, volumes in mL,
        ``volume_diff_pct`` in %. Undefined values are NaN (empty-mask table above).

    Raises
    ------
    InputError
        Masks that are not 3D scalar, hold NaN/inf, or lie on different grids.
    """
    require_same_grid(prediction, reference, what="reference vs prediction mask", step=STEP)
    pred = _binary(prediction, label, "prediction mask")
    ref = _binary(
        reference, label if reference_label is None else reference_label, "reference mask"
    )
    ref.CopyInformation(pred)  # same grid within rounding: make ITK's own check exact
    n_pred, volume_pred = mask_volume_ml(pred)
    n_ref, volume_ref = mask_volume_ml(ref)
    metrics = dict.fromkeys(METRICS, NAN)
    metrics.update(
        volume_pred_ml=volume_pred,
        volume_ref_ml=volume_ref,
        volume_diff_ml=volume_pred - volume_ref,
        volume_diff_pct=100.0 * (n_pred - n_ref) / n_ref if n_ref else NAN,  # one grid
    )
    if n_pred == 0 and n_ref == 0:
        metrics.update(dice=1.0, iou=1.0)
    elif n_pred == 0:
        metrics.update(dice=0.0, iou=0.0, sensitivity=0.0)
    elif n_ref == 0:
        metrics.update(dice=0.0, iou=0.0, precision=0.0)
    else:
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.SetNumberOfThreads(1)
        overlap.Execute(pred, ref)  # source = prediction, target = reference
        hd, hd95 = _surface_distances(
            sitk.GetArrayViewFromImage(pred).astype(bool),
            sitk.GetArrayViewFromImage(ref).astype(bool),
            tuple(reversed(pred.GetSpacing())),  # numpy axis order (z, y, x)
        )
        metrics.update(
            dice=overlap.GetDiceCoefficient(),
            iou=overlap.GetJaccardCoefficient(),
            sensitivity=1.0 - overlap.GetFalseNegativeError(),  # |R \ P| / |R|
            precision=1.0 - overlap.GetFalseDiscoveryRate(),  # |P \ R| / |P|
            hd=hd,
            hd95=hd95,
        )
    return {key: float(value) for key, value in metrics.items()}


def evaluate_labels(
    prediction: sitk.Image, reference: sitk.Image, labels: Mapping[int, str]
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_masks` per label name, plus ``"gland"`` (any non-zero) for several.

    Parameters
    ----------
    prediction, reference
        Label maps on one grid using the same label values (e.g. 1 = PZ, 2 = TZ).
    labels
        Label value -> name. With more than one label, the whole gland (every non-zero
        voxel of either map) is added as ``"gland"``.

    Raises
    ------
    InputError
        Non-positive label values, repeated names, ``"gland"`` used as a name for one of
        several labels, or the errors of :func:`evaluate_masks`.
    """
    names = list(labels.values())
    if not labels or any(int(v) != v or v <= 0 for v in labels):
        raise InputError(
            f"labels must map positive integers to names, got {dict(labels)}", step=STEP
        )
    if len(set(names)) != len(names) or (len(names) > 1 and "gland" in names):
        raise InputError(
            f"label names must be unique and not 'gland' (the union), got {names}", step=STEP
        )
    out = {
        name: evaluate_masks(prediction, reference, label=int(value))
        for value, name in sorted(labels.items())
    }
    if len(labels) > 1:
        out["gland"] = evaluate_masks(prediction, reference)
    return out


# ------------------------------------------------------------------------------ summary


def summarize(cases: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS) -> dict:
    """Mean ± SD of each metric over cases, leaving undefined values out.

    Parameters
    ----------
    cases
        Per-case dicts (other keys such as patient or model are ignored).
    metrics
        Metric keys to summarise.

    Returns
    -------
    dict
        ``{"n_cases": N, "<metric>": {"mean", "sd", "n"}, ...}``: the mean, the sample SD
        (ddof = 1; NaN for fewer than two values) and ``n``, the number of finite values
        (NaN, None, inf and a missing key are left out). Merge label keys into it for
        :func:`format_markdown_table` / :func:`format_summary_csv`.
    """
    out: dict[str, Any] = {"n_cases": len(cases)}
    for metric in metrics:
        values = np.array(
            [float(c[metric]) for c in cases if c.get(metric) is not None], dtype=np.float64
        )
        values = values[np.isfinite(values)]
        out[metric] = {
            "mean": float(values.mean()) if values.size else NAN,
            "sd": float(values.std(ddof=1)) if values.size > 1 else NAN,
            "n": int(values.size),
        }
    return out


def _is_stat(key: str, value: Any) -> bool:
    """A :func:`summarize` entry (``n_cases`` or a metric's dict), not a group label."""
    return key == "n_cases" or isinstance(value, Mapping)


def _stat(group: Mapping[str, Any], metric: str) -> tuple[float, float, int]:
    entry = group.get(metric) or {}
    return entry.get("mean", NAN), entry.get("sd", NAN), int(entry.get("n", 0))


def _groups(summaries: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping]:
    return [summaries] if isinstance(summaries, Mapping) else list(summaries)


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def format_markdown_table(
    summaries: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = METRICS,
    digits: int = 2,
) -> str:
    """A paper-style Markdown table: one row per metric, one column per summary.

    Parameters
    ----------
    summaries
        One :func:`summarize` result, or several, each optionally merged with label keys
        (e.g. ``{"model": "taps", "reference": "Bosma22b"} | summarize(cases)``); the label
        values (every entry that is not ``n_cases`` or a metric's dict), joined by " / ",
        head the columns ("mean ± SD" when there are none).
    metrics
        Rows, in order.
    digits
        Decimals of mean and SD.

    Returns
    -------
    str
        Markdown; cells read ``0.82 ± 0.05``, with ``(n=k)`` when a metric is defined for
        fewer cases than the summary has, ``n/a`` when undefined; a last row gives the cases
        (``Patients``: a summary groups one case per patient).
    """
    groups = _groups(summaries)
    headers = []
    for group in groups:
        names = [str(v) for k, v in group.items() if not _is_stat(k, v)]
        headers.append(" / ".join(names) if names else "mean ± SD")
    lines = ["| Metric | " + " | ".join(headers) + " |", "|---|" + "---|" * len(groups)]
    for metric in metrics:
        cells = []
        for group in groups:
            mean, sd, n = _stat(group, metric)
            total = group.get("n_cases", 0)
            if not n:
                cells.append("n/a")
                continue
            cell = _number(mean, digits)
            cell += f" ± {_number(sd, digits)}" if math.isfinite(sd) else ""
            cells.append(cell + (f" (n={n})" if n < total else ""))
        lines.append(f"| {METRIC_LABELS.get(metric, metric)} | " + " | ".join(cells) + " |")
    lines.append("| Patients | " + " | ".join(str(g.get("n_cases", 0)) for g in groups) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return "" if value is None else value


def format_cases_csv(cases: Sequence[Mapping[str, Any]]) -> str:
    """Per-case rows as CSV; columns = every key in first-seen order; NaN written ``NaN``."""
    fields: list[str] = []
    for case in cases:
        fields.extend(k for k in case if k not in fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for case in cases:
        writer.writerow({k: _cell(case.get(k)) for k in fields})
    return buffer.getvalue()


def format_summary_csv(
    summaries: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = METRICS,
) -> str:
    """Summaries in long form: label columns, then ``metric, n, mean, sd, n_cases``."""
    groups = _groups(summaries)
    label_fields: list[str] = []
    for group in groups:
        label_fields.extend(
            k for k, v in group.items() if not _is_stat(k, v) and k not in label_fields
        )
    fields = [*label_fields, "metric", "n", "mean", "sd", "n_cases"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for group in groups:
        for metric in metrics:
            mean, sd, n = _stat(group, metric)
            row = {k: _cell(group.get(k)) for k in label_fields}
            row.update(
                metric=metric,
                n=n,
                mean=_cell(mean),
                sd=_cell(sd),
                n_cases=group.get("n_cases", 0),
            )
            writer.writerow(row)
    return buffer.getvalue()


def write_cases_csv(path: str | Path, cases: Sequence[Mapping[str, Any]]) -> str:
    """Write :func:`format_cases_csv` atomically; return the file's sha256."""
    return write_text_atomic(path, format_cases_csv(cases))


def write_summary_csv(
    path: str | Path,
    summaries: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = METRICS,
) -> str:
    """Write :func:`format_summary_csv` atomically; return the file's sha256."""
    return write_text_atomic(path, format_summary_csv(summaries, metrics=metrics))
