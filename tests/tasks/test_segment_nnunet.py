"""nnU-Net v2 backend: the committed demo model on unseen synthetic exams, load-once reuse,
channel mapping and the errors for broken model folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tasks.errors import InputError
from tasks.nnunet_demo import dice, ensure_cohort
from tasks.segment import (
    DEMO_MODELS,
    SegmentationInputs,
    SegmentationParams,
    backends_created,
    get_backend,
)
from tasks.segment_nnunet import (
    ADC_UNITS,
    NnUNetBackend,
    check_model_folder,
    label_names,
    map_channels,
    model_adc_unit,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")
CPU = SegmentationParams(device="cpu", threads=1)


@pytest.fixture(scope="module")
def unseen_exams(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[tuple[SegmentationInputs, np.ndarray]]:
    """Two seed-0 synthetic exams (never trained on) through the real pipeline, with truth."""
    out = tmp_path_factory.mktemp("seed0")
    cases, _ = ensure_cohort(out, patients=2, seed=0, reuse=False)
    exams = []
    for case in cases:
        inputs = SegmentationInputs(
            t2w=sitk.ReadImage(str(case.t2w), sitk.sitkFloat32),
            dwi_b1000=sitk.ReadImage(str(case.dwi_b1000), sitk.sitkFloat32),
            adc=sitk.ReadImage(str(case.adc), sitk.sitkFloat32),
        )
        exams.append((inputs, sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0))
    assert len(exams) == 2
    return exams


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A writable copy of the demo model folder."""
    target = tmp_path / "model"
    shutil.copytree(DEMO_MODELS["demo"], target)
    return target


def _edit_dataset_json(folder: Path, **changes) -> None:
    path = folder / "dataset.json"
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


# -- the committed demo model -------------------------------------------------------------------


@pytest.mark.slow
def test_demo_model_segments_unseen_exams(unseen_exams) -> None:
    backend = get_backend("demo", CPU)
    assert backend.name == "demo"
    for inputs, truth in unseen_exams:
        result = backend.segment(inputs)
        labels = result.labels
        assert labels.GetSize() == inputs.t2w.GetSize()
        assert np.allclose(labels.GetOrigin(), inputs.t2w.GetOrigin())
        assert np.allclose(labels.GetDirection(), inputs.t2w.GetDirection())
        assert result.label_names == {1: "gland"}
        assert result.model_hash == backend.model_hash and len(result.model_hash) == 64
        predicted = sitk.GetArrayFromImage(labels)
        assert set(np.unique(predicted)) <= {0, 1}
        assert dice(predicted > 0, truth) >= 0.90
        probabilities = result.probabilities
        assert probabilities.shape == (2, *predicted.shape)
        assert np.allclose(probabilities.sum(axis=0), 1, atol=1e-3)
        assert np.array_equal(probabilities.argmax(axis=0), predicted)


@pytest.mark.slow
def test_backend_is_loaded_once_and_reused(unseen_exams) -> None:
    backend = get_backend("demo", CPU)
    created, predictor = backends_created(), backend.predictor
    glands = []
    for inputs, _ in unseen_exams:
        again = get_backend("demo", CPU)
        assert again is backend and again.predictor is predictor
        glands.append(int((sitk.GetArrayFromImage(again.segment(inputs).labels) > 0).sum()))
    assert backends_created() == created
    assert glands[0] != glands[1] and min(glands) > 1000  # two different, real predictions
    other = get_backend("demo", CPU.model_copy(update={"use_mirroring": True}))
    assert other is not backend and backends_created() == created + 1


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["demo", "demo-zones"])
def test_masks_equal_nnunet_predict(spec: str, unseen_exams, tmp_path: Path) -> None:
    """Our in-process prediction (all folds ensembled, mirroring off) gives exactly the mask
    of nnU-Net's own command on the same images written as nnU-Net's raw input."""
    backend = get_backend(spec, CPU)
    inputs, _ = unseen_exams[0]
    ours = sitk.GetArrayFromImage(backend.segment(inputs).labels)
    images = {"t2w": inputs.t2w, "dwi_b1000": inputs.dwi_b1000, "adc": inputs.adc}
    source, target = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for index, (_, role) in enumerate(backend.channels):
        image = sitk.Cast(images[role], sitk.sitkFloat32)
        if role == "adc":
            image = image * ADC_UNITS[backend.adc_unit]
        image.CopyInformation(inputs.t2w)
        sitk.WriteImage(image, str(source / f"case_{index:04d}.nii.gz"))
    command = [
        str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"),
        *("-i", str(source), "-o", str(target), "-m", str(DEMO_MODELS[spec])),
        *("-f", *map(str, backend.folds), "-chk", "checkpoint_final.pth"),
        *("-npp", "1", "-nps", "1", "-device", "cpu"),
        *("--disable_tta", "--disable_progress_bar"),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(target / "case.nii.gz")))
    assert len(backend.folds) == (1 if spec == "demo" else 2)
    assert theirs.shape == ours.shape and len(np.unique(theirs)) > 1
    assert np.array_equal(theirs, ours)


def test_model_hash_covers_the_model_files(model_copy: Path) -> None:
    original = NnUNetBackend(DEMO_MODELS["demo"], params=CPU)
    assert NnUNetBackend(model_copy, params=CPU).model_hash == original.model_hash
    _edit_dataset_json(model_copy, description="edited")
    assert NnUNetBackend(model_copy, params=CPU).model_hash != original.model_hash
    assert original.channels == [("T2", "t2w"), ("HBV", "dwi_b1000"), ("ADC", "adc")]
    assert original.folds == [0]


# -- errors -------------------------------------------------------------------------------------


def test_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        NnUNetBackend(tmp_path / "nope", params=CPU)
    with pytest.raises(InputError, match="neither"):
        get_backend(str(tmp_path / "nope"), CPU)


@pytest.mark.parametrize("file", ["dataset.json", "plans.json"])
def test_missing_model_file_is_an_input_error(model_copy: Path, file: str) -> None:
    (model_copy / file).unlink()
    with pytest.raises(InputError, match=f"no {file}"):
        NnUNetBackend(model_copy, params=CPU)


def test_missing_fold_or_checkpoint_is_an_input_error(model_copy: Path) -> None:
    with pytest.raises(InputError, match=r"fold 3 is not in the model \(available: \['0'\]\)"):
        NnUNetBackend(model_copy, params=CPU.model_copy(update={"folds": (3,)}))
    best = {"checkpoint": "checkpoint_best.pth"}
    with pytest.raises(InputError, match="no fold folder has the checkpoint 'checkpoint_best"):
        NnUNetBackend(model_copy, params=CPU.model_copy(update=best))
    with pytest.raises(InputError, match="fold_0 has no checkpoint 'checkpoint_best.pth'"):
        NnUNetBackend(model_copy, params=CPU.model_copy(update={**best, "folds": (0,)}))
    shutil.rmtree(model_copy / "fold_0")
    with pytest.raises(InputError, match="no fold_"):
        NnUNetBackend(model_copy, params=CPU)


def test_default_folds_are_the_numbered_ones(model_copy: Path) -> None:
    shutil.copytree(model_copy / "fold_0", model_copy / "fold_1")
    shutil.copytree(model_copy / "fold_0", model_copy / "fold_all")
    assert NnUNetBackend(model_copy, params=CPU).folds == [0, 1]
    only_all = CPU.model_copy(update={"folds": ("all",)})
    assert NnUNetBackend(model_copy, params=only_all).folds == ["all"]


def test_wrong_channel_count_is_an_input_error(model_copy: Path) -> None:
    _edit_dataset_json(model_copy, channel_names={"0": "T2", "1": "ADC"})
    with pytest.raises(InputError, match="names 2 channel.* network takes 3"):
        NnUNetBackend(model_copy, params=CPU)


def _edit_plans(folder: Path, edit) -> None:
    path = folder / "plans.json"
    plans = json.loads(path.read_text())
    edit(plans)
    path.write_text(json.dumps(plans))


def test_plans_that_do_not_fit_the_checkpoint_fail_at_start(model_copy: Path) -> None:
    def wider(plans: dict) -> None:
        kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        kwargs["features_per_stage"] = [2 * f for f in kwargs["features_per_stage"]]

    _edit_plans(model_copy, wider)
    for load in (NnUNetBackend, check_model_folder):
        with pytest.raises(InputError, match="weights do not fit the network of plans.json") as e:
            load(model_copy, params=CPU)
        assert Path(e.value.path) == model_copy / "fold_0" / "checkpoint_final.pth"
        assert "shape differs (checkpoint vs plans) for" in e.value.problem


def test_checkpoint_of_a_configuration_the_plans_lack_fails_at_start(model_copy: Path) -> None:
    _edit_plans(model_copy, lambda p: p["configurations"].pop("3d_fullres"))
    with pytest.raises(InputError, match="configuration '3d_fullres', which plans.json lacks"):
        check_model_folder(model_copy, CPU)


def test_adc_unit_from_the_plans_or_the_setting(model_copy: Path) -> None:
    plans = json.loads((model_copy / "plans.json").read_text())
    assert model_adc_unit(plans, 2) == "mm2/s"  # the demo model was trained on mm²/s
    for median, unit in ((1.5e-3, "mm2/s"), (0.9, "1e-3 mm2/s"), (1100.0, "1e-6 mm2/s")):
        plans["foreground_intensity_properties_per_channel"]["2"]["median"] = median
        assert model_adc_unit(plans, 2) == unit
    assert NnUNetBackend(model_copy, params=CPU).adc_unit == "mm2/s"
    _edit_plans(model_copy, lambda p: p.pop("foreground_intensity_properties_per_channel"))
    with pytest.raises(InputError, match="ADC unit is unknown"):
        check_model_folder(model_copy, CPU)
    picai = CPU.model_copy(update={"adc_unit": "1e-6 mm2/s"})
    check_model_folder(model_copy, picai)
    assert NnUNetBackend(model_copy, params=picai).adc_unit == "1e-6 mm2/s"


def test_unknown_channel_name_needs_a_channel_map(model_copy: Path) -> None:
    _edit_dataset_json(model_copy, channel_names={"0": "T2", "1": "FLAIR", "2": "ADC"})
    with pytest.raises(InputError, match="cannot map nnU-Net channel 'FLAIR'"):
        NnUNetBackend(model_copy, params=CPU)
    mapped = CPU.model_copy(update={"channel_map": {"FLAIR": "dwi_b1000"}})
    backend = NnUNetBackend(model_copy, params=mapped)
    assert backend.channels[1] == ("FLAIR", "dwi_b1000")


def test_missing_or_off_grid_input_is_an_input_error() -> None:
    backend = get_backend("demo", CPU)
    t2 = sitk.Image(64, 64, 8, sitk.sitkFloat32)
    t2.SetSpacing((0.5, 0.5, 3.0))
    with pytest.raises(InputError, match="needs channel 'HBV' \\(dwi_b1000\\)"):
        backend.segment(SegmentationInputs(t2w=t2, adc=t2))
    coarse = sitk.Image(32, 32, 8, sitk.sitkFloat32)
    with pytest.raises(InputError, match="adc is not on the T2 grid"):
        backend.segment(SegmentationInputs(t2w=t2, dwi_b1000=t2, adc=coarse))


# -- channel and label mapping ------------------------------------------------------------------


def test_channel_aliases_and_overrides() -> None:
    picai = {"0": "T2W", "1": "CT", "2": "HBV"}
    assert map_channels(picai) == [("T2W", "t2w"), ("CT", "adc"), ("HBV", "dwi_b1000")]
    assert map_channels({"1": "ADC", "0": "t2"}) == [("t2", "t2w"), ("ADC", "adc")]
    assert map_channels({"0": "MR"}, {"MR": "t2w"}) == [("MR", "t2w")]
    with pytest.raises(InputError, match="same image role"):
        map_channels({"0": "ADC", "1": "CT"})
    with pytest.raises(InputError, match="unknown role"):
        map_channels({"0": "T2"}, {"T2": "flair"})


def test_label_names_single_zonal_and_regions() -> None:
    assert label_names({"labels": {"background": 0, "gland": 1}}, None) == {1: "gland"}
    zonal = {"labels": {"background": 0, "pz": 1, "tz": 2}}
    assert label_names(zonal, None) == {1: "pz", 2: "tz"}
    regions = {"labels": {"background": 0, "gland": [1, 2], "tz": 2}}
    assert label_names(regions, [1, 2]) == {1: "gland", 2: "tz"}


@pytest.mark.parametrize("code", ["RAS", None])
def test_reader_orientation_round_trip(code: str | None) -> None:
    backend = NnUNetBackend.__new__(NnUNetBackend)  # only the orientation helpers
    backend._orientation = code
    array = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetDirection((-1, 0, 0, 0, 0, 1, 0, -1, 0))
    oriented = backend._array(image)
    if code:
        assert not np.array_equal(oriented, array)  # the reader's order really differs
    assert np.array_equal(backend._back(oriented[None], image)[0], array)
