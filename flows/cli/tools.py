"""The commands that need neither flows nor the database: ``config`` (the settings in
effect), ``pseudonym`` (folder to pseudonymous ids, with the key) and ``train-demo-model``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.settings import KEY_FILE_NAME, Settings, pseudonym_key


def config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.public_dict(), indent=2))
    return 0


def train_demo_model(args: argparse.Namespace, settings: Settings) -> int:
    from tasks.nnunet_demo import DEFAULT_CASES
    from tasks.nnunet_demo import train_demo_model as train
    from tasks.segment import DEMO_MODELS

    n_cases, n_val = DEFAULT_CASES[args.model]
    report = train(
        Path(args.work),
        name=args.model,
        n_cases=n_cases if args.cases is None else args.cases,
        n_val=n_val if args.val is None else args.val,
        seed=args.seed,
        out_dir=Path(args.model_dir) if args.model_dir else DEMO_MODELS[args.model],
        check_mirroring=not args.skip_mirroring_check,
    )
    print(json.dumps(report, indent=2, default=str))
    return 0


def pseudonym(args: argparse.Namespace, settings: Settings) -> int:
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
