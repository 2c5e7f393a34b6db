"""TAPS backend: the pretrained prostate model on the real exam ProstateX-0000 through our
ingest, denoising and N4; agreement with the package's own ``taps.segment``; load-once
reuse; and the errors for unusable input (the real-data tests skip without ../shared/data).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import SimpleITK as sitk

from tasks.bias import N4Params, correct_bias_n4
from tasks.denoise import T2DenoiseParams, denoise_t2
from tasks.discover import discover_exams
from tasks.errors import InputError
from tasks.ingest import ingest_exam
from tasks.segment import SegmentationInputs, SegmentationParams, backends_created, get_backend
from tasks.segment_taps import TapsBackend

os.environ.setdefault("OMP_NUM_THREADS", "1")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
X0000 = DATA / "dicom" / "ProstateX-0000"
MASK = DATA / "labels" / "ProstateX-0000" / "gland_Bosma22b.nii.gz"
needs_data = pytest.mark.skipif(
    not (X0000.is_dir() and MASK.is_file()),
    reason=f"real ProstateX sample data not found at {DATA} (tests need ../shared/data)",
)
CPU = SegmentationParams(device="cpu", threads=1)
KEY = "test-key"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def volume_ml(mask: np.ndarray, image: sitk.Image) -> float:
    return float(mask.sum()) * float(np.prod(image.GetSpacing())) / 1000.0


@pytest.fixture(scope="module")
def sessions() -> list:
    """Every ONNX Runtime session created while the module's backend is built and used."""
    return []


@pytest.fixture(scope="module")
def backend(sessions: list) -> TapsBackend:
    """One CPU backend for the module, built while InferenceSession creations are counted."""
    real = ort.InferenceSession

    class Counting(real):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            sessions.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort, "InferenceSession", Counting)
        made = TapsBackend(params=CPU)
    assert len(sessions) == 1
    return made


# -- errors and identity (no real data needed) --------------------------------------------------


def test_name_and_model_hash_of_the_bundled_onnx(backend: TapsBackend) -> None:
    assert backend.name == "taps"
    assert backend.model_path.name == "model_v1.onnx" and "taps" in backend.model_path.parts
    assert backend.model_hash == hashlib.sha256(backend.model_path.read_bytes()).hexdigest()
    assert backend.provider == "CPUExecutionProvider"


def _image(array: np.ndarray, spacing: tuple[float, ...]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        (_image(np.ones((64, 64), np.float32), (0.5, 0.5)), "3D T2W volume, got a 2D image"),
        (_image(np.zeros((8, 64, 64), np.float32), (0.5, 0.5, 3.0)), "constant"),
        (_image(np.full((8, 64, 64), np.nan, np.float32), (0.5, 0.5, 3.0)), "NaN"),
    ],
    ids=["2d", "all-zero", "nan"],
)
def test_unusable_t2_gives_a_clear_error(
    backend: TapsBackend, image: sitk.Image, problem: str
) -> None:
    with pytest.raises(InputError, match=problem) as caught:
        backend.segment(SegmentationInputs(t2w=image))
    assert caught.value.step == "segment"


def test_vector_image_is_refused(backend: TapsBackend) -> None:
    image = sitk.Compose([sitk.Image(16, 16, 4, sitk.sitkFloat32)] * 2)
    with pytest.raises(InputError, match="scalar"):
        backend.segment(SegmentationInputs(t2w=image))


def test_missing_package_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "taps", None)  # makes `import taps` raise ImportError
    with pytest.raises(InputError, match="not importable") as caught:
        TapsBackend(params=CPU)
    assert "pip install lavlab-taps" in caught.value.hint


def test_cuda_without_a_gpu_gives_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: device='cuda' is valid here")
    with pytest.raises(InputError, match="no CUDA device"):
        TapsBackend(params=SegmentationParams(device="cuda"))


def test_get_backend_creates_taps_once() -> None:
    params = SegmentationParams(device="cpu", threads=1, tile_step_size=0.25)  # a fresh key
    created = backends_created()
    first = get_backend("taps", params)
    assert isinstance(first, TapsBackend)
    assert get_backend("taps", params) is first and backends_created() == created + 1


@pytest.mark.slow
def test_blank_prediction_is_an_input_error() -> None:
    """A threshold no probability can pass leaves a blank mask: the package refuses it too."""
    rng = np.random.default_rng(0)
    image = _image(rng.uniform(1, 100, (4, 48, 48)).astype(np.float32), (0.8, 0.8, 3.0))
    with pytest.raises(InputError, match="no prostate"):
        TapsBackend(params=CPU, threshold=1.0).segment(SegmentationInputs(t2w=image))


# -- the real exam ProstateX-0000 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def x0000(tmp_path_factory: pytest.TempPathFactory, backend: TapsBackend) -> dict:
    """ProstateX-0000 ingested, denoised and N4-corrected as the pipeline does, segmented
    twice with the one module backend: the preprocessed T2 and the raw ingested T2."""
    if not (X0000.is_dir() and MASK.is_file()):
        pytest.skip(f"real ProstateX sample data not found at {DATA} (tests need ../shared/data)")
    out = tmp_path_factory.mktemp("taps")
    (exam,) = [e for e in discover_exams(DATA / "dicom") if e.folder.startswith("ProstateX-0000")]
    ingested = ingest_exam(exam, out_dir=out, key=KEY)
    assert ingested.status == "ok", ingested.error
    (t2_record,) = [s for s in ingested.series if s.kind == "t2w"]
    raw = sitk.ReadImage(str(out / t2_record.image), sitk.sitkFloat32)
    start = time.perf_counter()
    denoised = denoise_t2(raw, params=T2DenoiseParams())
    preprocessed, _ = correct_bias_n4(denoised, params=N4Params())
    preprocess_s = time.perf_counter() - start
    results, seconds = {}, {}
    for name, image in (("preprocessed", preprocessed), ("raw", raw)):
        start = time.perf_counter()
        results[name] = backend.segment(SegmentationInputs(t2w=image))
        seconds[name] = time.perf_counter() - start
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(MASK))) > 0
    return {
        "t2": {"preprocessed": preprocessed, "raw": raw},
        "results": results,
        "seconds": seconds,
        "preprocess_s": preprocess_s,
        "reference": reference,
        "out": out,
        "t2_file": out / t2_record.image,
    }


@pytest.mark.slow
@pytest.mark.realdata
@needs_data
def test_dice_on_prostatex_0000_after_denoise_and_n4(x0000: dict) -> None:
    result, t2 = x0000["results"]["preprocessed"], x0000["t2"]["preprocessed"]
    gland = sitk.GetArrayFromImage(result.labels) > 0
    score = dice(gland, x0000["reference"])
    print(
        f"TAPS on ProstateX-0000 (denoise + N4): Dice {score:.4f} vs gland_Bosma22b, "
        f"volume {volume_ml(gland, t2):.1f} mL (reference "
        f"{volume_ml(x0000['reference'], t2):.1f} mL), inference "
        f"{x0000['seconds']['preprocessed']:.1f} s (1 thread), denoise + N4 "
        f"{x0000['preprocess_s']:.1f} s, QC flags {result.details['qc_flags']}"
    )
    assert score >= 0.80
    assert result.details["volume_ml"] == pytest.approx(volume_ml(gland, t2))


@pytest.mark.slow
@pytest.mark.realdata
@needs_data
def test_dice_on_the_raw_t2_is_reported(x0000: dict) -> None:
    result, t2 = x0000["results"]["raw"], x0000["t2"]["raw"]
    gland = sitk.GetArrayFromImage(result.labels) > 0
    score = dice(gland, x0000["reference"])
    print(
        f"TAPS on ProstateX-0000 (raw ingested T2): Dice {score:.4f}, volume "
        f"{volume_ml(gland, t2):.1f} mL, inference {x0000['seconds']['raw']:.1f} s"
    )
    assert gland.any()  # reported, not bounded: the pipeline feeds the preprocessed T2


@pytest.mark.slow
@pytest.mark.realdata
@needs_data
@pytest.mark.parametrize("which", ["preprocessed", "raw"])
def test_result_is_exactly_on_the_t2_grid(x0000: dict, which: str) -> None:
    result, t2 = x0000["results"][which], x0000["t2"][which]
    labels = result.labels
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == t2.GetSize()
    assert labels.GetOrigin() == t2.GetOrigin()
    assert labels.GetSpacing() == t2.GetSpacing()
    assert labels.GetDirection() == t2.GetDirection()
    values = sitk.GetArrayFromImage(labels)
    assert set(np.unique(values)) == {0, 1}
    assert result.label_names == {1: "gland"}
    assert result.model == "taps" and len(result.model_hash) == 64
    probabilities = result.probabilities
    assert probabilities.shape == (2, *values.shape) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=0), 1, atol=1e-5)
    # the labels are the largest component of the thresholded gland probability
    above = probabilities[1] > result.details["threshold"]
    assert np.all(above[values == 1])


@pytest.mark.slow
@pytest.mark.realdata
@needs_data
def test_one_session_for_both_patients(x0000: dict, backend: TapsBackend, sessions: list) -> None:
    assert len(x0000["results"]) == 2  # two segment calls on the module backend ...
    assert len(sessions) == 1 and backend.session is sessions[0]  # ... and one session


@pytest.mark.slow
@pytest.mark.realdata
@needs_data
def test_matches_the_packages_own_segment(
    x0000: dict, backend: TapsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``taps.segment`` on a NIfTI file vs our in-memory backend on the same image.

    A crop of the raw T2 around the gland (176 x 176 voxels: one sliding window) keeps this
    short; both paths see exactly the same voxels and geometry.
    """
    import torch
    from taps.inference import segment

    raw = x0000["t2"]["raw"]
    crop = raw[112:288, 112:288, :]
    path = x0000["out"] / "crop_T2w.nii.gz"
    sitk.WriteImage(crop, str(path))
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)

    real_options = ort.SessionOptions

    def one_thread() -> ort.SessionOptions:  # the package leaves ONNX Runtime at all cores
        options = real_options()
        options.intra_op_num_threads = 1
        return options

    monkeypatch.setattr(ort, "SessionOptions", one_thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        written = segment(path, x0000["out"] / "crop_taps.nii.gz", None, device="cpu", exact=True)
    finally:
        torch.set_num_threads(threads)
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(written))) > 0
    ours = sitk.GetArrayFromImage(backend.segment(SegmentationInputs(t2w=image)).labels) > 0
    differing = int((theirs != ours).sum())
    print(
        f"TAPS package vs backend on the crop: {differing} of {int(theirs.sum())} gland "
        f"voxels differ, Dice {dice(theirs, ours):.5f}"
    )
    assert theirs.sum() > 10000
    assert differing <= 0.001 * theirs.sum()
