"""The two per-patient chains that ``bench_cohort.py`` compares, and how each step is measured.

Run by ``bench_cohort.py`` in a child process per variant (``python cohort_chains.py
VARIANT MANIFEST OUT``); not meant to be run by hand. One process runs one chain over every
exam of the manifest, patient after patient, as a pipeline worker (ours) or a researcher's
script (naive) does; one-off costs (imports, elastix start, loading a model once) are
measured apart as ``startup``. Ours passes over the exams ``repeats`` times (the manifest's;
the worker stays warm, so only the first pass may carry one-off costs) and each exam's
figures are the median over its passes (``cohort_measure.combine_passes``), every pass kept
under ``passes``; naive passes once (minutes per exam).

- **ours**: the pipeline's plain functions from ``tasks/`` with the pipeline's defaults
  (``flows.settings.StepSettings()``, ``SegmentationSettings()``, ``tasks/radiomics.yaml``),
  thread limits as a pipeline worker sets them (``ThreadSettings(workers=W,
  threads_per_worker=T).per_worker()``: the manifest's ``threads``, default 1), the
  segmentation model loaded once per process (``get_backend``). Model ``auto``: the demo
  nnU-Net on synthetic exams, TAPS on real ones.
- **naive**: the straightforward script with the same libraries at their defaults and no
  thread settings: SimpleITK N4 at its defaults (4 levels x 50 iterations at full
  resolution, no mask; the manifest's ``naive_n4_iterations`` may cap or skip it) on the
  ingested T2 (DWI not corrected), then SimpleITK curvature anisotropic diffusion of the
  corrected T2 at the time step ITK's own warning prescribes (``stable_time_step``; its
  default 0.0625 is unstable at 0.5 mm). N4 comes first because, run unmasked on the
  diffused T2, it corrects nothing: diffusion leaves tiny positive background values, the
  log intensities span about -100..7, and N4 stops after one iteration per level with a
  field of 1.0000 in the body (ProstateX-0000, ``benchmarks/results/naive_n4_order.md``) -
  a no-op that would flatter the naive time. Run on the ingested T2 it fits a real field
  (tens of iterations per level);
  a new elastix ``ParameterObject`` with elastix's default ``rigid`` / ``affine`` map per
  call (affine: T2 fixed), an unweighted log-linear ADC fit over every acquired b, the
  nnU-Net predictor created per patient with test-time mirroring (nnU-Net's default; TAPS
  per patient on real exams), ``RadiomicsFeatureExtractor()`` with no settings. Ingest,
  b1000 standardisation and DWI SUSAN have no library default and are the pipeline's.

Per step: wall time (s), process CPU time (s, all threads plus any child processes) and
the peak resident set size during the step (MB); accuracy is computed after the timings
and is not in them (both in ``cohort_measure.py``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cohort_measure import Meter, accuracy, combine_passes, maxrss_mb, total

# ------------------------------------------------------------------------------ inputs


def ingest(exam: dict[str, Any], out: Path) -> dict[str, Any]:
    """Discover and ingest one exam (the pipeline's ingest); T2, DWI by b, scanner ADC."""
    import SimpleITK as sitk

    from flows.settings import IngestSettings
    from tasks.discover import discover_exams
    from tasks.ingest import ingest_exam

    (found,) = [
        e for e in discover_exams(exam["root"]) if e.folder.startswith(exam["folder"] + "/")
    ]
    result = ingest_exam(
        found, out_dir=out, key="bench-cohort", min_b_values=IngestSettings().min_b_values
    )
    if result.status != "ok":
        raise RuntimeError(f"ingest of {exam['name']} failed: {result.error}")
    images: dict[str, Any] = {"dwi": {}}
    for series in result.series:
        image = sitk.ReadImage(str(out / series.image), sitk.sitkFloat32)
        if series.kind == "t2w":
            images["t2"] = image
        elif series.kind == "dwi":
            images["dwi"][float(series.b_value)] = image
        elif series.kind == "adc":
            images["scanner_adc"] = image
    return images


def _model_spec(exam: dict[str, Any]) -> str:
    """The pipeline's model ``auto``: demo on the synthetic cohort, TAPS on real exams."""
    from flows.segment import resolve_models

    return resolve_models(["auto"], demo=exam["kind"] == "synthetic")[0]


# -------------------------------------------------------------------------------- ours


def ours_threads(workers: int, threads: int | None) -> int:
    """Threads of one ours worker: ``threads`` (None: the pipeline's default, cores //
    workers), checked by ``ThreadSettings`` against the machine's cores."""
    from flows.settings import ThreadSettings

    return ThreadSettings(workers=workers, threads_per_worker=threads).per_worker()


def ours_startup(exams: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    """Thread limits, elastix start and each needed model loaded once (a worker's start)."""
    from flows.resources import apply_thread_limits
    from flows.segment import segmentation_params
    from flows.settings import SegmentationSettings, StepSettings
    from tasks.register import warm_up
    from tasks.segment import get_backend

    apply_thread_limits(threads)
    warm_up(StepSettings().registration)
    params = segmentation_params(SegmentationSettings(), threads)
    for spec in sorted({_model_spec(e) for e in exams}):
        get_backend(spec, params)
    return {"threads_per_worker": threads, "segmentation": params.model_dump(mode="json")}


def ours_exam(exam: dict[str, Any], meter: Meter, work: Path, threads: int) -> dict[str, Any]:
    """Our chain on one exam; per-step costs and the outputs accuracy is computed from."""
    import SimpleITK as sitk

    from flows.segment import RADIOMICS_IMAGES, segmentation_params
    from flows.settings import SegmentationSettings, StepSettings
    from tasks.chain import ChainParams, preprocess_exam
    from tasks.measure import extract_radiomics, load_radiomics_settings, mask_volume_ml
    from tasks.qc import qc_figure
    from tasks.register import transform_to_matrix
    from tasks.segment import SegmentationInputs, get_backend

    steps = StepSettings()  # the pipeline's defaults
    costs: dict[str, dict[str, float]] = {}

    def step(name: str, function: Callable[[], Any]) -> Any:
        result, costs[name] = meter.measure(function)
        return result

    images = step("ingest", lambda: ingest(exam, work / "ingest"))
    params = ChainParams(
        t2_denoise=steps.t2_denoise,
        susan=steps.susan,
        n4=steps.n4,
        registration=steps.registration,
        dwi_fit=steps.dwi_fit,
    )
    done = preprocess_exam(images["t2"], images["dwi"], params=params, threads=threads, step=step)
    t2, dwi_all, bias = done.t2_denoised, done.dwi_denoised, done.bias
    t2_n4, t2_field, dwi_n4, dwi_field = bias.t2, bias.t2_field, bias.dwi, bias.dwi_field
    transforms, t2_to_dwi = done.registered.motion, done.registered.alignment.transform
    b1000_t2, adc_native, adc_t2 = done.maps.b1000_t2, done.maps.adc_native, done.maps.adc_t2
    spec = _model_spec(exam)
    backend = get_backend(spec, segmentation_params(SegmentationSettings(), threads))
    inputs = SegmentationInputs(t2w=t2_n4, dwi_b1000=b1000_t2, adc=adc_t2)
    result = step("segment", lambda: backend.segment(inputs))
    labels = result.labels
    _, volume_ml = step("volume", lambda: mask_volume_ml(labels))
    settings = load_radiomics_settings(None)
    by_role = {"t2w": t2_n4, "adc": adc_t2, "dwi_b1000": b1000_t2}

    def radiomics() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role, name in RADIOMICS_IMAGES.items():
            image = sitk.Cast(by_role[role], sitk.sitkFloat32)
            for value in result.label_names:
                features = extract_radiomics(
                    image, labels, image_type=name, label=value, settings=settings
                )
                out[name] = [f.value for f in features]
        return out

    features = step("radiomics", radiomics)
    step("qc", lambda: qc_figure(t2_n4, labels, work / f"{exam['name']}_qc.png"))
    return {
        "model": spec,
        "segment_gpu": bool(getattr(backend, "uses_gpu", False)),
        "t2_in": t2,
        "t2_n4": t2_n4,
        "t2_field": t2_field,
        "dwi_in_low": dwi_all[min(dwi_all)],
        "dwi_n4_low": dwi_n4[min(dwi_n4)],
        "dwi_field": dwi_field,
        "rigid": {b: transform_to_matrix(t) for b, t in transforms.items()},
        "t2_to_dwi": transform_to_matrix(t2_to_dwi),
        "adc_native": adc_native,
        "adc_t2": adc_t2,
        "labels": labels,
        "volume_ml": volume_ml,
        "features": features,
        "radiomics_bin_width_adc": settings["adc"]["setting"]["binWidth"],
        "images": images,
        "steps": costs,
    }


# ------------------------------------------------------------------------------- naive


def naive_startup() -> dict[str, Any]:
    """What the script imports once at its top (the elastix start included)."""
    import itk

    itk.ParameterObject.New()  # the first one loads elastix's libraries (seconds)
    import torch  # noqa: F401
    from radiomics import featureextractor  # noqa: F401

    return {"threads": "library defaults (no thread settings)"}


def _to_itk(image: Any) -> Any:
    import itk
    import SimpleITK as sitk

    out = itk.GetImageFromArray(sitk.GetArrayFromImage(image).astype(np.float32))
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(itk.GetMatrixFromArray(np.array(image.GetDirection()).reshape(3, 3)))
    return out


def naive_elastix(fixed: Any, moving: Any, kind: str) -> tuple[Any, np.ndarray]:
    """A new ParameterObject with elastix's default ``kind`` map; returns the moving image
    on the fixed grid (elastix's own result image) and the fixed -> moving 4x4 (mm)."""
    import itk
    import SimpleITK as sitk

    parameter_object = itk.ParameterObject.New()
    parameter_object.AddParameterMap(parameter_object.GetDefaultParameterMap(kind))
    method = itk.ElastixRegistrationMethod.New(_to_itk(fixed), _to_itk(moving))
    method.SetParameterObject(parameter_object)
    method.SetLogToConsole(False)
    method.UpdateLargestPossibleRegion()
    combined = method.GetCombinationTransform()
    origin = np.array(combined.TransformPoint([0.0, 0.0, 0.0]))
    matrix = np.eye(4)
    for axis, unit in enumerate(np.eye(3)):
        matrix[:3, axis] = np.array(combined.TransformPoint([float(u) for u in unit])) - origin
    matrix[:3, 3] = origin
    result = sitk.GetImageFromArray(itk.GetArrayFromImage(method.GetOutput()))
    result.CopyInformation(fixed)
    return result, matrix


def _resample(image: Any, reference: Any, matrix: np.ndarray) -> Any:
    """``image`` on ``reference``'s grid through the reference -> image 4x4 (linear)."""
    import SimpleITK as sitk

    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def naive_adc(images: dict[float, Any]) -> Any:
    """Unweighted log-linear least squares over every given b (s/mm²); ADC in mm²/s >= 0."""
    import SimpleITK as sitk

    b = np.array(sorted(images), dtype=np.float64)
    logs = np.stack(
        [np.log(np.maximum(sitk.GetArrayFromImage(images[v]).astype(np.float64), 1.0)) for v in b]
    )
    x = b - b.mean()
    slope = np.tensordot(x, logs - logs.mean(axis=0), axes=1) / (x * x).sum()
    out = sitk.GetImageFromArray(np.maximum(-slope, 0.0).astype(np.float32))
    out.CopyInformation(images[b[0]])
    return out


def naive_exam(
    exam: dict[str, Any], meter: Meter, work: Path, n4_iterations: list[int] | str | None
) -> dict[str, Any]:
    """The straightforward script on one exam; same return layout as :func:`ours_exam`.

    ``n4_iterations``: ``None`` = N4's default iterations, a list = that cap per level,
    ``"skip"`` = no N4 (``--quick``).
    """
    from radiomics import featureextractor

    from tasks.denoise import SusanParams, denoise_dwi
    from tasks.dwi import DwiFitParams, standardize_b1000
    from tasks.measure import mask_volume_ml
    from tasks.segment import DEMO_MODELS, SegmentationInputs, SegmentationParams

    costs: dict[str, dict[str, float]] = {}

    def step(name: str, function: Callable[[], Any]) -> Any:
        result, costs[name] = meter.measure(function)
        return result

    images = step("ingest", lambda: ingest(exam, work / "ingest"))
    dwi = images["dwi"]
    acquired = sorted(dwi)
    b1000, _ = step("b1000", lambda: standardize_b1000(dwi, params=DwiFitParams()))

    t2_in = images["t2"]
    n4_run: dict[str, Any] = {}

    def n4() -> tuple[Any, Any]:
        if n4_iterations == "skip":  # --quick: the T2 goes on uncorrected
            return t2_in, None
        n4_run.update(default_n4(t2_in, n4_iterations))
        return n4_run["corrected"], n4_run["field"]

    t2_corrected, t2_field = step("n4", n4)

    def denoise() -> tuple[Any, Any]:
        return default_diffusion(t2_corrected, stable=True), denoise_dwi(
            dwi | {1000.0: b1000}, params=SusanParams()
        )

    t2_n4, dwi_all = step("denoise", denoise)
    low = min(dwi_all)

    def register() -> tuple[Any, ...]:
        moco, rigid = {low: dwi_all[low]}, {low: np.eye(4)}
        for b in sorted(dwi_all):
            if b != low:
                moco[b], rigid[b] = naive_elastix(dwi_all[low], dwi_all[b], "rigid")
        _, t2_to_dwi = naive_elastix(t2_n4, moco[low], "affine")
        return moco, rigid, t2_to_dwi, _resample(moco[1000.0], t2_n4, t2_to_dwi)

    moco, rigid, t2_to_dwi, b1000_t2 = step("register", register)

    def adc() -> tuple[Any, Any]:
        native = naive_adc({b: moco[b] for b in acquired})
        return native, _resample(native, t2_n4, t2_to_dwi)

    adc_native, adc_t2 = step("adc", adc)
    cores = os.cpu_count() or 1

    backends: list[Any] = []

    def segment() -> Any:
        if exam["kind"] == "synthetic":
            from tasks.segment_nnunet import NnUNetBackend

            params = SegmentationParams(device="auto", use_mirroring=True, threads=cores)
            backend: Any = NnUNetBackend(DEMO_MODELS["demo"], params=params)
        else:
            from tasks.segment_taps import TapsBackend

            backend = TapsBackend(params=SegmentationParams(device="auto", threads=cores))
        backends.append(backend)
        inputs = SegmentationInputs(t2w=t2_n4, dwi_b1000=b1000_t2, adc=adc_t2)
        return backend.segment(inputs)

    result = step("segment", segment)
    labels = result.labels
    _, volume_ml = step("volume", lambda: mask_volume_ml(labels))
    errors: dict[str, str] = {}

    def radiomics() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extractor = featureextractor.RadiomicsFeatureExtractor()
        for name, image in (("t2w", t2_n4), ("adc", adc_t2), ("b1000", b1000_t2)):
            try:
                values = extractor.execute(image, labels)
            except Exception as exc:  # noqa: BLE001 - reported as the naive script's outcome
                errors[name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            out[name] = [
                float(np.asarray(v, dtype=np.float64))
                for k, v in values.items()
                if not k.startswith("diagnostics_")
            ]
        return out

    features = step("radiomics", radiomics)
    return {
        "model": "demo, mirroring, per patient" if exam["kind"] == "synthetic" else "taps",
        "segment_gpu": bool(getattr(backends[0], "uses_gpu", False)),
        "t2_in": t2_in,
        "t2_n4": t2_corrected,
        "t2_field": t2_field,
        "n4_iterations_run": n4_run.get("iterations_run", []),
        "n4_field_p1_p99": field_spread(t2_field, t2_in),
        "rigid": rigid,
        "t2_to_dwi": t2_to_dwi,
        "adc_native": adc_native,
        "adc_t2": adc_t2,
        "labels": labels,
        "volume_ml": volume_ml,
        "features": features,
        "radiomics_errors": errors,
        "radiomics_bin_width_adc": 25.0,  # pyradiomics' default binWidth
        "images": images,
        "steps": costs,
    }


def default_n4(image: Any, iterations: list[int] | None = None) -> dict[str, Any]:
    """SimpleITK's N4 at its defaults (4 levels x 50 iterations at full resolution, no
    mask; ``iterations`` caps it per level): ``corrected``, ``field`` (multiplicative),
    ``iterations_run`` per level and the ``last_convergence`` measure."""
    import SimpleITK as sitk

    n4_filter = sitk.N4BiasFieldCorrectionImageFilter()
    if iterations is not None:
        n4_filter.SetMaximumNumberOfIterations(iterations)
    levels: dict[int, int] = {}

    def count() -> None:
        level = n4_filter.GetCurrentLevel()
        levels[level] = levels.get(level, 0) + 1

    n4_filter.AddCommand(sitk.sitkIterationEvent, count)
    corrected = n4_filter.Execute(image)
    return {
        "corrected": corrected,
        "field": sitk.Exp(n4_filter.GetLogBiasFieldAsImage(image)),
        "iterations_run": [levels[k] for k in sorted(levels)],
        "last_convergence": float(n4_filter.GetCurrentConvergenceMeasurement()),
    }


def default_diffusion(image: Any, *, stable: bool) -> Any:
    """SimpleITK curvature anisotropic diffusion at the pipeline's iterations and
    conductance; time step :func:`tasks.denoise.stable_time_step` (``stable``) or
    SimpleITK's default 0.0625 (unstable below 1 mm voxels in 3D)."""
    import SimpleITK as sitk

    from tasks.denoise import T2DenoiseParams, stable_time_step

    diffusion = sitk.CurvatureAnisotropicDiffusionImageFilter()
    if stable:
        diffusion.SetTimeStep(stable_time_step(image.GetSpacing()))
    diffusion.SetNumberOfIterations(T2DenoiseParams().iterations)
    diffusion.SetConductanceParameter(T2DenoiseParams().conductance)
    return diffusion.Execute(image)


def field_spread(field: Any, image: Any) -> list[float] | None:
    """1st and 99th percentile of a multiplicative bias field over the voxels brighter than
    the image's mean (a crude body mask): how much the correction changed, ~[1, 1] = none."""
    import SimpleITK as sitk

    if field is None:
        return None
    values = sitk.GetArrayViewFromImage(field)
    intensities = sitk.GetArrayViewFromImage(image)
    body = values[intensities > intensities.mean()]
    return [round(float(v), 4) for v in np.percentile(body, [1, 99])]


# -------------------------------------------------------------------------------- main


def _sizes(images: dict[str, Any]) -> dict[str, Any]:
    low = images["dwi"][min(images["dwi"])]
    return {
        "t2_size": list(images["t2"].GetSize()),
        "dwi_size": list(low.GetSize()),
        "b_values": sorted(images["dwi"]),
    }


def _pass(steps: dict[str, dict[str, float]], load: float) -> dict[str, Any]:
    """One pass over one exam: its steps, its total, its total less ``segment``."""
    cost = {"steps": steps, "total": total(steps)}
    cost["total"]["peak_above_start_mb"] = round(
        cost["total"]["peak_rss_mb"] - steps["ingest"]["start_rss_mb"], 1
    )
    cost["excluding_segment"] = total(steps, skip=("segment",))
    cost["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return cost


def main(variant: str, manifest_path: str, out_path: str) -> None:
    """Run ``variant`` (``ours`` or ``naive``) over the manifest's exams; write JSON."""
    manifest = json.loads(Path(manifest_path).read_text())
    meter = Meter()
    work = Path(manifest["work"]) / f"{variant}-{os.getpid()}"
    exams = manifest["exams"]
    if variant == "ours":
        threads = ours_threads(manifest["workers"], manifest["threads"])
        repeats = manifest["repeats"]
        startup_info, startup = meter.measure(lambda: ours_startup(exams, threads))
    else:
        repeats = 1
        startup_info, startup = meter.measure(naive_startup)
    rows: dict[str, dict[str, Any]] = {}
    passes: dict[str, list[dict[str, Any]]] = {exam["name"]: [] for exam in exams}
    for index in range(repeats):
        for exam in exams:
            load = os.getloadavg()[0]
            folder = work / f"{exam['name']}-pass{index + 1}"
            if variant == "ours":
                out = ours_exam(exam, meter, folder, threads)
            else:
                out = naive_exam(exam, meter, folder, manifest["naive_n4_iterations"])
            cost = _pass(out["steps"], load)
            passes[exam["name"]].append(cost)
            if index == 0:  # accuracy once: the outputs do not change between passes
                rows[exam["name"]] = {
                    "exam": exam["name"],
                    "kind": exam["kind"],
                    "model": out["model"],
                    "segment_gpu": out["segment_gpu"],
                    **_sizes(out["images"]),
                    "accuracy": accuracy(exam, out),
                }
                for key in ("n4_iterations_run", "n4_field_p1_p99"):
                    if key in out:
                        rows[exam["name"]][key] = out[key]
            del out  # free this exam's images before the next one's steps are measured
            print(
                f"[{variant}] pass {index + 1}/{repeats} {exam['name']}: {cost['total']}",
                file=sys.stderr,
                flush=True,
            )
    for name, row in rows.items():
        row |= combine_passes(passes[name])
        row["load_average_1min"] = passes[name][0]["load_average_1min"]
        row["passes"] = passes[name]
    report = {
        "variant": variant,
        "pid": os.getpid(),
        "memory_method": meter.method,
        "repeats": repeats,
        "startup": startup,
        "startup_info": startup_info,
        "process_peak_rss_mb": round(maxrss_mb(), 1),
        "exams": list(rows.values()),
    }
    Path(out_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
