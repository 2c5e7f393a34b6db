"""The per-exam chain of tasks after ingest, read like a table of steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.futures import PrefectFuture

from db.queries import first_failures
from db.store import session_scope
from flows.ingest import PATIENTS_DIR, ingest_role
from flows.preprocess import (
    ExamImages,
    adc_task,
    denoise_task,
    n4_task,
    register_task,
    standardize_task,
)
from flows.segment import (
    model_label,
    qc_task,
    radiomics_task,
    segment_task,
    segmentation_params,
)
from flows.settings import Settings
from flows.steps import FileRef, RunContext, engine_for
from tasks.ingest import exam_dir


def ingested_refs(result: dict[str, Any], out_dir: Path) -> list[FileRef]:
    """The images ingest wrote for one exam, as file references with their roles."""
    return [
        FileRef(ingest_role(s), str(out_dir / s["image"]), s["image_sha256"])
        for s in result["series"]
    ]


def submit_exam(
    result: dict[str, Any],
    ctx: RunContext,
    settings: Settings,
    models: list[str],
    futures: dict[str, PrefectFuture],
) -> Iterator[None]:
    """Submit the chain of one ingested exam step by step, pausing (``yield``) after each.

    denoising -> N4 -> registration -> b1000 -> ADC, then per model: segmentation, then
    radiomics and the QC figure. Each step waits for the one it reads from. ``futures``
    receives, in submission order, ``"denoise"``, ``"n4"``, ``"register"``, ``"b1000"``,
    ``"adc"``, ``"segment:<model>"``, ``"radiomics:<model>"`` and ``"qc:<model>"``.
    Driven by :func:`submit_breadth_first`.
    """
    out_dir = ctx.output_root / PATIENTS_DIR
    refs = ingested_refs(result, out_dir)
    patient = result["patient"]
    folder = out_dir / exam_dir(patient, result["session"])
    dwi = tuple(r for r in refs if r.role.startswith("dwi_b"))
    images = ExamImages(
        t2w=next(r for r in refs if r.role == "t2w_raw"),
        dwi=dwi,
        # without acquired DWI (PI-CAI), the computed high b and the scanner ADC stand in
        hbv=None if dwi else next((r for r in refs if r.role.startswith("computed_dwi")), None),
        adc_scanner=None if dwi else next((r for r in refs if r.role == "adc_scanner"), None),
    )
    steps = settings.steps
    # In submission order: the first failed one is the step to blame.
    futures["denoise"] = denoise_task.submit(
        patient, folder, images, ctx, steps.t2_denoise, steps.susan
    )
    yield
    futures["n4"] = n4_task.submit(patient, folder, futures["denoise"], ctx, steps.n4)
    yield
    futures["register"] = register_task.submit(
        patient, folder, futures["n4"], ctx, steps.registration
    )
    yield
    futures["b1000"] = standardize_task.submit(
        patient, folder, futures["register"], ctx, steps.dwi_fit
    )
    yield
    adc = adc_task.submit(patient, folder, futures["b1000"], ctx, steps.dwi_fit)
    futures["adc"] = adc
    yield
    params = segmentation_params(settings.segmentation, ctx.threads)
    for model in models:  # ``adc`` resolves to the T2-grid images by role
        masks = segment_task.submit(patient, folder, adc, model, ctx, params)
        futures[f"segment:{model}"] = masks
        yield
        futures[f"radiomics:{model}"] = radiomics_task.submit(
            patient, folder, adc, masks, model, ctx, settings.measure.radiomics_file
        )
        futures[f"qc:{model}"] = qc_task.submit(patient, folder, adc, masks, model, ctx)
        yield


def submit_breadth_first(chains: list[Iterator[None]]) -> None:
    """Advance every exam's chain one submission at a time, round robin.

    A task that reads a future waits for it inside its runner thread. Submitting one exam's
    whole chain before the next exam's (depth first) therefore filled the pool's threads
    with steps waiting on the same exam: with 2 workers, one worked while the other waited,
    so exams ran one at a time. Breadth first, every exam's first step is queued before any
    exam's second step, so the threads find runnable work while upstream steps finish.
    """
    active = list(chains)
    while active:
        active = [chain for chain in active if next(chain, StopIteration) is not StopIteration]


def process_exams(
    results: list[dict[str, Any]], ctx: RunContext, settings: Settings, models: list[str]
) -> list[dict[str, Any]]:
    """Run the chain for every ingested exam; mark the ones that fail.

    A failed step fails only its own exam: the entry gets ``status="error"``, the ``step``
    that failed and its error; the exam's finished outputs are kept (and listed).
    """
    futures: dict[int, dict[str, PrefectFuture]] = {
        i: {} for i, r in enumerate(results) if r["status"] == "ok"
    }
    submit_breadth_first(
        [submit_exam(results[i], ctx, settings, models, futures[i]) for i in futures]
    )
    for future in (f for exam in futures.values() for f in exam.values()):
        future.wait()
    with session_scope(engine_for(ctx.database_url)) as session:
        recorded = first_failures(session, ctx.pipeline_run_id) if ctx.pipeline_run_id else {}
    out = [dict(r) for r in results]
    for i, exam_futures in futures.items():
        outputs: dict[str, str] = {}
        failure: tuple[str, str] | None = None
        for name, future in exam_futures.items():
            if future.state.is_completed():
                outputs.update(_outputs_of(name, future.result(), first=models[0]))
            elif future.state.is_failed() or future.state.is_crashed():
                failure = failure or _failure(name, future)
        if failure is None and not all(f.state.is_completed() for f in exam_futures.values()):
            failure = ("preprocess", "a step did not run: " + _not_run(exam_futures))
        out[i]["outputs"] = outputs
        if failure is not None:  # the step as recorded; else what the error says
            step, error = recorded.get(out[i]["patient"], failure)
            out[i].update(status="error", step=step, error=error)
    return out


def _outputs_of(name: str, value: Any, *, first: str) -> dict[str, str]:
    """Output paths by role: the ADC step's images, and ``mask:<model>``, ``qc:<model>``,
    ``radiomics:<model>`` per model, the first model's also as plain ``mask``, ``qc`` and
    ``radiomics``. Intermediate steps give none (their files are in the database)."""
    if name == "adc":
        return {role: ref.path for role, ref in value.items()}
    if ":" not in name:
        return {}
    kind, model = name.split(":", 1)
    role = "mask" if kind == "segment" else kind
    path = value["mask"].path if kind == "segment" else value.path
    out = {f"{role}:{model_label(model)}": path}
    return out | ({role: path} if model == first else {})


def _failure(name: str, future: PrefectFuture) -> tuple[str, str]:
    """The step and error of a failed task (its own exception's step, else its name)."""
    try:
        future.state.result()
    except Exception as error:
        problem = getattr(error, "problem", None) or f"{type(error).__name__}: {error}"
        return getattr(error, "step", None) or name.split(":", 1)[0], problem
    return name, future.state.message or "failed"


def _not_run(futures: dict[str, PrefectFuture]) -> str:
    """Which tasks of an exam ended without completing, with their state names."""
    pending = (f"{n} ({f.state.name})" for n, f in futures.items() if not f.state.is_completed())
    return ", ".join(pending)
