"""Header reading and b-value extraction on small datasets built here (one per vendor style)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tasks.dicom_headers import (
    extract_b_value,
    header_from_dataset,
    read_header,
    read_headers,
    slice_normal,
)
from tasks.errors import InputError


def _mr(manufacturer: str = "SIEMENS") -> Dataset:
    ds = Dataset()
    ds.Modality = "MR"
    ds.Manufacturer = manufacturer
    return ds


def _siemens(value: object, vr: str = "IS", creator: str = "SIEMENS MR HEADER") -> Dataset:
    ds = _mr("SIEMENS")
    if creator:
        ds.add_new((0x0019, 0x0010), "LO", creator)
    ds.add_new((0x0019, 0x100C), vr, value)
    return ds


def test_standard_tag_wins() -> None:
    ds = _siemens("50")
    ds.DiffusionBValue = 800.0
    assert extract_b_value(ds) == (800.0, "standard")


@pytest.mark.parametrize(
    ("value", "vr"), [("800", "IS"), (b"800 ", "OB"), (b"50", "OB"), (b"1400", "UN")]
)
def test_siemens_private_tag_as_is_or_bytes(value: object, vr: str) -> None:
    expected = float(value if isinstance(value, str) else value.decode().strip())
    assert extract_b_value(_siemens(value, vr)) == (expected, "siemens")


def test_siemens_block_found_through_its_creator() -> None:
    ds = _mr("SIEMENS")
    ds.add_new((0x0019, 0x0010), "LO", "SOME OTHER CREATOR")
    ds.add_new((0x0019, 0x0011), "LO", "SIEMENS MR HEADER")
    ds.add_new((0x0019, 0x100C), "IS", "9999")  # belongs to the other creator
    ds.add_new((0x0019, 0x110C), "IS", "400")
    assert extract_b_value(ds) == (400.0, "siemens")


def test_private_tag_of_a_foreign_creator_is_ignored() -> None:
    ds = _siemens("800", creator="NOT SIEMENS")
    ds.SequenceName = "*ep_b50t"
    assert extract_b_value(ds) == (50.0, "sequence_name")


def test_private_tag_without_creator_needs_matching_manufacturer() -> None:
    assert extract_b_value(_siemens("800", creator=""))[0] == 800.0
    ds = _siemens("800", creator="")
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    assert extract_b_value(ds) == (None, None)


@pytest.mark.parametrize(
    ("name", "b"),
    [("*ep_b800t", 800.0), ("*ep_b50t", 50.0), ("ep_b0", 0.0), ("ep_b1400t", 1400.0)],
)
def test_siemens_sequence_name(name: str, b: float) -> None:
    ds = _mr()
    ds.SequenceName = name
    assert extract_b_value(ds) == (b, "sequence_name")


def test_sequence_name_range_is_not_a_b_value() -> None:
    ds = _mr()
    ds.SequenceName = "*ep_b50_800"
    assert extract_b_value(ds) == (None, None)
    ds.Rows, ds.Columns = 4, 4
    assert header_from_dataset(ds, Path("x.dcm")).sequence_b_range == (50, 800)


@pytest.mark.parametrize(
    ("value", "b"),
    [("1000000800\\8\\0\\0", 800.0), ("800\\8\\0\\0", 800.0), ("1000001400\\8\\0\\0", 1400.0)],
)
def test_ge_private_tag(value: str, b: float) -> None:
    ds = _mr("GE MEDICAL SYSTEMS")
    ds.add_new((0x0043, 0x0010), "LO", "GEMS_PARM_01")
    ds.add_new((0x0043, 0x1039), "IS", value.split("\\"))
    assert extract_b_value(ds) == (b, "ge")


def test_ge_private_tag_as_bytes() -> None:
    ds = _mr("GE MEDICAL SYSTEMS")
    ds.add_new((0x0043, 0x0010), "LO", "GEMS_PARM_01")
    ds.add_new((0x0043, 0x1039), "UN", b"1000000800\\8\\0\\0 ")
    assert extract_b_value(ds) == (800.0, "ge")


def test_philips_private_tag_float_and_raw_bytes() -> None:
    ds = _mr("Philips Medical Systems")
    ds.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
    ds.add_new((0x2001, 0x1003), "FL", 1000.0)
    assert extract_b_value(ds) == (1000.0, "philips")
    raw = _mr("Philips Medical Systems")
    raw.add_new((0x2001, 0x0010), "LO", "Philips Imaging DD 001")
    raw.add_new((0x2001, 0x1003), "UN", struct.pack("<f", 600.0))
    assert extract_b_value(raw) == (600.0, "philips")


def test_no_b_value() -> None:
    ds = _mr()
    ds.SequenceName = "*tse2d1_25"
    assert extract_b_value(ds) == (None, None)


def test_slice_normal() -> None:
    assert np.allclose(slice_normal((1, 0, 0, 0, 1, 0)), (0, 0, 1))
    assert np.allclose(slice_normal((0, 1, 0, 0, 0, -1)), (-1, 0, 0))  # sagittal


def _write(path: Path, **attributes: object) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.PatientName = "Secret^Person"
    ds.PatientID = "SECRET-ID-123"
    ds.PatientBirthDate = "19230405"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer = "MR", "SIEMENS"
    ds.SeriesNumber, ds.InstanceNumber = 6, 3
    ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]
    ds.ScanningSequence, ds.SequenceName = "EP", "*ep_b800t"
    ds.EchoTime, ds.RepetitionTime = "63", "2700"
    ds.Rows, ds.Columns, ds.BitsAllocated = 2, 3, 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 12, 11, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelSpacing = ["2", "1.5"]
    ds.ImagePositionPatient = ["-10", "-20", "5.5"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1"
    ds.PixelData = np.arange(6, dtype=np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_read_header_from_file(tmp_path: Path) -> None:
    header = read_header(_write(tmp_path / "a file.dcm"))
    assert header.b_value == 800.0 and header.b_value_source == "sequence_name"
    assert header.image_type == ("DERIVED", "PRIMARY", "DIFFUSION", "TRACEW")
    assert header.scanning_sequence == ("EP",)
    assert header.pixel_spacing == (2.0, 1.5)
    assert header.position == (-10.0, -20.0, 5.5)
    assert header.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert (header.rescale_slope, header.rescale_intercept) == (2.0, -1.0)
    assert header.echo_time == 63.0 and header.series_number == 6
    assert header.pixel_bytes == 12
    # no patient attribute is kept in the record
    assert "Secret" not in repr(header) and "SECRET-ID" not in repr(header)
    assert "19230405" not in repr(header)


def test_unreadable_file_is_an_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "sub" / "broken.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 7)
    with pytest.raises(InputError, match="unreadable DICOM header") as info:
        read_headers([bad], root=tmp_path)
    assert info.value.path == "sub/broken.dcm"
    assert str(tmp_path) not in str(info.value)
