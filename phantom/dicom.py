"""Write synthetic MR volumes as real DICOM series: one MR Image Storage file per slice.

This is the DICOM half of :mod:`phantom.exam` (anatomy and physics live there).

Geometry
--------
A :class:`Grid` is an image geometry in LPS physical coordinates (mm: +x patient left,
+y posterior, +z superior) with ITK conventions: ``size`` and ``spacing`` in index order
(i, j, k) = (column, row, slice), ``origin`` = LPS centre of voxel (0, 0, 0), ``direction`` =
3x3 row-major matrix whose columns are the LPS unit vectors of the i, j and k axes. Pixel
arrays are numpy (z, y, x) = (slice, row, column), the order ``sitk.GetArrayFromImage``
returns. Slice k is written with ImagePositionPatient = origin + k * spacing[2] * direction[:, 2]
and ImageOrientationPatient = (direction[:, 0], direction[:, 1]); since direction[:, 2] is the
cross product of the two, SimpleITK's ImageSeriesReader restores the grid.

Vendor b-value conventions (s/mm²; written on DWI files only, plus the Siemens ADC)
-----------------------------------------------------------------------------------
- siemens: (0019,100C) under private creator (0019,0010) "SIEMENS MR HEADER", as IS or, like
  anonymised TCIA data, as OB bytes padded to even length (``b"800 "``); SequenceName
  ``*ep_b800t``. All b-values in ONE series, b-major: every slice of the first b, then of the
  next, InstanceNumber running 1..n_slices * n_b. The Siemens ADC series carries the highest b
  in (0019,100C) and a SequenceName such as ``*ep_b50_800``.
- ge: (0043,1039) IS with 4 values under creator (0043,0010) "GEMS_PARM_01"; the first value
  is the b-value, for some exams plus 1000000000 (``1000000800\\8\\0\\0``), otherwise
  ``800\\0\\0\\0``. One series per b-value.
- philips: (2001,1003) FL under creator (2001,0010) "Philips Imaging DD 001". ONE series,
  b-major.
- standard: DiffusionBValue (0018,9087) FD (the only variant that writes it). One series per
  b-value.

Files are written atomically (to a temporary sibling, then renamed) with
:func:`tasks.io.write_bytes_atomic`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from phantom.plan import ExamPlan
from tasks.errors import InputError
from tasks.io import write_bytes_atomic

GYROMAGNETIC_MHZ_PER_T = 42.577478
GE_BVALUE_OFFSET = 1_000_000_000

SIEMENS_CREATOR = "SIEMENS MR HEADER"
GE_CREATOR = "GEMS_PARM_01"
PHILIPS_CREATOR = "Philips Imaging DD 001"

ORIENTATIONS = ("axial", "sagittal", "coronal")
# Direction matrices (columns: row, column and slice-normal directions in LPS).
SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # rows +y, cols -z
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # rows +x, cols -z

_MAGNITUDE = ("ORIGINAL", "PRIMARY", "M", "NORM")
_TRACE = ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW")
_ADC = ("DERIVED", "PRIMARY", "DIFFUSION", "ADC")


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3-D image (LPS, mm; ITK index order; see the module docstring)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def centered(
        cls,
        size: Sequence[int],
        spacing: Sequence[float],
        direction: np.ndarray,
        center: Sequence[float],
    ) -> Grid:
        """Grid of ``size`` voxels whose middle lies at the LPS point ``center`` (mm)."""
        matrix = np.asarray(direction, dtype=float).reshape(3, 3)
        half_extent = (np.asarray(size) - 1) * np.asarray(spacing, dtype=float) / 2
        origin = np.asarray(center, dtype=float) - matrix @ half_extent
        return cls(
            size=tuple(int(n) for n in size),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in origin),
            direction=tuple(float(d) for d in matrix.ravel()),
        )

    @property
    def matrix(self) -> np.ndarray:
        """3x3 direction matrix; columns are the LPS directions of the i, j, k axes."""
        return np.array(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping a voxel index (i, j, k) to its LPS point (mm)."""
        affine = np.eye(4)
        affine[:3, :3] = self.matrix * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def points(self, transform: np.ndarray | None = None) -> np.ndarray:
        """LPS points (mm) of all voxel centres, shape (3, nz, ny, nx).

        With ``transform`` (4x4 homogeneous), return ``transform @ p`` for every centre p.
        """
        affine = self.index_to_physical()
        if transform is not None:
            affine = np.asarray(transform, dtype=float) @ affine
        nx, ny, nz = self.size
        i = np.arange(nx, dtype=float)[None, None, :]
        j = np.arange(ny, dtype=float)[None, :, None]
        k = np.arange(nz, dtype=float)[:, None, None]
        return np.stack(
            [
                affine[c, 0] * i + affine[c, 1] * j + affine[c, 2] * k + affine[c, 3]
                for c in range(3)
            ]
        )

    def image(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) numpy array as a SimpleITK image with this geometry."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def as_dict(self) -> dict[str, list[float] | list[int]]:
        """JSON-ready geometry."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


@dataclass(frozen=True, eq=False)
class Volume:
    """Pixels (uint16, numpy (z, y, x)) on a grid; ``b_value`` (s/mm²) for DWI volumes."""

    grid: Grid
    pixels: np.ndarray
    b_value: int | None = None


@dataclass(frozen=True)
class SeriesHeader:
    """Acquisition attributes of one series. ``kind``: t2w, dwi, adc or distractor."""

    number: int
    description: str
    kind: str
    image_type: tuple[str, ...]
    scanning_sequence: str
    sequence_variant: tuple[str, ...]
    echo_time_ms: float
    repetition_time_ms: float
    sequence_name: str | None = None


@dataclass(frozen=True)
class WrittenSeries:
    """A series on disk: its folder, SeriesInstanceUID and files in InstanceNumber order."""

    folder: Path
    uid: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class VendorStyle:
    """How one vendor names and structures its series."""

    manufacturer: str
    models: tuple[str, str]  # (1.5 T model, 3 T model)
    software: tuple[str, ...]
    descriptions: dict[str, str]  # keys: localizer, t2_sag, t2_cor, t2_tra, dwi, adc
    single_dwi_series: bool


VENDOR_STYLES: dict[str, VendorStyle] = {
    "siemens": VendorStyle(
        manufacturer="SIEMENS",
        models=("Avanto", "Skyra"),
        software=("syngo MR E11",),
        descriptions={
            "localizer": "localizer",
            "t2_sag": "t2_tse_sag",
            "t2_cor": "t2_tse_cor",
            "t2_tra": "t2_tse_tra",
            "dwi": "ep2d_diff_b{bs}_tra",
            "adc": "ep2d_diff_b{bs}_tra_ADC",
        },
        single_dwi_series=True,
    ),
    "ge": VendorStyle(
        manufacturer="GE MEDICAL SYSTEMS",
        models=("Signa HDxt", "DISCOVERY MR750"),
        software=("25", "LX", "MR Software release:DV25.0_R02_1549.b"),
        descriptions={
            "localizer": "3 Plane Loc",
            "t2_sag": "Sag T2 FSE",
            "t2_cor": "Cor T2 FSE",
            "t2_tra": "Ax T2 FSE",
            "dwi": "Ax DWI b{b}",
            "adc": "Apparent Diffusion Coefficient (mm2-s)",
        },
        single_dwi_series=False,
    ),
    "philips": VendorStyle(
        manufacturer="Philips Medical Systems",
        models=("Achieva", "Ingenia"),
        software=("5.3.1", "5.3.1.0"),
        descriptions={
            "localizer": "Survey",
            "t2_sag": "T2W_TSE_sag",
            "t2_cor": "T2W_TSE_cor",
            "t2_tra": "T2W_TSE_ax",
            "dwi": "DWI_b{bs}",
            "adc": "dADC_DWI_b{bs}",
        },
        single_dwi_series=True,
    ),
    "standard": VendorStyle(
        manufacturer="SyntheticMR",
        models=("Generic 1.5T", "Generic 3T"),
        software=("1.0",),
        descriptions={
            "localizer": "LOC",
            "t2_sag": "T2 SAG",
            "t2_cor": "T2 COR",
            "t2_tra": "T2 AX",
            "dwi": "DWI b{b}",
            "adc": "ADC",
        },
        single_dwi_series=False,
    ),
}


def dicom_uid(plan: ExamPlan, *parts: object) -> str:
    """Deterministic UID from the exam's (seed, index) and ``parts`` (e.g. "series", 4)."""
    # "tasks.synthetic" is the phantom's old module path, kept as a literal so that every
    # UID (and so every generated file) stays what it was before the move to phantom/.
    sources = ["tasks.synthetic", str(plan.seed), str(plan.index), *(str(p) for p in parts)]
    return generate_uid(entropy_srcs=sources)


def _uid_tail(uid: str) -> str:
    return "".join(ch for ch in uid if ch.isdigit())[-5:]


def study_folder_name(plan: ExamPlan) -> str:
    """TCIA-like study folder, e.g. ``07-07-2011-NA-MRI PROSTATE-12345`` (or just the date)."""
    date = f"{plan.study_date[4:6]}-{plan.study_date[6:8]}-{plan.study_date[:4]}"
    if plan.messy_names:
        return date
    return f"{date}-NA-MRI PROSTATE-{_uid_tail(dicom_uid(plan, 'study'))}"


def series_folder_name(plan: ExamPlan, number: int, description: str, uid: str) -> str:
    """TCIA-like series folder: ``4.000000-t2tsetra-00702``, or messy ``5 - Ax T2 FSE.prostate``."""
    if plan.messy_names:
        return f"{number} - {description.replace('/', '-')}.prostate"
    return f"{number}.000000-{re.sub(r'[^A-Za-z0-9]', '', description)}-{_uid_tail(uid)}"


def add_bvalue_tags(
    ds: Dataset, vendor: str, b_value: int, *, siemens_ob: bool = False, ge_offset: bool = False
) -> None:
    """Write ``b_value`` (s/mm²) into ``ds`` the way ``vendor`` does (module docstring)."""
    if vendor == "siemens":
        block = ds.private_block(0x0019, SIEMENS_CREATOR, create=True)
        if siemens_ob:
            text = str(b_value)
            block.add_new(0x0C, "OB", (text + " " * (len(text) % 2)).encode("ascii"))
        else:
            block.add_new(0x0C, "IS", str(b_value))
    elif vendor == "ge":
        first = b_value + GE_BVALUE_OFFSET if ge_offset else b_value
        rest = ["8", "0", "0"] if ge_offset else ["0", "0", "0"]
        block = ds.private_block(0x0043, GE_CREATOR, create=True)
        block.add_new(0x39, "IS", [str(first), *rest])
    elif vendor == "philips":
        block = ds.private_block(0x2001, PHILIPS_CREATOR, create=True)
        block.add_new(0x03, "FL", float(b_value))
    elif vendor == "standard":
        ds.DiffusionBValue = float(b_value)
        ds.DiffusionDirectionality = "ISOTROPIC"
    else:
        raise InputError(
            f"unknown vendor {vendor!r}", step="synthetic", hint=f"one of {list(VENDOR_STYLES)}"
        )


def _ds(values: Sequence[float]) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _study_attributes(plan: ExamPlan) -> dict[str, object]:
    style = VENDOR_STYLES[plan.vendor]
    age = int(plan.study_date[:4]) - int(plan.birth_date[:4])
    age -= plan.study_date[4:] < plan.birth_date[4:]
    return {
        "PatientName": plan.patient_name,
        "PatientID": plan.patient_id,
        "PatientBirthDate": plan.birth_date,
        "PatientSex": "M",
        "PatientAge": f"{age:03d}Y",
        "StudyInstanceUID": dicom_uid(plan, "study"),
        "StudyDate": plan.study_date,
        "StudyTime": plan.study_time,
        "StudyID": "1",
        "StudyDescription": "MRI PROSTATE",
        "AccessionNumber": plan.accession,
        "ReferringPhysicianName": "",
        "FrameOfReferenceUID": dicom_uid(plan, "frame"),
        "PositionReferenceIndicator": "",
        "Modality": "MR",
        "Manufacturer": style.manufacturer,
        "ManufacturerModelName": style.models[plan.field_strength_t > 2],
        "SoftwareVersions": list(style.software),
        "MagneticFieldStrength": format_number_as_ds(plan.field_strength_t),
        "ImagingFrequency": format_number_as_ds(
            round(GYROMAGNETIC_MHZ_PER_T * plan.field_strength_t, 6)
        ),
        "PatientPosition": "FFS",
        "BodyPartExamined": "PROSTATE",
    }


def _series_attributes(plan: ExamPlan, header: SeriesHeader, uid: str) -> dict[str, object]:
    minutes = int(plan.study_time[2:4]) + 3 * header.number
    series_time = f"{plan.study_time[:2]}{minutes % 60:02d}{plan.study_time[4:6]}"
    attributes: dict[str, object] = {
        "SeriesInstanceUID": uid,
        "SeriesNumber": str(header.number),
        "SeriesDescription": header.description,
        "ProtocolName": header.description,
        "SeriesDate": plan.study_date,
        "SeriesTime": series_time,
        "ContentDate": plan.study_date,
        "ContentTime": series_time,
        "ImageType": list(header.image_type),
        "ScanningSequence": header.scanning_sequence,
        "SequenceVariant": list(header.sequence_variant),
        "MRAcquisitionType": "2D",
        "EchoTime": format_number_as_ds(header.echo_time_ms),
        "RepetitionTime": format_number_as_ds(header.repetition_time_ms),
        "SOPClassUID": MRImageStorage,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 0,
    }
    if header.sequence_name is not None:
        attributes["SequenceName"] = header.sequence_name
    return attributes


def write_series(
    study_dir: Path, plan: ExamPlan, header: SeriesHeader, volumes: Sequence[Volume]
) -> WrittenSeries:
    """Write ``volumes`` as one DICOM series under ``study_dir``; one file per slice.

    Volumes are written one after the other (b-major for multi-b DWI); InstanceNumber runs
    1..total slices and names the files ``<InstanceNumber>.dcm``; AcquisitionNumber is the
    volume's 1-based position. DWI volumes get the vendor b-value tags; a Siemens ADC gets the
    highest b of the exam.

    Outputs
    -------
    ``<study_dir>/<series folder>/<n>.dcm`` (see :func:`series_folder_name`).
    """
    uid = dicom_uid(plan, "series", header.number)
    folder = Path(study_dir) / series_folder_name(plan, header.number, header.description, uid)
    shared = {**_study_attributes(plan), **_series_attributes(plan, header, uid)}
    files: list[Path] = []
    instance = 0
    for acquisition, volume in enumerate(volumes, start=1):
        grid = volume.grid
        matrix = grid.matrix
        rows, columns = grid.size[1], grid.size[0]
        for k in range(grid.size[2]):
            instance += 1
            position = np.asarray(grid.origin) + k * grid.spacing[2] * matrix[:, 2]
            ds = Dataset()
            for keyword, value in shared.items():
                setattr(ds, keyword, value)
            ds.SOPInstanceUID = dicom_uid(plan, "sop", header.number, instance)
            ds.InstanceNumber = str(instance)
            ds.AcquisitionNumber = str(acquisition)
            ds.ImagePositionPatient = _ds(position)
            ds.ImageOrientationPatient = _ds([*matrix[:, 0], *matrix[:, 1]])
            ds.SliceLocation = format_number_as_ds(float(position @ matrix[:, 2]))
            ds.SliceThickness = format_number_as_ds(grid.spacing[2])
            ds.SpacingBetweenSlices = format_number_as_ds(grid.spacing[2])
            ds.PixelSpacing = _ds([grid.spacing[1], grid.spacing[0]])
            ds.Rows = rows
            ds.Columns = columns
            ds.PixelData = np.ascontiguousarray(volume.pixels[k], dtype="<u2").tobytes()
            if header.kind == "dwi" and volume.b_value is not None:
                add_bvalue_tags(
                    ds,
                    plan.vendor,
                    volume.b_value,
                    siemens_ob=plan.siemens_bvalue_ob,
                    ge_offset=plan.ge_bvalue_offset,
                )
                if plan.vendor == "siemens":
                    ds.SequenceName = siemens_sequence_name(volume.b_value)
            elif header.kind == "adc" and plan.vendor == "siemens":
                add_bvalue_tags(
                    ds, "siemens", max(plan.b_values), siemens_ob=plan.siemens_bvalue_ob
                )
            files.append(_write_dataset(folder / f"{instance}.dcm", ds))
    return WrittenSeries(folder=folder, uid=uid, files=tuple(files))


def _write_dataset(path: Path, ds: Dataset) -> Path:
    """Write ``ds`` as an Explicit VR Little Endian Part 10 file, atomically."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def siemens_sequence_name(b_value: int) -> str:
    """Siemens DWI SequenceName, e.g. ``*ep_b800t`` (``*ep_b0`` for b = 0)."""
    return f"*ep_b{b_value}t" if b_value else "*ep_b0"


def write_exam_series(
    study_dir: Path,
    plan: ExamPlan,
    *,
    localizer: Sequence[Volume],
    sagittal: Volume,
    coronal: Volume,
    t2: Volume,
    dwi: Sequence[Volume],
    adc: Volume | None,
) -> list[dict[str, object]]:
    """Write every series of one exam in the vendor's layout; return JSON-ready records.

    Series numbers: 1 localizer (one slice per volume, mixed orientations), 2 sagittal T2,
    3 coronal T2, 4 axial T2W, then DWI (one series for Siemens and Philips, else one per b,
    ascending b) and last the scanner ADC when given. Each record holds the folder (relative
    to the patient's DICOM folder), series number and UID, description, kind (t2w, dwi, adc,
    distractor), orientation, b-values, per-volume shape (x, y, z), spacing (mm) and file count.
    """
    style = VENDOR_STYLES[plan.vendor]
    names = style.descriptions
    b_text = "_".join(str(b) for b in plan.b_values)
    high_field = plan.field_strength_t > 2
    t2_timing = (101.0, 5660.0) if high_field else (104.0, 4480.0)
    dwi_timing = (81.0, 3300.0) if high_field else (87.0, 2700.0)

    def magnitude(number: int, key: str, kind: str) -> SeriesHeader:
        return SeriesHeader(number, names[key], kind, _MAGNITUDE, "SE", ("SK", "SP"), *t2_timing)

    jobs: list[tuple[SeriesHeader, list[Volume], str]] = [
        (magnitude(1, "localizer", "distractor"), list(localizer), "mixed"),
        (magnitude(2, "t2_sag", "distractor"), [sagittal], "sagittal"),
        (magnitude(3, "t2_cor", "distractor"), [coronal], "coronal"),
        (magnitude(4, "t2_tra", "t2w"), [t2], "axial"),
    ]
    groups = [list(dwi)] if style.single_dwi_series else [[v] for v in dwi]
    for number, group in enumerate(groups, start=5):
        description = names["dwi"].format(b=group[0].b_value, bs=b_text)
        header = SeriesHeader(number, description, "dwi", _TRACE, "EP", ("SK", "SP"), *dwi_timing)
        jobs.append((header, group, "axial"))
    if adc is not None:
        sequence = (
            f"*ep_b{plan.b_values[0]}_{plan.b_values[-1]}" if plan.vendor == "siemens" else None
        )
        header = SeriesHeader(
            5 + len(groups),
            names["adc"].format(bs=b_text),
            "adc",
            _ADC,
            "EP",
            ("SK", "SP"),
            *dwi_timing,
            sequence_name=sequence,
        )
        jobs.append((header, [adc], "axial"))

    records = []
    for header, volumes, orientation in jobs:
        written = write_series(study_dir, plan, header, volumes)
        first = volumes[0].grid
        records.append(
            {
                "folder": f"{Path(study_dir).name}/{written.folder.name}",
                "series_number": header.number,
                "series_instance_uid": written.uid,
                "description": header.description,
                "kind": header.kind,
                "orientation": orientation,
                "b_values": [v.b_value for v in volumes if v.b_value is not None],
                "shape": list(first.size),
                "spacing": list(first.spacing),
                "n_files": len(written.files),
            }
        )
    return records
