"""One header per image: classic files, enhanced multi-frame frames, non-image objects skipped.

Enhanced MR DICOM (Siemens XA, Philips since R5; SOP class Enhanced MR Image Storage) keeps a
whole series, or one volume of it, in one file: ``NumberOfFrames`` images whose attributes lie
in functional groups, per frame (``PerFrameFunctionalGroupsSequence``) or shared by all frames
(``SharedFunctionalGroupsSequence``); a per-frame group wins over a shared one. Each frame
becomes one :class:`~tasks.dicom_headers.DicomHeader` (``frame`` = its 0-based index in the
pixel data), so classification, grouping by b-value, slice sorting and volume building treat
it like a classic single-frame file. Read per frame:

* geometry (LPS, mm): ``PlanePositionSequence`` ImagePositionPatient,
  ``PlaneOrientationSequence`` ImageOrientationPatient, ``PixelMeasuresSequence``
  PixelSpacing and SliceThickness;
* ``PixelValueTransformationSequence`` RescaleSlope / RescaleIntercept (else the file's, else
  1 / 0);
* ``MRDiffusionSequence`` (0018,9117): DiffusionBValue (0018,9087) in s/mm² (below
  ``B0_MAX`` recorded as 0), DiffusionDirectionality, and the gradient direction from
  ``DiffusionGradientDirectionSequence`` DiffusionGradientOrientation;
* ``MREchoSequence`` EffectiveEchoTime and ``MRTimingAndRelatedParametersSequence``
  RepetitionTime (ms); ``MRImageFrameTypeSequence`` FrameType as the image type.

Enhanced files have no ScanningSequence; it is derived from EchoPulseSequence (SPIN -> SE,
GRADIENT -> GR, BOTH -> SE and GR), EchoPlanarPulseSequence YES (EP) and the MR Modifier
Sequence's InversionRecovery YES (IR), so the T2W rule of :mod:`tasks.classify` applies.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from tasks.dicom_headers import (
    DicomHeader,
    _floats,
    _int,
    _number,
    _strings,
    _text,
    fail,
    normalise_b,
    read_dataset,
    unit_vector,
)

_ECHO_PULSE = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}


def is_image_object(ds: Dataset) -> bool:
    """True for an image: Rows and Columns, and a standard *Image Storage* SOP class.

    Presentation states, spectroscopy, raw data and private SOP classes (Philips' series
    data and ExamCard objects carry Rows/Columns without pixels) are not images. A file
    without any SOP class is judged by Rows/Columns alone.
    """
    if not (_int(ds.get("Rows")) and _int(ds.get("Columns"))):
        return False
    sop = _text(ds.get("SOPClassUID"))
    if not sop:
        meta = getattr(ds, "file_meta", None)
        sop = _text(getattr(meta, "MediaStorageSOPClassUID", "")) if meta is not None else ""
    if not sop:
        return True
    uid = UID(sop)
    return not uid.is_private and "Image Storage" in uid.name


def is_enhanced(ds: Dataset) -> bool:
    """True if the file describes its frames with per-frame functional groups."""
    return "PerFrameFunctionalGroupsSequence" in ds


def _item(groups: list[Dataset | None], keyword: str) -> Dataset | None:
    """First item of macro ``keyword`` in the first group holding it (per-frame, then shared)."""
    for group in groups:
        if group is not None and keyword in group:
            sequence = group[keyword].value
            if sequence is not None and len(sequence):
                return sequence[0]
    return None


def _get(item: Dataset | None, keyword: str) -> object:
    return item.get(keyword) if item is not None else None


def _scanning_sequence(ds: Dataset, groups: list[Dataset | None]) -> tuple[str, ...]:
    codes = list(_ECHO_PULSE.get(_text(ds.get("EchoPulseSequence")).upper(), ()))
    if _text(ds.get("EchoPlanarPulseSequence")).upper() == "YES":
        codes.append("EP")
    modifier = _item(groups, "MRModifierSequence")
    if _text(_get(modifier, "InversionRecovery")).upper() == "YES":
        codes.append("IR")
    return tuple(codes)


def frame_headers(ds: Dataset, base: DicomHeader) -> list[DicomHeader]:
    """One header per frame of an enhanced file; ``base`` is its file-level header.

    Raises
    ------
    ValueError
        The per-frame sequence does not hold one item per frame.
    """
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != base.number_of_frames:
        raise ValueError(
            f"{len(per_frame)} per-frame functional groups for {base.number_of_frames} frames"
        )
    shared_sequence = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else None
    scanning = base.scanning_sequence or _scanning_sequence(ds, [shared])
    sequence_name = base.sequence_name or _text(ds.get("PulseSequenceName"))
    headers = []
    for index, frame in enumerate(per_frame):
        groups = [frame, shared]
        measures = _item(groups, "PixelMeasuresSequence")
        transform = _item(groups, "PixelValueTransformationSequence")
        diffusion = _item(groups, "MRDiffusionSequence")
        echo = _item(groups, "MREchoSequence")
        timing = _item(groups, "MRTimingAndRelatedParametersSequence")
        frame_type = _strings(_get(_item(groups, "MRImageFrameTypeSequence"), "FrameType"))
        spacing = _floats(_get(measures, "PixelSpacing"), 2)
        slope = _number(_get(transform, "RescaleSlope"))
        intercept = _number(_get(transform, "RescaleIntercept"))
        b_value, b_source = base.b_value, base.b_value_source
        directionality, direction = base.diffusion_directionality, base.diffusion_direction
        if diffusion is not None:
            frame_b = _number(diffusion.get("DiffusionBValue"))
            if frame_b is not None:
                b_value, b_source = normalise_b(frame_b), "standard"
            directionality = _text(diffusion.get("DiffusionDirectionality")).upper() or None
            gradient = _item([diffusion], "DiffusionGradientDirectionSequence")
            direction = unit_vector(_get(gradient, "DiffusionGradientOrientation"))
        position = _floats(_get(_item(groups, "PlanePositionSequence"), "ImagePositionPatient"), 3)
        orientation = _floats(
            _get(_item(groups, "PlaneOrientationSequence"), "ImageOrientationPatient"), 6
        )
        headers.append(
            dataclasses.replace(
                base,
                frame=index,
                image_type=frame_type or base.image_type,
                scanning_sequence=scanning,
                sequence_name=sequence_name,
                echo_time=_number(_get(echo, "EffectiveEchoTime")) or base.echo_time,
                repetition_time=_number(_get(timing, "RepetitionTime")) or base.repetition_time,
                pixel_spacing=spacing or base.pixel_spacing,  # type: ignore[arg-type]
                slice_thickness=_number(_get(measures, "SliceThickness")) or base.slice_thickness,
                position=position or base.position,  # type: ignore[arg-type]
                orientation=orientation or base.orientation,  # type: ignore[arg-type]
                rescale_slope=base.rescale_slope if slope is None else slope,
                rescale_intercept=base.rescale_intercept if intercept is None else intercept,
                b_value=b_value,
                b_value_source=b_source if b_value is not None else None,
                diffusion_directionality=directionality,
                diffusion_direction=direction,
            )
        )
    return headers


def read_image_headers(path: str | Path, *, label: str | None = None) -> list[DicomHeader]:
    """Headers of the images in one file, as ingest uses them.

    Returns one header for a classic (single-frame) image, one per frame for enhanced
    multi-frame DICOM, and an empty list for an object that is not an image
    (:func:`is_image_object`: presentation state, Philips private objects, ...).

    Parameters
    ----------
    path
        The DICOM file.
    label
        How to name the file in error messages (relative path); defaults to the file name.

    Raises
    ------
    InputError
        As :func:`tasks.dicom_headers.read_header`, or an enhanced file whose functional
        groups are malformed.
    """
    path = Path(path)
    label = label or path.name
    ds, header = read_dataset(path, label)
    if not is_image_object(ds):
        return []
    if not is_enhanced(ds):
        return [header]
    try:
        return frame_headers(ds, header)
    except Exception as exc:  # malformed functional groups: many pydicom/value errors
        raise fail(
            label, f"unreadable enhanced DICOM functional groups ({type(exc).__name__})"
        ) from exc
