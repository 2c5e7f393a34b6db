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

A b-value below ``B0_MAX`` (1 s/mm²) is recorded as 0: Philips numbers its extra b0 images
0.001, 0.002, ... s/mm² to tell them apart, and at b < 1 s/mm² the signal of free water (ADC
3e-3 mm²/s) drops by less than 0.3 %, so such an image is a b0 for every fit.

Diffusion gradient direction (unit vector, used only to tell directions apart): standard
``DiffusionGradientOrientation`` (0018,9089); Siemens (0019,xx0E) "SIEMENS MR HEADER"; GE
(0019,xxBB/BC/BD) "GEMS_ACQU_01"; Philips (2005,xxB0/B1/B2) "Philips MR Imaging DD 001".
:func:`diffusion_role` says whether an image is a b0, a trace (isotropic) image or one
direction of a directional set.

:func:`tasks.dicom_enhanced.read_image_headers` is the reader for ingest: one header per
*image*, i.e. per file for classic DICOM and per frame for enhanced multi-frame DICOM, and
none for objects that are not images (presentation states, Philips private series data,
spectroscopy, raw data), which lie in the series folders of some exports.

A scanner-derived series (ADC, computed high b) can carry a b-value too; deciding what the
series is belongs to :mod:`tasks.classify`, not here.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from tasks.errors import InputError
from tasks.registry import INGEST

STEP = INGEST.name  # the step's one name: tasks/registry.py

SIEMENS_CREATOR = "SIEMENS MR HEADER"
GE_CREATOR = "GEMS_PARM_01"
PHILIPS_CREATOR = "Philips Imaging DD 001"
GE_ACQU_CREATOR = "GEMS_ACQU_01"
PHILIPS_MR_CREATOR = "Philips MR Imaging DD 001"
B0_MAX = 1.0  # s/mm²: b-values below this are recorded as 0 (see the module docstring)

_SEQ_B = re.compile(r"(?:ep|re)_b(\d+)t?$", re.IGNORECASE)
_SEQ_B_RANGE = re.compile(r"(?:ep|re)_b(\d+)_(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class DicomHeader:
    """What the ingest step needs from one DICOM file (no patient attributes, no dates).

    Lengths are in mm, times in ms, b-values in s/mm² (below ``B0_MAX`` recorded as 0),
    ``position`` is ImagePositionPatient (LPS) and ``orientation`` ImageOrientationPatient
    (row direction cosines, then column ones). For enhanced multi-frame DICOM there is one
    header per frame: ``frame`` is its 0-based index in the file's pixel data (``None`` for a
    single-frame file) and geometry, rescale, b-value and times are that frame's.
    ``diffusion_direction`` is the diffusion gradient's unit vector where the file gives one.
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
    diffusion_direction: tuple[float, float, float] | None = None
    frame: int | None = None

    @property
    def image_name(self) -> str:
        """File name, plus the frame number (1-based) for a frame of a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


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


def normalise_b(b: float | None) -> float | None:
    """``b`` in s/mm², with values below ``B0_MAX`` (Philips' 0.001 ... 0.004) set to 0."""
    if b is None:
        return None
    return 0.0 if abs(b) < B0_MAX else float(b)


def unit_vector(values: object) -> tuple[float, float, float] | None:
    """Three numbers as a unit vector; ``None`` if absent, malformed or (near) zero."""
    numbers = _floats(values, 3)
    if numbers is None:
        return None
    vector = np.asarray(numbers, float)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 0.5:  # b0 images store (0, 0, 0)
        return None
    return tuple(float(v) for v in vector / norm)  # type: ignore[return-value]


def gradient_direction(ds: Dataset) -> tuple[float, float, float] | None:
    """Diffusion gradient direction from the standard tag, else a vendor's private tags."""
    if "DiffusionGradientOrientation" in ds:
        return unit_vector(ds["DiffusionGradientOrientation"].value)
    value = _private_value(ds, 0x0019, 0x0E, SIEMENS_CREATOR, "SIEMENS")
    if isinstance(value, (bytes, bytearray)) and len(value) == 24:
        return unit_vector(struct.unpack("<3d", bytes(value)))
    if value is not None:
        return unit_vector(value)
    for group, elements, creator, vendor in (
        (0x0019, (0xBB, 0xBC, 0xBD), GE_ACQU_CREATOR, "GE"),
        (0x2005, (0xB0, 0xB1, 0xB2), PHILIPS_MR_CREATOR, "PHILIPS"),
    ):
        parts = [_number(_private_value(ds, group, e, creator, vendor)) for e in elements]
        if all(p is not None for p in parts):
            return unit_vector(parts)
    return None


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
    b_value = normalise_b(b_value)
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
        diffusion_direction=gradient_direction(ds),
    )


DiffusionRole = Literal["b0", "trace", "directional"]
_DIRECTIONAL = {"DIRECTIONAL", "BMATRIX"}


def diffusion_role(h: DicomHeader) -> DiffusionRole | None:
    """What a diffusion image is: ``b0``, ``trace`` (isotropic) or ``directional``.

    ``None`` without a b-value. b = 0 (after ``B0_MAX``) is a b0 whatever its direction tags.
    Trace: ImageType TRACEW / ISOTROPIC or DiffusionDirectionality ISOTROPIC (Siemens
    (0019,xx0D), Philips (2001,xx04) "I"). Directional: DiffusionDirectionality DIRECTIONAL
    or BMATRIX (Philips "O"), or, without any directionality tag, a gradient direction
    (GE stores only that). Any other image with b > 0 counts as trace, as before.
    """
    if h.b_value is None:
        return None
    if h.b_value == 0:
        return "b0"
    if {"TRACEW", "ISOTROPIC"} & set(h.image_type) or h.diffusion_directionality == "ISOTROPIC":
        return "trace"
    if h.diffusion_directionality in _DIRECTIONAL:
        return "directional"
    if h.diffusion_directionality is None and h.diffusion_direction is not None:
        return "directional"
    return "trace"


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit slice normal (row cosines x column cosines) from ImageOrientationPatient."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def fail(label: str, problem: str) -> InputError:
    """An ingest :class:`InputError` about the file or series named ``label``."""
    return InputError(problem, step=STEP, path=label)


def read_dataset(path: Path, label: str) -> tuple[Dataset, DicomHeader]:
    """Read a file's dataset (without pixels) and its file-level header; see read_header."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        header = header_from_dataset(ds, path, path.stat().st_size)
    except Exception as exc:  # pydicom raises many types for malformed input or values
        raise fail(label, f"unreadable DICOM header ({type(exc).__name__})") from exc
    if not header.study_uid or not header.series_uid:
        # pydicom returns what it could parse of a file cut short inside its header
        raise fail(
            label,
            "unreadable DICOM header (no Study/SeriesInstanceUID: truncated or not an image)",
        )
    return ds, header


def read_header(path: str | Path, *, label: str | None = None) -> DicomHeader:
    """Read one file's header (``stop_before_pixels``): file-level attributes only.

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
    return read_dataset(path, label or path.name)[1]


def read_headers(paths: Iterable[Path], *, root: Path | None = None) -> list[DicomHeader]:
    """Read the headers of several files; error labels are relative to ``root`` if given."""
    headers = []
    for path in paths:
        label = Path(path).relative_to(root).as_posix() if root else Path(path).name
        headers.append(read_header(path, label=label))
    return headers
