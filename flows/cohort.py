"""The cohort flow: discover the exams under a root, then fan out the per-exam chain.

discover -> ingest (one task run per exam) -> denoise -> N4 -> register -> b1000 -> ADC ->
per model: segment -> radiomics + QC figure. One exam's failure never stops the others:
its entry in the result says which step failed and why (also in the database).
"""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import State

from flows.ingest import ingest_exams
from flows.patient import process_exams
from flows.report import final_state, publish_run
from flows.runners import SettingsTaskRunner
from flows.runs import pipeline_run, pseudonym_secret
from flows.segment import resolve_models
from flows.settings import load_settings
from tasks.discover import discover_exams


@flow(name="cohort", task_runner=SettingsTaskRunner())
def cohort_flow(
    root: str,
    models: list[str] | None = None,
    config_file: str | None = None,
    output_root: str | None = None,
    force: bool = False,
    force_steps: list[str] | None = None,
) -> State:
    """Process every exam under ``root``; the result is ``{"patients": [...], "models": [...]}``.

    The final state is ``Completed`` unless every patient failed (``flows.report``); its
    message counts the failures by step. Artifacts: ``cohort-progress``, ``cohort-summary``.

    Parameters
    ----------
    root
        Cohort folder (DICOM in any nesting, PI-CAI style MHA/NIfTI).
    models
        Segmentation model specs (``demo``, ``taps``, nnU-Net model folders, ``auto``);
        default: ``settings.segmentation.model``.
    force, force_steps
        Recompute every step, or these steps (e.g. ``["register", "segment"]``), even when
        a finished run with the same inputs and parameters is on record.
    """
    settings = load_settings(config_file, data_root=root, output_root=output_root)
    specs = resolve_models(models or [settings.segmentation.model], demo=False)
    command = f"run {root} " + " ".join(f"--model {m}" for m in specs)
    with pipeline_run(settings, command=command, force=force, force_steps=force_steps) as (
        ctx,
        run,
    ):
        exams = discover_exams(settings.data_root)
        get_run_logger().info("found %d exams; models: %s", len(exams), ", ".join(specs))
        results = ingest_exams(exams, ctx, pseudonym_secret(settings), settings.steps.ingest)
        results = process_exams(results, ctx, settings, specs)
        run.finish(results)
        publish_run(ctx, results, title=f"Cohort run over {root}")
    return final_state({"patients": results, "models": specs})
