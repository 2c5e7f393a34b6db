"""Checks made at start, before any work: a setting that cannot work stops the run at once.

Used by the command line (exit code 2) and by the flows themselves (a deployment's flow run
fails at start with the same message), so a bad setting never costs a night of
preprocessing before it shows.
"""

from __future__ import annotations

from flows.settings import Settings, SettingsError


def check_database(settings: Settings) -> None:
    """The provenance database can be reached (``database_url``), else :class:`SettingsError`."""
    from db.store import check_connection

    try:
        check_connection(settings.resolved_database_url)
    except ValueError as error:
        raise SettingsError(f"database_url: {error}") from None


def check_force_steps(names: list[str] | None) -> None:
    """Every ``--force-step`` names a step of :mod:`tasks.registry`, else
    :class:`SettingsError` listing the valid ones."""
    from tasks.registry import check_step_names

    try:
        check_step_names(names or [])
    except ValueError as error:
        raise SettingsError(f"force_steps (--force-step): {error}") from None


def check_models(specs: list[str], settings: Settings, *, demo: bool) -> None:
    """Every model spec names a usable model (checked without loading a network), else
    :class:`SettingsError` naming the spec and the problem."""
    from flows.segment import resolve_models, segmentation_params
    from tasks.errors import InputError
    from tasks.segment import check_model

    params = segmentation_params(settings.segmentation, settings.threads.per_worker())
    for spec in specs:
        for resolved in resolve_models([spec], demo=demo):
            try:
                check_model(resolved, params)
            except InputError as error:
                where = f" ({error.path})" if error.path and error.path != resolved else ""
                hint = f"; {error.hint}" if error.hint else ""
                raise SettingsError(
                    f"segmentation.model (--model) {spec!r}: {error.problem}{where}{hint}"
                ) from None


def check_demo_tree(settings: Settings) -> None:
    """The demo's output tree holds no real cohort's results (a ``run`` or ``ingest`` on
    record in its database), else :class:`SettingsError`: the demo never mixes its
    synthetic exams into a cohort's tables and report."""
    from sqlalchemy import inspect

    from db.run_queries import run_commands
    from db.store import make_engine, session_scope

    engine = make_engine(settings.resolved_database_url)
    try:
        if not inspect(engine).has_table("pipeline_run"):
            return
        with session_scope(engine) as session:
            cohort = run_commands(session) & {"run", "ingest"}
    finally:
        engine.dispose()
    if cohort:
        raise SettingsError(
            f"output {settings.output_root} holds a cohort's results ({', '.join(sorted(cohort))} "
            "on record): the demo needs an output folder of its own (--output DIR)"
        )
