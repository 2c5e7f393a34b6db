"""elastix registration against the synthetic generator's exact transforms.

Truth convention (``phantom.exam``): a DWI voxel of volume b at physical point y samples
the anatomy at ``A @ M_b @ y``. So the motion transform (fixed = lowest b, moving = volume b)
must equal ``inv(M_b)``, and the T2 -> DWI map of ``align_dwi_to_t2`` must equal ``inv(A)``.
Target registration error (TRE) is the mean distance (mm) over the gland's voxel centres
(``dwi_gland_mask`` for motion, ``t2_gland_mask`` for T2 <-> DWI). Exams 0 and 1 of cohort
seed 0 (chosen up front: the first two) cover Siemens with b1400 and the noisiest DWI of the
first 16 exams, and GE. Exam 7 was the worst affine case of exams 0-7 before the affine
stage was held in-plane. Figures print with ``pytest -s``; ``benchmarks/bench_align.py``
covers exams 0-7 on the pipeline's own inputs.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from phantom.exam import generate_exam
from phantom.plan import plan_exam
from tasks.align import align_dwi_to_t2
from tasks.discover import discover_exams
from tasks.errors import InputError
from tasks.ingest import ingest_exam
from tasks.register import (
    RegistrationParams,
    load_transform,
    mask_points_mm,
    motion_correct_dwi,
    parameter_object,
    parameter_objects_created,
    register_rigid,
    registration_error_mm,
    resample_to_reference,
    save_transform,
    transform_to_matrix,
    warm_up,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:builtin type .* has no __module__:DeprecationWarning"),
]
PARAMS = RegistrationParams(threads=1)
OTHER_DIRECTION = {"dwi_fixed": "t2_fixed", "t2_fixed": "dwi_fixed"}


@pytest.fixture(scope="module")
def exams(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("register")
    warm_up(PARAMS)  # the first ParameterObject of the process costs seconds: pay it once
    cases = []
    for index in (0, 1):
        generated = generate_exam(root, plan_exam(0, index))
        (found,) = [
            e
            for e in discover_exams(root / "dicom")
            if e.folder.startswith(generated.patient_folder + "/")
        ]
        result = ingest_exam(found, out_dir=root / "out", key="k")
        assert result.status == "ok", result.error
        case = {"name": generated.patient_folder, "truth_dir": generated.truth_dir, "dwi": {}}
        case["truth"] = json.loads(generated.truth_json.read_text())["transforms"]
        for record in result.series:
            image = sitk.ReadImage(str(root / "out" / record.image))
            if record.kind == "t2w":
                case["t2"] = image
            elif record.kind == "dwi":
                case["dwi"][float(record.b_value)] = image
        cases.append(case)
    return cases


def _truth_image(case: dict, name: str) -> sitk.Image:
    return sitk.ReadImage(str(Path(case["truth_dir"]) / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def motion(exams: list[dict]) -> list[tuple[dict, dict]]:
    return [motion_correct_dwi(case["dwi"], params=PARAMS) for case in exams]


@pytest.fixture(scope="module")
def affine(exams: list[dict]) -> dict[str, list]:
    """Both directions' T2 -> DWI transforms per exam, keyed by direction."""
    out: dict[str, list] = {}
    for direction in ("dwi_fixed", "t2_fixed"):
        params = PARAMS.model_copy(update={"affine_direction": direction})
        out[direction] = [
            align_dwi_to_t2(case["t2"], case["dwi"][min(case["dwi"])], params=params)
            for case in exams
        ]
    return out


def test_motion_correction_tre_below_half_a_millimetre(exams: list, motion: list) -> None:
    lines = []
    for case, (corrected, transforms) in zip(exams, motion, strict=True):
        points = mask_points_mm(_truth_image(case, "dwi_gland_mask"))
        reference_b = min(case["dwi"])
        assert sorted(transforms) == sorted(case["dwi"])
        np.testing.assert_allclose(transform_to_matrix(transforms[reference_b]), np.eye(4))
        for b, transform in sorted(transforms.items()):
            if b == reference_b:
                continue
            truth = np.linalg.inv(np.array(case["truth"]["motion"][str(int(b))]))
            before = registration_error_mm(np.eye(4), truth, points)
            after = registration_error_mm(transform_to_matrix(transform), truth, points)
            lines.append(f"{case['name']} b{b:g}: TRE {before:.2f} -> {after:.3f} mm")
            assert after <= 0.5, lines[-1]
            assert after < before / 2, lines[-1]
            assert corrected[b].GetSize() == case["dwi"][reference_b].GetSize()
            assert corrected[b].GetOrigin() == case["dwi"][reference_b].GetOrigin()
    print("\nrigid (each b -> lowest b):\n" + "\n".join(lines))


def test_affine_tre_and_the_default_direction_is_the_better_one(exams, affine) -> None:
    tre: dict[str, list[float]] = {d: [] for d in affine}
    before = []
    for number, case in enumerate(exams):
        points = mask_points_mm(_truth_image(case, "t2_gland_mask"))
        truth = np.linalg.inv(np.array(case["truth"]["dwi_to_t2"]))
        before.append(registration_error_mm(np.eye(4), truth, points))
        for direction, results in affine.items():
            matrix = transform_to_matrix(results[number].transform)
            tre[direction].append(registration_error_mm(matrix, truth, points))
    default, other = PARAMS.affine_direction, OTHER_DIRECTION[PARAMS.affine_direction]
    print("\naffine T2 <-> DWI, TRE over T2 gland points (mm):")
    for number, case in enumerate(exams):
        print(
            f"{case['name']}: before {before[number]:.2f}, dwi_fixed "
            f"{tre['dwi_fixed'][number]:.3f}, t2_fixed {tre['t2_fixed'][number]:.3f}"
        )
    print(
        f"mean: {default} (default) {np.mean(tre[default]):.3f}, {other} {np.mean(tre[other]):.3f}"
    )
    assert np.mean(tre[default]) <= 1.0
    assert np.mean(tre[default]) < np.mean(tre[other])
    for number in range(len(exams)):
        # Per exam the bound is looser than the mean's: the through-plane (z) error
        # dominates and varies between exams (0.43-2.03 mm on exams 0-7).
        assert tre[default][number] <= 1.5
        assert tre[default][number] < before[number] / 2


def test_affine_tre_on_exam_7_once_the_worst_case(tmp_path: Path) -> None:
    """Exam 7 was the worst case (1.8 mm, through-plane) of the unconstrained affine; the
    in-plane affine judged against the identity brings it under 1 mm."""
    generated = generate_exam(tmp_path, plan_exam(0, 7))
    (found,) = discover_exams(tmp_path / "dicom")
    result = ingest_exam(found, out_dir=tmp_path / "out", key="k")
    images = {r.kind + str(r.b_value): tmp_path / "out" / r.image for r in result.series}
    t2 = sitk.ReadImage(str(images["t2wNone"]))
    low = min(r.b_value for r in result.series if r.kind == "dwi")
    dwi = sitk.ReadImage(str(images[f"dwi{low}"]))
    matrix = transform_to_matrix(align_dwi_to_t2(t2, dwi, params=PARAMS).transform)
    truth = json.loads(generated.truth_json.read_text())["transforms"]["dwi_to_t2"]
    points = mask_points_mm(sitk.ReadImage(str(generated.truth_dir / "t2_gland_mask.nii.gz")))
    tre = registration_error_mm(matrix, np.linalg.inv(np.array(truth)), points)
    print(f"\nSYN-0008 affine TRE (default direction): {tre:.3f} mm")
    assert tre <= 1.0


def test_dwi_resampled_onto_t2_has_exactly_the_t2_grid(exams: list, affine: dict) -> None:
    case = exams[1]
    transform = affine[PARAMS.affine_direction][1].transform
    dwi = case["dwi"][max(case["dwi"])]
    out = resample_to_reference(dwi, case["t2"], transform, interpolator="linear")
    assert out.GetSize() == case["t2"].GetSize()
    assert out.GetOrigin() == case["t2"].GetOrigin()
    assert out.GetSpacing() == case["t2"].GetSpacing()
    assert out.GetDirection() == case["t2"].GetDirection()
    assert out.GetPixelID() == sitk.sitkFloat32
    # The same map carries the DWI gland onto the T2 gland (direction check of the map).
    gland = resample_to_reference(
        _truth_image(case, "dwi_gland_mask"), case["t2"], transform, interpolator="nearest"
    )
    a = sitk.GetArrayViewFromImage(gland) > 0
    b = sitk.GetArrayViewFromImage(_truth_image(case, "t2_gland_mask")) > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    print(f"\ngland Dice after resampling DWI -> T2: {dice:.3f}")
    assert dice > 0.9


def test_parameter_object_is_built_once_per_process(exams: list, motion: list) -> None:
    fixed, moving = exams[1]["dwi"][min(exams[1]["dwi"])], exams[1]["dwi"][800.0]
    first = parameter_object(
        "rigid", PARAMS, fixed_spacing=fixed.GetSpacing(), moving_spacing=moving.GetSpacing()
    )
    count = parameter_objects_created()
    register_rigid(fixed, moving, params=PARAMS)  # already run by motion correction
    again = parameter_object(
        "rigid", PARAMS, fixed_spacing=fixed.GetSpacing(), moving_spacing=moving.GetSpacing()
    )
    assert again is first
    assert parameter_objects_created() == count
    # Threads racing for a new parameter set still build exactly one object.
    params = PARAMS.model_copy(update={"rigid_iterations": 7})
    seen = []
    workers = [
        threading.Thread(target=lambda: seen.append(parameter_object("rigid", params)))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert parameter_objects_created() == count + 1
    assert all(obj is seen[0] for obj in seen)


def test_transform_files_round_trip_and_matrix_direction(tmp_path: Path, affine) -> None:
    # A translation by +t maps a fixed point p to the moving point p + t.
    shift = sitk.TranslationTransform(3, (1.0, -2.0, 3.5))
    np.testing.assert_allclose(transform_to_matrix(shift)[:3, 3], [1.0, -2.0, 3.5])
    for transform in (affine[PARAMS.affine_direction][0].transform, shift):
        path = tmp_path / "t2_to_dwi.tfm"
        digest = save_transform(transform, path)
        assert len(digest) == 64
        loaded = load_transform(path)
        np.testing.assert_array_equal(transform_to_matrix(loaded), transform_to_matrix(transform))
    with pytest.raises(InputError, match="not found"):
        load_transform(tmp_path / "missing.tfm")
    with pytest.raises(InputError, match="linear"):
        transform_to_matrix(sitk.DisplacementFieldTransform(3))


def test_bad_inputs_raise_input_errors(exams: list) -> None:
    dwi = exams[1]["dwi"][min(exams[1]["dwi"])]
    with pytest.raises(InputError, match="3D"):
        register_rigid(dwi[:, :, 0], dwi[:, :, 1], params=PARAMS)
    with pytest.raises(InputError, match="grid"):
        register_rigid(dwi, dwi, params=PARAMS, fixed_mask=sitk.Image([4, 4, 4], sitk.sitkUInt8))
    with pytest.raises(InputError, match="no DWI"):
        motion_correct_dwi({}, params=PARAMS)
