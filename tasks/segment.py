"""Segmentation backends: one small interface, an explicit registry, one loaded model per process.

A backend takes the preprocessed images of one exam on the T2 grid and returns a label map
on that same grid (same size, origin, spacing and direction; LPS), with the name of every
label. The flows never know which model runs: they call :func:`get_backend` with a model
spec from the settings and then ``backend.segment(inputs)``.

Model specs (``settings.segmentation.model``)
---------------------------------------------
``"demo"``
    The small nnU-Net v2 model trained on the synthetic cohort and committed under
    ``models/demo-nnunet`` (gland; :mod:`tasks.segment_nnunet`).
``"demo-zones"``
    The committed synthetic-cohort model in the users' model form: residual-encoder plans,
    two cross-validation folds ensembled, labels PZ and TZ (``models/demo-zones-resenc``).
``"taps"``
    The pretrained TAPS prostate model from the ``lavlab-taps`` package (T2 only;
    :mod:`tasks.segment_taps`).
a folder path
    Any trained nnU-Net v2 model folder (``dataset.json``, ``plans.json``, ``fold_X/``).

Backends are created once per (spec, parameters) and process and reused for every patient
(:func:`get_backend`), because loading a network costs seconds and GPU memory. The types
every backend shares are in :mod:`tasks.segment_backend`.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable
from pathlib import Path

from tasks.errors import InputError
from tasks.segment_backend import (
    STEP,
    SegmentationBackend,
    SegmentationInputs,
    SegmentationParams,
    SegmentationResult,
)

__all__ = [  # the interface, with the backend factory
    "SegmentationBackend",
    "SegmentationInputs",
    "SegmentationParams",
    "SegmentationResult",
    "check_model",
    "get_backend",
]
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The committed demo models: spec -> model folder (made by ``prostate-cohort train-demo-model``).
DEMO_MODELS: dict[str, Path] = {
    "demo": REPO_ROOT / "models" / "demo-nnunet",
    "demo-zones": REPO_ROOT / "models" / "demo-zones-resenc",
}


def model_folder(spec: str) -> Path:
    """The nnU-Net model folder of a spec: a committed demo model or the spec as a path."""
    return DEMO_MODELS.get(spec, Path(spec))


def _make_nnunet(spec: str, params: SegmentationParams) -> SegmentationBackend:
    from tasks.segment_nnunet import NnUNetBackend  # noqa: PLC0415 - torch import is slow

    name = spec if spec in DEMO_MODELS else None
    return NnUNetBackend(model_folder(spec), params=params, name=name)


def _make_taps(spec: str, params: SegmentationParams) -> SegmentationBackend:
    from tasks.segment_taps import TapsBackend  # noqa: PLC0415 - onnxruntime import is slow

    return TapsBackend(params=params)


#: Named backends; any other spec is an nnU-Net model folder.
BACKENDS: dict[str, Callable[[str, SegmentationParams], SegmentationBackend]] = {
    **dict.fromkeys(DEMO_MODELS, _make_nnunet),
    "taps": _make_taps,
}

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], SegmentationBackend] = {}
_CREATED: list[tuple[str, str]] = []


def get_backend(spec: str, params: SegmentationParams) -> SegmentationBackend:
    """The backend for ``spec``, created on first use in this process and then reused.

    Raises
    ------
    InputError
        If ``spec`` is neither a named backend nor an existing folder, or the model folder
        is incomplete or incompatible (raised by the backend).
    """
    _check_spec(spec)
    key = (str(Path(spec).resolve()) if spec not in BACKENDS else spec, params.model_dump_json())
    with _LOCK:
        if key not in _LOADED:
            _LOADED[key] = BACKENDS.get(spec, _make_nnunet)(spec, params)
            _CREATED.append(key)
        return _LOADED[key]


def _check_spec(spec: str) -> None:
    if spec not in BACKENDS and not Path(spec).is_dir():
        raise InputError(
            f"segmentation model {spec!r} is neither one of {sorted(BACKENDS)} nor a folder",
            step=STEP,
            hint=f"set segmentation.model to one of {sorted(BACKENDS)} or an nnU-Net v2 "
            "model folder",
        )


def check_model(spec: str, params: SegmentationParams) -> None:
    """Check, without loading a network, that ``spec`` names a usable model: ``taps`` with
    its package installed, or ``demo``/a folder holding a complete nnU-Net v2 model (files,
    channels, folds, checkpoints). The command line calls it before any work starts.

    Raises
    ------
    InputError
        Why the model cannot be used (what :func:`get_backend` would raise later).
    """
    _check_spec(spec)
    if spec == "taps":
        if importlib.util.find_spec("taps") is None:
            from tasks.segment_taps import PACKAGE  # noqa: PLC0415

            raise InputError(
                "the TAPS model package is not installed",
                step=STEP,
                hint=f"pip install {PACKAGE} (it ships the model; nothing is downloaded)",
            )
        return
    from tasks.segment_nnunet import check_model_folder  # noqa: PLC0415

    check_model_folder(model_folder(spec), params)


def backends_created() -> int:
    """How many backends this process has created (tests check reuse with it)."""
    return len(_CREATED)
