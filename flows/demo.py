"""The demo: make the synthetic cohort, then run the whole pipeline on it.

Layout under the output root::

    demo-cohort/dicom/SYN-0001/...      synthetic DICOM exams (the pipeline's input)
    demo-cohort/truth/SYN-0001/...      their ground truth (masks, true ADC, transforms)
    patients/<pseudonymous id>/...      pipeline outputs
    evaluation/                         the masks against the known truth (Dice, HD95, ...)
    provenance.sqlite                   the provenance database (default URL)

The output root defaults to ``demo-output`` (:data:`flows.settings.DEMO_OUTPUT_ROOT`), never
the cohort's ``output_root``, and the database is always the SQLite file in it, never the
cohort's ``database_url``: the demo's results are never mixed with a real cohort's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger
from prefect.states import State

from flows.checks import check_database, check_demo_tree, check_models
from flows.evaluate import evaluate_flow
from flows.ingest import patient_id_of
from flows.patient import run_patients
from flows.report import LiveProgress, final_state, publish_run
from flows.runners import SettingsTaskRunner
from flows.runs import pipeline_run, pseudonym_secret
from flows.segment import resolve_models
from flows.settings import demo_overrides, load_settings
from flows.steps import FileRef, RunContext, execute_step, step_task
from phantom.exam import generate_exam
from phantom.plan import plan_exam
from tasks.discover import discover_exams
from tasks.pseudonym import pseudonymous_id
from tasks.registry import SYNTHESIZE

DEMO_DIR = "demo-cohort"
#: The truth files the demo's masks are compared with, on the T2 grid: ``t2_gland_mask``
#: (the whole gland) and ``t2_zones`` (1 = PZ, 2 = TZ; compared with zonal models only).
TRUTH_MASKS = "t2_[gz]*"


@step_task(SYNTHESIZE)
def synthesize_exam_task(root: Path, seed: int, index: int, patient: str, ctx: RunContext) -> str:
    """Write synthetic exam ``index`` (DICOM + truth) unless an intact copy exists."""
    plan = plan_exam(seed, index)

    def run() -> tuple[list[FileRef], dict[str, Any]]:
        exam = generate_exam(root, plan)
        return [FileRef.of("truth_json", exam.truth_json)], {}

    outcome = execute_step(
        ctx,
        patient=patient,
        step=SYNTHESIZE.name,
        version=SYNTHESIZE.version,
        inputs=[],
        parameters={"seed": seed, "index": index},
        run=run,
    )
    return outcome.status


@flow(name="demo", task_runner=SettingsTaskRunner())
def demo_flow(
    patients: int | None = None,
    seed: int | None = None,
    config_file: str | None = None,
    output_root: str | None = None,
    force: bool = False,
    force_steps: list[str] | None = None,
) -> State:
    """Generate ``patients`` synthetic exams, process them, and compare each mask with the
    exam's true gland (:func:`flows.evaluate.evaluate_flow`, reference ``t2_gland_mask``).

    Result: ``{"cohort", "patients", "models", "output_root", "evaluation"}`` (the
    evaluation's ``summary`` and ``folder``). Final state and artifacts as
    :func:`flows.cohort.cohort_flow`.
    """
    settings = load_settings(config_file, **demo_overrides(output_root))
    n = patients if patients is not None else settings.demo.patients
    seed = seed if seed is not None else settings.demo.seed
    root = settings.output_root / DEMO_DIR
    logger = get_run_logger()
    command = f"demo --patients {n} --seed {seed}"
    models = resolve_models([settings.segmentation.model], demo=True)
    check_database(settings)
    check_demo_tree(settings)  # also when started as a deployment, not only from the CLI
    check_models(models, settings, demo=True)
    with pipeline_run(settings, command=command, force=force, force_steps=force_steps) as (
        ctx,
        run,
    ):
        key = pseudonym_secret(settings)
        ids = [
            pseudonymous_id(plan_exam(seed, i).patient_folder, key.get_secret_value())
            for i in range(n)
        ]
        futures = [synthesize_exam_task.submit(root, seed, i, ids[i], ctx) for i in range(n)]
        states = [f.result() for f in futures]
        logger.info(
            "synthetic cohort: %d generated, %d cached",
            states.count("completed"),
            states.count("cached"),
        )
        exams = [
            (exam, patient_id_of(exam, key.get_secret_value()))
            for exam in discover_exams(root / "dicom")
        ]
        results = run_patients(
            exams, ctx, settings, models, on_progress=LiveProgress(ctx, [p for _, p in exams])
        )
        run.finish(results)
        publish_run(ctx, results, title=f"Demo run ({n} synthetic exams)", thresholds=settings.qc)
    evaluation = _against_truth(root, results, config_file, settings.output_root)
    return final_state(
        {
            "cohort": str(root),
            "patients": results,
            "models": models,
            "output_root": str(settings.output_root),
            "evaluation": evaluation,
        }
    )


def _against_truth(
    root: Path, results: list[dict[str, Any]], config_file: str | None, output_root: Path
) -> dict[str, Any] | None:
    """The evaluate flow over the exams' true gland and zone masks (None when no patient has a
    mask)."""
    if not any(p["status"] == "ok" for p in results):
        return None
    found = evaluate_flow(
        references=[str(root / "truth")],
        pattern=TRUTH_MASKS,
        config_file=config_file,
        output_root=str(output_root),
    )
    return {k: found[k] for k in ("summary", "folder", "cases")}
