"""Every vendor: enhanced multi-frame DICOM, directional DWI, GE/Philips/Siemens b-value tags.

The real-data tests read the dcm2niix test series in ../shared/data/vendors (GE classic,
Philips classic, Siemens XA30 enhanced; see that folder's README) and compare with
``reference.bval`` (dcm2niix's reading); they skip when that folder is absent. The other
tests build small files here.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    MRImageStorage,
    generate_uid,
)

from tasks.classify import select_series
from tasks.dicom_enhanced import read_image_headers
from tasks.dicom_headers import (
    B0_MAX,
    diffusion_role,
    extract_b_value,
    header_from_dataset,
    slice_normal,
)
from tasks.discover import discover_exams
from tasks.dwi_trace import plan_b_volumes
from tasks.ingest import ingest_exam
from tasks.volumes import build_dwi_volumes, build_volume

VENDORS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "vendors"
GE = "GE-DWI/01_Ax_DWI_TENSOR_R2"
PHILIPS = "Philips-DWI/701_DTI"
SIEMENS_XA = "Siemens-XA30-enhanced-DWI/10_DWI_dir80_PA"


def needs_vendors(test):
    """Mark a test as reading ../shared/data/vendors; skip it, saying why, without them."""
    skip = pytest.mark.skipif(
        not VENDORS.is_dir(),
        reason=f"vendor DWI sample data not found at {VENDORS} (tests need ../shared/data)",
    )
    return pytest.mark.realdata(skip(test))


# folder -> (distinct b-values in s/mm², directions at the highest b, slice positions)
EXPECTED = {
    GE: ((0.0, 1000.0), 6, 2),
    PHILIPS: ((0.0, 1000.0), 12, 32),
    SIEMENS_XA: ((0.0, 2500.0), 20, 39),
}


# --- files built here --------------------------------------------------------------------


def _meta(sop: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _image_module(ds: Dataset, rows: int, columns: int) -> None:
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PhotometricInterpretation = "MONOCHROME2"


def _classic(
    path: Path, z: float, pixels: np.ndarray, b: float, direction=None, series="1.2.3.4", **extra
) -> Path:
    ds = Dataset()
    ds.file_meta = _meta(MRImageStorage)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", series
    ds.Modality, ds.Manufacturer, ds.SeriesNumber = "MR", "TEST", 5
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    ds.ScanningSequence, ds.EchoTime, ds.RepetitionTime = "EP", 70, 4000
    _image_module(ds, *pixels.shape)
    ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 3.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.DiffusionBValue = b
    if direction is not None:
        ds.DiffusionDirectionality = "DIRECTIONAL"
        ds.DiffusionGradientOrientation = list(direction)
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _enhanced(path: Path, frames: list[dict], rows: int = 3, columns: int = 4) -> Path:
    """An Enhanced MR file; each frame dict: z, pixels, slope, intercept, b, direction."""
    ds = Dataset()
    ds.file_meta = _meta(EnhancedMRImageStorage)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.9"
    ds.Modality, ds.Manufacturer, ds.SeriesNumber = "MR", "Siemens Healthineers", 9
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    ds.EchoPulseSequence, ds.EchoPlanarPulseSequence = "SPIN", "YES"
    _image_module(ds, rows, columns)
    ds.NumberOfFrames = len(frames)
    shared = _item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=[0, 1, 0, 0, 0, -1])]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[1.5, 0.5], SliceThickness=4.0)]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(RepetitionTime=3000)]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for f in frames:
        diffusion = _item(DiffusionBValue=f["b"])
        if f.get("direction") is not None:
            diffusion.DiffusionDirectionality = "BMATRIX"
            diffusion.DiffusionGradientDirectionSequence = Sequence(
                [_item(DiffusionGradientOrientation=list(f["direction"]))]
            )
        else:
            diffusion.DiffusionDirectionality = "NONE"
        per_frame.append(
            _item(
                PlanePositionSequence=Sequence([_item(ImagePositionPatient=[f["z"], -5.0, 7.0])]),
                PixelValueTransformationSequence=Sequence(
                    [_item(RescaleSlope=f["slope"], RescaleIntercept=f["intercept"])]
                ),
                MRDiffusionSequence=Sequence([diffusion]),
                MREchoSequence=Sequence([_item(EffectiveEchoTime=80.0)]),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack([f["pixels"] for f in frames]).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_frames_become_images_with_their_own_geometry_and_rescale(tmp_path: Path) -> None:
    """Sagittal frames stored out of order, shared orientation/spacing, per-frame rescale."""
    rng = np.random.default_rng(1)
    xs = [6.0, 0.0, 9.0, 3.0]  # frame order in the file; the slice normal is -x
    frames = [
        {"z": x, "pixels": rng.integers(1, 500, (3, 4)), "slope": 1 + i, "intercept": -i, "b": 0}
        for i, x in enumerate(xs)
    ]
    path = _enhanced(tmp_path / "enh.dcm", frames)
    headers = read_image_headers(path)
    assert [h.frame for h in headers] == [0, 1, 2, 3]
    assert all(h.path == path and h.number_of_frames == 4 for h in headers)
    assert headers[0].orientation == (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    assert headers[0].pixel_spacing == (1.5, 0.5) and headers[0].slice_thickness == 4.0
    assert [h.position[0] for h in headers] == xs  # type: ignore[index]
    assert [h.rescale_slope for h in headers] == [1.0, 2.0, 3.0, 4.0]
    assert headers[0].echo_time == 80.0 and headers[0].repetition_time == 3000.0
    assert headers[0].scanning_sequence == ("SE", "EP")
    assert headers[0].b_value == 0.0 and headers[0].image_name == "enh.dcm frame 1"

    volume = build_volume(headers, label="enh")
    image = volume.image
    assert volume.files == (path,)
    normal = slice_normal(headers[0].orientation)  # type: ignore[arg-type]
    order = sorted(range(4), key=lambda i: float(np.dot([xs[i], -5.0, 7.0], normal)))
    expected = np.stack(
        [frames[i]["pixels"] * frames[i]["slope"] + frames[i]["intercept"] for i in order]
    )
    assert np.array_equal(sitk.GetArrayFromImage(image), expected.astype(np.float32))
    assert image.GetSpacing() == pytest.approx((0.5, 1.5, 3.0))
    for k, i in enumerate(order):  # voxel (0, 0, k) lies at that frame's ImagePositionPatient
        point = image.TransformIndexToPhysicalPoint((0, 0, k))
        assert point == pytest.approx((xs[i], -5.0, 7.0))


def _dwi_files(folder: Path, *, trace: bool, directions: int, philips_b0: bool = False) -> list:
    """Two slices: b0 (plus Philips-style b 0.002) and b1000 in ``directions`` directions."""
    rng = np.random.default_rng(2)
    axes = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0.6, 0.8, 0)][:directions]
    files, n = [], 0
    for z in (0.0, 3.0):
        items = [(0.0, None, {})] + ([(0.002, None, {})] if philips_b0 else [])
        items += [(1000.0, axis, {}) for axis in axes]
        if trace:
            items.append((1000.0, None, {"ImageType": ["DERIVED", "PRIMARY", "TRACEW"]}))
        for b, axis, extra in items:
            n += 1
            pixels = rng.integers(1, 1000, (2, 3))
            files.append(_classic(folder / f"{n}.dcm", z, pixels, b, axis, **extra))
    return files


def _read(files: list[Path]) -> list:
    return [h for f in files for h in read_image_headers(f)]


def test_directional_only_b_value_is_the_geometric_mean(tmp_path: Path) -> None:
    headers = _read(_dwi_files(tmp_path, trace=False, directions=3, philips_b0=True))
    assert B0_MAX == 1.0 and {h.b_value for h in headers} == {0.0, 1000.0}
    selection = select_series({"dwi": headers})
    assert selection.dwi == ("dwi",)
    assert "b1000: geometric mean of 3 directions" in selection.decisions[0].reason
    b0, b1000 = build_dwi_volumes([("dwi", headers)])
    assert b0.repeats == 2 and "b0: unweighted images" in b0.note  # b 0 and 0.002 averaged
    assert "b1000: geometric mean of 3 directions" in b1000.note
    for k, z in enumerate((0.0, 3.0)):
        planes = [
            pydicom.dcmread(h.path).pixel_array.astype(np.float64)
            for h in headers
            if h.b_value == 1000 and h.position[2] == z  # type: ignore[index]
        ]
        expected = np.prod(planes, axis=0) ** (1 / 3)
        assert np.allclose(sitk.GetArrayFromImage(b1000.image)[k], expected, rtol=1e-5)


def test_scanner_trace_wins_over_directional_images(tmp_path: Path) -> None:
    headers = _read(_dwi_files(tmp_path, trace=True, directions=3))
    plans = plan_b_volumes(headers)
    assert [(p.b, p.method, p.ignored) for p in plans] == [(0, "b0", 0), (1000, "trace", 6)]
    assert plans[1].note == "b1000: scanner trace image (6 directional images ignored)"
    b1000 = build_dwi_volumes([("dwi", headers)])[1]
    trace = [h for h in headers if "TRACEW" in h.image_type]
    assert set(b1000.files) == {h.path for h in trace}
    expected = np.stack([pydicom.dcmread(h.path).pixel_array for h in trace])
    assert np.array_equal(sitk.GetArrayFromImage(b1000.image), expected.astype(np.float32))


def test_too_few_directions_is_refused(tmp_path: Path) -> None:
    headers = _read(_dwi_files(tmp_path, trace=False, directions=2))
    decision = select_series({"dwi": headers}).decisions[0]
    assert decision.kind == "other" and "a trace needs at least 3" in decision.reason


def _philips(b: float, code: str) -> Dataset:
    ds = Dataset()
    ds.Modality, ds.Manufacturer = "MR", "Philips Medical Systems"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
    ds.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
    ds.add_new((0x2001, 0x1003), "FL", b)
    ds.add_new((0x2001, 0x1004), "CS", code)
    ds.add_new((0x2005, 0x0010), "LO", "Philips MR Imaging DD 001")
    for element, value in zip((0x10B0, 0x10B1, 0x10B2), (0.0, 0.6, 0.8), strict=True):
        ds.add_new((0x2005, element), "FL", value if code == "O" else 0.0)
    return ds


def test_roles_from_vendor_tags() -> None:
    """Philips (2001,1004) I = trace, O = directional (b0-like b: b0); GE: a gradient vector
    without any directionality tag is directional; Siemens TRACEW is trace."""
    iso = header_from_dataset(_philips(1000.0, "I"), Path("iso"))
    assert (iso.b_value, iso.b_value_source, diffusion_role(iso)) == (1000.0, "philips", "trace")
    directional = header_from_dataset(_philips(1000.0, "O"), Path("dir"))
    assert diffusion_role(directional) == "directional"
    assert directional.diffusion_direction == pytest.approx((0.0, 0.6, 0.8))
    b0_like = header_from_dataset(_philips(0.003, "O"), Path("b0"))
    assert (b0_like.b_value, diffusion_role(b0_like)) == (0.0, "b0")
    ge = Dataset()
    ge.Modality, ge.Manufacturer = "MR", "GE MEDICAL SYSTEMS"
    ge.add_new((0x0043, 0x0010), "LO", "GEMS_PARM_01")
    ge.add_new((0x0043, 0x1039), "IS", ["1000001000", "8", "0", "0"])
    ge.add_new((0x0019, 0x0010), "LO", "GEMS_ACQU_01")
    for element, value in zip((0x10BB, 0x10BC, 0x10BD), ("0", "-1", "0"), strict=True):
        ge.add_new((0x0019, element), "DS", value)
    header = header_from_dataset(ge, Path("ge"))
    assert (header.b_value, diffusion_role(header)) == (1000.0, "directional")
    ge[0x0019, 0x10BC].value = "0"  # no gradient: GE's combined (trace) image
    assert diffusion_role(header_from_dataset(ge, Path("ge"))) == "trace"


def test_non_image_objects_are_skipped(tmp_path: Path) -> None:
    state = Dataset()
    state.file_meta = _meta(GrayscaleSoftcopyPresentationStateStorage)
    state.SOPClassUID = GrayscaleSoftcopyPresentationStateStorage
    state.SOPInstanceUID = state.file_meta.MediaStorageSOPInstanceUID
    state.StudyInstanceUID, state.SeriesInstanceUID, state.Modality = "1.2.3", "1.2.3.4", "PR"
    state.save_as(tmp_path / "PS_0001", enforce_file_format=True)
    private = tmp_path / "XX_0001"  # Philips private series data: Rows/Columns, no pixels
    _classic(private, 0.0, np.ones((2, 3)), 0.0, SOPClassUID="1.3.46.670589.11.0.0.12.2")
    assert read_image_headers(tmp_path / "PS_0001") == []
    assert read_image_headers(private) == []


# --- real files of three vendors ---------------------------------------------------------


@pytest.fixture(scope="module")
def vendor_headers() -> dict[str, list]:
    """Image headers (one per file or frame) of each vendor folder, non-image objects skipped."""
    return {
        folder: [h for f in sorted((VENDORS / folder).iterdir()) for h in read_image_headers(f)]
        for folder in EXPECTED
    }


def _reference(folder: str) -> list[float]:
    text = (VENDORS / folder).parent.joinpath("reference.bval").read_text()
    return [0.0 if float(v) < B0_MAX else float(v) for v in text.split()]


def _by_position(headers: list) -> dict[float, list]:
    normal = slice_normal(headers[0].orientation)
    groups: dict[float, list] = {}
    for h in headers:
        groups.setdefault(round(float(np.dot(h.position, normal)), 1), []).append(h)
    return dict(sorted(groups.items()))


@needs_vendors
@pytest.mark.parametrize("folder", list(EXPECTED))
def test_b_values_match_dcm2niix(folder: str, vendor_headers: dict) -> None:
    """At every slice position the images' b-values are reference.bval's volumes, one each
    (Philips' b 0.001 ... 0.004 read as 0)."""
    headers = vendor_headers[folder]
    b_values, directions, n_slices = EXPECTED[folder]
    reference = Counter(_reference(folder))
    assert tuple(sorted(reference)) == b_values
    by_position = _by_position(headers)
    assert len(by_position) == n_slices
    for images in by_position.values():
        assert Counter(h.b_value for h in images) == reference
    high = [h for h in headers if h.b_value == b_values[-1]]
    assert {diffusion_role(h) for h in high} == {"directional"}
    assert len({h.diffusion_direction for h in high}) == directions == reference[b_values[-1]]


@needs_vendors
@pytest.mark.parametrize("folder", [GE, PHILIPS])
def test_vendor_private_b_value_tags_on_real_files(folder: str) -> None:
    """GE (0043,1039) and Philips (2001,1003) give the b-value without the standard tag."""
    vendor = "ge" if folder == GE else "philips"
    read = []
    for path in sorted((VENDORS / folder).iterdir()):
        if path.name.startswith(("PS_", "XX_", "reference")):
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        standard = float(ds.DiffusionBValue) if "DiffusionBValue" in ds else None
        if "DiffusionBValue" in ds:
            del ds.DiffusionBValue
        b, source = extract_b_value(ds)
        assert source == vendor and b is not None
        if standard is not None:
            assert b == pytest.approx(standard, abs=1e-6)
        read.append(0.0 if b < B0_MAX else b)
    n_slices = EXPECTED[folder][2]
    assert Counter(read) == Counter(
        {b: n * n_slices for b, n in Counter(_reference(folder)).items()}
    )
    if folder == PHILIPS:  # (2001,1004) "O" (directional) on every image, "I" absent
        ds = pydicom.dcmread(VENDORS / folder / "IM_0002", stop_before_pixels=True)
        assert ds[0x2001, 0x1004].value == "O"


def _exam(folder: str, tmp_path: Path) -> Path:
    """<root>/PAT/STUDY/<series>/ holding links to the vendor files."""
    root = tmp_path / "root"
    series = root / "PAT" / "STUDY" / Path(folder).name
    series.mkdir(parents=True)
    for path in (VENDORS / folder).iterdir():
        (series / path.name).symlink_to(path)
    return root


@needs_vendors
@pytest.mark.parametrize("folder", list(EXPECTED))
def test_exam_of_one_vendor_dwi_fails_only_for_lack_of_t2(
    folder: str, vendor_headers: dict, tmp_path: Path
) -> None:
    """No T2W: the exam fails with that reason alone; its DWI is classified and builds."""
    (exam,) = discover_exams(_exam(folder, tmp_path))
    result = ingest_exam(exam, out_dir=tmp_path / "out", key="k")
    assert result.status == "error" and "no usable axial T2W" in result.error
    # that is the only problem: the DWI series was read, classified and its volumes built
    assert re.fullmatch(r"no usable axial T2W series( \([^;]*(; see found)?\))?", result.error)
    assert not result.series
    b_values, directions, _ = EXPECTED[folder]
    how = f"b{b_values[-1]:g}: geometric mean of {directions} directions"
    dwi = [f for f in result.found if f.kind == "dwi"]  # what ingest says it found
    assert len(dwi) == 1 and tuple(dwi[0].b_values) == b_values and how in dwi[0].reason
    # named relative to the exam folder ("." where discovery took the series folder as exam)
    assert dwi[0].series in {Path(folder).name, "."} and dwi[0].selected
    selection = select_series({"dwi": vendor_headers[folder]})
    (decision,) = selection.decisions
    assert selection.dwi == ("dwi",) and decision.kind == "dwi" and how in decision.reason
    volumes = build_dwi_volumes([("dwi", vendor_headers[folder])])
    assert [v.b_value for v in volumes] == list(b_values)
    assert how in volumes[1].note and "b0: unweighted images" in volumes[0].note


@needs_vendors
def test_siemens_xa_enhanced_volume_geometry(vendor_headers: dict) -> None:
    """The volumes' affine is what the frames' ImagePositionPatient, ImageOrientationPatient
    and PixelSpacing give; 39 frames per file, 39 slices per volume."""
    files = sorted((VENDORS / SIEMENS_XA).glob("*.dcm"))
    frames = []  # (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of file 1
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert int(ds.NumberOfFrames) == 39 == len(ds.PerFrameFunctionalGroupsSequence)
        if path == files[0]:
            for item in ds.PerFrameFunctionalGroupsSequence:
                frames.append(
                    (
                        np.array(item.PlanePositionSequence[0].ImagePositionPatient, float),
                        np.array(item.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                        np.array(item.PixelMeasuresSequence[0].PixelSpacing, float),
                    )
                )
    row, col = frames[0][1][:3], frames[0][1][3:]
    normal = np.cross(row, col)
    positions = sorted((p for p, _, _ in frames), key=lambda p: float(np.dot(p, normal)))
    steps = np.diff([float(np.dot(p, normal)) for p in positions])
    row_spacing, col_spacing = frames[0][2]
    b0, b2500 = build_dwi_volumes([("dwi", vendor_headers[SIEMENS_XA])])
    for volume in (b0, b2500):
        image = volume.image
        assert image.GetSize() == (72, 72, 39)
        assert np.allclose(image.GetOrigin(), positions[0], atol=1e-4)
        assert np.allclose(
            np.reshape(image.GetDirection(), (3, 3)), np.column_stack([row, col, normal])
        )
        assert np.allclose(image.GetSpacing(), (col_spacing, row_spacing, steps.mean()), atol=1e-4)
        for k, position in enumerate(positions):  # voxel (i, j, k) -> IPP_k + i*dc*row + j*dr*col
            expected = position + 5 * col_spacing * row + 7 * row_spacing * col
            assert np.allclose(image.TransformIndexToPhysicalPoint((5, 7, k)), expected, atol=1e-3)
    assert b0.files == (files[0],) and len(b2500.files) == 20
    # the b0 volume is file 1's frames, sorted along the normal
    ds = pydicom.dcmread(files[0])
    order = np.argsort([float(np.dot(p, normal)) for p, _, _ in frames])
    assert np.array_equal(
        sitk.GetArrayFromImage(b0.image), ds.pixel_array[order].astype(np.float32)
    )


@needs_vendors
def test_ge_trace_is_the_geometric_mean_of_the_six_directions(vendor_headers: dict) -> None:
    """The GE b1000 volume equals the geometric mean of its 6 direction images, per slice."""
    by_slice: dict[float, list[np.ndarray]] = {}
    for path in sorted((VENDORS / GE).iterdir()):
        if not path.name.startswith("i"):
            continue
        ds = pydicom.dcmread(path)
        if int(ds[0x0043, 0x1039].value[0]) % 100000 != 1000:
            continue
        assert any(float(ds[0x0019, e].value) != 0 for e in (0x10BB, 0x10BC, 0x10BD))
        pixels = ds.pixel_array.astype(np.float64)
        pixels = pixels * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        normal = slice_normal(tuple(float(v) for v in ds.ImageOrientationPatient))
        z = round(float(np.dot(np.array(ds.ImagePositionPatient, float), normal)), 2)
        by_slice.setdefault(z, []).append(pixels)
    assert [len(v) for v in by_slice.values()] == [6, 6]
    expected = np.stack([np.prod(by_slice[z], axis=0) ** (1 / 6) for z in sorted(by_slice)])
    b1000 = build_dwi_volumes([("dwi", vendor_headers[GE])])[1]
    assert b1000.b_value == 1000 and b1000.repeats == 1 and len(b1000.files) == 12
    actual = sitk.GetArrayFromImage(b1000.image)
    assert np.allclose(actual, expected, rtol=1e-5, atol=1e-3)
    assert actual.max() > 0
