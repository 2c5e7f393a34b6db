"""Tests for the phantom: determinism, real DICOM, vendor b-value tags, exact ground truth.

The DICOM is read back with SimpleITK and pydicom and the b-values with a small parser written
here (not the module's writer), so the tests check what a consumer of the files would see.
"""

from __future__ import annotations

import dataclasses
import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from phantom.dicom import add_bvalue_tags
from phantom.exam import SyntheticExam, generate_cohort, generate_exam
from phantom.plan import VENDORS, plan_exam
from tasks.errors import InputError
from tasks.io import sha256_file

N_PATIENTS = 4
B_TAGS = {
    "siemens": (0x0019, 0x100C),
    "ge": (0x0043, 0x1039),
    "philips": (0x2001, 0x1003),
    "standard": (0x0018, 0x9087),
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticExam]:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), N_PATIENTS, seed=0)


@pytest.fixture(scope="module")
def clean_exam(tmp_path_factory: pytest.TempPathFactory) -> SyntheticExam:
    """Noise-free Siemens exam (b-values as OB) with large, known transforms."""
    plan = plan_exam(0, 0)
    n_b = len(plan.b_values)
    plan = dataclasses.replace(
        plan,
        noise_sigma_t2=0.0,
        noise_sigma_dwi=0.0,
        siemens_bvalue_ob=True,
        dwi_to_t2_rotation_deg=(3.0, -3.0, 3.0),
        dwi_to_t2_translation_mm=(4.0, -4.0, 3.0),
        dwi_to_t2_scale=(1.03, 0.97, 1.02),
        dwi_to_t2_shear=(0.02, -0.02, 0.01),
        motion_rotation_deg=((0.0, 0.0, 0.0),) + ((2.0, -2.0, 2.0),) * (n_b - 1),
        motion_translation_mm=((0.0, 0.0, 0.0),) + ((2.0, -2.0, 2.0),) * (n_b - 1),
    )
    return generate_exam(tmp_path_factory.mktemp("clean"), plan)


# ---------------------------------------------------------------- helpers (independent readers)


def load_truth(exam: SyntheticExam) -> dict:
    return json.loads(exam.truth_json.read_text())


def series_records(exam: SyntheticExam, kind: str) -> list[dict]:
    return [s for s in load_truth(exam)["series"] if s["kind"] == kind]


def series_files(exam: SyntheticExam, record: dict) -> list[Path]:
    return sorted((exam.dicom_dir / record["folder"]).glob("*.dcm"))


def _creator(ds: Dataset, group: int) -> str | None:
    element = ds.get((group, 0x0010))
    return None if element is None else element.value


def b_value_of(ds: Dataset) -> float | None:
    """The b-value (s/mm²) wherever this file's vendor keeps it; None if it has none."""
    if (0x0018, 0x9087) in ds:
        return float(ds[0x0018, 0x9087].value)
    if _creator(ds, 0x0019) == "SIEMENS MR HEADER" and (0x0019, 0x100C) in ds:
        value = ds[0x0019, 0x100C].value
        return float(value.decode("ascii").strip() if isinstance(value, bytes) else value)
    if _creator(ds, 0x0043) == "GEMS_PARM_01":
        first = int(ds[0x0043, 0x1039].value[0])
        return float(first % 1_000_000_000)
    if _creator(ds, 0x2001) == "Philips Imaging DD 001":
        return float(ds[0x2001, 0x1003].value)
    return None


def slice_normal(ds: Dataset) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def read_series(files: list[Path]) -> sitk.Image:
    """Read one stack with SimpleITK, files sorted along the slice normal."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    normal = slice_normal(headers[0])
    order = np.argsort([np.dot(normal, np.array(h.ImagePositionPatient, float)) for h in headers])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(files[i]) for i in order])
    return reader.Execute()


def dwi_by_b(exam: SyntheticExam) -> dict[int, sitk.Image]:
    """Every DWI volume keyed by b, splitting single multi-b series by the vendor tag."""
    groups: dict[int, list[Path]] = {}
    for record in series_records(exam, "dwi"):
        for path in series_files(exam, record):
            b_value = b_value_of(pydicom.dcmread(path, stop_before_pixels=True))
            groups.setdefault(int(b_value), []).append(path)
    return {b: read_series(files) for b, files in sorted(groups.items())}


def t2_image(exam: SyntheticExam) -> sitk.Image:
    (record,) = series_records(exam, "t2w")
    return read_series(series_files(exam, record))


def truth_image(exam: SyntheticExam, name: str) -> sitk.Image:
    return sitk.ReadImage(str(exam.truth_dir / f"{name}.nii.gz"))


def arr(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def axial_direction(obliquity_deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(obliquity_deg)), np.sin(np.deg2rad(obliquity_deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=float)


def affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform


def t2_gland_on_dwi_grid(exam: SyntheticExam, matrix: np.ndarray) -> np.ndarray:
    """T2 gland mask resampled onto the DWI grid; ``matrix`` maps DWI points to T2 points."""
    mask = sitk.Cast(truth_image(exam, "t2_gland_mask"), sitk.sitkFloat32)
    reference = truth_image(exam, "dwi_gland_mask")
    moved = sitk.Resample(mask, reference, affine_transform(matrix), sitk.sitkLinear, 0.0)
    return arr(moved) >= 0.5


def physical_centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    z, y, x = np.nonzero(mask)
    index = np.stack([x, y, z]).mean(axis=1)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def all_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------- the plan


def test_plan_is_deterministic_and_varies_by_index() -> None:
    plans = [plan_exam(0, index) for index in range(12)]
    assert plans == [plan_exam(0, index) for index in range(12)]
    assert plan_exam(1, 0) != plan_exam(0, 0)
    for start in range(9):
        assert {p.vendor for p in plans[start : start + 4]} == set(VENDORS)
    for plan in plans:
        assert plan.patient_folder == f"SYN-{plan.index + 1:04d}"
        assert plan.patient_id != plan.patient_folder and len(plan.patient_id) == 9
        assert list(plan.b_values) == sorted(set(plan.b_values))
        assert plan.b_values[0] in (0, 50) and {400, 800} <= set(plan.b_values)
        assert (1000 in plan.b_values) == (plan.index % 3 != 2)
        assert plan.motion_rotation_deg[0] == plan.motion_translation_mm[0] == (0.0, 0.0, 0.0)
        assert 0 <= plan.obliquity_deg <= 10 and plan.field_strength_t in (1.5, 3.0)
    assert 4 <= sum(p.has_scanner_adc for p in plans) <= 8
    assert 4 <= sum(p.has_lesion for p in plans) <= 8


def test_inconsistent_plan_is_rejected(tmp_path: Path) -> None:
    plan = dataclasses.replace(plan_exam(0, 0), b_values=(0, 800))  # motion still has 5 entries
    with pytest.raises(InputError, match="one entry per b"):
        generate_exam(tmp_path, plan)
    with pytest.raises(InputError, match="vendor"):
        generate_exam(tmp_path, dataclasses.replace(plan_exam(0, 0), vendor="toshiba"))
    assert not (tmp_path / "dicom").exists()


def test_same_plan_gives_identical_files(cohort: list[SyntheticExam], tmp_path: Path) -> None:
    again = generate_exam(tmp_path, plan_exam(0, 0))
    assert all_files(again.dicom_dir) == all_files(cohort[0].dicom_dir)
    assert all_files(again.truth_dir) == all_files(cohort[0].truth_dir)
    first = next(cohort[0].dicom_dir.rglob("1.dcm"))
    same = again.dicom_dir / first.relative_to(cohort[0].dicom_dir)
    a, b = pydicom.dcmread(first), pydicom.dcmread(same)
    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID) == (
        b.StudyInstanceUID,
        b.SeriesInstanceUID,
        b.SOPInstanceUID,
    )


def test_different_seed_gives_different_pixels(cohort: list[SyntheticExam], tmp_path: Path) -> None:
    other = generate_exam(tmp_path, plan_exam(1, 0))
    assert not np.array_equal(arr(t2_image(other)), arr(t2_image(cohort[0])))


# ------------------------------------------------------------------------- DICOM read-back


def test_axial_t2_reads_back_with_planned_geometry(cohort: list[SyntheticExam]) -> None:
    for exam in cohort:
        image = t2_image(exam)
        assert image.GetSize() == (384, 384, 20)
        assert np.allclose(image.GetSpacing(), (0.5, 0.5, 3.0))
        direction = np.array(image.GetDirection()).reshape(3, 3)
        assert np.allclose(direction, axial_direction(exam.plan.obliquity_deg), atol=1e-5)
        grid = load_truth(exam)["grids"]["t2"]
        assert np.allclose(image.GetOrigin(), grid["origin"], atol=1e-3)
        assert arr(image).dtype == np.uint16


def test_dwi_reads_back_as_one_volume_per_b(cohort: list[SyntheticExam]) -> None:
    for exam in cohort:
        volumes = dwi_by_b(exam)
        assert tuple(volumes) == exam.plan.b_values
        for image in volumes.values():
            assert image.GetSize() == (128, 128, 20)
            assert np.allclose(image.GetSpacing(), (2.0, 2.0, 3.0))
            direction = np.array(image.GetDirection()).reshape(3, 3)
            assert np.allclose(direction, axial_direction(exam.plan.obliquity_deg), atol=1e-5)


def test_each_vendor_keeps_b_values_in_its_own_tag(cohort: list[SyntheticExam]) -> None:
    assert {exam.plan.vendor for exam in cohort} == set(VENDORS)
    for exam in cohort:
        vendor = exam.plan.vendor
        records = series_records(exam, "dwi")
        single = vendor in ("siemens", "philips")
        assert len(records) == (1 if single else len(exam.plan.b_values))
        found = []
        for record in records:
            for path in series_files(exam, record):
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                assert [tag for tag in B_TAGS.values() if tag in ds] == [B_TAGS[vendor]]
                found.append(int(b_value_of(ds)))
                assert list(ds.ImageType[2:]) == ["DIFFUSION", "TRACEW"]
                assert ds.ScanningSequence == "EP" and ds.Modality == "MR"
                if vendor == "siemens":
                    assert ds.SequenceName == (f"*ep_b{found[-1]}t" if found[-1] else "*ep_b0")
                    raw = ds[0x0019, 0x100C].value
                    assert isinstance(raw, bytes) == exam.plan.siemens_bvalue_ob
                if vendor == "ge":
                    first = int(ds[0x0043, 0x1039].value[0])
                    assert (first >= 1_000_000_000) == exam.plan.ge_bvalue_offset
        assert sorted(set(found)) == list(exam.plan.b_values)
        assert all(found.count(b) == 20 for b in exam.plan.b_values)
        for record in series_records(exam, "t2w") + series_records(exam, "distractor"):
            ds = pydicom.dcmread(series_files(exam, record)[0], stop_before_pixels=True)
            assert b_value_of(ds) is None and ds.ScanningSequence == "SE"


@pytest.mark.parametrize(
    ("vendor", "siemens_ob", "ge_offset"),
    [
        ("siemens", False, False),
        ("siemens", True, False),
        ("ge", False, False),
        ("ge", False, True),
        ("philips", False, False),
        ("standard", False, False),
    ],
)
@pytest.mark.parametrize("b_value", [0, 50, 800, 1400])
def test_bvalue_tag_variants_round_trip(
    vendor: str, siemens_ob: bool, ge_offset: bool, b_value: int
) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # as in the generated files
    add_bvalue_tags(ds, vendor, b_value, siemens_ob=siemens_ob, ge_offset=ge_offset)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    read = pydicom.dcmread(buffer)
    assert b_value_of(read) == b_value
    if vendor == "siemens":
        assert ("OB" if siemens_ob else "IS") == read[0x0019, 0x100C].VR
    if vendor == "ge":
        expected = b_value + 1_000_000_000 if ge_offset else b_value
        assert int(read[0x0043, 0x1039].value[0]) == expected
        assert len(read[0x0043, 0x1039].value) == 4


def test_scanner_adc_series_is_derived_adc(cohort: list[SyntheticExam]) -> None:
    with_adc = [exam for exam in cohort if exam.plan.has_scanner_adc]
    assert {exam.plan.vendor for exam in with_adc} >= {"siemens"}
    for exam in cohort:
        records = series_records(exam, "adc")
        assert len(records) == exam.plan.has_scanner_adc
        for record in records:
            ds = pydicom.dcmread(series_files(exam, record)[0], stop_before_pixels=True)
            assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
            if exam.plan.vendor == "siemens":
                assert b_value_of(ds) == max(exam.plan.b_values)  # carries a b, still an ADC
                lo, hi = exam.plan.b_values[0], exam.plan.b_values[-1]
                assert ds.SequenceName == f"*ep_b{lo}_{hi}"
            else:
                assert b_value_of(ds) is None


def test_scanner_adc_matches_true_adc_inside_gland(clean_exam: SyntheticExam) -> None:
    (record,) = series_records(clean_exam, "adc")
    adc = arr(read_series(series_files(clean_exam, record))) * 1e-6
    truth = arr(truth_image(clean_exam, "adc_true_dwi"))
    tissue = arr(truth_image(clean_exam, "dwi_tissue"))
    for label, name in ((4, "pz"), (5, "tz")):
        inside = tissue == label
        expected = load_truth(clean_exam)["tissues"][name]["adc_mm2_s"]
        assert np.allclose(truth[inside], expected)
        # The scanner fits moved volumes, so only the bulk of each zone is exact.
        assert np.median(adc[inside]) == pytest.approx(expected, rel=0.05)


def test_localizer_and_plane_distractors_have_the_right_orientations(
    cohort: list[SyntheticExam],
) -> None:
    axes = {"sagittal": 0, "coronal": 1, "axial": 2}
    for exam in cohort:
        records = {r["orientation"]: r for r in series_records(exam, "distractor")}
        assert set(records) == {"mixed", "sagittal", "coronal"}
        localizer = [pydicom.dcmread(p) for p in series_files(exam, records["mixed"])]
        assert len(localizer) == 3 and len({ds.SeriesInstanceUID for ds in localizer}) == 1
        dominant = sorted(int(np.argmax(np.abs(slice_normal(ds)))) for ds in localizer)
        assert dominant == [0, 1, 2]
        for orientation in ("sagittal", "coronal"):
            files = series_files(exam, records[orientation])
            image = read_series(files)
            assert image.GetSize() == (256, 256, 15)
            assert np.allclose(image.GetSpacing(), (0.7, 0.7, 4.0))
            normal = np.abs(np.array(image.GetDirection()).reshape(3, 3)[:, 2])
            assert np.allclose(normal, np.eye(3)[axes[orientation]])


def test_folders_and_identity(cohort: list[SyntheticExam]) -> None:
    root = cohort[0].dicom_dir.parent.parent
    assert [e.patient_folder for e in cohort] == [f"SYN-{i:04d}" for i in range(1, 5)]
    assert not list((root / "dicom").rglob("*.nii.gz"))
    assert not list((root / "truth").rglob("*.dcm"))
    for exam in cohort:
        identity = load_truth(exam)["identifiers"]
        ds = pydicom.dcmread(next(exam.dicom_dir.rglob("*.dcm")), stop_before_pixels=True)
        assert ds.PatientID == identity["patient_id"] != exam.patient_folder
        assert str(ds.PatientName) == identity["patient_name"] and "^" in identity["patient_name"]
        assert ds.PatientBirthDate == identity["birth_date"]
        assert ds.AccessionNumber == identity["accession"]
        assert ds.PatientPosition == "FFS" and ds.BodyPartExamined == "PROSTATE"
        folders = [r["folder"] for r in load_truth(exam)["series"]]
        assert all(identity["patient_id"] not in f for f in folders)
        messy = any(" " in f.split("/")[1] and "." in f.split("/")[1] for f in folders)
        assert messy == exam.plan.messy_names
        study_uids = {
            pydicom.dcmread(next((exam.dicom_dir / f).glob("*.dcm"))).FrameOfReferenceUID
            for f in folders
        }
        assert len(study_uids) == 1


# --------------------------------------------------------------------------- ground truth


def test_gland_volume_and_zones(cohort: list[SyntheticExam]) -> None:
    for exam in cohort:
        truth = load_truth(exam)
        gland = arr(truth_image(exam, "t2_gland_mask"))
        zones = arr(truth_image(exam, "t2_zones"))
        voxels_ml = gland.sum() * 0.5 * 0.5 * 3.0 / 1000
        a, b, c = exam.plan.gland_semi_axes_mm
        analytic = 4 / 3 * np.pi * a * b * c / 1000
        assert 25 <= analytic <= 55
        assert voxels_ml == pytest.approx(analytic, rel=0.03)
        assert truth["gland_volume_ml"]["t2_voxels"] == pytest.approx(voxels_ml)
        assert truth["gland_volume_ml"]["analytic"] == pytest.approx(analytic)
        assert set(np.unique(zones)) == {0, 1, 2}
        assert np.array_equal(zones > 0, gland == 1)
        lesion_path = exam.truth_dir / "t2_lesion_mask.nii.gz"
        assert lesion_path.exists() == exam.plan.has_lesion
        if exam.plan.has_lesion:
            lesion = arr(truth_image(exam, "t2_lesion_mask")) == 1
            assert np.all(zones[lesion] == 1)
            assert 0.15 <= lesion.sum() * 0.75 / 1000 <= 1.0


def test_noise_free_dwi_follows_the_true_adc(clean_exam: SyntheticExam) -> None:
    b_low = clean_exam.plan.b_values[0]
    low = arr(dwi_by_b(clean_exam)[b_low]).astype(float)
    inside = arr(truth_image(clean_exam, "dwi_gland_mask")) == 1
    adc = arr(truth_image(clean_exam, "adc_true_dwi")).astype(float)
    b1000 = arr(truth_image(clean_exam, "b1000_true_dwi")).astype(float)
    s0 = arr(truth_image(clean_exam, "s0_true_dwi")).astype(float)
    expected = np.exp(-(1000 - b_low) * adc[inside])
    assert np.allclose(b1000[inside] / low[inside], expected, rtol=0.005)
    assert np.allclose(low, s0 * np.exp(-b_low * adc), atol=0.51)


def test_noise_free_t2_over_bias_is_piecewise_constant(clean_exam: SyntheticExam) -> None:
    t2 = arr(t2_image(clean_exam)).astype(float)
    bias = arr(truth_image(clean_exam, "t2_bias")).astype(float)
    tissue = arr(truth_image(clean_exam, "t2_tissue"))
    ratio = t2 / bias
    assert np.ptp(np.log(bias[tissue > 0])) > 0.2  # the bias is really there
    for name, params in load_truth(clean_exam)["tissues"].items():
        inside = tissue == params["label"]
        if name == "air":
            assert np.all(t2[inside] == 0)
        elif inside.any():
            assert np.allclose(ratio[inside], params["t2"], rtol=0.01), name


def test_background_noise_is_rician_with_the_planned_sigma(
    cohort: list[SyntheticExam],
) -> None:
    for exam in cohort:
        t2_air = arr(truth_image(exam, "t2_tissue")) == 0
        sigma_t2 = arr(t2_image(exam))[t2_air].mean() / np.sqrt(np.pi / 2)
        assert sigma_t2 == pytest.approx(exam.plan.noise_sigma_t2, rel=0.1)
        dwi_air = arr(truth_image(exam, "dwi_tissue")) == 0
        low = arr(dwi_by_b(exam)[exam.plan.b_values[0]])
        sigma_dwi = low[dwi_air].mean() / np.sqrt(np.pi / 2)
        assert sigma_dwi == pytest.approx(exam.plan.noise_sigma_dwi, rel=0.1)
        gland = arr(truth_image(exam, "dwi_gland_mask")) == 1
        s0 = arr(truth_image(exam, "s0_true_dwi"))
        adc = arr(truth_image(exam, "adc_true_dwi"))
        snr_b800 = np.mean((s0 * np.exp(-800 * adc))[gland]) / exam.plan.noise_sigma_dwi
        assert 7 <= snr_b800 <= 30


def test_saved_transform_maps_t2_gland_onto_dwi_gland(
    cohort: list[SyntheticExam], clean_exam: SyntheticExam
) -> None:
    for exam in [*cohort, clean_exam]:
        truth = load_truth(exam)
        assert "dwi_to_t2 @ motion[b] @ y" in truth["transforms"]["convention"]
        dwi_to_t2 = np.array(truth["transforms"]["dwi_to_t2"])
        gland = arr(truth_image(exam, "dwi_gland_mask")) == 1
        forward = dice(t2_gland_on_dwi_grid(exam, dwi_to_t2), gland)
        assert forward >= 0.9, exam.patient_folder
        if exam is clean_exam:  # large known transform: the direction of A must matter
            inverted = dice(t2_gland_on_dwi_grid(exam, np.linalg.inv(dwi_to_t2)), gland)
            assert inverted < 0.9 * forward


def test_moved_volume_shows_the_gland_where_motion_puts_it(clean_exam: SyntheticExam) -> None:
    truth = load_truth(clean_exam)
    b_value = 800
    image = dwi_by_b(clean_exam)[b_value]
    signal = arr(image) / arr(truth_image(clean_exam, "dwi_bias"))
    # Noise-free, so each voxel is one tissue's S0 * exp(-b ADC): classify by nearest value.
    names = [n for n in truth["tissues"] if n != "air"]
    values = np.array(
        [
            truth["tissues"][n]["s0"] * np.exp(-b_value * truth["tissues"][n]["adc_mm2_s"])
            for n in names
        ]
    )
    nearest = np.argmin(np.abs(signal[..., None] - values), axis=-1)
    seen = np.isin(nearest, [names.index(n) for n in ("pz", "tz", "lesion")])

    dwi_to_t2 = np.array(truth["transforms"]["dwi_to_t2"])
    motion = np.array(truth["transforms"]["motion"][str(b_value)])
    assert not np.allclose(motion, np.eye(4))
    with_motion = dice(t2_gland_on_dwi_grid(clean_exam, dwi_to_t2 @ motion), seen)
    without_motion = dice(t2_gland_on_dwi_grid(clean_exam, dwi_to_t2), seen)
    assert with_motion >= 0.9
    assert without_motion < with_motion - 0.03

    center = np.array([*truth["gland_center_mm"], 1.0])
    expected = (np.linalg.inv(dwi_to_t2 @ motion) @ center)[:3]
    unmoved = (np.linalg.inv(dwi_to_t2) @ center)[:3]
    centroid = physical_centroid(image, seen)
    assert np.linalg.norm(centroid - expected) < 0.6
    assert np.linalg.norm(centroid - unmoved) > 2.0
