"""One patient, one Prefect flow run: ingest -> denoise -> N4 -> register -> b1000 -> ADC ->
per model: segment -> radiomics, then per model QC (metrics and figure, comparing the
models), read like a table of steps.

The cohort flow runs :func:`patient_flow` for each exam through :func:`run_patients`: a task
per patient on the flow's task runner (``threads.workers`` at once, or a Dask cluster), each
calling the patient's flow, which runs its steps in order. So a bounded number of patients is
in flight and each finishes its chain before the next one starts: results, QC figures and
the report grow during the run, and a killed run leaves its finished patients finished.

In the Prefect UI every patient is a flow run named by its pseudonym, nested under the
cohort run, with its own state, graph and logs; a patient that fails is a ``Failed`` flow
run whose message names the step and the reason. The exam (folder names, DICOM
identifiers) and the database URL travel as a :class:`Hidden` parameter, which Prefect
records as ``**********``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.states import Failed, State
from pydantic import SecretStr

from db.queries import steps_run
from db.store import session_scope
from flows.ingest import PATIENTS_DIR, error_entry, ingest_exam_task, ingest_role
from flows.placement import run_placed
from flows.preprocess import (
    ExamImages,
    adc_task,
    denoise_task,
    n4_task,
    register_task,
    standardize_task,
)
from flows.qc import qc_task
from flows.runs import pseudonym_secret
from flows.segment import (
    model_label,
    radiomics_task,
    segment_task,
    segmentation_params,
)
from flows.settings import Settings
from flows.steps import FileRef, RunContext, engine_for
from tasks.discover import Exam
from tasks.errors import StepError
from tasks.ingest import exam_dir
from tasks.registry import (
    ADC,
    B1000,
    DENOISE,
    INGEST,
    N4,
    QC,
    RADIOMICS,
    REGISTER,
    SEGMENT,
)


class Hidden(SecretStr):
    """A flow parameter Prefect records as ``**********``: the object itself reaches the
    flow function (in this process), its contents never reach the Prefect API."""

    def __init__(self, value: Any) -> None:
        super().__init__("hidden")
        self.value = value


@dataclass(frozen=True)
class PatientJob:
    """What one patient's flow run needs: the exam, the run and the settings."""

    exam: Exam
    ctx: RunContext
    settings: Settings
    models: tuple[str, ...]


def ingested_refs(result: dict[str, Any], out_dir: Path) -> list[FileRef]:
    """The images ingest wrote for one exam, as file references with their roles."""
    return [
        FileRef(ingest_role(s), str(out_dir / s["image"]), s["image_sha256"])
        for s in result["series"]
    ]


def exam_images(result: dict[str, Any], out_dir: Path) -> ExamImages:
    """The ingested images of one exam as the chain's first input."""
    refs = ingested_refs(result, out_dir)
    dwi = tuple(r for r in refs if r.role.startswith("dwi_b"))
    return ExamImages(
        t2w=next(r for r in refs if r.role == "t2w_raw"),
        dwi=dwi,
        # without acquired DWI (PI-CAI), the computed high b and the scanner ADC stand in
        hbv=None if dwi else next((r for r in refs if r.role.startswith("computed_dwi")), None),
        adc_scanner=None if dwi else next((r for r in refs if r.role == "adc_scanner"), None),
    )


@flow(name="patient", flow_run_name="{patient}", validate_parameters=False)
def patient_flow(patient: str, job: Hidden) -> dict[str, Any] | State:
    """One exam through every step; the result is its entry in the cohort's result.

    A failing step ends the patient's run as ``Failed`` with ``"<step>: <reason>"`` (its
    data: the entry with ``status="error"``, the step and the error, and the outputs of the
    steps that finished); the steps already done stay done and cached.
    """
    work: PatientJob = job.value
    ctx, settings = work.ctx, work.settings
    key = pseudonym_secret(settings)
    outputs: dict[str, str] = {}
    step = INGEST.name
    try:
        ingested = ingest_exam_task(work.exam, patient, ctx, key, settings.steps.ingest)
    except Exception as error:
        entry = error_entry(work.exam, patient, error) | {"step": step, "outputs": {}}
        return Failed(message=f"{step}: {entry['error']}", data=entry)
    entry = dict(ingested) | {"outputs": outputs}
    out_dir = ctx.output_root / PATIENTS_DIR
    folder = out_dir / exam_dir(patient, ingested["session"])
    steps = settings.steps
    try:
        step = DENOISE.name
        images = denoise_task(
            patient, folder, exam_images(ingested, out_dir), ctx, steps.t2_denoise, steps.susan
        )
        step = N4.name
        images = n4_task(patient, folder, images, ctx, steps.n4)
        step = REGISTER.name
        registered = register_task(patient, folder, images, ctx, steps.registration)
        step = B1000.name
        registered = standardize_task(patient, folder, registered, ctx, steps.dwi_fit)
        step = ADC.name
        maps = adc_task(patient, folder, registered, ctx, steps.dwi_fit)
        outputs.update({role: ref.path for role, ref in maps.items()})
        params = segmentation_params(settings.segmentation, ctx.threads)
        masks: dict[str, dict[str, FileRef]] = {}
        for i, model in enumerate(work.models):
            label = model_label(model)
            step = SEGMENT.recorded(label)
            masks[label] = run_placed(
                segment_task,
                settings.segmentation.dask_resources,
                *(patient, folder, maps, model, ctx, params),
            )
            _add_output(outputs, "mask", label, masks[label]["mask"].path, first=i == 0)
            step = RADIOMICS.recorded(label)
            table = radiomics_task(
                patient, folder, maps, masks[label], model, ctx, settings.measure.radiomics_file
            )
            _add_output(outputs, "radiomics", label, table.path, first=i == 0)
        scanner_adc = next(
            (r for r in ingested_refs(ingested, out_dir) if r.role == "adc_scanner"), None
        )
        for i, model in enumerate(work.models):  # after every model: QC compares them
            label = model_label(model)
            step = QC.recorded(label)
            figure = qc_task(
                patient, folder, maps, registered, masks, model, ctx, steps.dwi_fit, scanner_adc
            )
            _add_output(outputs, "qc", label, figure.path, first=i == 0)
    except Exception as error:
        problem = str(error) if isinstance(error, StepError) else f"{type(error).__name__}: {error}"
        entry |= {"status": "error", "step": step, "error": problem}
        return Failed(message=f"{step}: {problem}", data=entry)
    return entry


def _add_output(outputs: dict[str, str], role: str, label: str, path: str, *, first: bool) -> None:
    """``<role>:<model>``, and plain ``<role>`` for the first model."""
    outputs[f"{role}:{label}"] = path
    if first:
        outputs[role] = path


@task(name="patient", task_run_name="patient-{patient}", cache_policy=NONE)
def patient_task(patient: str, job: PatientJob) -> dict[str, Any]:
    """Run one patient's flow (a task, so that the task runner bounds how many run at once
    and Dask can place them); return its entry, failed or not."""
    started = time.monotonic()
    state = patient_flow(patient, Hidden(job), return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        return result | {"seconds": round(time.monotonic() - started, 1)}
    return {  # the flow itself crashed: no entry was made
        "patient": patient,
        "source": job.exam.folder,  # for the terminal only
        "status": "error",
        "step": "patient",
        "error": state.message or f"{type(result).__name__}: {result}",
        "outputs": {},
    }


#: Characters of the progress bar in the progress line.
BAR_WIDTH = 20


@dataclass
class Progress:
    """Counts of a cohort run as patients finish, with the time per patient and the ETA."""

    total: int
    started: float
    done: int = 0
    failed: int = 0

    def add(self, entry: dict[str, Any]) -> None:
        self.done += 1
        self.failed += entry.get("status") == "error"

    def line(self) -> str:
        """``[######--------------] 12/40 patients (1 failed), 31 s per patient, about 14 min
        left`` (seconds of wall time per finished patient, all workers together)."""
        elapsed = time.monotonic() - self.started
        per_patient = elapsed / self.done if self.done else float("nan")
        left = per_patient * (self.total - self.done)
        eta = f"about {_duration(left)} left" if self.done < self.total else "done"
        filled = round(BAR_WIDTH * self.done / self.total) if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return (
            f"[{bar}] {self.done}/{self.total} patients ({self.failed} failed), "
            f"{per_patient:.0f} s per patient, {eta}"
        )


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_patients(
    exams: list[tuple[Exam, str]],
    ctx: RunContext,
    settings: Settings,
    models: list[str],
    *,
    on_progress: Callable[[Progress, list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run :func:`patient_flow` for every ``(exam, patient)``; entries in ``exams`` order.

    ``on_progress(progress, entries so far)`` is called each time a patient finishes (the
    cohort flow updates its progress artifact there); the log gets the progress line.
    """
    futures = {
        patient_task.submit(patient, PatientJob(exam, ctx, settings, tuple(models))): i
        for i, (exam, patient) in enumerate(exams)
    }
    entries: list[dict[str, Any] | None] = [None] * len(exams)
    progress = Progress(total=len(exams), started=time.monotonic())
    logger = get_run_logger()
    for future in as_completed(list(futures)):
        entry = future.result()
        entries[futures[future]] = entry
        progress.add(entry)
        logger.info("progress: %s", progress.line())
        if on_progress is not None:
            on_progress(progress, [e for e in entries if e is not None])
    done = [e for e in entries if e is not None]
    _mark_cached(done, ctx)
    return done


def _mark_cached(entries: list[dict[str, Any]], ctx: RunContext) -> None:
    """Each entry's ``ran``: the steps this run computed (not found in the cache), and
    ``cached``: True when it computed none of them."""
    if ctx.pipeline_run_id is None:
        return
    with session_scope(engine_for(ctx.database_url)) as session:
        ran = steps_run(session, ctx.pipeline_run_id)
    for entry in entries:
        entry["ran"] = ran.get(entry["patient"], [])
        entry["cached"] = entry.get("status") != "error" and not entry["ran"]
