"""Run one parsed command: load the settings once, run the checks at start
(:mod:`flows.cli.start`), then hand both to the command's handler: :mod:`flows.cli.pipeline`
(the commands that run flows), :mod:`flows.cli.results` (the commands that read the
provenance database) or :mod:`flows.cli.tools` (the rest).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext

import flows.cli.pipeline as pipeline
import flows.cli.results as results
import flows.cli.tools as tools
from flows.cli.pipeline import CohortSource, cohort_source
from flows.cli.start import RUN_COMMANDS, check_before_work, flow_session, prefect_home
from flows.settings import Settings, SettingsError, demo_overrides, load_settings
from flows.tree_lock import OutputTreeBusy

#: A command's work: the parsed arguments and the settings in, the exit code out.
Handler = Callable[[argparse.Namespace, Settings], int]
#: The same for a command over a cohort folder (``run``, ``ingest``).
CohortHandler = Callable[[argparse.Namespace, Settings, CohortSource], int]

HANDLERS: dict[str, Handler] = {
    "demo": pipeline.demo,
    "evaluate": pipeline.evaluate,
    "status": results.status,
    "pseudonym": tools.pseudonym,
    "features": results.features,
    "volumes": results.volumes,
    "report": results.cohort_report,
    "qc": results.qc,
    "train-demo-model": tools.train_demo_model,
    "db": results.db,
    "config": tools.config,
}
COHORT_HANDLERS: dict[str, CohortHandler] = {"run": pipeline.run, "ingest": pipeline.ingest}


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command ``args``; return the exit code (see :func:`flows.cli.main`)."""
    try:
        # ROOT of run/ingest is validated with the settings (data_root): a bad one fails early.
        source = cohort_source(args) if args.command in COHORT_HANDLERS else None
        output = {"output_root": getattr(args, "output", None)}
        if args.command == "demo":  # its own tree and database, never the cohort's
            output = demo_overrides(args.output)
        settings = load_settings(
            args.config, data_root=source.root if source is not None else None, **output
        )
    except SettingsError as error:
        print(f"prostate-cohort: {error}", file=sys.stderr)
        return 2
    prefect_home(settings.output_root)
    try:
        check_before_work(args, settings)
        with flow_session(settings) if args.command in RUN_COMMANDS else nullcontext():
            if source is not None:
                return COHORT_HANDLERS[args.command](args, settings, source)
            return HANDLERS[args.command](args, settings)
    except (SettingsError, OutputTreeBusy) as error:
        print(f"prostate-cohort: {error}", file=sys.stderr)
        return 2
