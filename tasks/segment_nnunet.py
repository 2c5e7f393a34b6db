"""nnU-Net v2 backend: any trained model folder, loaded once, predicting in this process.

A model folder is what ``nnUNetv2_train`` leaves in ``nnUNet_results`` (or what
``nnUNetv2_export_model_to_zip`` packs)::

    <folder>/dataset.json                  channel names, labels, file ending
    <folder>/plans.json                    preprocessing and network architecture
    <folder>/fold_<k>/<checkpoint>.pth     trained weights, one folder per fold

The network's input channels are matched to our image roles (``"t2w"``, ``"dwi_b1000"``,
``"adc"``) by the channel names in ``dataset.json``: first ``SegmentationParams.channel_map``
(exact name), then :data:`CHANNEL_ALIASES` (case-insensitive). Every channel must lie on the
T2 grid. The folds are ensembled as ``nnUNetv2_predict`` does: their logits averaged, then
the softmax (the masks equal ``nnUNetv2_predict_from_modelfolder``'s; tested). Prediction
runs in-process (no worker processes, so it works inside Prefect and Dask
workers): nnU-Net's own preprocessing (crop, resample to the model's spacing, normalise),
sliding-window inference and resampling of the probabilities back to the T2 grid.

Axis order: SimpleITK arrays are (z, y, x) and nnU-Net's ``SimpleITKIO`` reads images exactly
so, with spacing reversed to (z, y, x) in mm; this backend hands nnU-Net the same arrays and
spacing without writing files.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from tasks.errors import InputError
from tasks.io import sha256_files
from tasks.segment_backend import (
    STEP,
    SegmentationInputs,
    SegmentationParams,
    SegmentationResult,
    check_on_grid,
    labels_like,
)

#: nnU-Net channel name (lower case) -> our image role. ``"CT"`` is how nnU-Net datasets
#: usually name ADC, so that nnU-Net normalises it with dataset-wide statistics (PI-CAI).
CHANNEL_ALIASES: dict[str, str] = {
    "t2": "t2w",
    "t2w": "t2w",
    "t2-w": "t2w",
    "t2_w": "t2w",
    "t2_tse": "t2w",
    "hbv": "dwi_b1000",
    "b1000": "dwi_b1000",
    "dwi": "dwi_b1000",
    "dwi_b1000": "dwi_b1000",
    "adc": "adc",
    "ct": "adc",
}

ROLES = ("t2w", "dwi_b1000", "adc")

#: ADC units a model may have been trained with -> factor from our ADC in mm²/s.
ADC_UNITS: dict[str, float] = {"mm2/s": 1.0, "1e-3 mm2/s": 1e3, "1e-6 mm2/s": 1e6}
#: A typical prostate ADC in mm²/s, to tell the training data's unit from its median.
_TYPICAL_ADC_MM2_S = 1.2e-3

#: How nnU-Net's reader classes orient arrays: ``None`` = as SimpleITK reads them (z, y, x);
#: otherwise the code given to ``sitk.DICOMOrient`` that yields the reader's array.
#: ``NibabelIO`` transposes nibabel's (x, y, z) array to the SimpleITK order, so it is ``None``;
#: both reorienting readers equal ``DICOMOrient(image, "RAS")`` (checked against nnunetv2 2.8.1
#: on oblique and permuted directions).
_READER_ORIENTATION: dict[str, str | None] = {
    "SimpleITKIO": None,
    "NibabelIO": None,
    "SimpleITKIOWithReorient": "RAS",
    "NibabelIOWithReorient": "RAS",
}


def map_channels(
    channel_names: dict[str, str], channel_map: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """Image role for every network input channel, in channel order.

    Parameters
    ----------
    channel_names
        ``dataset.json["channel_names"]``: channel index (as a string) -> name.
    channel_map
        Overrides: channel name -> role (exact name).

    Returns
    -------
    list of (name, role)
        One entry per channel, ordered by channel index.

    Raises
    ------
    InputError
        If a channel name maps to no role, to an unknown role, or two channels to one role.
    """
    channel_map = channel_map or {}
    try:
        ordered = sorted(channel_names.items(), key=lambda item: int(item[0]))
    except (TypeError, ValueError):
        raise InputError(
            f"dataset.json channel_names keys must be channel indices, got {list(channel_names)}",
            step=STEP,
        ) from None
    mapped: list[tuple[str, str]] = []
    for _, name in ordered:
        role = channel_map.get(name) or CHANNEL_ALIASES.get(str(name).strip().lower())
        if role is None:
            raise InputError(
                f"cannot map nnU-Net channel {name!r} to an image role",
                step=STEP,
                hint=f"set segmentation.channel_map, e.g. {{{name!r}: 't2w'}}; roles: {ROLES}",
            )
        if role not in ROLES:
            raise InputError(
                f"channel {name!r} is mapped to unknown role {role!r}",
                step=STEP,
                hint=f"roles are {ROLES}",
            )
        mapped.append((name, role))
    roles = [role for _, role in mapped]
    if len(set(roles)) != len(roles):
        raise InputError(
            f"several nnU-Net channels map to the same image role: {mapped}",
            step=STEP,
            hint="give each channel its own role in segmentation.channel_map",
        )
    return mapped


def label_names(
    dataset_json: dict[str, Any], regions_class_order: list[int] | None
) -> dict[int, str]:
    """Output label value -> name from ``dataset.json["labels"]`` (background and ignore excluded).

    Region-based models (a label given as a list of values) write ``regions_class_order[i]``
    for the i-th region.
    """
    names: dict[int, str] = {}
    regions = [
        (name, value)
        for name, value in dataset_json["labels"].items()
        if name not in ("background", "ignore") and value not in (0, [0], (0,))
    ]
    if any(isinstance(value, list | tuple) for _, value in regions):
        order = regions_class_order or list(range(1, len(regions) + 1))
        for (name, _), out in zip(regions, order, strict=False):
            names[int(out)] = name
        return names
    for name, value in regions:
        names[int(value)] = name
    return names


def model_adc_unit(plans: dict[str, Any], channel: int) -> str | None:
    """The ADC unit a model was trained on, from the median of its training ADC inside the
    labels (``plans["foreground_intensity_properties_per_channel"]``): the unit of
    :data:`ADC_UNITS` in which a typical prostate ADC (1.2e-3 mm²/s) is nearest that median,
    by order of magnitude (units lie 3 decades apart, so the choice is unambiguous for any
    tissue ADC). ``None`` when the plans do not record it.
    """
    properties = plans.get("foreground_intensity_properties_per_channel", {}).get(str(channel))
    median = (properties or {}).get("median")
    if not median or median <= 0:
        return None
    return min(
        ADC_UNITS,
        key=lambda u: abs(np.log10(median) - np.log10(_TYPICAL_ADC_MM2_S * ADC_UNITS[u])),
    )


def adc_unit(
    folder: Path,
    plans: dict[str, Any],
    channels: list[tuple[str, str]],
    params: SegmentationParams,
) -> str | None:
    """The ADC unit the model takes: ``params.adc_unit``, or with ``"auto"`` the unit read
    from its plans (:func:`model_adc_unit`); ``None`` when no channel is the ADC.

    Raises
    ------
    InputError
        With ``"auto"``, if the plans do not record the training ADC.
    """
    index = next((i for i, (_, role) in enumerate(channels) if role == "adc"), None)
    if index is None:
        return None
    if params.adc_unit != "auto":
        return params.adc_unit
    unit = model_adc_unit(plans, index)
    if unit is None:
        raise InputError(
            "the model's plans do not record its training ADC, so its ADC unit is unknown",
            step=STEP,
            path=folder / "plans.json",
            hint="set segmentation.adc_unit (PI-CAI models: '1e-6 mm2/s')",
        )
    return unit


def _first_conv_in_channels(state_dict: dict[str, Any]) -> int | None:
    """Input channels of the first convolution in a state dict (registration order)."""
    for value in state_dict.values():
        if hasattr(value, "ndim") and value.ndim >= 4:  # conv weight (out, in, *kernel)
            return int(value.shape[1])
    return None


class NnUNetBackend:
    """A trained nnU-Net v2 model, loaded once; ``segment`` predicts one exam in-process.

    Parameters
    ----------
    folder
        The model folder (``dataset.json``, ``plans.json``, ``fold_<k>/<checkpoint>``).
    params
        Device, folds, checkpoint name, mirroring, tile step, channel map, CPU threads.
    name
        Model name in results and provenance (default: the folder name).

    Attributes
    ----------
    name : str
    model_hash : str
        sha256 over ``dataset.json``, ``plans.json`` and the checkpoints of the used folds.
    channels : list of (str, str)
        (nnU-Net channel name, image role) in channel order.
    label_names : dict of int to str
        Output label value -> name, background excluded (e.g. ``{1: "gland"}``).
    adc_unit : str or None
        The ADC unit the model takes (``params.adc_unit``, or read from the plans); our ADC
        (mm²/s) is multiplied by ``ADC_UNITS[adc_unit]``. ``None`` without an ADC channel.
    normalization : dict of str to str
        nnU-Net's normalisation per channel name (``ZScoreNormalization``: per image, so the
        unit does not matter; ``CTNormalization``: with the training data's statistics, so
        it does).
    predictor : nnunetv2.inference.predict_from_raw_data.nnUNetPredictor

    Raises
    ------
    InputError
        If the folder, ``dataset.json``, ``plans.json``, a fold or a checkpoint is missing,
        a channel cannot be mapped to an image role, the checkpoint does not fit the plans
        (e.g. a different number of input channels), or CUDA is asked for but not available.
    """

    def __init__(
        self, folder: str | Path, *, params: SegmentationParams, name: str | None = None
    ) -> None:
        folder = Path(folder)
        self.folder = folder
        self.params = params
        self.name = name or folder.name
        dataset_json, plans = self._read_model_files(folder)
        self.channels = map_channels(dataset_json.get("channel_names", {}), params.channel_map)
        check_checkpoints(folder, params, dataset_json, plans)
        reader = plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in _READER_ORIENTATION:
            raise InputError(
                f"model reads images with {reader!r}; supported: {sorted(_READER_ORIENTATION)}",
                step=STEP,
                path=folder / "plans.json",
            )
        self._orientation = _READER_ORIENTATION[reader]
        self.folds = self._folds(folder, params)
        checkpoints = [folder / f"fold_{f}" / params.checkpoint for f in self.folds]
        self.model_hash = sha256_files(
            [folder / "dataset.json", folder / "plans.json", *checkpoints]
        )
        self.device = self._device(params.device)
        self._lock = threading.Lock()
        self.predictor = self._load(folder, checkpoints, len(self.channels))
        self.label_names = label_names(
            dataset_json, self.predictor.label_manager.regions_class_order
        )
        schemes = self.predictor.configuration_manager.normalization_schemes
        self.normalization = {
            name: scheme for (name, _), scheme in zip(self.channels, schemes, strict=True)
        }
        self.adc_unit = adc_unit(folder, plans, self.channels, params)

    # -- construction -----------------------------------------------------------------------

    @staticmethod
    def _read_model_files(folder: Path) -> tuple[dict, dict]:
        if not folder.is_dir():
            raise InputError(
                "nnU-Net model folder does not exist",
                step=STEP,
                path=folder,
                hint="set segmentation.model to a trained nnU-Net v2 model folder",
            )
        loaded = []
        for file in ("dataset.json", "plans.json"):
            if not (folder / file).is_file():
                raise InputError(
                    f"nnU-Net model folder has no {file}",
                    step=STEP,
                    path=folder,
                    hint="use the folder nnUNetv2_train wrote: <trainer>__<plans>__<configuration>",
                )
            try:
                loaded.append(json.loads((folder / file).read_text()))
            except (OSError, ValueError) as exc:
                raise InputError(
                    f"cannot read {file}: {exc}", step=STEP, path=folder / file
                ) from None
        dataset_json, plans = loaded
        if not isinstance(dataset_json.get("channel_names"), dict) or not dataset_json.get(
            "labels"
        ):
            raise InputError(
                "dataset.json lacks channel_names or labels",
                step=STEP,
                path=folder / "dataset.json",
            )
        return dataset_json, plans

    @staticmethod
    def _folds(folder: Path, params: SegmentationParams) -> list[int | str]:
        """The folds to ensemble. ``params.folds`` ``None``: like nnU-Net's auto-detection,
        every ``fold_<k>`` folder that holds the checkpoint (``fold_all`` only if it is the
        sole one, since it was trained on the validation cases of the others)."""
        available = sorted(
            (p.name.removeprefix("fold_") for p in folder.glob("fold_*") if p.is_dir()),
            key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f),
        )
        if not available:
            raise InputError(
                "nnU-Net model folder has no fold_* folder",
                step=STEP,
                path=folder,
                hint="train at least one fold, or point at the folder that holds fold_0, ...",
            )
        if params.folds is None:
            wanted = [f for f in available if (folder / f"fold_{f}" / params.checkpoint).is_file()]
            numeric = [f for f in wanted if f.isdigit()]
            wanted = numeric or wanted
            if not wanted:
                raise InputError(
                    f"no fold folder has the checkpoint {params.checkpoint!r}",
                    step=STEP,
                    path=folder,
                    hint="set segmentation.checkpoint (e.g. checkpoint_best.pth)",
                )
        else:
            wanted = [str(f) for f in params.folds]
        for fold in wanted:
            if fold not in available:
                raise InputError(
                    f"fold {fold} is not in the model (available: {available})",
                    step=STEP,
                    path=folder,
                    hint="set segmentation.folds to available folds",
                )
            if not (folder / f"fold_{fold}" / params.checkpoint).is_file():
                raise InputError(
                    f"fold_{fold} has no checkpoint {params.checkpoint!r}",
                    step=STEP,
                    path=folder / f"fold_{fold}",
                    hint="set segmentation.checkpoint (e.g. checkpoint_best.pth)",
                )
        return [int(f) if f.isdigit() else f for f in wanted]

    @property
    def uses_gpu(self) -> bool:
        """True when the predictor runs on a CUDA device."""
        return self.device.type == "cuda"

    @staticmethod
    def _device(choice: str):
        import torch  # noqa: PLC0415

        if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise InputError(
                    "segmentation.device is 'cuda' but torch sees no CUDA device",
                    step=STEP,
                    hint="set segmentation.device to 'cpu' or 'auto'",
                )
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def _load(self, folder: Path, checkpoints: list[Path], n_channels: int):
        import torch  # noqa: PLC0415
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: PLC0415

        if self.device.type == "cpu":
            torch.set_num_threads(self.params.threads)
        predictor = nnUNetPredictor(
            tile_step_size=self.params.tile_step_size,
            use_gaussian=True,
            use_mirroring=self.params.use_mirroring,
            perform_everything_on_device=self.device.type == "cuda",
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        try:
            predictor.initialize_from_trained_model_folder(
                str(folder), tuple(self.folds), self.params.checkpoint
            )
        except (RuntimeError, KeyError, ValueError) as exc:
            raise InputError(
                f"nnU-Net cannot build the model from its files: {exc}",
                step=STEP,
                path=folder,
                hint="plans.json, dataset.json and the checkpoints must come from one training",
            ) from None
        return predictor

    # -- prediction ---------------------------------------------------------------------------

    def _array(self, image: sitk.Image) -> np.ndarray:
        if self._orientation is not None:
            image = sitk.DICOMOrient(image, self._orientation)
        return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)

    def _back(self, array: np.ndarray, t2: sitk.Image) -> np.ndarray:
        """A (..., z, y, x) array in the reader's orientation back onto the T2 array order."""
        if self._orientation is None:
            return array
        reference = sitk.DICOMOrient(t2, self._orientation)
        code = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(t2.GetDirection())
        out = []
        for volume in array.reshape(-1, *array.shape[-3:]):
            image = sitk.GetImageFromArray(np.ascontiguousarray(volume))
            image.CopyInformation(reference)
            out.append(sitk.GetArrayFromImage(sitk.DICOMOrient(image, code)))
        return np.stack(out).reshape(*array.shape[:-3], *out[0].shape)

    def segment(self, inputs: SegmentationInputs) -> SegmentationResult:
        """Segment one exam.

        Parameters
        ----------
        inputs
            The exam's images on the T2 grid; the model's channels decide which are needed.

        Returns
        -------
        SegmentationResult
            uint8 labels on the T2 grid, :attr:`label_names`, and ``probabilities`` of shape
            (labels + 1, z, y, x) float32 on the T2 grid. ``details`` holds folds, device,
            mirroring, tile step, the channel -> role map and the prediction time in s.

        Raises
        ------
        InputError
            If an image the model needs is missing or not on the T2 grid.
        """
        import torch  # noqa: PLC0415
        from nnunetv2.inference.export_prediction import (  # noqa: PLC0415
            convert_predicted_logits_to_segmentation_with_correct_shape as to_t2_shape,
        )

        t2 = inputs.t2w
        arrays = []
        for name, role in self.channels:
            image = getattr(inputs, role)
            if image is None:
                raise InputError(
                    f"model {self.name!r} needs channel {name!r} ({role}) but it is missing",
                    step=STEP,
                    hint=f"provide the {role} image on the T2 grid",
                )
            check_on_grid(image, t2, role)
            array = self._array(image)
            if role == "adc":
                array = array * np.float32(ADC_UNITS[self.adc_unit])
            arrays.append(array)
        data = np.stack(arrays)
        spacing = (
            sitk.DICOMOrient(t2, self._orientation).GetSpacing()
            if self._orientation
            else t2.GetSpacing()
        )
        properties = {"spacing": [abs(float(s)) for s in spacing[::-1]]}  # (z, y, x) mm

        started = time.perf_counter()
        predictor = self.predictor
        with self._lock:  # one prediction at a time: fold weights are swapped into one network
            if self.device.type == "cpu":
                torch.set_num_threads(self.params.threads)
            # The two halves of nnUNetPredictor.predict_single_npy_array, so that the
            # resampling back to the T2 grid uses our thread count, not nnU-Net's default 8.
            preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
            image, _, properties = preprocessor.run_case_npy(
                data,
                None,
                properties,
                predictor.plans_manager,
                predictor.configuration_manager,
                predictor.dataset_json,
            )
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(image))
            segmentation, probabilities = to_t2_shape(
                logits.cpu(),
                predictor.plans_manager,
                predictor.configuration_manager,
                predictor.label_manager,
                properties,
                return_probabilities=True,
                num_threads_torch=self.params.threads,
            )
        seconds = time.perf_counter() - started
        segmentation = self._back(np.asarray(segmentation), t2)
        probabilities = self._back(np.asarray(probabilities, dtype=np.float32), t2)
        return SegmentationResult(
            labels=labels_like(segmentation, t2),
            label_names=dict(self.label_names),
            model=self.name,
            model_hash=self.model_hash,
            probabilities=probabilities,
            details={
                "folds": list(self.folds),
                "checkpoint": self.params.checkpoint,
                "device": str(self.device),
                "use_mirroring": self.params.use_mirroring,
                "tile_step_size": self.params.tile_step_size,
                "channels": {name: role for name, role in self.channels},
                "adc_unit": self.adc_unit,
                "normalization": dict(self.normalization),
                "seconds": round(seconds, 3),
            },
        )


def check_checkpoints(
    folder: Path, params: SegmentationParams, dataset_json: dict[str, Any], plans: dict[str, Any]
) -> None:
    """Every used fold's checkpoint fits the plans: readable, trained in a configuration of
    ``plans.json``, taking the channels of ``dataset.json``, and with weights of exactly
    the shapes of the network the plans describe (built on CPU, weights loaded strictly).

    Raises
    ------
    InputError
        Naming the checkpoint and the mismatch.
    """
    import torch  # noqa: PLC0415
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: PLC0415
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # noqa: PLC0415

    n_channels = len(dataset_json["channel_names"])
    plans_manager = PlansManager(plans)
    n_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    mismatch = "plans.json, dataset.json and the checkpoints must come from one training"
    for fold in NnUNetBackend._folds(folder, params):
        path = folder / f"fold_{fold}" / params.checkpoint
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            weights = checkpoint["network_weights"]
            configuration = checkpoint["init_args"]["configuration"]
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is bad input
            raise InputError(f"cannot read checkpoint: {exc!r}", step=STEP, path=path) from None
        if configuration not in plans.get("configurations", {}):
            raise InputError(
                f"checkpoint was trained in configuration {configuration!r}, which plans.json "
                f"lacks (has {sorted(plans.get('configurations', {}))})",
                step=STEP,
                path=path,
                hint=mismatch,
            )
        expected = _first_conv_in_channels(weights)
        if expected is not None and expected != n_channels:
            raise InputError(
                f"dataset.json names {n_channels} channel(s) but the network takes {expected}",
                step=STEP,
                path=path,
                hint="dataset.json and the checkpoint come from different models",
            )
        manager = plans_manager.get_configuration(configuration)
        network = get_network_from_plans(
            manager.network_arch_class_name,
            manager.network_arch_init_kwargs,
            manager.network_arch_init_kwargs_req_import,
            n_channels,
            n_outputs,
            allow_init=False,
            deep_supervision=True,
        )
        problem = _weights_problem(network.state_dict(), weights)
        if problem:
            raise InputError(
                f"the checkpoint's weights do not fit the network of plans.json "
                f"({configuration}): {problem}",
                step=STEP,
                path=path,
                hint=mismatch,
            )


def _weights_problem(expected: dict[str, Any], weights: dict[str, Any]) -> str | None:
    """How a state dict differs from a network's (first few keys), or ``None``."""
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    parts = [
        f"{what} {len(keys)}: {', '.join(keys[:2])}"
        for what, keys in (
            ("shape differs (checkpoint vs plans) for", shapes),
            ("missing in the checkpoint:", missing),
            ("not in the plans' network:", extra),
        )
        if keys
    ]
    return "; ".join(parts) or None


def check_model_folder(folder: Path, params: SegmentationParams) -> None:
    """Check an nnU-Net v2 model folder before any exam is processed: its ``dataset.json``
    and ``plans.json``, the channel mapping, the folds, the ADC unit, and every checkpoint
    against the plans (:func:`check_checkpoints`; the network is built on the CPU, nothing
    runs on a GPU).

    Raises
    ------
    InputError
        What :class:`NnUNetBackend` would raise on loading the model.
    """
    dataset_json, plans = NnUNetBackend._read_model_files(folder)
    channels = map_channels(dataset_json.get("channel_names", {}), params.channel_map)
    adc_unit(folder, plans, channels, params)
    check_checkpoints(folder, params, dataset_json, plans)
