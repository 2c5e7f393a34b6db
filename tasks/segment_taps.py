"""Baseline segmentation backend: the pretrained TAPS prostate-gland model (``lavlab-taps``).

TAPS (MIT licence) ships one ONNX network (a MONAI SegResNetDS, T2W in, one gland logit
out) inside the PyPI package ``lavlab-taps`` as ``taps/resources/model_v1.onnx``. Its public
API, ``taps.segment(image_path, output_path, ...)``, works on NIfTI files only; this backend
runs the same steps in memory, on a SimpleITK image, calling the package's own functions and
constants (``taps.inference``, lavlab-taps 1.1.2) wherever they exist:

1. Load: the T2W voxels as float32 in ITK index order (x, y, z) with the RAS affine, which is
   what MONAI's ``LoadImaged`` (NibabelReader) returns for the NIfTI our ingest writes
   (re-implemented: ``LoadImaged`` reads files only).
2. Preprocess: ``taps.inference.build_preprocessing()`` minus its ``LoadImaged``, i.e.
   channel first, float32, ``Orientationd("RAS")``, ``Spacingd((0.8, 0.8, 3.0) mm,
   bilinear)``, ``NormalizeIntensityd(nonzero=True)`` (z-score over non-zero voxels),
   ``CropForegroundd(margin=5)`` (the package's own transform objects).
3. Infer: MONAI ``sliding_window_inference`` with the package's ``ROI_SIZE`` (128, 128, 32),
   ``sw_batch_size=1``, ``overlap=0.5``, ``mode="gaussian"``, through an ONNX Runtime
   session built as ``taps.inference.ONNXPredictor`` builds it (same log level and provider
   lists) plus a thread count; the session is created once per backend.
4. Postprocess: ``taps.inference.gaussian_blur_logits`` (sigma 2.5 voxels of the 0.8 mm
   grid), MONAI ``Invertd`` back to the input grid (bilinear), ``sigmoid > 0.55``, then the
   package's QC (``_run_qc`` without its file writing): the largest 26-connected component
   is the result, and the QC warnings are returned in ``details``.

The label map is on exactly the input T2 grid (LPS; arrays (z, y, x)).
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import SimpleITK as sitk

from tasks.errors import InputError
from tasks.io import sha256_file
from tasks.segment_backend import (
    STEP,
    SegmentationInputs,
    SegmentationParams,
    SegmentationResult,
    check_on_grid,
    labels_like,
)

PACKAGE = "lavlab-taps"
#: LPS (SimpleITK) -> RAS (NIfTI / MONAI) on homogeneous coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: What this module uses from ``taps.inference`` (checked when the backend is created).
_TAPS_NAMES = (
    "ROI_SIZE",
    "DEFAULT_SIGMA",
    "DEFAULT_PROBABILITY_THRESHOLD",
    "MIN_PROSTATE_VOLUME_CC",
    "MAX_PROSTATE_VOLUME_CC",
    "build_preprocessing",
    "gaussian_blur_logits",
    "resolve_checkpoint",
    "_largest_component",
    "_clean_slice_components",
    "_warn_geometry",
    "_warn_border_contact",
    "_warn_slice_continuity",
    "_warn_holes",
)


def _import_taps() -> ModuleType:
    """``taps.inference`` with every name this backend needs, or a clear :class:`InputError`."""
    try:
        from taps import inference  # noqa: PLC0415 - imports MONAI and torch: slow
    except ImportError as exc:
        raise InputError(
            f"the TAPS model package is not importable ({exc})",
            step=STEP,
            hint=f"pip install {PACKAGE} (it ships the model; nothing is downloaded)",
        ) from exc
    missing = [name for name in _TAPS_NAMES if not hasattr(inference, name)]
    if missing:
        raise InputError(
            f"{PACKAGE} {_version()} lacks {', '.join(missing)}",
            step=STEP,
            hint=f"install the {PACKAGE} release pinned in pyproject.toml",
        )
    return inference


def _version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 affine from ITK index (i, j, k) to RAS mm, as a NIfTI reader would give it.

    SimpleITK maps index to LPS as ``origin + direction @ (spacing * index)``; NIfTI and
    MONAI use RAS, which flips the first two physical axes.
    """
    affine = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)
    affine[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine


def check_t2(image: Any) -> np.ndarray:
    """The T2W voxels as float32 (z, y, x), or :class:`InputError` if TAPS cannot use them.

    Usable means: a SimpleITK image, 3D, one component per voxel, finite values and not
    constant (an all-zero or constant image holds nothing to segment).
    """
    if not isinstance(image, sitk.Image):
        raise InputError(f"t2w must be a SimpleITK image, got {type(image).__name__}", step=STEP)
    if image.GetDimension() != 3:
        raise InputError(
            f"TAPS needs a 3D T2W volume, got a {image.GetDimension()}D image "
            f"of size {image.GetSize()}",
            step=STEP,
            hint="pass the axial T2W volume as ingested",
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"TAPS needs a scalar T2W image, got {image.GetNumberOfComponentsPerPixel()} "
            "components per voxel",
            step=STEP,
        )
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    if not np.isfinite(values).all():
        raise InputError("T2W image has NaN or infinite voxels", step=STEP)
    if values.min() == values.max():
        raise InputError(
            f"T2W image is constant (every voxel {float(values.min()):g}): nothing to segment",
            step=STEP,
            hint="check that the T2W series was read and preprocessed correctly",
        )
    return values


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run torch CPU ops (resampling, window stitching) on ``threads`` threads, then restore."""
    import torch  # noqa: PLC0415

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _SessionPredictor:
    """``taps.inference.ONNXPredictor.__call__``: run one window through the session.

    ``x``: float32 tensor (batch, 1, 128, 128, 32) on the CPU; returns the logits tensor of
    the same shape on the CPU.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, x: Any) -> Any:
        import torch  # noqa: PLC0415

        outputs = self.session.run(None, {self.input_name: x.numpy()})
        return torch.from_numpy(outputs[0])


def _providers(device: str) -> list[str]:
    """ONNX Runtime providers for ``params.device``, as ``ONNXPredictor`` lists them."""
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415

    cuda_built = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not (cuda_built and torch.cuda.is_available()):
        raise InputError(
            "segmentation.device is 'cuda' but no CUDA device is usable by ONNX Runtime "
            f"(CUDA provider built: {cuda_built}; torch sees a GPU: {torch.cuda.is_available()})",
            step=STEP,
            hint="set segmentation.device to 'auto' or 'cpu'",
        )
    if device != "cpu" and cuda_built and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TapsBackend:
    """The TAPS prostate-gland model as a :class:`tasks.segment.SegmentationBackend`.

    Parameters
    ----------
    params
        ``device`` (``"auto"``: CUDA when ONNX Runtime has its CUDA provider and torch sees
        a GPU, else CPU) and ``threads`` (ONNX Runtime intra-op and torch CPU threads). The
        nnU-Net options (folds, mirroring, tile step, channel map) do not apply.
    sigma
        Gaussian blur of the logits, in voxels of the 0.8 x 0.8 x 3 mm grid (package
        default 2.5).
    threshold
        Foreground probability threshold (package default 0.55).

    Attributes
    ----------
    name
        ``"taps"``.
    model_hash
        sha256 of the ONNX file shipped in the package.
    model_path
        That file (``taps/resources/model_v1.onnx``); never downloaded.
    session
        The ONNX Runtime session, created once here and reused for every patient.

    Raises
    ------
    InputError
        If ``lavlab-taps`` (or its bundled model) is missing or lacks what this backend
        uses, or ``params.device == "cuda"`` and no CUDA device is usable.
    """

    name = "taps"

    def __init__(
        self,
        *,
        params: SegmentationParams,
        sigma: float | None = None,
        threshold: float | None = None,
    ) -> None:
        self._taps = _import_taps()
        try:
            self.model_path = Path(self._taps.resolve_checkpoint(None))
        except FileNotFoundError as exc:
            raise InputError(
                f"{PACKAGE} {_version()} has no bundled model ({exc})",
                step=STEP,
                hint=f"reinstall {PACKAGE}: pip install --force-reinstall {PACKAGE}",
            ) from exc
        self.params = params
        self.sigma = self._taps.DEFAULT_SIGMA if sigma is None else float(sigma)
        self.threshold = (
            self._taps.DEFAULT_PROBABILITY_THRESHOLD if threshold is None else float(threshold)
        )
        self.model_hash = sha256_file(self.model_path)
        self.version = _version()

        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        options.log_severity_level = 3  # as ONNXPredictor
        options.intra_op_num_threads = params.threads
        options.inter_op_num_threads = 1
        requested = _providers(params.device)
        self.session = ort.InferenceSession(
            str(self.model_path), sess_options=options, providers=requested
        )
        self.provider = self.session.get_providers()[0]
        if params.device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise InputError(
                f"ONNX Runtime could not start its CUDA provider (running on {self.provider})",
                step=STEP,
                hint="check the CUDA/cuDNN libraries onnxruntime-gpu needs, or use device 'cpu'",
            )
        self._predictor = _SessionPredictor(self.session)
        # the package's preprocessing without LoadImaged (we hand it an in-memory image)
        from monai.transforms.compose import Compose  # noqa: PLC0415

        self._preprocess = Compose(list(self._taps.build_preprocessing().transforms[1:]))

    @property
    def uses_gpu(self) -> bool:
        """True when ONNX Runtime runs the model on its CUDA provider."""
        return self.provider == "CUDAExecutionProvider"

    def segment(self, inputs: SegmentationInputs) -> SegmentationResult:
        """Segment the prostate gland on ``inputs.t2w`` (the other channels are ignored).

        Parameters
        ----------
        inputs
            ``t2w``: 3D T2W image (SimpleITK, LPS, mm; any intensity units; preprocessed
            or raw).

        Returns
        -------
        SegmentationResult
            ``labels``: uint8 on exactly the T2 grid, 1 = gland (the largest 26-connected
            component of ``sigmoid(blurred logits) > threshold``); ``label_names``
            ``{1: "gland"}``; ``probabilities``: float32 (2, z, y, x), background and gland
            probability on the T2 grid (before the largest-component step); ``details``:
            package version, provider, volume in mL, seconds, the package's QC flags.

        Raises
        ------
        InputError
            If the T2W is not a usable 3D scalar image, or the model finds no gland.
        """
        import torch  # noqa: PLC0415
        from monai.data.meta_tensor import MetaTensor  # noqa: PLC0415
        from monai.inferers.utils import sliding_window_inference  # noqa: PLC0415
        from monai.transforms.post.dictionary import Invertd  # noqa: PLC0415
        from monai.utils.enums import SpaceKeys  # noqa: PLC0415

        start = time.perf_counter()
        t2 = inputs.t2w
        values_zyx = check_t2(t2)
        affine = ras_affine(t2)
        # what LoadImaged(image_only=False) returns for the NIfTI of this image: (x, y, z)
        meta = {
            "affine": torch.as_tensor(affine, dtype=torch.float64),
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(t2.GetSize()),
            "space": SpaceKeys.RAS,
            "original_channel_dim": float("nan"),
            "filename_or_obj": "t2w",
        }
        # as monai.transforms.LoadImage builds it (the affine setter also sets spatial_ndim)
        image = MetaTensor.ensure_torch_and_prune_meta(
            np.ascontiguousarray(values_zyx.transpose(2, 1, 0)), dict(meta)
        )
        with _torch_threads(self.params.threads), torch.inference_mode():
            data = self._preprocess({"image": image, "image_meta_dict": dict(meta)})
            preprocessed_shape = tuple(data["image"].shape[1:])
            logits = sliding_window_inference(
                data["image"].unsqueeze(0),
                roi_size=self._taps.ROI_SIZE,
                sw_batch_size=1,
                predictor=self._predictor,
                overlap=0.5,
                mode="gaussian",
            )
            data["pred"] = self._taps.gaussian_blur_logits(logits, sigma=self.sigma)[0]
            inverted = Invertd(
                keys="pred",
                transform=self._preprocess,
                orig_keys="image",
                meta_keys="pred_meta_dict",
                orig_meta_keys="image_meta_dict",
                nearest_interp=False,
                to_tensor=True,
            )(data)
            gland_xyz = torch.sigmoid(inverted["pred"][0]).cpu().numpy().astype(np.float32)
        if gland_xyz.shape != tuple(t2.GetSize()):
            raise InputError(
                f"TAPS output shape {gland_xyz.shape} differs from the T2 size {t2.GetSize()}",
                step=STEP,
            )
        mask_xyz = (gland_xyz > self.threshold).astype(np.uint8)
        if not mask_xyz.any():
            raise InputError(
                "TAPS found no prostate voxels in the T2W image",
                step=STEP,
                hint="check that the image is an axial prostate T2W covering the gland",
            )
        mask_xyz, qc = self._qc(mask_xyz, affine)
        labels = labels_like(mask_xyz.transpose(2, 1, 0), t2)
        check_on_grid(labels, t2, "TAPS labels")
        gland = np.ascontiguousarray(gland_xyz.transpose(2, 1, 0))
        voxel_ml = float(np.prod(t2.GetSpacing())) / 1000.0
        details = {
            "package": f"{PACKAGE} {self.version}",
            "model_file": self.model_path.name,
            "provider": self.provider,
            "threads": self.params.threads,
            "sigma_voxels": self.sigma,
            "threshold": self.threshold,
            "preprocessed_shape_xyz": preprocessed_shape,
            "volume_ml": float(mask_xyz.sum()) * voxel_ml,
            "seconds": time.perf_counter() - start,
            **qc,
        }
        return SegmentationResult(
            labels=labels,
            label_names={1: "gland"},
            model=self.name,
            model_hash=self.model_hash,
            probabilities=np.stack([1.0 - gland, gland]).astype(np.float32),
            details=details,
        )

    def _qc(self, mask_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """``taps.inference._run_qc`` without its file writing: largest component + flags.

        ``mask_xyz`` is (x, y, z) with the RAS ``affine``, as the package passes them.
        """
        taps = self._taps
        volume_cc = float(mask_xyz.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000
        flags = {
            "geometry": bool(taps._warn_geometry(mask_xyz, affine)),
            "border_contact": bool(taps._warn_border_contact(mask_xyz)),
            "slice_gaps": bool(taps._warn_slice_continuity(mask_xyz)),
            "holes": bool(taps._warn_holes(mask_xyz)),
            "volume_out_of_range": not (
                taps.MIN_PROSTATE_VOLUME_CC <= volume_cc <= taps.MAX_PROSTATE_VOLUME_CC
            ),
        }
        largest, components = taps._largest_component(mask_xyz)
        _, multi_slices = taps._clean_slice_components(mask_xyz)
        flags["several_components"] = components > 1
        flags["slices_with_several_components"] = multi_slices > 0
        qc = {
            "qc_abnormal": any(flags.values()),
            "qc_flags": sorted(k for k, v in flags.items() if v),
            "components": int(components),
            "slices_with_several_components": int(multi_slices),
            "volume_ml_before_largest_component": volume_cc,
        }
        return np.asarray(largest, dtype=np.uint8), qc
