"""The commands that run flows on the output tree: ``demo``, ``run``, ``ingest``, ``evaluate``.

Each gets the parsed arguments and the settings loaded once by :func:`flows.cli.main`; ``run``
and ``ingest`` also get their :class:`CohortSource`, whose data root those settings were
validated with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.cli.outcome import report_patients
from flows.settings import Settings, SettingsError


@dataclass(frozen=True)
class CohortSource:
    """Where ``run``/``ingest`` find the exams: the data root, and the manifest if any."""

    root: str
    manifest: str | None


def cohort_source(args: argparse.Namespace) -> CohortSource:
    """(data root, manifest) of ``run``/``ingest``: ROOT may be the manifest itself (its
    folder is then the data root)."""
    root, manifest = Path(args.root), args.manifest
    if root.suffix.lower() == ".csv" and root.is_file():
        if manifest is not None:
            raise SettingsError("give the manifest as ROOT or as --manifest, not both")
        return CohortSource(str(root.resolve().parent), str(root.resolve()))
    if manifest is not None and not Path(manifest).is_file():
        raise SettingsError(f"manifest {manifest} does not exist or is not a file")
    return CohortSource(args.root, str(Path(manifest).resolve()) if manifest is not None else None)


def run_flow(
    flow: Any, settings: Settings, runner: Any = None, **parameters: Any
) -> dict[str, Any]:
    """Run a cohort-style flow on ``runner`` (default: the bounded thread pool); print its
    final state; return its result (also when the state is Failed: every patient failed,
    or no exam)."""
    from flows.runners import task_runner

    runner = runner or task_runner(settings)
    state = flow.with_options(task_runner=runner)(**parameters, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):  # the flow itself crashed
        raise result
    print(f"run: {state.type.value.lower()}: {state.message}", file=sys.stderr)
    return result


def demo(args: argparse.Namespace, settings: Settings) -> int:
    from flows.demo import demo_flow

    result = run_flow(
        demo_flow,
        settings,
        patients=args.patients,
        seed=args.seed,
        config_file=args.config,
        output_root=str(settings.output_root),
        force=args.force,
        force_steps=args.force_step,
    )
    code = report_patients(result["patients"], args.json, header=f"demo cohort: {result['cohort']}")
    if not args.json:
        print(demo_epilogue(result, args.config))
    return code


def demo_epilogue(result: dict[str, Any], config: str | None) -> str:
    """Where the demo's results are, its Dice against the known truth, and the commands to
    look at them."""
    out = result["output_root"]
    lines = [f"results: {out}/ (patients/, provenance.sqlite, evaluation/)"]
    evaluation = result.get("evaluation")
    for row in (evaluation or {}).get("summary", []):
        dice, keys = row["dice"], ("model", "reference", "label_name")
        values = [c["dice"] for c in evaluation["cases"] if all(c[k] == row[k] for k in keys)]
        what = "" if row["label_name"] == "gland" else f" {row['label_name'].upper()}"
        if row["label_name"] == "gland" and row["reference"] != "t2_gland_mask":
            continue  # the zones' union: the same gland as t2_gland_mask's
        lines.append(
            f"Dice against the known truth, model {row['model']}{what}: mean "
            f"{dice['mean']:.3f}, min {min(values):.3f} over {dice['n']} patients "
            "(evaluation/summary.md)"
        )
    if not evaluation:
        lines.append("no mask to compare with the known truth (every patient failed)")
    # the commands as this one was called (e.g. .venv/bin/prostate-cohort), so they run as shown
    program = sys.argv[0] if Path(sys.argv[0]).name == "prostate-cohort" else "prostate-cohort"
    prefix = f"{program}{f' --config {config}' if config else ''}"
    prefect = Path(program).with_name("prefect") if "/" in program else Path("prefect")
    home = f"PREFECT_HOME={os.environ['PREFECT_HOME']} " if os.environ.get("PREFECT_HOME") else ""
    lines += [
        "look at them:",
        f"  {prefix} report --output {out}        # HTML report: volumes, QC figures, Dice",
        f"  {prefix} status --output {out}        # per patient: steps and what ran",
        f"  {prefix} qc --output {out}            # QC review list: exams to look at, why",
        f"  {prefix} features --output {out} --wide -o features.csv   # radiomics",
        f"  {home}{prefect} server start          # the runs in the Prefect UI, "
        "http://127.0.0.1:4200",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace, settings: Settings, source: CohortSource) -> int:
    from flows.cohort import cohort_flow
    from flows.runners import task_runner

    result = run_flow(
        cohort_flow,
        settings,
        task_runner(settings, args.runner, args.address),
        root=source.root,
        models=args.model,
        config_file=args.config,
        output_root=str(settings.output_root),
        force=args.force,
        force_steps=args.force_step,
        manifest=source.manifest,
        follow_symlinks=args.follow_symlinks,
        patients=args.patient,
    )
    code = report_patients(
        result["patients"],
        args.json and not args.reference,
        header="processed",
        skipped=result.get("skipped", []),
    )
    if args.reference:
        args.pattern, args.model = args.reference_pattern, None
        return max(code, evaluate(args, settings))
    return code


def evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from flows.evaluate import evaluate_flow

    result = evaluate_flow(
        references=args.reference,
        pattern=args.pattern,
        models=args.model,
        config_file=args.config,
        output_root=str(settings.output_root),
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0 if result["cases"] and not result["errors"] else 1
    print(Path(result["folder"], "summary.md").read_text())
    for line in result["unmatched"]:
        print(f"  unmatched reference {line}")
    for line in result["skipped"]:
        print(f"  skipped reference {line}")
    for line in result["errors"]:
        print(f"  ERROR {line}")
    print(
        f"{result['patients']} patients ({len(result['cases'])} model x reference comparisons);"
        f" tables in {result['folder']}"
    )
    return 0 if result["cases"] and not result["errors"] else 1


def ingest(args: argparse.Namespace, settings: Settings, source: CohortSource) -> int:
    from flows.ingest import ingest_flow
    from flows.runners import task_runner

    result = ingest_flow.with_options(task_runner=task_runner(settings))(
        root=source.root,
        config_file=args.config,
        output_root=str(settings.output_root),
        force=args.force,
        manifest=source.manifest,
        follow_symlinks=args.follow_symlinks,
    )
    return report_patients(
        result["patients"],
        args.json,
        header=f"ingested {args.root}",
        skipped=result.get("skipped", []),
    )
