"""Benchmark: the whole preprocessing chain of one exam, step by step, ours vs library defaults.

The chain is the one the pipeline runs, imported from the library
(:func:`tasks.chain.preprocess_exam`: T2 anisotropic diffusion + DWI SUSAN -> N4 -> elastix
motion correction and the checked T2<->DWI alignment -> b1000 and ADC fits on both grids), on
in-memory images, so the figures are the image work alone (no file I/O, no database, no
Prefect).

Baselines, measured in the same run on the same images:

- T2 denoising: SimpleITK's ``CurvatureAnisotropicDiffusionImageFilter`` at the pipeline's
  settings (at one thread the pipeline runs the numpy filter of
  ``tasks/curvature_diffusion.py`` instead: both are timed, and their voxels compared), and
  with its default time step (0.0625; unstable for 0.5 mm voxels, see ``tasks/denoise.py``).
- N4: SimpleITK's N4 at its defaults at full resolution without a mask takes minutes
  (``benchmarks/results/preprocess.md``: 398 s wall on a 384x384x20 T2); with
  ``--default-n4`` it is run here too.
- ADC: the through-origin log-ratio formula of a widely used tool.
- elastix: a cold worker (import itk + first ParameterObject) is what a fresh process per
  task pays before its first registration; it is reported, not added to the chain.

Usage::

    .venv/bin/python benchmarks/bench_chain.py [--threads 1] [--default-n4]

Writes ``benchmarks/results/chain.json`` and ``chain.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from flows.resources import apply_thread_limits
from phantom.exam import generate_exam
from phantom.plan import plan_exam
from tasks.bias import N4Params
from tasks.chain import ChainParams, preprocess_exam
from tasks.denoise import T2DenoiseParams, denoise_t2, resolve_time_step
from tasks.discover import discover_exams
from tasks.dwi import through_origin_adc
from tasks.ingest import ingest_exam
from tasks.io import write_json_atomic, write_text_atomic
from tasks.register import (
    RegistrationParams,
    warm_up,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom"
RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = 15.0
REAL_EXAMS = ("ProstateX-0000", "ProstateX-0218")


def timed(function: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``function``; return its result and wall / CPU seconds (CPU: all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, {
        "wall_s": round(time.perf_counter() - wall, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
    }


def load(root: Path, folder_prefix: str, out: Path) -> dict[str, Any]:
    """Ingest one exam; return its T2 and DWI volumes (float32)."""
    (exam,) = [e for e in discover_exams(root) if e.folder.startswith(folder_prefix)]
    result = ingest_exam(exam, out_dir=out, key="bench")
    images: dict[str, Any] = {"name": folder_prefix.rstrip("/"), "dwi": {}}
    for series in result.series:
        image = sitk.ReadImage(str(out / series.image), sitk.sitkFloat32)
        if series.kind == "t2w":
            images["t2"] = image
        elif series.kind == "dwi":
            images["dwi"][float(series.b_value)] = image
    return images


def run_chain(images: dict[str, Any], threads: int) -> dict[str, Any]:
    """The pipeline's chain (:func:`tasks.chain.preprocess_exam`, default parameters) with
    per-stage timings; under ``"t2_grid"`` the images segmentation reads (T2, b1000 and
    ADC on the T2 grid; not JSON)."""
    params = ChainParams(
        t2_denoise=T2DenoiseParams(threads=threads),
        n4=N4Params(threads=threads),
        registration=RegistrationParams(threads=threads),
    )
    steps: dict[str, dict[str, float]] = {}

    def step(name: str, function: Callable[[], Any]) -> Any:
        result, steps[name] = timed(function)
        return result

    done = preprocess_exam(images["t2"], images["dwi"], params=params, threads=threads, step=step)
    total = {k: round(sum(s[k] for s in steps.values()), 3) for k in ("wall_s", "cpu_s")}
    grid = {"t2w": done.bias.t2, "dwi_b1000": done.maps.b1000_t2, "adc": done.maps.adc_t2}
    return {"steps": steps, "total": total, "fitted_b": sorted(images["dwi"]), "t2_grid": grid}


def run_baselines(images: dict[str, Any], threads: int, default_n4: bool) -> dict[str, Any]:
    """The same libraries at their defaults, where a default exists."""
    out: dict[str, Any] = {}
    t2 = images["t2"]

    def default_diffusion() -> sitk.Image:
        flt = sitk.CurvatureAnisotropicDiffusionImageFilter()  # default time step 0.0625
        flt.SetNumberOfIterations(T2DenoiseParams().iterations)
        flt.SetConductanceParameter(T2DenoiseParams().conductance)
        flt.SetNumberOfThreads(threads)
        return flt.Execute(t2)

    def itk_diffusion() -> sitk.Image:
        flt = sitk.CurvatureAnisotropicDiffusionImageFilter()
        flt.SetNumberOfIterations(T2DenoiseParams().iterations)
        flt.SetConductanceParameter(T2DenoiseParams().conductance)
        flt.SetTimeStep(resolve_time_step(t2, T2DenoiseParams()))
        flt.SetNumberOfThreads(threads)
        return flt.Execute(t2)

    def numpy_diffusion() -> sitk.Image:
        return denoise_t2(t2, params=T2DenoiseParams(threads=1))

    itk_out, out["denoise_t2_itk_filter"] = timed(itk_diffusion)
    numpy_out, out["denoise_t2_numpy_filter"] = timed(numpy_diffusion)
    same = np.array_equal(sitk.GetArrayFromImage(itk_out), sitk.GetArrayFromImage(numpy_out))
    out["denoise_t2_itk_filter"]["same_voxels_as_numpy"] = same
    smoothed, out["denoise_t2_default_time_step"] = timed(default_diffusion)
    values = sitk.GetArrayViewFromImage(smoothed)
    out["denoise_t2_default_time_step"]["finite"] = bool(np.isfinite(values).all())
    stack = np.stack([sitk.GetArrayFromImage(images["dwi"][b]) for b in sorted(images["dwi"])])
    _, out["adc_through_origin"] = timed(lambda: through_origin_adc(stack, sorted(images["dwi"])))
    if default_n4:

        def n4_defaults() -> sitk.Image:
            return sitk.N4BiasFieldCorrectionImageFilter().Execute(t2)

        _, out["n4_t2_defaults_full_resolution"] = timed(n4_defaults)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--default-n4", action="store_true")
    args = parser.parse_args()
    apply_thread_limits(args.threads)
    report: dict[str, Any] = {
        "threads": args.threads,
        "target_s": TARGET_S,
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "exams": [],
    }
    _, report["elastix_warm_up"] = timed(lambda: warm_up(RegistrationParams()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exams = []
        if DATA.is_dir():
            for name in REAL_EXAMS:
                exams.append(load(DATA, name + "/", root / name))
        generated = generate_exam(root / "syn", plan_exam(0, 0))
        exams.append(load(root / "syn" / "dicom", generated.patient_folder + "/", root / "out"))
        for images in exams:
            row = {
                "exam": images["name"],
                "t2_size": list(images["t2"].GetSize()),
                "dwi_size": list(images["dwi"][min(images["dwi"])].GetSize()),
                "b_values": sorted(images["dwi"]),
                "ours": {
                    k: v for k, v in run_chain(images, args.threads).items() if k != "t2_grid"
                },
                "baselines": run_baselines(images, args.threads, args.default_n4),
            }
            report["exams"].append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "chain.json", report)
    write_text_atomic(RESULTS / "chain.md", markdown(report))


#: The stage of ours that holds each baseline's work (and more: the denoise stage also
#: runs SUSAN on the DWI, fit_maps fits b1000 and ADC on two grids, n4 also corrects DWI).
BASELINE_STAGE = {
    "denoise_t2_itk_filter": "denoise",
    "denoise_t2_numpy_filter": "denoise",
    "denoise_t2_default_time_step": "denoise",
    "adc_through_origin": "fit_maps",
    "n4_t2_defaults_full_resolution": "n4",
}


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``chain.md``."""
    lines = [
        "# Preprocessing chain per exam (image work only)",
        "",
        f"ITK/BLAS threads: {report['threads']}; CPU = process time of all threads; "
        f"target: whole chain <= {report['target_s']:g} s. elastix warm-up (once per worker "
        f"process, not in the chain): {report['elastix_warm_up']['wall_s']:.1f} s.",
        "",
    ]
    for row in report["exams"]:
        ours, base = row["ours"], row["baselines"]
        lines += [
            f"## {row['exam']} (T2 {row['t2_size']}, DWI {row['dwi_size']}, "
            f"b {', '.join(f'{b:g}' for b in row['b_values'])})",
            "",
            "| step | wall s | CPU s |",
            "|---|---|---|",
        ]
        for name, cost in ours["steps"].items():
            lines.append(f"| {name} | {cost['wall_s']:.2f} | {cost['cpu_s']:.2f} |")
        total = ours["total"]
        lines += [
            f"| **whole chain** | **{total['wall_s']:.2f}** | **{total['cpu_s']:.2f}** |",
            "",
            f"Within the {report['target_s']:g} s target: {total['wall_s'] <= report['target_s']}.",
            "",
            "| baseline | wall s | CPU s | note |",
            "|---|---|---|---|",
        ]
        for name, cost in base.items():
            note = ""
            if "finite" in cost:
                note = "output finite" if cost["finite"] else "output has NaN/inf (unstable)"
            if "same_voxels_as_numpy" in cost:
                speedup = cost["wall_s"] / max(base["denoise_t2_numpy_filter"]["wall_s"], 1e-9)
                note = (
                    f"ITK's filter at the pipeline's settings: {speedup:.2f}x the numpy "
                    f"filter's time; same voxels: {cost['same_voxels_as_numpy']}"
                )
            stage = BASELINE_STAGE[name]
            ratio = cost["wall_s"] / max(ours["steps"][stage]["wall_s"], 1e-9)
            lines.append(
                f"| {name} | {cost['wall_s']:.2f} | {cost['cpu_s']:.2f} | "
                f"{ratio:.2f}x the wall time of our whole {stage} stage; {note} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
