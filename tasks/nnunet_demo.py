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
from tasks.segment import DEMO_MODELS
from tasks.segment_backend import check_on_grid

STEP = "nnunet_demo"
DATASET_ID = 731
DATASET_NAME = f"Dataset{DATASET_ID:03d}_ProstateSynthetic"
CHANNEL_NAMES = {"0": "T2", "1": "HBV", "2": "ADC"}
CONFIGURATION = "3d_fullres"
#: Output labels (nnU-Net ``dataset.json`` form) and the truth file they are trained on.
LABELS: dict[str, dict[str, int]] = {
    "gland": {"background": 0, "gland": 1},
    "zones": {"background": 0, "pz": 1, "tz": 2},
}
TRUTH_FILES = {"gland": "t2_gland_mask.nii.gz", "zones": "t2_zones.nii.gz"}
#: Plans name by planner (the ResEnc planner is nnU-Net's ``nnUNetPlannerResEncM``).
PLANS_NAMES = {"default": "nnUNetPlans_demoCPU", "resenc": "nnUNetResEncUNetMPlans_demoCPU"}


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
        CPU threads for torch (and ITK) in training, per fold.
    planner
        ``"default"``: nnU-Net's plain U-Net planner; ``"resenc"``: its residual-encoder
        planner (``nnUNetPlannerResEncM``), the users' model form.
    labels
        ``"gland"`` (label 1) or ``"zones"`` (1 = PZ, 2 = TZ); see :data:`LABELS`.
    n_splits, folds
        ``n_splits`` 1: one split (the training exams, then the held-out ones), fold 0;
        otherwise nnU-Net's ``n_splits``-fold cross-validation over all exams, of which
        ``folds`` are trained (in parallel, one process each).
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
    planner: str = "default"
    labels: str = "gland"
    n_splits: int = 1
    folds: tuple[int, ...] = (0,)

    @property
    def plans_name(self) -> str:
        return PLANS_NAMES[self.planner]


#: The committed demo models: name -> recipe. ``demo`` is the test and demo cohort's model;
#: ``demo-zones`` has the users' model form (ResEnc plans, cross-validation folds, PZ/TZ).
RECIPES: dict[str, DemoRecipe] = {
    "demo": DemoRecipe(),
    "demo-zones": DemoRecipe(planner="resenc", labels="zones", n_splits=5, folds=(0, 1)),
}

#: Training and held-out exams of each model (a cross-validated model validates on its folds).
DEFAULT_CASES: dict[str, tuple[int, int]] = {"demo": (24, 2), "demo-zones": (25, 0)}


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
    output_root: Path,
    *,
    patients: int,
    seed: int,
    threads: int = 1,
    reuse: bool = True,
    truth_file: str = TRUTH_FILES["gland"],
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
            cases = pipeline_cases(output_root, truth_file=truth_file)
        except InputError:
            cases = []
        if len(cases) >= patients:
            return cases[:patients], {"reused": True}
    run = run_pipeline(output_root, patients=patients, seed=seed, threads=threads)
    try:
        cases = pipeline_cases(output_root, truth_file=truth_file)
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
    n_splits: int = 1,
) -> Path:
    """Write ``cases`` (+ ``val_cases``) as an nnU-Net raw dataset; return its folder.

    Outputs
    -------
    ``<raw_root>/Dataset731_ProstateSynthetic/imagesTr/<case>_000{0,1,2}.nii.gz`` (T2, HBV,
    ADC), ``labelsTr/<case>.nii.gz`` (uint8), ``dataset.json`` and ``splits_final.json``:
    with ``n_splits`` 1 one split (train = ``cases``, val = ``val_cases``), otherwise
    nnU-Net's own ``n_splits``-fold split of all cases (``generate_crossval_split``, seed
    12345). Every image gets the T2 header exactly.

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
    if n_splits == 1:
        split = [{"train": [c.case_id for c in cases], "val": [c.case_id for c in val_cases]}]
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split  # noqa: PLC0415

        ids = [c.case_id for c in [*cases, *val_cases]]
        split = generate_crossval_split(ids, seed=12345, n_splits=n_splits)
    write_json_atomic(folder / "splits_final.json", split)
    return folder


# -- planning, preprocessing, training (child process) ------------------------------------------


def _demo_classes(recipe: DemoRecipe) -> tuple[type, type]:
    """The planner and trainer subclasses (nnunetv2 must be imported with its env set)."""
    import torch  # noqa: PLC0415
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (  # noqa: PLC0415
        ExperimentPlanner,
    )
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (  # noqa: PLC0415, E501
        nnUNetPlannerResEncM,
    )
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: PLC0415

    base = nnUNetPlannerResEncM if recipe.planner == "resenc" else ExperimentPlanner

    class DemoCPUPlanner(base):
        """nnU-Net's planner (default or ResEnc M) with a narrower network (features in
        the plans)."""

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


def _seed(recipe: DemoRecipe) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(recipe.threads)
    random.seed(recipe.torch_seed)
    np.random.seed(recipe.torch_seed)
    torch.manual_seed(recipe.torch_seed)


def _child_prepare(recipe: DemoRecipe) -> dict[str, Any]:
    """Fingerprint, plan and preprocess in this (child) process; nnU-Net env already set."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (  # noqa: PLC0415
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    _seed(recipe)
    planner, _ = _demo_classes(recipe)
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
        overwrite_plans_name=recipe.plans_name,
    )
    preprocess_dataset(
        DATASET_ID, recipe.plans_name, (CONFIGURATION,), [1], show_progress_bar=False
    )
    return {"plan_preprocess_s": time.perf_counter() - started}


def _child_train(work: Path, recipe: DemoRecipe, fold: int) -> dict[str, Any]:
    """Train one fold in this (child) process; nnU-Net env already set."""
    import torch  # noqa: PLC0415
    from batchgenerators.utilities.file_and_folder_operations import load_json  # noqa: PLC0415

    _seed(recipe)
    _, trainer_class = _demo_classes(recipe)
    torch.set_num_threads(recipe.threads)
    preprocessed = work / "nnUNet_preprocessed" / DATASET_NAME
    plans = load_json(str(preprocessed / f"{recipe.plans_name}.json"))
    plans["continue_training"] = False  # nnU-Net 2.8's trainer pops this key
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    trainer = trainer_class(
        plans=plans,
        configuration=CONFIGURATION,
        fold=fold,
        dataset_json=dataset_json,
        device=torch.device("cpu"),
    )
    started = time.perf_counter()
    trainer.run_training()
    seconds = time.perf_counter() - started
    log = trainer.logger.get_checkpoint()
    return {
        "fold": fold,
        "train_s": seconds,
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
    """Entry of a training child process: ``argv[1]`` work dir, ``argv[2]`` recipe JSON,
    ``argv[3]`` ``prepare`` or the fold to train; the result goes to ``argv[4]``."""
    work, recipe = Path(sys.argv[1]), DemoRecipe(**json.loads(sys.argv[2]))
    action = sys.argv[3]
    result = (
        _child_prepare(recipe) if action == "prepare" else _child_train(work, recipe, int(action))
    )
    write_json_atomic(Path(sys.argv[4]), result)


def _start_child(work: Path, recipe: DemoRecipe, action: str) -> tuple[subprocess.Popen, Path]:
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
    result, log = work / f"child_{action}.json", work / f"child_{action}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(work), json.dumps(asdict(recipe)), action, result],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
    return process, log


def _finish(process: subprocess.Popen, log: Path) -> dict[str, Any]:
    if process.wait() != 0:
        raise RuntimeError(f"nnU-Net training failed, see {log}:\n{log.read_text()[-4000:]}")
    return json.loads(log.with_suffix(".json").read_text())


def train_nnunet(work: Path, recipe: DemoRecipe) -> dict[str, Any]:
    """Fingerprint, plan, preprocess and train ``recipe.folds`` of the raw dataset in ``work``.

    Child processes with ``nnUNet_raw`` = ``work/nnUNet_raw`` (written by
    :func:`write_raw_dataset`), ``nnUNet_preprocessed`` and ``nnUNet_results`` under ``work``,
    data augmentation in-process (``nnUNet_n_proc_DA=0``) and ``recipe.threads`` threads
    each: one plans and preprocesses, then one per fold trains, all folds at once.

    Returns
    -------
    dict
        ``times`` (plan_preprocess_s, train_s = the longest fold), ``output_folder`` (the
        nnU-Net training output), trainer name, and per fold (``per_fold``) the last pseudo
        Dice and loss and the mean epoch seconds.
    """
    work = Path(work)
    prepared = _finish(*_start_child(work, recipe, "prepare"))
    started = time.perf_counter()
    children = [_start_child(work, recipe, str(fold)) for fold in recipe.folds]
    folds = [_finish(*child) for child in children]
    return {
        "times": {
            "plan_preprocess_s": prepared["plan_preprocess_s"],
            "train_s": time.perf_counter() - started,
        },
        "output_folder": folds[0]["output_folder"],
        "trainer": folds[0]["trainer"],
        "per_fold": folds,
    }


# -- export and evaluation ----------------------------------------------------------------------


def export_slim_model(
    training_folder: Path, out_dir: Path, *, folds: Sequence[int] = (0,)
) -> dict[str, Any]:
    """Copy the inference part of an nnU-Net training output to ``out_dir``.

    Outputs
    -------
    ``out_dir/dataset.json``, ``out_dir/plans.json``, ``out_dir/fold_<k>/checkpoint_final.pth``
    for every fold, holding ``network_weights``, ``init_args`` (configuration, fold),
    ``trainer_name`` (``nnUNetTrainer``), ``trained_with``, ``inference_allowed_mirroring_axes`` and
    ``current_epoch``. Other files in ``out_dir`` are left alone.

    Returns
    -------
    dict
        Size in bytes and sha256 of every written file.
    """
    training_folder, out_dir = Path(training_folder), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copyfile(training_folder / name, out_dir / name)
    files = [out_dir / "dataset.json", out_dir / "plans.json"]
    for fold in folds:
        files.append(_export_fold(training_folder, out_dir, fold))
    return {
        str(p.relative_to(out_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
    }


def _export_fold(training_folder: Path, out_dir: Path, fold: int) -> Path:
    import torch  # noqa: PLC0415

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
    shutil.rmtree(out_dir / f"fold_{fold}", ignore_errors=True)
    (out_dir / f"fold_{fold}").mkdir(parents=True)
    target = out_dir / f"fold_{fold}" / "checkpoint_final.pth"
    torch.save(slim, target)
    return target


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def evaluate_model(
    model_dir: Path,
    cases: list[TrainingCase],
    *,
    use_mirroring: bool = False,
    threads: int = 1,
    folds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Dice against each case's mask, and seconds: ``dice`` of the gland (all foreground
    labels), and ``dice_<label>`` for every label of a multi-label model (label values as
    in the truth). ``folds``: the folds to ensemble (default: all)."""
    import torch  # noqa: PLC0415

    from tasks.segment import SegmentationInputs, SegmentationParams  # noqa: PLC0415
    from tasks.segment_nnunet import NnUNetBackend  # noqa: PLC0415

    torch.set_num_threads(threads)
    params = SegmentationParams(
        device="cpu",
        use_mirroring=use_mirroring,
        threads=threads,
        folds=None if folds is None else tuple(folds),
    )
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
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask)))
        predicted = sitk.GetArrayFromImage(result.labels)
        row = {"case": case.case_id, "dice": round(dice(predicted > 0, truth > 0), 4)}
        if len(result.label_names) > 1:
            for value, name in sorted(result.label_names.items()):
                row[f"dice_{name}"] = round(dice(predicted == value, truth == value), 4)
        rows.append(row | {"seconds": round(seconds, 2)})
    return rows


# -- everything ---------------------------------------------------------------------------------


def train_demo_model(
    work_dir: Path,
    *,
    name: str = "demo",
    n_cases: int = 24,
    n_val: int = 2,
    seed: int = 1000,
    out_dir: Path | None = None,
    eval_patients: int = 4,
    eval_seed: int = 0,
    recipe: DemoRecipe | None = None,
    reuse_pipeline: bool = True,
    notes: str = "",
    check_mirroring: bool = True,
) -> dict[str, Any]:
    """Make the demo model from scratch: pipeline runs, nnU-Net training, export, evaluation.

    Parameters
    ----------
    work_dir
        Scratch folder for the pipeline outputs and nnU-Net's raw, preprocessed and results
        folders (about 3.3 GB with the defaults).
    name
        Which demo model (:data:`RECIPES`, :data:`tasks.segment.DEMO_MODELS`).
    n_cases, n_val
        Training and validation exams, made by the pipeline with ``seed`` (exams 1 ..
        ``n_cases`` train, the next ``n_val`` validate).
    seed
        Seed of the training cohort; must differ from ``eval_seed``.
    out_dir
        Where the slim model goes (default: the model's folder under ``models/``).
    eval_patients, eval_seed
        The unseen exams the Dice is measured on (the demo and test seed 0).
    recipe
        Network, labels, folds and schedule (default ``RECIPES[name]``).
    reuse_pipeline
        Use a cohort folder in ``work_dir`` that already holds enough processed exams as it
        is, without running the pipeline (:func:`ensure_cohort`); ``False`` deletes and
        remakes both cohorts.
    notes
        Free text for the model's README.md (e.g. how long an earlier, reused run took).
    check_mirroring
        Also measure the Dice on the unseen exams with test-time mirroring (8x slower).

    Returns
    -------
    dict
        The report also written to ``out_dir/training.json`` and summarised in
        ``out_dir/README.md``: recipe, cases, phase seconds, Dice per unseen exam.
    """
    if seed == eval_seed:
        raise InputError("the training seed must differ from the evaluation seed", step=STEP)
    recipe = recipe or RECIPES[name]
    work_dir, out_dir = Path(work_dir), Path(out_dir or DEMO_MODELS[name])
    train_root, eval_root = work_dir / f"cohort-seed{seed}", work_dir / f"cohort-seed{eval_seed}"
    if not reuse_pipeline:
        shutil.rmtree(train_root, ignore_errors=True)
        shutil.rmtree(eval_root, ignore_errors=True)
    times: dict[str, float] = {}
    truth_file = TRUTH_FILES[recipe.labels]
    cases, train_run = ensure_cohort(
        train_root,
        patients=n_cases + n_val,
        seed=seed,
        threads=recipe.threads,
        reuse=reuse_pipeline,
        truth_file=truth_file,
    )
    times["pipeline_train_s"] = train_run.get("seconds", 0.0)
    train, val = cases[:n_cases], cases[n_cases:]
    started = time.perf_counter()
    nnunet_work = work_dir / "nnunet"
    shutil.rmtree(nnunet_work, ignore_errors=True)
    raw = write_raw_dataset(
        train,
        nnunet_work / "nnUNet_raw",
        val_cases=val,
        labels=LABELS[recipe.labels],
        n_splits=recipe.n_splits,
    )
    splits = json.loads((raw / "splits_final.json").read_text())
    times["raw_dataset_s"] = time.perf_counter() - started
    child = train_nnunet(nnunet_work, recipe)
    times |= child["times"]
    started = time.perf_counter()
    files = export_slim_model(Path(child["output_folder"]), out_dir, folds=recipe.folds)
    times["export_s"] = time.perf_counter() - started
    eval_cases, eval_run = ensure_cohort(
        eval_root,
        patients=eval_patients,
        seed=eval_seed,
        threads=recipe.threads,
        reuse=reuse_pipeline,
        truth_file=truth_file,
    )
    times["pipeline_eval_s"] = eval_run.get("seconds", 0.0)
    started = time.perf_counter()
    by_id = {c.case_id: c for c in cases}
    held_out = [  # each fold's own validation exams, with that fold alone
        row | {"fold": fold}
        for fold in recipe.folds
        for row in evaluate_model(
            out_dir,
            [by_id[i] for i in splits[fold]["val"]],
            threads=recipe.threads,
            folds=[fold],
        )
    ]
    unseen = evaluate_model(out_dir, eval_cases, threads=recipe.threads)
    unseen_mirror = (
        evaluate_model(out_dir, eval_cases, use_mirroring=True, threads=recipe.threads)
        if check_mirroring
        else []
    )
    times["evaluate_s"] = time.perf_counter() - started
    report = {
        "name": name,
        "command": f"train_demo_model(work_dir, name={name!r}, n_cases={n_cases}, "
        f"n_val={n_val}, seed={seed}, "
        f"eval_patients={eval_patients}, eval_seed={eval_seed})",
        "recipe": asdict(recipe),
        "dataset": DATASET_NAME,
        "plans": recipe.plans_name,
        "labels": LABELS[recipe.labels],
        "truth_file": truth_file,
        "configuration": CONFIGURATION,
        "trainer": child["trainer"],
        "train_cases": [c.case_id for c in train],
        "val_cases": [c.case_id for c in val],
        "splits": [splits[fold] for fold in recipe.folds],
        "training_seed": seed,
        "pipeline_command": f"prostate-cohort demo --patients {n_cases + n_val} --seed {seed}",
        "pipeline_runs": {
            "train": {k: v for k, v in train_run.items() if k != "output"},
            "eval": {k: v for k, v in eval_run.items() if k != "output"},
        },
        "iterations": recipe.epochs * recipe.iterations_per_epoch,
        "pseudo_dice_last_epoch": [f["pseudo_dice_last"] for f in child["per_fold"]],
        "mean_epoch_s": round(
            float(np.mean([f["epoch_seconds_mean"] for f in child["per_fold"]])), 2
        ),
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
    labels = {k: v for k, v in report.get("labels", LABELS["gland"]).items() if v}
    folds = list(r.get("folds", [0]))
    resenc = r.get("planner", "default") == "resenc"

    def dice_line(rows: list[dict]) -> str:
        if not rows:
            return "not measured"
        seconds = np.mean([row["seconds"] for row in rows])
        keys = ["dice"] + [f"dice_{name}" for name in labels if len(labels) > 1]
        parts = []
        for key in keys:
            values = [row[key] for row in rows]
            name = "gland" if key == "dice" else key.removeprefix("dice_")
            parts.append(f"{name} mean {np.mean(values):.4f}, min {np.min(values):.4f}")
        return f"{'; '.join(parts)} (n = {len(rows)}); {seconds:.1f} s per exam"

    times = "\n".join(f"- `{k}`: {v} s" for k, v in report["times_s"].items())
    notes = f"\n{report['notes']}\n" if report.get("notes") else ""
    outputs = ", ".join(f"{v} = `{k}`" for k, v in labels.items())
    fold_files = ", ".join(f"`fold_{f}/checkpoint_final.pth`" for f in folds)
    planner = "a `nnUNetPlannerResEncM` (residual encoder)" if resenc else "an `ExperimentPlanner`"
    if r.get("n_splits", 1) == 1:
        split = (
            f"   - Training: {len(report['train_cases'])} exams, {report['train_cases'][0]} to "
            f"{report['train_cases'][-1]}.\n"
            f"   - Held-out validation (fold 0 of `splits_final.json`): "
            f"{', '.join(report['val_cases'])}."
        )
    else:
        cases = [*report["train_cases"], *report["val_cases"]]
        split = (
            f"   - {len(cases)} exams, {cases[0]} to {cases[-1]}, in nnU-Net's "
            f"{r['n_splits']}-fold cross-validation split; folds {folds} trained, each "
            "validated on its own held-out exams:\n"
            + "\n".join(
                f"     fold {f}: {', '.join(s['val'])}"
                for f, s in zip(folds, report["splits"], strict=True)
            )
        )
    mirroring = report.get("dice_unseen_mirroring") or []
    skip_mirroring = "" if mirroring else " --skip-mirroring-check"
    holds = "holds" if len(folds) == 1 else "hold"
    mirror_line = f"\n- the same exams, mirroring on: {dice_line(mirroring)}" if mirroring else ""
    return f"""# Demo nnU-Net v2 model: prostate {"zones" if len(labels) > 1 else "gland"} \
from T2W + b1000 DWI + ADC

A small nnU-Net v2 model trained on synthetic exams that the prostate-cohort pipeline itself
made and preprocessed. It is a demo and test model: it has never seen a real exam and must
not be used on one.

- Inputs (`dataset.json` channels): `T2` = N4-corrected T2W; `HBV` = b1000 DWI on the T2
  grid; `ADC` = ADC in mm²/s on the T2 grid. nnU-Net z-scores each channel per image.
- Output: {outputs}.
- Files: `dataset.json`; `plans.json`, which describes the whole network; and
  {fold_files}, which {holds} the weights only (no optimizer state).
  `training.json` is the full training report.

## How it was made

```bash
.venv/bin/prostate-cohort train-demo-model --model {report.get("name", "demo")} \
--cases {len(report["train_cases"])} --val {len(report["val_cases"])}{skip_mirroring} \
--work /tmp/demo-train
```

Call: `{report["command"]}`, with the recipe in `training.json`.

1. Data: `{report["pipeline_command"]}`. Only its preprocessing outputs
   (`*_desc-n4_T2w`, `*_space-T2w_b1000_dwi`, `*_space-T2w_desc-fit_adc`) are used, with
   the truth `demo-cohort/truth/SYN-*/{report.get("truth_file", TRUTH_FILES["gland"])}`.
{split}
2. Planning and preprocessing: nnU-Net's fingerprint, planner and preprocessing, all in
   `{report["configuration"]}` with plans `{report["plans"]}`. The planner is
   {planner} subclass with these settings:
   - features: {r["base_features"]} to {r["max_features"]}
   - target spacing (z, y, x): {tuple(r["target_spacing"])} mm
   - memory target: {r["gpu_memory_target_gb"]} GB
3. Training: nnU-Net's trainer, `{report["trainer"]}`. This is `nnUNetTrainer` with a
   shorter schedule:
   - {r["epochs"]} epochs x {r["iterations_per_epoch"]} iterations = \
{report["iterations"]} iterations per fold
   - initial lr {r["initial_lr"]}
   - CPU, {r["threads"]} thread(s) per fold, seed {r["torch_seed"]}
   - mean epoch: {report["mean_epoch_s"]} s

   The subclass changes only the schedule, so the checkpoints name `nnUNetTrainer` as their
   trainer and nnU-Net's predictor can load them.

Phase times:

{times}

Versions: {", ".join(f"{k} {v}" for k, v in report["versions"].items())}.
{notes}
## Measured Dice (against the synthetic truth; CPU, {r["threads"]} thread)

- held-out seed-{report["training_seed"]} exams, each with its own fold: \
{dice_line(report["dice_val"])}
- unseen seed-0 exams (the demo and test cohort), {len(folds)} fold(s) ensembled, mirroring
  off: {dice_line(report["dice_unseen"])}{mirror_line}

`training.json` has the Dice of each exam. Training on CPU is seeded but not guaranteed to
be bit-identical across machines or library versions, so retraining gives a model with a
similar Dice, not the same one.
"""
