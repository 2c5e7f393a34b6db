"""How ``bench_cohort.py`` measures each chain: the cost of every step (wall s, CPU s, peak
RSS MB) and the accuracy of its outputs (synthetic truth; scanner ADC and reference masks on
real exams). Used by ``cohort_chains.py`` in its child process.

Peak memory: ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` before each
step, so each step's peak is its own; where Linux refuses that reset (or there is no
/proc), the process's peak so far from ``getrusage`` (``ru_maxrss``), and the report says
which was used.

Repeated passes over one exam (``--repeats``) are combined by :func:`combine_passes`: the
MEDIAN wall and CPU time per step and per exam, the LARGEST peak memory.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


# ----------------------------------------------------------------------------- measuring


def _status_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MB (None without /proc)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where Linux refuses."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def maxrss_mb() -> float:
    """Peak RSS of this process since it started (MB); ru_maxrss is KiB on Linux."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1024.0 * 1024.0) if sys.platform == "darwin" else value / 1024.0


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) plus its waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Meter:
    """Measures steps: wall (s), CPU (s) and peak RSS (MB) of each."""

    def __init__(self) -> None:
        self.per_step_peak = _reset_peak() and _status_mb("VmHWM") is not None
        self.method = (
            "per-step peak RSS: VmHWM reset via /proc/self/clear_refs before each step"
            if self.per_step_peak
            else "process peak RSS so far (getrusage ru_maxrss); per-step peaks unavailable"
        )

    def measure(self, function: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
        """Run ``function``; return its result and ``wall_s``, ``cpu_s``, ``peak_rss_mb``
        (peak during the call) and ``start_rss_mb`` (RSS when it started)."""
        if self.per_step_peak:
            _reset_peak()
        start_rss = _status_mb("VmRSS") or 0.0
        wall, cpu = time.perf_counter(), _cpu_s()
        result = function()
        cost = {
            "wall_s": time.perf_counter() - wall,
            "cpu_s": _cpu_s() - cpu,
            "peak_rss_mb": (_status_mb("VmHWM") if self.per_step_peak else maxrss_mb()) or 0.0,
            "start_rss_mb": start_rss,
        }
        return result, {k: round(v, 3) for k, v in cost.items()}


def total(steps: dict[str, dict[str, float]], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Wall and CPU s summed over ``steps`` (less those in ``skip``); peak RSS: the largest
    step peak."""
    kept = [cost for name, cost in steps.items() if name not in skip]
    out = {k: round(sum(cost[k] for cost in kept), 3) for k in ("wall_s", "cpu_s")}
    out["peak_rss_mb"] = max(cost["peak_rss_mb"] for cost in kept)
    return out


def _combine(costs: list[dict[str, float]]) -> dict[str, float]:
    """Median of ``wall_s`` and ``cpu_s``; the largest of every other field (memory)."""
    return {
        k: round(statistics.median(c[k] for c in costs), 3)
        if k in ("wall_s", "cpu_s")
        else max(c[k] for c in costs)
        for k in costs[0]
    }


def combine_passes(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One exam's passes (each ``steps``, ``total``, ``excluding_segment``) as one: per step
    and per exam the median wall / CPU s over the passes and the largest peak RSS."""
    return {
        "steps": {
            name: _combine([p["steps"][name] for p in passes]) for name in passes[0]["steps"]
        },
        "total": _combine([p["total"] for p in passes]),
        "excluding_segment": _combine([p["excluding_segment"] for p in passes]),
    }


# ---------------------------------------------------------------------------- accuracy


def _array(image: Any) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).astype(np.float64)


def _dice(labels: Any, reference: Any) -> float:
    a, b = _array(labels) > 0, _array(reference) > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _on_grid(image: Any, reference: Any, nearest: bool = False) -> Any:
    """``image`` on ``reference``'s grid, identity transform (scanner geometry)."""
    import SimpleITK as sitk

    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0)


def _gray_levels(image: Any, labels: Any, bin_width: float) -> int:
    """Distinct pyradiomics bins of ``image`` inside the mask at ``bin_width`` (no resampling)."""
    values = _array(image)[_array(labels) > 0]
    if values.size == 0:
        return 0
    return int(np.unique(np.floor((values - values.min()) / bin_width)).size)


def _radiomics_summary(out: dict[str, Any]) -> dict[str, Any]:
    values = [v for vs in out["features"].values() for v in vs]
    return {
        "features": len(values),
        "non_finite": int(sum(not np.isfinite(v) for v in values)),
        "images_failed": sorted(out.get("radiomics_errors", {})),
        "adc_gray_levels_in_mask": _gray_levels(
            out["adc_t2"], out["labels"], out["radiomics_bin_width_adc"]
        ),
    }


def accuracy(exam: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of one chain's outputs: against the synthetic truth, or on real exams
    against the scanner ADC and the reference masks. ADC figures in 1e-6 mm²/s."""
    import SimpleITK as sitk
    from bench_preprocess import field_accuracy

    from tasks.register import mask_points_mm, registration_error_mm

    acc: dict[str, Any] = {"volume_ml": round(out["volume_ml"], 2)}
    adc = _array(out["adc_native"])
    if exam["kind"] == "synthetic":
        truth = Path(exam["truth_dir"])
        meta = json.loads((truth / "truth.json").read_text())
        if out["t2_field"] is not None:
            acc["n4_t2_r_log_field"] = field_accuracy(
                out["t2_field"], out["t2_in"], out["t2_n4"], truth, "t2"
            )["r_log_field"]
        if "dwi_field" in out:
            acc["n4_dwi_r_log_field"] = field_accuracy(
                out["dwi_field"], out["dwi_in_low"], out["dwi_n4_low"], truth, "dwi"
            )["r_log_field"]
        points = mask_points_mm(sitk.ReadImage(str(truth / "dwi_gland_mask.nii.gz")))
        motion = meta["transforms"]["motion"]
        rigid = [
            registration_error_mm(
                out["rigid"][b], np.linalg.inv(np.array(motion[str(int(b))])), points
            )
            for b in out["rigid"]
            if b != min(out["rigid"]) and str(int(b)) in motion
        ]
        acc["tre_rigid_mm"] = round(float(np.mean(rigid)), 3) if rigid else None
        points = mask_points_mm(sitk.ReadImage(str(truth / "t2_gland_mask.nii.gz")))
        true_affine = np.linalg.inv(np.array(meta["transforms"]["dwi_to_t2"]))
        acc["tre_affine_mm"] = round(
            registration_error_mm(out["t2_to_dwi"], true_affine, points), 3
        )
        gland = _array(sitk.ReadImage(str(truth / "dwi_gland_mask.nii.gz"))) > 0
        error = (adc - _array(sitk.ReadImage(str(truth / "adc_true_dwi.nii.gz"))))[gland] * 1e6
        acc["adc_gland_median_abs_error"] = round(float(np.median(np.abs(error))), 1)
        acc["adc_gland_median_error"] = round(float(np.median(error)), 1)
        reference = sitk.ReadImage(str(truth / "t2_gland_mask.nii.gz"))
        acc["dice"] = round(_dice(out["labels"], reference), 4)
        acc["volume_error_ml"] = round(out["volume_ml"] - meta["gland_volume_ml"]["t2_voxels"], 2)
    else:
        references = {Path(p).name.split(".")[0]: sitk.ReadImage(p) for p in exam["references"]}
        acc["dice"] = {
            name: round(_dice(out["labels"], ref), 4) for name, ref in references.items()
        }
        scanner = out["images"].get("scanner_adc")
        if scanner is not None:
            scanner_adc = _array(_on_grid(scanner, out["adc_native"]))
            if references:
                name, region = next(iter(references.items()))
                inside = _array(_on_grid(region, out["adc_native"], nearest=True)) > 0
                acc["adc_vs_scanner_region"] = f"the {name} gland"
            else:  # the same region for both chains: central box where the scanner has ADC
                inside = np.zeros(scanner_adc.shape, bool)
                _, ny, nx = scanner_adc.shape
                inside[:, ny // 4 : 3 * ny // 4, nx // 4 : 3 * nx // 4] = True
                inside &= scanner_adc > 0
                acc["adc_vs_scanner_region"] = "the central in-plane half (scanner ADC > 0)"
            difference = (adc - scanner_adc)[inside] * 1e6
            acc["adc_vs_scanner_median_abs_diff"] = round(float(np.median(np.abs(difference))), 1)
            acc["adc_vs_scanner_median_diff"] = round(float(np.median(difference)), 1)
    acc["radiomics"] = _radiomics_summary(out)
    return acc
