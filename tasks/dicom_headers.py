"""Read DICOM headers (never pixels) into small frozen records, and find diffusion b-values.

Only the attributes the ingest step needs are kept: identifiers of the study and series,
acquisition parameters used for classification, geometry, rescale and the b-value. Patient
attributes (name, ID, birth date) and dates are never read into the record, so nothing built
from a :class:`DicomHeader` can leak them.

b-value sources, in the order they are tried (the first one present wins):

1. standard ``DiffusionBValue`` (0018,9087);
2. vendor private tags, used only when the block's private creator matches (or, where the
   file carries no private creator for that group, when the manufacturer matches):
   Siemens (0019,xx0C) "SIEMENS MR HEADER" (IS, or OB bytes such as ``b'800 '`` after
   anonymisation); GE (0043,xx39) "GEMS_PARM_01", first value, minus the 1e9 flag some
   versions add (``1000000800\\8\\0\\0`` -> 800); Philips (2001,xx03)
   "Philips Imaging DD 001" (FL, or its 4 raw bytes);
3. Siemens ``SequenceName`` ``*ep_b800t`` / ``ep_b0`` / ``*re_b1000t``.

A scanner-derived series (ADC, computed high b) can carry a b-value too; deciding what the
series is belongs to :mod:`tasks.classify`, not here.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from tasks.errors import InputError

STEP = "ingest"

SIEMENS_CREATOR = "SIEMENS MR HEADER"
GE_CREATOR = "GEMS_PARM_01"
PHILIPS_CREATOR = "Philips Imaging DD 001"

_SEQ_B = re.compile(r"(?:ep|re)_b(\d+)t?$", re.IGNORECASE)
_SEQ_B_RANGE = re.compile(r"(?:ep|re)_b(\d+)_(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class DicomHeader:
    """What the ingest step needs from one DICOM file (no patient attributes, no dates).

    Lengths are in mm, times in ms, ``position`` is ImagePositionPatient (LPS) and
    ``orientation`` ImageOrientationPatient (row direction cosines, then column ones).
    """

    path: Path
    study_uid: str
    series_uid: str
    modality: str
    manufacturer: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    sequence_name: str
    echo_time: float | None
    repetition_time: float | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    rescale_slope: float
    rescale_intercept: float
    number_of_frames: int
    b_value: float | None
    b_value_source: str | None
    diffusion_directionality: str | None
    sequence_b_range: tuple[int, int] | None
    file_size: int
    pixel_bytes: int | None


def _first(value: object) -> object:
    if isinstance(value, (list, tuple, MultiValue)):
        return value[0] if len(value) else None
    return value


def _number(value: object) -> float | None:
    """Decode a number stored as DS/IS/FL/FD, as text bytes (OB/UN) or as a 4-byte float."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        text = raw.decode("ascii", errors="replace").strip("\x00 ").split("\\")[0].strip()
        try:
            return float(text)
        except ValueError:
            if len(raw) == 4:  # binary FL read as OB/UN (implicit VR, unknown private tag)
                number = struct.unpack("<f", raw)[0]
                return float(number) if number == number else None
            if len(raw) == 8:
                return float(struct.unpack("<d", raw)[0])
            return None
    value = _first(value)
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", errors="replace").strip("\x00 ")
    return str(value).strip()


def _private_value(ds: Dataset, group: int, element: int, creator: str, vendor: str) -> object:
    """Value of private element ``(group, xx<element>)`` in the block owned by ``creator``.

    Where the group has private creators, only the block of ``creator`` is looked at. Where it
    has none (stripped by some anonymisers), the conventional block 0x10 is used, but only for
    a file whose manufacturer is ``vendor`` or unknown.
    """
    creators = {
        tag.element: _text(ds[tag].value)
        for tag in sorted(ds.keys())
        if tag.group == group and 0x10 <= tag.element <= 0xFF
    }
    if creators:
        blocks = [b for b, name in creators.items() if name.upper() == creator.upper()]
        if not blocks:
            return None
        tag = Tag(group, (blocks[0] << 8) | element)
    else:
        manufacturer = _text(ds.get("Manufacturer", "")).upper()
        if manufacturer and vendor not in manufacturer:
            return None
        tag = Tag(group, 0x1000 | element)
    return ds[tag].value if tag in ds else None


def _ge_b_value(value: object) -> float | None:
    if isinstance(value, (bytes, bytearray)):
        value = _text(value).split("\\")[0]
    number = _number(value)
    if number is None:
        return None
    if number >= 1e9:  # some GE software versions add 1e9 as a flag
        number = number % 100000
    return number


def extract_b_value(ds: Dataset) -> tuple[float | None, str | None]:
    """Return ``(b, source)`` in s/mm² from the first tag that holds it, or ``(None, None)``.

    ``source`` is one of ``"standard"``, ``"siemens"``, ``"ge"``, ``"philips"``,
    ``"sequence_name"``.
    """
    if "DiffusionBValue" in ds:
        b = _number(ds["DiffusionBValue"].value)
        if b is not None:
            return b, "standard"
    b = _number(_private_value(ds, 0x0019, 0x0C, SIEMENS_CREATOR, "SIEMENS"))
    if b is not None:
        return b, "siemens"
    b = _ge_b_value(_private_value(ds, 0x0043, 0x39, GE_CREATOR, "GE"))
    if b is not None:
        return b, "ge"
    b = _number(_private_value(ds, 0x2001, 0x03, PHILIPS_CREATOR, "PHILIPS"))
    if b is not None:
        return b, "philips"
    match = _SEQ_B.search(_text(ds.get("SequenceName", "")))
    if match:
        return float(match.group(1)), "sequence_name"
    return None, None


def _directionality(ds: Dataset) -> str | None:
    if "DiffusionDirectionality" in ds:
        return _text(ds["DiffusionDirectionality"].value).upper() or None
    value = _private_value(ds, 0x0019, 0x0D, SIEMENS_CREATOR, "SIEMENS")
    if value is not None:
        return _text(value).upper() or None
    value = _private_value(ds, 0x2001, 0x04, PHILIPS_CREATOR, "PHILIPS")
    if value is not None:  # Philips: I = isotropic (trace), O = directional, else none
        code = _text(value).upper()[:1]
        return {"I": "ISOTROPIC", "O": "DIRECTIONAL"}.get(code, "NONE")
    return None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n else None


def _int(value: object) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _strings(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(p.strip().upper() for p in value.split("\\") if p.strip())
    return tuple(str(v).strip().upper() for v in value)  # type: ignore[union-attr]


def header_from_dataset(ds: Dataset, path: Path, file_size: int = 0) -> DicomHeader:
    """Build a :class:`DicomHeader` from a dataset already read (pixels not needed)."""
    b_value, b_source = extract_b_value(ds)
    range_match = _SEQ_B_RANGE.search(_text(ds.get("SequenceName", "")))
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    frames = _int(ds.get("NumberOfFrames")) or 1
    bits = _int(ds.get("BitsAllocated"))
    samples = _int(ds.get("SamplesPerPixel")) or 1
    pixel_bytes = (
        rows * columns * frames * samples * bits // 8 if rows and columns and bits else None
    )
    spacing = _floats(ds.get("PixelSpacing"), 2)
    return DicomHeader(
        path=path,
        study_uid=_text(ds.get("StudyInstanceUID")),
        series_uid=_text(ds.get("SeriesInstanceUID")),
        modality=_text(ds.get("Modality")).upper(),
        manufacturer=_text(ds.get("Manufacturer")),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=_text(ds.get("SeriesDescription")),
        instance_number=_int(ds.get("InstanceNumber")),
        image_type=_strings(ds.get("ImageType")),
        scanning_sequence=_strings(ds.get("ScanningSequence")),
        sequence_name=_text(ds.get("SequenceName")),
        echo_time=_number(ds.get("EchoTime")),
        repetition_time=_number(ds.get("RepetitionTime")),
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slice_thickness=_number(ds.get("SliceThickness")),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        rescale_slope=_number(ds.get("RescaleSlope")) or 1.0,
        rescale_intercept=_number(ds.get("RescaleIntercept")) or 0.0,
        number_of_frames=frames,
        b_value=b_value,
        b_value_source=b_source,
        diffusion_directionality=_directionality(ds),
        sequence_b_range=(int(range_match[1]), int(range_match[2])) if range_match else None,
        file_size=file_size,
        pixel_bytes=pixel_bytes,
    )


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit slice normal (row cosines x column cosines) from ImageOrientationPatient."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def read_header(path: str | Path, *, label: str | None = None) -> DicomHeader:
    """Read one file's header (``stop_before_pixels``).

    Parameters
    ----------
    path
        The DICOM file.
    label
        How to name the file in error messages (e.g. its path relative to the data root);
        defaults to the file name, so absolute paths never reach messages.

    Raises
    ------
    InputError
        The file cannot be parsed as DICOM, or lacks its Study/SeriesInstanceUID.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        header = header_from_dataset(ds, path, path.stat().st_size)
    except Exception as exc:  # pydicom raises many types for malformed input or values
        raise InputError(
            f"unreadable DICOM header ({type(exc).__name__})",
            step=STEP,
            path=label or path.name,
        ) from exc
    if not header.study_uid or not header.series_uid:
        # pydicom returns what it could parse of a file cut short inside its header
        raise InputError(
            "unreadable DICOM header (no Study/SeriesInstanceUID: truncated or not an image)",
            step=STEP,
            path=label or path.name,
        )
    return header


def read_headers(paths: Iterable[Path], *, root: Path | None = None) -> list[DicomHeader]:
    """Read the headers of several files; error labels are relative to ``root`` if given."""
    headers = []
    for path in paths:
        label = Path(path).relative_to(root).as_posix() if root else Path(path).name
        headers.append(read_header(path, label=label))
    return headers
