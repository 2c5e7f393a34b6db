"""The per-exam chain of tasks after ingest, read like a table of steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.futures import PrefectFuture

from flows.ingest import PATIENTS_DIR, ingest_role
from flows.preprocess import (
    ExamImages,
    adc_task,
    denoise_task,
    dwi_refs,
    n4_task,
    register_task,
    standardize_task,
)
from flows.settings import Settings
from flows.steps import FileRef, RunContext
from tasks.ingest import exam_dir


def ingested_refs(result: dict[str, Any], out_dir: Path) -> list[FileRef]:
    """The images ingest wrote for one exam, as file references with their roles."""
    return [
        FileRef(ingest_role(s), str(out_dir / s["image"]), s["image_sha256"])
        for s in result["series"]
    ]


def submit_preprocessing(
    result: dict[str, Any], ctx: RunContext, settings: Settings
) -> PrefectFuture:
    """Submit b1000 -> denoising -> N4 -> registration -> ADC for one ingested exam.

    Returns the future of the last step; each step waits for the one before.
    """
    out_dir = ctx.output_root / PATIENTS_DIR
    refs = ingested_refs(result, out_dir)
    patient = result["patient"]
    folder = out_dir / exam_dir(patient, result["session"])
    images = ExamImages(
        t2w=next(r for r in refs if r.role == "t2w_raw"),
        dwi=tuple(r for r in refs if r.role.startswith("dwi_b")),
    )
    steps = settings.steps
    standardized = standardize_task.submit(patient, folder, images, ctx, steps.dwi_fit)
    denoised = denoise_task.submit(
        patient, folder, standardized, ctx, steps.t2_denoise, steps.susan
    )
    corrected = n4_task.submit(patient, folder, denoised, ctx, steps.n4)
    registered = register_task.submit(patient, folder, corrected, ctx, steps.registration)
    acquired = tuple(sorted(dwi_refs(list(images.dwi))))
    return adc_task.submit(patient, folder, registered, acquired, ctx, steps.dwi_fit)


def preprocess_exams(
    results: list[dict[str, Any]], ctx: RunContext, settings: Settings
) -> list[dict[str, Any]]:
    """Run the preprocessing chain for every ingested exam; mark the ones that fail.

    A failed step fails only its own exam: the entry gets ``status="error"``, the ``step``
    that failed and its error; the exams' other results are kept.
    """
    futures = {
        i: submit_preprocessing(r, ctx, settings)
        for i, r in enumerate(results)
        if r["status"] == "ok"
    }
    out = [dict(r) for r in results]
    for i, future in futures.items():
        future.wait()
        if future.state.is_completed():
            out[i]["outputs"] = {role: ref.path for role, ref in future.result().items()}
            continue
        step, error = _first_failure(future)
        out[i].update(status="error", step=step, error=error)
    return out


def _first_failure(future: PrefectFuture) -> tuple[str, str]:
    """The step and error of the first failed task upstream of (or at) ``future``."""
    state = future.state
    try:
        state.result()
    except Exception as error:  # a failed or not-ready upstream step
        problem = getattr(error, "problem", None) or str(error)
        return getattr(error, "step", None) or "preprocess", problem
    return "preprocess", state.message or "did not complete"
