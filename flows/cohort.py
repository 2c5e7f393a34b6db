"""The cohort flow: discover the exams under a root, then one patient flow run per exam.

discover -> per patient (:mod:`flows.patient`, ``threads.workers`` at once): ingest ->
denoise -> N4 -> register -> b1000 -> ADC -> per model: segment -> radiomics + QC figure.
One exam's failure never stops the others: its entry in the result says which step failed
and why (also in the database and as its Failed flow run).
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.states import State

from flows.checks import check_database, check_models
from flows.ingest import discover_cohort, patient_id_of, skipped_entries
from flows.patient import run_patients
from flows.report import LiveProgress, final_state, publish_run
from flows.runners import SettingsTaskRunner
from flows.runs import pipeline_run, pseudonym_secret
from flows.segment import resolve_models
from flows.settings import SettingsError, load_settings
from tasks.discover import Discovery, Exam


@flow(name="cohort", task_runner=SettingsTaskRunner())
def cohort_flow(
    root: str,
    models: list[str] | None = None,
    config_file: str | None = None,
    output_root: str | None = None,
    force: bool = False,
    force_steps: list[str] | None = None,
    manifest: str | None = None,
    follow_symlinks: bool = False,
    patients: list[str] | None = None,
) -> State:
    """Process every exam under ``root``; the result is ``{"patients": [...], "models": [...],
    "skipped": [...]}`` (``skipped``: the paths that hold no exam, for the terminal only).

    Settings that cannot work (database, models: :mod:`flows.checks`) fail the run at
    start. The final state is ``Completed`` unless every patient failed
    (``flows.report``); its message counts the failures by step. Artifacts:
    ``cohort-progress``, ``cohort-summary``.

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
    manifest, follow_symlinks
        A CSV listing the exams (``patient, study, path``; see :mod:`tasks.discover`);
        search symbolic links to folders.
    patients
        Only these patients (pseudonymous ids), e.g. to retry the ones that failed; an id
        that matches no exam under ``root`` stops the run at start.
    """
    settings = load_settings(config_file, data_root=root, output_root=output_root)
    specs = resolve_models(models or [settings.segmentation.model], demo=False)
    check_database(settings)  # a deployment's run stops here, as the command line does
    check_models(specs, settings, demo=False)
    command = f"run {root} " + " ".join(f"--model {m}" for m in specs)
    command += f" --manifest {manifest}" if manifest else ""
    command += " --follow-symlinks" if follow_symlinks else ""
    command += "".join(f" --patient {p}" for p in patients or [])
    with pipeline_run(settings, command=command, force=force, force_steps=force_steps) as (
        ctx,
        run,
    ):
        found = discover_cohort(
            settings.data_root, manifest=manifest, follow_symlinks=follow_symlinks
        )
        get_run_logger().info("models: %s", ", ".join(specs))
        publish_discovery(found)
        key = pseudonym_secret(settings).get_secret_value()
        exams = [(exam, patient_id_of(exam, key)) for exam in found.exams]
        if patients:
            exams = _only(exams, patients)
        results = run_patients(
            exams, ctx, settings, specs, on_progress=LiveProgress(ctx, [p for _, p in exams])
        )
        run.finish(results)
        publish_run(ctx, results, title=f"Cohort run over {root}", thresholds=settings.qc)
    return final_state({"patients": results, "models": specs, "skipped": skipped_entries(found)})


def _only(exams: list[tuple[Exam, str]], patients: list[str]) -> list[tuple[Exam, str]]:
    """The exams of these pseudonymous ids (every id must match one)."""
    unknown = sorted(set(patients) - {p for _, p in exams})
    if unknown:
        raise SettingsError(
            f"--patient: no exam under the root has the pseudonymous id(s) {', '.join(unknown)}"
        )
    return [(exam, patient) for exam, patient in exams if patient in set(patients)]


def discovery_markdown(found: Discovery) -> str:
    """What discovery found, as Markdown: exams (with a problem), skipped paths by reason.

    Counts and fixed reasons only: skipped paths (an empty patient folder, a link named
    after a patient) may name patients, so they are shown on the terminal and never here.
    """
    problems = sum(e.problem is not None for e in found.exams)
    lines = [
        "# Discovery",
        "",
        f"{len(found.exams)} exams found ({problems} with a problem, reported as that "
        f"exam's ingest error); {len(found.skipped)} paths skipped.",
        "",
    ]
    counts = found.skipped_by_reason()
    if counts:
        lines += ["| skipped because | paths |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in counts.items()]
    return "\n".join(lines) + "\n"


def publish_discovery(found: Discovery) -> None:
    """The ``cohort-discovery`` artifact (:func:`discovery_markdown`)."""
    create_markdown_artifact(
        markdown=discovery_markdown(found),
        key="cohort-discovery",
        description="Exams found and paths skipped (counts and reasons; no paths)",
    )
