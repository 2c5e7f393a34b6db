"""Build the demo nnU-Net v2 model reproducibly, with nnU-Net's own planning and training.

The demo model (``models/demo-nnunet``) segments the prostate gland from the pipeline's
preprocessed T2W (N4), b1000 DWI and ADC, all on the T2 grid. It is trained on a synthetic
cohort made by the pipeline itself with a seed (1000) different from the demo and test seed
(0), so that the tests see exams it was never trained on.

What nnU-Net does and where this module steps in (only through nnU-Net's extension points):

1. :func:`write_raw_dataset` writes an ``nnUNet_raw`` dataset (channels ``T2``, ``HBV``,
   ``ADC``; label ``gland``) and a ``splits_final.json`` with one split (fold 0): the
   training cases and a few held-out validation cases.
2. Fingerprint, planning and preprocessing are nnU-Net's, with a planner subclass
   (:func:`_demo_classes`) that starts the U-Net at fewer features, a coarser target spacing
   and a small memory target, so that the plans describe a network small enough to train on
   CPU. The architecture is therefore entirely in ``plans.json``.
3. Training is ``nnUNetTrainer.run_training`` in a subclass that only shortens the schedule
   (epochs, iterations per epoch). It runs in a child process because nnU-Net reads its
   folders (``nnUNet_raw`` ...) from environment variables at import time.
4. :func:`export_slim_model` keeps what inference needs: ``dataset.json``, ``plans.json`` and
   ``fold_0/checkpoint_final.pth`` with the weights only (no optimizer state). The checkpoint
   names ``nnUNetTrainer`` as its trainer, since the subclass changed no architecture, so
   ``nnUNetPredictor.initialize_from_trained_model_folder`` finds the class inside nnU-Net;
   the subclass's name is kept under ``trained_with``.

:func:`train_demo_model` does all of it, including running the pipeline (the
``prostate-cohort demo`` command, in a subprocess) on the training and evaluation cohorts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from tasks.errors import InputError
from tasks.io import sha256_file, write_json_atomic, write_text_atomic
from tasks.pseudonym import pseudonymous_id
from tasks.segment import DEMO_MODEL_DIR
from tasks.segment_backend import check_on_grid

STEP = "nnunet_demo"
DATASET_ID = 731
DATASET_NAME = f"Dataset{DATASET_ID:03d}_ProstateSynthetic"
CHANNEL_NAMES = {"0": "T2", "1": "HBV", "2": "ADC"}
PLANS_NAME = "nnUNetPlans_demoCPU"
CONFIGURATION = "3d_fullres"
FOLD = 0


@dataclass(frozen=True)
class TrainingCase:
    """One training exam: three images on the T2 grid and its gland mask (same grid).

    ``t2w``: N4-corrected T2W; ``dwi_b1000``: b1000 DWI on the T2 grid; ``adc``: ADC in mm²/s
    on the T2 grid; ``mask``: gland mask (0/1, or zone labels if the dataset has zones).
    """

    case_id: str
    t2w: Path
    dwi_b1000: Path
    adc: Path
    mask: Path


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model, saved with it (README.md, training.json).

    Attributes
    ----------
    target_spacing
        nnU-Net target spacing (z, y, x) in mm for ``3d_fullres``.
    gpu_memory_target_gb
        The planner's memory target; smaller gives a smaller patch.
    base_features, max_features
        U-Net features at the first stage and the cap (nnU-Net default 32 and 320).
    epochs, iterations_per_epoch, val_iterations_per_epoch
        Training schedule (nnU-Net default 1000 x 250, 50 validation iterations).
    initial_lr
        Initial SGD learning rate (nnU-Net default 0.01, poly decay).
    torch_seed
        Seed of torch, numpy and random in the training process.
    threads
        CPU threads for torch (and ITK) in training.
    """

    target_spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
    gpu_memory_target_gb: float = 0.25
    base_features: int = 8
    max_features: int = 64
    epochs: int = 40
    iterations_per_epoch: int = 25
    val_iterations_per_epoch: int = 4
    initial_lr: float = 1e-2
    torch_seed: int = 12345
    threads: int = 1


# -- training cases from a pipeline run --------------------------------------------------------


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise InputError(f"expected one {pattern}, found {len(found)}", step=STEP, path=folder)
    return found[0]


def pipeline_cases(
    output_root: Path, *, truth_file: str = "t2_gland_mask.nii.gz"
) -> list[TrainingCase]:
    """The training cases of a ``prostate-cohort demo`` run, sorted by synthetic exam.

    Nothing in the output tree names the synthetic exam (``SYN-0001``: a patient folder), so
    each exam is found through the run's pseudonymisation key
    (``<output_root>/.pseudonym-key``): its patient folder is the keyed hash of the exam
    name. The truth lies in ``<output_root>/demo-cohort/truth/SYN-0001/<truth_file>``.

    Raises
    ------
    InputError
        If the run has no exams, or an exam lacks an output or its truth.
    """
    output_root = Path(output_root)
    key_file = output_root / ".pseudonym-key"
    if not key_file.is_file():
        raise InputError("the demo run's pseudonymisation key is missing", step=STEP, path=key_file)
    key = key_file.read_text().strip()
    truth_root = output_root / "demo-cohort" / "truth"
    names = (
        sorted(t.name for t in truth_root.iterdir() if t.is_dir()) if truth_root.is_dir() else []
    )
    by_patient = {pseudonymous_id(name, key): name for name in names}
    cases = []
    for ingest in sorted(output_root.glob("patients/*/*/*_ingest.json")):
        exam = ingest.parent
        syn = by_patient.get(exam.parent.name)
        if syn is None:
            raise InputError("no synthetic exam has this pseudonym", path=ingest, step=STEP)
        mask = output_root / "demo-cohort" / "truth" / syn / truth_file
        if not mask.is_file():
            raise InputError("ground truth missing", step=STEP, path=mask)
        cases.append(
            TrainingCase(
                case_id=syn,
                t2w=_one(exam / "anat", "*_desc-n4_T2w.nii.gz"),
                dwi_b1000=_one(exam / "dwi", "*_space-T2w_b1000_dwi.nii.gz"),
                adc=_one(exam / "dwi", "*_space-T2w_desc-fit_adc.nii.gz"),
                mask=mask,
            )
        )
    if not cases:
        raise InputError("no processed exams found", step=STEP, path=output_root / "patients")
    return sorted(cases, key=lambda c: c.case_id)


def run_pipeline(output_root: Path, *, patients: int, seed: int, threads: int = 1) -> dict:
    """Run ``prostate-cohort demo`` into ``output_root`` (a subprocess, 1 worker).

    Returns
    -------
    dict
        ``seconds`` (wall), ``returncode`` and ``output`` (the last 4000 characters).
    """
    command = Path(sys.executable).parent / "prostate-cohort"
    if not command.exists():
        raise InputError("the prostate-cohort command is not installed", path=command, step=STEP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROSTATE_COHORT_")}
    env |= _thread_env(threads) | {
        "PROSTATE_COHORT_THREADS__WORKERS": "1",
        "PROSTATE_COHORT_THREADS__THREADS_PER_WORKER": str(threads),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    args = [str(command), "demo", "--patients", str(patients), "--seed", str(seed)]
    started = time.perf_counter()
    result = subprocess.run(
        [*args, "--output", str(output_root)], env=env, capture_output=True, text=True, check=False
    )
    return {
        "seconds": time.perf_counter() - started,
        "returncode": result.returncode,
        "output": (result.stdout + result.stderr)[-4000:],
    }


def ensure_cohort(
    output_root: Path, *, patients: int, seed: int, threads: int = 1, reuse: bool = True
) -> tuple[list[TrainingCase], dict[str, Any]]:
    """The first ``patients`` preprocessed exams of a seeded demo cohort, made if needed.

    With ``reuse``, a folder that already holds ``patients`` processed exams is used as it
    is (``{"reused": True}``). Otherwise the pipeline runs; a non-zero exit status is
    accepted when every exam still has the outputs training needs (a later step such as
    segmentation may fail while no model exists yet); it is recorded in the returned dict.

    Raises
    ------
    RuntimeError
        If the pipeline did not produce ``patients`` usable exams.
    """
    output_root = Path(output_root)
    if reuse and output_root.is_dir():
        try:
            cases = pipeline_cases(output_root)
        except InputError:
            cases = []
        if len(cases) >= patients:
            return cases[:patients], {"reused": True}
    run = run_pipeline(output_root, patients=patients, seed=seed, threads=threads)
    try:
        cases = pipeline_cases(output_root)
    except InputError:
        cases = []
    if len(cases) < patients:
        raise RuntimeError(
            f"prostate-cohort demo --patients {patients} --seed {seed} gave {len(cases)} usable "
            f"exams (exit status {run['returncode']}):\n{run['output']}"
        )
    return cases[:patients], {"reused": False, **run}


def _thread_env(threads: int) -> dict[str, str]:
    n = str(threads)
    return {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
    }


# -- the nnU-Net raw dataset --------------------------------------------------------------------


def write_raw_dataset(
    cases: list[TrainingCase],
    raw_root: Path,
    *,
    val_cases: Sequence[TrainingCase] = (),
    labels: dict[str, int] | None = None,
) -> Path:
    """Write ``cases`` (+ ``val_cases``) as an nnU-Net raw dataset; return its folder.

    Outputs
    -------
    ``<raw_root>/Dataset731_ProstateSynthetic/imagesTr/<case>_000{0,1,2}.nii.gz`` (T2, HBV,
    ADC), ``labelsTr/<case>.nii.gz`` (uint8), ``dataset.json`` and ``splits_final.json`` (one
    split: train = ``cases``, val = ``val_cases``). Every image gets the T2 header exactly.

    Raises
    ------
    InputError
        If a channel or mask is not on its case's T2 grid.
    """
    labels = labels or {"background": 0, "gland": 1}
    folder = Path(raw_root) / DATASET_NAME
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in [*cases, *val_cases]:
        t2 = sitk.ReadImage(str(case.t2w), sitk.sitkFloat32)
        for index, path in enumerate((case.t2w, case.dwi_b1000, case.adc)):
            image = sitk.ReadImage(str(path), sitk.sitkFloat32)
            check_on_grid(image, t2, path.name)
            image.CopyInformation(t2)  # identical headers (nnU-Net compares them)
            sitk.WriteImage(image, str(folder / "imagesTr" / f"{case.case_id}_{index:04d}.nii.gz"))
        mask = sitk.ReadImage(str(case.mask), sitk.sitkUInt8)
        check_on_grid(mask, t2, "ground-truth mask")
        mask.CopyInformation(t2)
        sitk.WriteImage(mask, str(folder / "labelsTr" / f"{case.case_id}.nii.gz"))
    dataset = {
        "name": DATASET_NAME,
        "description": "Synthetic prostate mpMRI exams preprocessed by prostate-cohort "
        "(N4 T2W; b1000 DWI and ADC in mm2/s resampled onto the T2 grid)",
        "channel_names": CHANNEL_NAMES,
        "labels": labels,
        "numTraining": len(cases) + len(val_cases),
        "file_ending": ".nii.gz",
    }
    write_json_atomic(folder / "dataset.json", dataset)
    split = [{"train": [c.case_id for c in cases], "val": [c.case_id for c in val_cases]}]
    write_json_atomic(folder / "splits_final.json", split)
    return folder


# -- planning, preprocessing, training (child process) ------------------------------------------


def _demo_classes(recipe: DemoRecipe) -> tuple[type, type]:
    """The planner and trainer subclasses (nnunetv2 must be imported with its env set)."""
    import torch  # noqa: PLC0415
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (  # noqa: PLC0415
        ExperimentPlanner,
    )
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: PLC0415

    class DemoCPUPlanner(ExperimentPlanner):
        """nnU-Net's default planner with a narrower U-Net (features in the plans)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = recipe.base_features
            self.UNet_max_features_3d = recipe.max_features
            self.UNet_max_features_2d = recipe.max_features

    class nnUNetTrainer_DemoCPU(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming scheme
        """nnU-Net's default trainer with a short schedule; nothing else changes."""

        # nnU-Net records the __init__ arguments by name (inspect.signature + locals()):
        # the signature must stay exactly nnUNetTrainer's.
        def __init__(
            self,
            plans: dict,
            configuration: str,
            fold: int,
            dataset_json: dict,
            device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's default
        ) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = recipe.epochs
            self.num_iterations_per_epoch = recipe.iterations_per_epoch
            self.num_val_iterations_per_epoch = recipe.val_iterations_per_epoch
            self.initial_lr = recipe.initial_lr
            self.save_every = recipe.epochs + 1  # no intermediate checkpoints

    return DemoCPUPlanner, nnUNetTrainer_DemoCPU


def _child(work: Path, recipe: DemoRecipe) -> dict[str, Any]:
    """Plan, preprocess and train in this (child) process; nnU-Net env already set."""
    import torch  # noqa: PLC0415
    from batchgenerators.utilities.file_and_folder_operations import load_json  # noqa: PLC0415
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (  # noqa: PLC0415
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    torch.set_num_threads(recipe.threads)
    random.seed(recipe.torch_seed)
    np.random.seed(recipe.torch_seed)
    torch.manual_seed(recipe.torch_seed)
    planner, trainer_class = _demo_classes(recipe)
    times = {}
    started = time.perf_counter()
    # The planner sets torch threads to nnUNet_n_proc_DA (0 is refused there); training then
    # augments in this process (0: no augmentation worker processes).
    os.environ["nnUNet_n_proc_DA"] = "1"  # noqa: SIM112 - nnU-Net's name
    extract_fingerprint_dataset(DATASET_ID, num_processes=1, check_dataset_integrity=True)
    plan_experiment_dataset(
        DATASET_ID,
        planner,
        gpu_memory_target_in_gb=recipe.gpu_memory_target_gb,
        overwrite_target_spacing=recipe.target_spacing,
        overwrite_plans_name=PLANS_NAME,
    )
    preprocess_dataset(DATASET_ID, PLANS_NAME, (CONFIGURATION,), [1], show_progress_bar=False)
    times["plan_preprocess_s"] = time.perf_counter() - started
    os.environ["nnUNet_n_proc_DA"] = "0"  # noqa: SIM112
    torch.set_num_threads(recipe.threads)

    preprocessed = work / "nnUNet_preprocessed" / DATASET_NAME
    plans = load_json(str(preprocessed / f"{PLANS_NAME}.json"))
    plans["continue_training"] = False  # nnU-Net 2.8's trainer pops this key
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    trainer = trainer_class(
        plans=plans,
        configuration=CONFIGURATION,
        fold=FOLD,
        dataset_json=dataset_json,
        device=torch.device("cpu"),
    )
    started = time.perf_counter()
    trainer.run_training()
    times["train_s"] = time.perf_counter() - started
    log = trainer.logger.get_checkpoint()
    return {
        "times": times,
        "output_folder": trainer.output_folder_base,
        "trainer": trainer_class.__name__,
        "pseudo_dice_last": [float(x) for x in log["dice_per_class_or_region"][-1]],
        "ema_pseudo_dice_last": float(log["ema_fg_dice"][-1]),
        "train_loss_last": float(log["train_losses"][-1]),
        "epoch_seconds_mean": float(
            np.mean(np.subtract(log["epoch_end_timestamps"], log["epoch_start_timestamps"]))
        ),
    }


def _child_main() -> None:
    """Entry of the training child process: ``argv[1]`` work dir, ``argv[2]`` recipe JSON."""
    work, recipe = Path(sys.argv[1]), DemoRecipe(**json.loads(sys.argv[2]))
    result = _child(work, recipe)
    write_json_atomic(work / "child_result.json", result)


def train_nnunet(work: Path, recipe: DemoRecipe) -> dict[str, Any]:
    """Fingerprint, plan, preprocess and train fold 0 of the raw dataset under ``work``.

    Runs in a child process with ``nnUNet_raw`` = ``work/nnUNet_raw`` (written by
    :func:`write_raw_dataset`), ``nnUNet_preprocessed`` and ``nnUNet_results`` under ``work``,
    data augmentation in-process (``nnUNet_n_proc_DA=0``) and ``recipe.threads`` threads.

    Returns
    -------
    dict
        ``times`` (plan_preprocess_s, train_s), ``output_folder`` (the nnU-Net training
        output), trainer name, last pseudo Dice and loss, mean epoch seconds.
    """
    work = Path(work)
    env = dict(os.environ) | _thread_env(recipe.threads)
    env |= {
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_n_proc_DA": "0",
        "nnUNet_def_n_proc": "1",
        "nnUNet_compile": "false",
    }
    code = "from tasks.nnunet_demo import _child_main; _child_main()"
    log = work / "train.log"
    with open(log, "w") as handle:
        result = subprocess.run(
            [sys.executable, "-c", code, str(work), json.dumps(asdict(recipe))],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
    if result.returncode != 0:
        raise RuntimeError(f"nnU-Net training failed, see {log}:\n{log.read_text()[-4000:]}")
    return json.loads((work / "child_result.json").read_text())


# -- export and evaluation ----------------------------------------------------------------------


def export_slim_model(training_folder: Path, out_dir: Path, *, fold: int = FOLD) -> dict[str, Any]:
    """Copy the inference part of an nnU-Net training output to ``out_dir``.

    Outputs
    -------
    ``out_dir/dataset.json``, ``out_dir/plans.json``, ``out_dir/fold_<fold>/checkpoint_final.pth``
    holding ``network_weights``, ``init_args`` (configuration, fold), ``trainer_name``
    (``nnUNetTrainer``), ``trained_with``, ``inference_allowed_mirroring_axes`` and
    ``current_epoch``. Other files in ``out_dir`` are left alone.

    Returns
    -------
    dict
        Size in bytes and sha256 of every written file.
    """
    import torch  # noqa: PLC0415

    training_folder, out_dir = Path(training_folder), Path(out_dir)
    checkpoint = torch.load(
        training_folder / f"fold_{fold}" / "checkpoint_final.pth",
        map_location="cpu",
        weights_only=False,
    )
    slim = {
        # as saved: torch.save keeps one copy of a parameter that two state-dict keys share
        "network_weights": checkpoint["network_weights"],
        "init_args": {
            "configuration": checkpoint["init_args"]["configuration"],
            "fold": checkpoint["init_args"]["fold"],
        },
        "trainer_name": "nnUNetTrainer",
        "trained_with": checkpoint["trainer_name"],
        "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
        "current_epoch": checkpoint.get("current_epoch"),
    }
    (out_dir / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / f"fold_{fold}")
    (out_dir / f"fold_{fold}").mkdir()
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(training_folder / name, out_dir / name)
    target = out_dir / f"fold_{fold}" / "checkpoint_final.pth"
    torch.save(slim, target)
    files = [out_dir / "dataset.json", out_dir / "plans.json", target]
    return {
        str(p.relative_to(out_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def evaluate_model(
    model_dir: Path, cases: list[TrainingCase], *, use_mirroring: bool = False, threads: int = 1
) -> list[dict[str, Any]]:
    """Dice of the model's gland (all foreground labels) against each case's mask, and seconds."""
    import torch  # noqa: PLC0415

    from tasks.segment import SegmentationInputs, SegmentationParams  # noqa: PLC0415
    from tasks.segment_nnunet import NnUNetBackend  # noqa: PLC0415

    torch.set_num_threads(threads)
    params = SegmentationParams(device="cpu", use_mirroring=use_mirroring, threads=threads)
    backend = NnUNetBackend(model_dir, params=params)
    rows = []
    for case in cases:
        inputs = SegmentationInputs(
            t2w=sitk.ReadImage(str(case.t2w), sitk.sitkFloat32),
            dwi_b1000=sitk.ReadImage(str(case.dwi_b1000), sitk.sitkFloat32),
            adc=sitk.ReadImage(str(case.adc), sitk.sitkFloat32),
        )
        started = time.perf_counter()
        result = backend.segment(inputs)
        seconds = time.perf_counter() - started
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0
        predicted = sitk.GetArrayFromImage(result.labels) > 0
        rows.append(
            {
                "case": case.case_id,
                "dice": round(dice(predicted, truth), 4),
                "seconds": round(seconds, 2),
            }
        )
    return rows


# -- everything ---------------------------------------------------------------------------------


def train_demo_model(
    work_dir: Path,
    *,
    n_cases: int = 24,
    n_val: int = 2,
    seed: int = 1000,
    out_dir: Path = DEMO_MODEL_DIR,
    eval_patients: int = 4,
    eval_seed: int = 0,
    recipe: DemoRecipe | None = None,
    reuse_pipeline: bool = True,
    notes: str = "",
) -> dict[str, Any]:
    """Make the demo model from scratch: pipeline runs, nnU-Net training, export, evaluation.

    Parameters
    ----------
    work_dir
        Scratch folder for the pipeline outputs and nnU-Net's raw, preprocessed and results
        folders (about 3.3 GB with the defaults).
    n_cases, n_val
        Training and validation exams, made by the pipeline with ``seed`` (exams 1 ..
        ``n_cases`` train, the next ``n_val`` validate).
    seed
        Seed of the training cohort; must differ from ``eval_seed``.
    out_dir
        Where the slim model goes (default ``models/demo-nnunet``).
    eval_patients, eval_seed
        The unseen exams the Dice is measured on (the demo and test seed 0).
    recipe
        Network and schedule (:class:`DemoRecipe` defaults).
    reuse_pipeline
        Use a cohort folder in ``work_dir`` that already holds enough processed exams as it
        is, without running the pipeline (:func:`ensure_cohort`); ``False`` deletes and
        remakes both cohorts.
    notes
        Free text for the model's README.md (e.g. how long an earlier, reused run took).

    Returns
    -------
    dict
        The report also written to ``out_dir/training.json`` and summarised in
        ``out_dir/README.md``: recipe, cases, phase seconds, Dice per unseen exam.
    """
    if seed == eval_seed:
        raise InputError("the training seed must differ from the evaluation seed", step=STEP)
    recipe = recipe or DemoRecipe()
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    train_root, eval_root = work_dir / f"cohort-seed{seed}", work_dir / f"cohort-seed{eval_seed}"
    if not reuse_pipeline:
        shutil.rmtree(train_root, ignore_errors=True)
        shutil.rmtree(eval_root, ignore_errors=True)
    times: dict[str, float] = {}
    cases, train_run = ensure_cohort(
        train_root,
        patients=n_cases + n_val,
        seed=seed,
        threads=recipe.threads,
        reuse=reuse_pipeline,
    )
    times["pipeline_train_s"] = train_run.get("seconds", 0.0)
    train, val = cases[:n_cases], cases[n_cases:]
    started = time.perf_counter()
    nnunet_work = work_dir / "nnunet"
    shutil.rmtree(nnunet_work, ignore_errors=True)
    write_raw_dataset(train, nnunet_work / "nnUNet_raw", val_cases=val)
    times["raw_dataset_s"] = time.perf_counter() - started
    child = train_nnunet(nnunet_work, recipe)
    times |= child["times"]
    started = time.perf_counter()
    files = export_slim_model(Path(child["output_folder"]), out_dir)
    times["export_s"] = time.perf_counter() - started
    eval_cases, eval_run = ensure_cohort(
        eval_root,
        patients=eval_patients,
        seed=eval_seed,
        threads=recipe.threads,
        reuse=reuse_pipeline,
    )
    times["pipeline_eval_s"] = eval_run.get("seconds", 0.0)
    started = time.perf_counter()
    held_out = evaluate_model(out_dir, val, threads=recipe.threads)
    unseen = evaluate_model(out_dir, eval_cases, threads=recipe.threads)
    unseen_mirror = evaluate_model(out_dir, eval_cases, use_mirroring=True, threads=recipe.threads)
    times["evaluate_s"] = time.perf_counter() - started
    report = {
        "command": f"train_demo_model(work_dir, n_cases={n_cases}, n_val={n_val}, seed={seed}, "
        f"eval_patients={eval_patients}, eval_seed={eval_seed})",
        "recipe": asdict(recipe),
        "dataset": DATASET_NAME,
        "plans": PLANS_NAME,
        "configuration": CONFIGURATION,
        "trainer": child["trainer"],
        "train_cases": [c.case_id for c in train],
        "val_cases": [c.case_id for c in val],
        "training_seed": seed,
        "pipeline_command": f"prostate-cohort demo --patients {n_cases + n_val} --seed {seed}",
        "pipeline_runs": {
            "train": {k: v for k, v in train_run.items() if k != "output"},
            "eval": {k: v for k, v in eval_run.items() if k != "output"},
        },
        "iterations": recipe.epochs * recipe.iterations_per_epoch,
        "pseudo_dice_last_epoch": child["pseudo_dice_last"],
        "mean_epoch_s": round(child["epoch_seconds_mean"], 2),
        "dice_val": held_out,
        "dice_unseen": unseen,
        "dice_unseen_mirroring": unseen_mirror,
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "files": files,
        "versions": _versions(),
        "notes": notes,
    }
    write_json_atomic(out_dir / "training.json", report)
    write_text_atomic(out_dir / "README.md", model_readme(report))
    for name in ("training.json", "README.md"):
        (out_dir / name).chmod(0o644)  # the atomic writer's temporary files are 0600
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import version  # noqa: PLC0415

    return {name: version(name) for name in ("nnunetv2", "torch", "SimpleITK")}


def model_readme(report: dict[str, Any]) -> str:
    """The model folder's README.md from a :func:`train_demo_model` report."""
    r = report["recipe"]

    def dice_line(rows: list[dict]) -> str:
        values = [row["dice"] for row in rows]
        seconds = np.mean([row["seconds"] for row in rows])
        return (
            f"mean {np.mean(values):.4f}, min {np.min(values):.4f} (n = {len(values)}); "
            f"{seconds:.1f} s per exam"
        )

    times = "\n".join(f"- `{k}`: {v} s" for k, v in report["times_s"].items())
    notes = f"\n{report['notes']}\n" if report.get("notes") else ""
    return f"""# Demo nnU-Net v2 model: prostate gland from T2W + b1000 DWI + ADC

A small nnU-Net v2 model trained on synthetic exams that the prostate-cohort pipeline itself
made and preprocessed. It is a demo and test model: it has never seen a real exam and must
not be used on one.

- Inputs (`dataset.json` channels): `T2` = N4-corrected T2W; `HBV` = b1000 DWI on the T2
  grid; `ADC` = ADC in mm²/s on the T2 grid. nnU-Net z-scores each channel per image.
- Output: label 1 = `gland`.
- Files: `dataset.json`; `plans.json`, which describes the whole network; and
  `fold_0/checkpoint_final.pth`, which holds the weights only (no optimizer state).
  `training.json` is the full training report.

## How it was made

```bash
.venv/bin/prostate-cohort train-demo-model --work /tmp/demo-train
```

(the same as ``tasks.nnunet_demo.train_demo_model(Path("/tmp/demo-train"))``)

Call: `{report["command"]}`, with the defaults of `DemoRecipe`.

1. Data: `{report["pipeline_command"]}`. Only its preprocessing outputs
   (`*_desc-n4_T2w`, `*_space-T2w_b1000_dwi`, `*_space-T2w_desc-fit_adc`) are used, with
   the truth `demo-cohort/truth/SYN-*/t2_gland_mask.nii.gz`.
   - Training: {len(report["train_cases"])} exams, {report["train_cases"][0]} to \
{report["train_cases"][-1]}.
   - Held-out validation (fold 0 of `splits_final.json`): {", ".join(report["val_cases"])}.
2. Planning and preprocessing: nnU-Net's fingerprint, planner and preprocessing, all in
   `{report["configuration"]}` with plans `{report["plans"]}`. The planner is an
   `ExperimentPlanner` subclass with these settings:
   - U-Net features: {r["base_features"]} to {r["max_features"]}
   - target spacing (z, y, x): {tuple(r["target_spacing"])} mm
   - memory target: {r["gpu_memory_target_gb"]} GB
3. Training: nnU-Net's trainer, `{report["trainer"]}`. This is `nnUNetTrainer` with a
   shorter schedule:
   - {r["epochs"]} epochs x {r["iterations_per_epoch"]} iterations = \
{report["iterations"]} iterations
   - initial lr {r["initial_lr"]}
   - CPU, {r["threads"]} thread(s), seed {r["torch_seed"]}
   - mean epoch: {report["mean_epoch_s"]} s

   The subclass changes only the schedule, so the checkpoint names `nnUNetTrainer` as its
   trainer and nnU-Net's predictor can load it.

Phase times:

{times}

Versions: {", ".join(f"{k} {v}" for k, v in report["versions"].items())}.
{notes}
## Measured Dice (gland, against the synthetic truth; CPU, {r["threads"]} thread)

- held-out seed-{report["training_seed"]} exams: {dice_line(report["dice_val"])}
- unseen seed-0 exams (the demo and test cohort), mirroring off:
  {dice_line(report["dice_unseen"])}
- the same exams, mirroring on: {dice_line(report["dice_unseen_mirroring"])}

`training.json` has the Dice of each exam. Training on CPU is seeded but not guaranteed to
be bit-identical across machines or library versions, so retraining gives a model with a
similar Dice, not the same one.
"""
