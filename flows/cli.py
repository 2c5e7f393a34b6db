"""The ``prostate-cohort`` command line: parse arguments, make one call, print the outcome.

Exit codes: 0 success; 1 some patients failed (their errors are printed and recorded);
2 invalid settings or arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flows.settings import KEY_FILE_NAME, Settings, SettingsError, load_settings, pseudonym_key
from flows.tree_lock import OutputTreeBusy, output_tree_lock
from tasks.registry import step_names

DESCRIPTION = """\
Process a cohort of prostate multiparametric MRI exams: ingest DICOM/NIfTI/MHA, standardise
DWI, denoise, correct bias, register, compute ADC, segment the gland and extract radiomics,
with the provenance of every step in a database.

Start here:
  prostate-cohort demo                 make a synthetic cohort and run the pipeline on it
  prostate-cohort ingest /data/cohort  find and ingest the exams under a folder

Settings come from --config FILE (TOML or YAML), PROSTATE_COHORT_* environment variables
and the defaults; `prostate-cohort config` shows what is in effect.
"""


def _prefect_defaults() -> None:
    """Offline-friendly Prefect defaults; an operator's own settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _prefect_home(output_root: Path) -> None:
    """Put Prefect's home under ``output_root/.prefect`` when ``~/.prefect`` is unusable.

    Prefect keeps its profiles and the temporary server's database in ``PREFECT_HOME``
    (default ``~/.prefect``); without a writable home folder (``HOME`` unset, missing or
    read-only: a service account, a container) the server cannot start. An operator's own
    ``PREFECT_HOME`` wins. Call before Prefect is imported.
    """
    if os.environ.get("PREFECT_HOME"):
        return
    home = os.environ.get("HOME")
    if home:
        default = Path(home) / ".prefect"
        usable = default if default.exists() else Path(home)
        if usable.is_dir() and os.access(usable, os.W_OK | os.X_OK):
            return
    os.environ["PREFECT_HOME"] = str(output_root / ".prefect")


#: Commands that open the provenance database (checked at start: ``database_url``).
_DATABASE_COMMANDS = frozenset(
    {"demo", "run", "evaluate", "ingest", "status", "features", "volumes", "report", "db"}
)


def _check_before_work(args: argparse.Namespace, settings: Settings) -> None:
    """Stop at start, before any work, on a database or segmentation model that cannot be
    used (:class:`SettingsError`, exit code 2)."""
    from flows.checks import check_database, check_models

    if args.command in _DATABASE_COMMANDS:
        check_database(settings)
    if args.command in ("run", "demo"):
        _prefect_defaults()  # flows.segment imports Prefect
        specs = getattr(args, "model", None) or [settings.segmentation.model]
        check_models(specs, settings, demo=args.command == "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prostate-cohort",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="settings file (.toml, .yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="make the synthetic demo cohort and run the pipeline on it",
        description="Generate N synthetic exams (real DICOM, four vendor conventions, with "
        "ground truth) under OUTPUT/demo-cohort and run the pipeline on them.",
    )
    demo.add_argument("--patients", type=int, metavar="N", help="number of exams (default 4)")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    demo.add_argument("--output", metavar="DIR", help="output root (default ./output)")
    demo.add_argument("--force", action="store_true", help="recompute cached steps")
    demo.add_argument(
        "--force-step",
        action="append",
        choices=step_names(),
        metavar="STEP",
        help=f"recompute this step even when cached (repeat): {', '.join(step_names())}",
    )
    demo.add_argument("--json", action="store_true", help="print the result as JSON")

    run = commands.add_parser(
        "run",
        help="run the whole pipeline over the exams under a folder",
        description="Discover the exams under ROOT and run ingest, b1000 standardisation, "
        "denoising, N4, registration, ADC, segmentation, volume, radiomics and QC figures. "
        "Finished steps are reused (cache); --force recomputes.",
    )
    run.add_argument("root", help=ROOT_HELP)
    run.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="segmentation model: taps, demo or an nnU-Net v2 model folder; repeat to run "
        "several (default: settings segmentation.model; 'auto' = taps on real exams)",
    )
    run.add_argument(
        "--reference",
        action="append",
        metavar="DIR",
        help="also evaluate the masks against the reference masks in DIR (see evaluate)",
    )
    run.add_argument(
        "--reference-pattern", default="*", metavar="GLOB", help="reference file names"
    )
    run.add_argument(
        "--runner",
        choices=("threads", "dask"),
        default="threads",
        help="threads: threads.workers patients at once in this process (default); "
        "dask: the running Dask cluster at --address",
    )
    run.add_argument("--address", metavar="tcp://HOST:PORT", help="Dask scheduler address")
    run.add_argument("--output", metavar="DIR", help="output root (default ./output)")
    run.add_argument("--force", action="store_true", help="recompute cached steps")
    run.add_argument(
        "--force-step",
        action="append",
        choices=step_names(),
        metavar="STEP",
        help=f"recompute this step even when cached (repeat): {', '.join(step_names())}",
    )
    run.add_argument("--json", action="store_true", help="print one JSON object")
    _add_discovery_options(run)

    evaluate = commands.add_parser(
        "evaluate",
        help="compare the predicted masks with reference masks (Dice, IoU, HD, HD95, ...)",
        description="Match reference masks to processed exams and compute, per case and "
        "model, Dice, IoU, Hausdorff distance (max and 95th percentile, mm), sensitivity, "
        "precision and volume difference; mean ± SD per model and reference. DIR holds "
        "DIR/<exam>.nii.gz (one reference named after DIR) or DIR/<exam>/<name>.nii.gz "
        "(several references), <exam> being the exam folder or the original patient id. "
        "Writes OUTPUT/evaluation/metrics.csv and summary.md and records the metrics.",
    )
    evaluate.add_argument(
        "--reference", action="append", required=True, metavar="DIR", help="reference folder"
    )
    evaluate.add_argument("--pattern", default="*", metavar="GLOB", help="reference file names")
    evaluate.add_argument("--model", action="append", metavar="MODEL", help="only this model")
    evaluate.add_argument("--output", metavar="DIR", help="output root (default ./output)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")

    ingest = commands.add_parser(
        "ingest",
        help="find and ingest the exams under a folder",
        description="Discover exams under ROOT (DICOM in any nesting, PI-CAI style "
        "NIfTI/MHA), pick the axial T2W, DWI per b-value, scanner ADC and computed high-b "
        "series, check them and write pseudonymised float32 NIfTI under OUTPUT/patients.",
    )
    ingest.add_argument("root", help=ROOT_HELP)
    ingest.add_argument("--output", metavar="DIR", help="output root (default ./output)")
    ingest.add_argument("--force", action="store_true", help="re-ingest cached exams")
    ingest.add_argument("--json", action="store_true", help="print one JSON object")
    _add_discovery_options(ingest)

    train = commands.add_parser(
        "train-demo-model",
        help="retrain the bundled demo nnU-Net model on a synthetic cohort (CPU, ~30 min)",
        description="Run the pipeline on a synthetic training cohort (seed --seed), train a "
        "small nnU-Net v2 model with nnU-Net's own planner, preprocessing and trainer on "
        "CPU, write the slim model folder to --model-dir and measure its Dice on unseen "
        "seed-0 exams (see models/demo-nnunet/README.md).",
    )
    train.add_argument("--work", required=True, metavar="DIR", help="scratch folder (~3 GB)")
    train.add_argument("--cases", type=int, default=24, help="training exams (default 24)")
    train.add_argument("--seed", type=int, default=1000, help="training cohort seed")
    train.add_argument("--model-dir", metavar="DIR", help="default: models/demo-nnunet")

    pseudonym = commands.add_parser(
        "pseudonym",
        help="the pseudonymous ids of exam folders (needs the key; prints, stores nothing)",
        description="For a person holding the pseudonymisation key: discover the exams under "
        "ROOT and print each exam folder with its pseudonymous patient and session ids, "
        "optionally only the exams under the given FOLDERs (relative to ROOT). Nothing "
        "identifying is stored anywhere; this is the way back from a pseudonym to a folder.",
    )
    pseudonym.add_argument("root", help="cohort folder")
    pseudonym.add_argument("folders", nargs="*", metavar="FOLDER", help="exam or patient folder")
    pseudonym.add_argument("--output", metavar="DIR", help="output root (default ./output)")
    pseudonym.add_argument("--json", action="store_true", help="print one JSON object")

    status = commands.add_parser(
        "status",
        help="where every patient stands, step by step (from the provenance database)",
        description="Per patient: the latest state and error of every step and the paths of "
        "the main outputs (t2w, dwi_b1000 and adc on the T2 grid, adc_native, mask, qc).",
    )
    status.add_argument("--output", metavar="DIR", help="output root (default ./output)")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    _add_analysis_commands(commands)

    db = commands.add_parser("db", help="provenance database: migrate, show revision")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_commands.add_parser("upgrade", help="migrate the database to the latest schema")
    db_commands.add_parser("current", help="print the database's schema revision")

    config = commands.add_parser("config", help="print the settings in effect (JSON)")
    config.add_argument("--output", metavar="DIR", help="output root (default ./output)")
    return parser


ROOT_HELP = "cohort folder, or a CSV manifest (patient, study, path; paths relative to it)"


def _add_discovery_options(command: argparse.ArgumentParser) -> None:
    """How ``run`` and ``ingest`` find the exams: a manifest, symbolic links."""
    command.add_argument(
        "--manifest",
        metavar="FILE",
        help="CSV listing the exams, one per row: columns patient, study, path (a folder "
        "relative to ROOT, or absolute under it) instead of finding them by folder",
    )
    command.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="search symbolic links to folders (a cohort kept as links); without it they "
        "are listed as skipped",
    )


def _cohort_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """(data root, manifest) of ``run``/``ingest``: ROOT may be the manifest itself (its
    folder is then the data root)."""
    root, manifest = Path(args.root), args.manifest
    if root.suffix.lower() == ".csv" and root.is_file():
        if manifest is not None:
            raise SettingsError("give the manifest as ROOT or as --manifest, not both")
        return str(root.resolve().parent), str(root.resolve())
    if manifest is not None and not Path(manifest).is_file():
        raise SettingsError(f"manifest {manifest} does not exist or is not a file")
    return args.root, str(Path(manifest).resolve()) if manifest is not None else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config, output_root=getattr(args, "output", None))
    except SettingsError as error:
        print(f"prostate-cohort: {error}", file=sys.stderr)
        return 2
    _prefect_home(settings.output_root)
    handler = {
        "demo": _demo,
        "run": _run,
        "evaluate": _evaluate,
        "ingest": _ingest,
        "status": _status,
        "pseudonym": _pseudonym,
        "features": _features,
        "volumes": _volumes,
        "report": _cohort_report,
        "train-demo-model": _train_demo_model,
        "db": _db,
        "config": _config,
    }[args.command]
    try:
        _check_before_work(args, settings)
        if args.command not in _RUN_COMMANDS:
            return handler(args, settings)
        with output_tree_lock(settings.output_root):  # one run at a time per output tree
            _prefect_defaults()
            from flows.prefect_server import temporary_server

            with temporary_server():  # ends with this process, even after kill -9
                return handler(args, settings)
    except (SettingsError, OutputTreeBusy) as error:
        print(f"prostate-cohort: {error}", file=sys.stderr)
        return 2


#: Commands that run flows on the output tree (they hold its lock while they run).
_RUN_COMMANDS = frozenset({"demo", "run", "ingest", "evaluate"})


def _config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.public_dict(), indent=2))
    return 0


def _train_demo_model(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.nnunet_demo import train_demo_model
    from tasks.segment import DEMO_MODEL_DIR

    report = train_demo_model(
        Path(args.work),
        n_cases=args.cases,
        seed=args.seed,
        out_dir=Path(args.model_dir) if args.model_dir else DEMO_MODEL_DIR,
    )
    print(json.dumps(report, indent=2, default=str))
    return 0


def _pseudonym(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.discover import discover_exams
    from tasks.ingest import exam_ids

    key_file = settings.output_root / KEY_FILE_NAME
    if settings.pseudonym_key is None and not key_file.is_file():
        print(f"prostate-cohort: no pseudonymisation key at {key_file}", file=sys.stderr)
        return 2
    key = pseudonym_key(settings)
    wanted = [f.strip("/") for f in args.folders]
    rows = []
    for exam in discover_exams(Path(args.root)):
        if wanted and not any(exam.folder == w or exam.folder.startswith(w + "/") for w in wanted):
            continue
        patient, session = exam_ids(exam, key)
        rows.append({"folder": exam.folder, "patient": patient, "session": session})
    if args.json:
        print(json.dumps({"exams": rows}, indent=2))
    else:
        for row in rows:
            print(f"{row['patient']}  {row['session']}  {row['folder']}")
    return 0 if rows else 1


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from db.queries import patient_status
    from db.store import current_revision, make_engine, session_scope

    url = settings.resolved_database_url
    if current_revision(url) is None:
        print(f"prostate-cohort: no provenance database at {url}: nothing has run yet")
        return 1
    with session_scope(make_engine(url)) as session:
        patients = patient_status(session)
    if args.json:
        print(json.dumps({"patients": patients}, indent=2))
        return 0
    for p in patients:
        failed = [f"{step}: {s['error']}" for step, s in p["steps"].items() if s["error"]]
        done = sum(s["state"] == "completed" for s in p["steps"].values())
        line = f"  {p['patient']}: {done}/{len(p['steps'])} steps completed"
        print(line + (f"; FAILED {'; '.join(failed)}" if failed else ""))
    print(f"{len(patients)} patients")
    return 0


def _add_analysis_commands(commands: Any) -> None:
    """The read-only commands over the provenance database: features, volumes, report."""
    features = commands.add_parser(
        "features",
        help="export the radiomics features (long, or --wide) to Parquet or CSV",
        description="Write the newest radiomics values of every patient, image and mask. "
        "Long form: one row per value (patient, model, zone, mask, image, feature_class, "
        "feature, wide_column, value, settings_hash, step_run_id, ...). --wide: one row "
        "per patient x image x mask, one column per feature named <class>_<feature> in "
        "lower case (e.g. firstorder_mean), as the SQL view radiomics_wide.",
    )
    features.add_argument(
        "-o", "--out-file", required=True, metavar="FILE", help="file to write (.parquet, .csv)"
    )
    features.add_argument("--wide", action="store_true", help="one column per feature")
    for flag, what in (
        ("--image", "image: t2w, adc, b1000"),
        ("--zone", "zone: gland, pz, tz"),
        ("--model", "segmentation model, e.g. demo, taps"),
        ("--feature-class", "pyradiomics class, e.g. firstorder, glcm, shape"),
        ("--patient", "pseudonymous patient id"),
    ):
        features.add_argument(flag, action="append", metavar="NAME", help=f"only this {what}")
    features.add_argument("--run", metavar="ID", help="only what this pipeline run computed")
    volumes = commands.add_parser(
        "volumes",
        help="print the mask volumes (mL) per patient, model and label",
        description="The newest mask volumes (mL) per patient, model and label; -o also "
        "writes the whole table (with voxel counts, mask paths, step runs).",
    )
    volumes.add_argument("-o", "--out-file", metavar="FILE", help="also write to FILE")
    report = commands.add_parser(
        "report",
        help="write the cohort report: one self-contained HTML file",
        description="Run summary, failures with reasons, time per step, gland-volume "
        "distribution, QC thumbnails linking to the full figures, evaluation table.",
    )
    report.add_argument("-o", "--out-file", metavar="FILE", help="default OUTPUT/report.html")
    report.add_argument("--title", default="Cohort report", help="the report's heading")
    for command in (features, volumes):
        command.add_argument("--format", choices=("parquet", "csv"), help="default: by suffix")
    for command in (features, volumes, report):
        command.add_argument("--output", metavar="DIR", help="output root (default ./output)")


@contextmanager
def _analysis_session(settings: Settings) -> Iterator[Any]:
    """A session on the provenance database, or None (message printed) when there is none."""
    from sqlalchemy.engine import make_url

    from db.store import current_revision, make_engine, session_scope

    url = settings.resolved_database_url
    if current_revision(url) is None:
        shown = make_url(url).render_as_string(hide_password=True)
        print(f"prostate-cohort: no provenance database at {shown}: nothing has run yet")
        yield None
        return
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            yield session
    finally:
        engine.dispose()


def _read_table(args: argparse.Namespace, settings: Settings, query: Any) -> Any:
    """``query(session)`` (a DataFrame), or an exit code: 2 when ``--out-file`` names no
    table format, 1 when there is no database yet (each with its message)."""
    from flows.exports import table_format

    try:
        if args.out_file is not None:
            table_format(args.out_file, args.format)
    except ValueError as error:
        print(f"prostate-cohort: {error}", file=sys.stderr)
        return 2
    with _analysis_session(settings) as session:
        return 1 if session is None else query(session)


def _features(args: argparse.Namespace, settings: Settings) -> int:
    from db.queries import features
    from flows.exports import write_table

    filters = {
        "images": args.image,
        "zones": args.zone,
        "models": args.model,
        "feature_classes": args.feature_class,
        "patients": args.patient,
        "pipeline_run_id": args.run,
    }
    frame = _read_table(args, settings, lambda s: features(s, wide=args.wide, **filters))
    if isinstance(frame, int):
        return frame
    write_table(frame, args.out_file, fmt=args.format)
    print(f"{len(frame)} rows x {frame.shape[1]} columns -> {args.out_file}")
    return 0


def _volumes(args: argparse.Namespace, settings: Settings) -> int:
    import pandas as pd

    from db.queries import volumes
    from flows.exports import write_table

    frame = _read_table(args, settings, volumes)
    if isinstance(frame, int):
        return frame
    shown = frame[["patient", "model", "label_name", "volume_ml", "voxel_count"]]
    with pd.option_context("display.max_rows", None, "display.width", 200):
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"{len(frame)} volumes (mL)")
    if args.out_file:
        write_table(frame, args.out_file, fmt=args.format)
    return 0


def _cohort_report(args: argparse.Namespace, settings: Settings) -> int:
    from flows.report_html import write_report

    path = Path(args.out_file or settings.output_root / "report.html")
    with _analysis_session(settings) as session:
        if session is None:
            return 1
        data = write_report(session, path, title=args.title)
    print(f"report: {path} ({len(data.patients)} patients, {len(data.failures)} failures)")
    return 0


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from db.store import current_revision, head_revision, upgrade

    url = settings.resolved_database_url
    if args.db_command == "upgrade":
        upgrade(url)
    revision = current_revision(url)
    print(f"database schema revision: {revision or 'none'} (latest: {head_revision()})")
    return 0


def _run_flow(
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


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from flows.demo import demo_flow

    result = _run_flow(
        demo_flow,
        settings,
        patients=args.patients,
        seed=args.seed,
        config_file=args.config,
        output_root=str(settings.output_root),
        force=args.force,
        force_steps=args.force_step,
    )
    return _report(result["patients"], args.json, header=f"demo cohort: {result['cohort']}")


def _run(args: argparse.Namespace, settings: Settings) -> int:
    root, manifest = _cohort_source(args)
    load_settings(args.config, data_root=root)  # fail early on a bad ROOT
    from flows.cohort import cohort_flow
    from flows.runners import task_runner

    result = _run_flow(
        cohort_flow,
        settings,
        task_runner(settings, args.runner, args.address),
        root=root,
        models=args.model,
        config_file=args.config,
        output_root=str(settings.output_root),
        force=args.force,
        force_steps=args.force_step,
        manifest=manifest,
        follow_symlinks=args.follow_symlinks,
    )
    code = _report(
        result["patients"],
        args.json and not args.reference,
        header="processed",
        skipped=result.get("skipped", []),
    )
    if args.reference:
        args.pattern, args.model = args.reference_pattern, None
        return max(code, _evaluate(args, settings))
    return code


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
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
    for line in result["errors"]:
        print(f"  ERROR {line}")
    print(f"{len(result['cases'])} cases; tables in {result['folder']}")
    return 0 if result["cases"] and not result["errors"] else 1


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    root, manifest = _cohort_source(args)
    load_settings(args.config, data_root=root)  # fail early on a bad ROOT
    from flows.ingest import ingest_flow
    from flows.runners import task_runner

    result = ingest_flow.with_options(task_runner=task_runner(settings))(
        root=root,
        config_file=args.config,
        output_root=str(settings.output_root),
        force=args.force,
        manifest=manifest,
        follow_symlinks=args.follow_symlinks,
    )
    return _report(
        result["patients"],
        args.json,
        header=f"ingested {args.root}",
        skipped=result.get("skipped", []),
    )


def _report(
    patients: list[dict[str, Any]],
    as_json: bool,
    *,
    header: str,
    skipped: list[dict[str, Any]] | None = None,
) -> int:
    """Print per-patient results (and, for ``run``/``ingest``, the paths discovery skipped,
    with the reason); exit code 1 when any patient failed."""
    if as_json:
        shown: dict[str, Any] = {"patients": [_json_entry(p) for p in patients]}
        if skipped is not None:
            shown["skipped"] = skipped
        print(json.dumps(shown, indent=2))
    else:
        print(header)
        for p in patients:
            if p["status"] == "ok":
                found = ", ".join(_describe(s) for s in p["series"])
                cached = " (cached)" if p.get("cached") else ""
                print(f"  {p['patient']}  {p['source']}: ok{cached}: {found}")
            else:
                step = f" in step {p['step']}" if p.get("step") else ""
                print(f"  {p['patient']}  {p['source']}: ERROR{step}: {p['error']}")
        n_failed = sum(p["status"] != "ok" for p in patients)
        for s in skipped or []:
            files = f" ({s['files']} files)" if s.get("files") else ""
            print(f"  skipped {s['path']}: {s['reason']}{files}")
        line = f"{len(patients)} patients, {n_failed} failed"
        print(line + (f", {len(skipped)} paths skipped" if skipped else ""))
    return 1 if any(p["status"] != "ok" for p in patients) else 0


def _describe(series: dict[str, Any]) -> str:
    b = series.get("b_value")
    return series["kind"] + (f" b{b:g}" if b is not None else "")


def _json_entry(p: dict[str, Any]) -> dict[str, Any]:
    keep = ("kind", "b_value", "source", "shape", "spacing", "image", "reason")
    return {
        "patient": p["patient"],
        "source": p["source"],
        "status": p["status"],
        "error": p["error"],
        "series": [{k: s[k] for k in keep if k in s} for s in p["series"]],
        "rejected": p.get("rejected", []),
        "found": p.get("found", []),
        "step": p.get("step"),
        "outputs": p.get("outputs", {}),
    }


if __name__ == "__main__":
    sys.exit(main())
