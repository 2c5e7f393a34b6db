"""The command line's arguments: every command, its options and its help text."""

from __future__ import annotations

import argparse
from typing import Any

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

ROOT_HELP = "cohort folder, or a CSV manifest (patient, study, path; paths relative to it)"


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
        "ground truth) under OUTPUT/demo-cohort, run the pipeline on them and compare each "
        "mask with the exam's true gland. OUTPUT is ./demo-output unless --output is given "
        "(never the cohort's output_root).",
    )
    demo.add_argument("--patients", type=int, metavar="N", help="number of exams (default 4)")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    _add_run_options(demo, json_help="print the result as JSON", output="./demo-output")

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
    _add_run_options(run, json_help="print one JSON object")
    run.add_argument(
        "--patient",
        action="append",
        metavar="ID",
        help="only this patient (pseudonymous id, e.g. one that failed; repeat for several): "
        "its flow run reruns from the cache",
    )
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
    train.add_argument(
        "--model",
        choices=["demo", "demo-zones"],
        default="demo",
        help="demo: gland, default plans, fold 0; demo-zones: PZ/TZ, ResEnc plans, "
        "5-fold split with folds 0 and 1 trained",
    )
    train.add_argument("--cases", type=int, help="training exams (default: demo 24, demo-zones 25)")
    train.add_argument(
        "--val", type=int, help="held-out exams of a one-split model (default: demo 2, else 0)"
    )
    train.add_argument("--seed", type=int, default=1000, help="training cohort seed")
    train.add_argument("--model-dir", metavar="DIR", help="default: the model's models/ folder")
    train.add_argument(
        "--skip-mirroring-check", action="store_true", help="no Dice with test-time mirroring"
    )

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


def _add_run_options(
    command: argparse.ArgumentParser, *, json_help: str, output: str = "./output"
) -> None:
    """What ``demo`` and ``run`` share: the output root, recomputing, JSON output."""
    command.add_argument("--output", metavar="DIR", help=f"output root (default {output})")
    command.add_argument("--force", action="store_true", help="recompute cached steps")
    command.add_argument(
        "--force-step",
        action="append",
        choices=step_names(),
        metavar="STEP",
        help=f"recompute this step even when cached (repeat): {', '.join(step_names())}",
    )
    command.add_argument("--json", action="store_true", help=json_help)


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
    qc = commands.add_parser(
        "qc",
        help="print the QC review list: the exams to look at, worst first, with reasons",
        description="Judge every exam's stored QC metrics with the settings' thresholds (qc "
        "section) and the cohort so far (robust z-scores): fail, review or pass, with the "
        'reasons. --json prints every exam: {"exams": [{"patient", "model", '
        '"status", "reasons", "metrics", "figure"}]}.',
    )
    qc.add_argument("--json", action="store_true", help="every exam with its metrics, as JSON")
    qc.add_argument("--all", action="store_true", help="also list the exams that pass")
    qc.add_argument("--patient", action="append", metavar="ID", help="only this patient")
    report.add_argument("--title", default="Cohort report", help="the report's heading")
    for command in (features, volumes):
        command.add_argument("--format", choices=("parquet", "csv"), help="default: by suffix")
    for command in (features, volumes, report, qc):
        command.add_argument("--output", metavar="DIR", help="output root (default ./output)")
