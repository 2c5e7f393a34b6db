"""Ingest one exam: classify its series, build checked volumes, write float32 NIfTI.

Outputs (``<p>``, ``<s>``: pseudonymous patient and session ids, see :func:`exam_ids`)::

    <out_dir>/<p>/<s>/anat/<p>_<s>_T2w.nii.gz                 axial T2W
    <out_dir>/<p>/<s>/dwi/<p>_<s>_b<b>_dwi.nii.gz             one per acquired b (s/mm²)
    <out_dir>/<p>/<s>/dwi/<p>_<s>_adc.nii.gz                  scanner ADC in mm²/s
    <out_dir>/<p>/<s>/dwi/<p>_<s>_computed-b<b>_dwi.nii.gz    scanner-computed high b

All images are float32 in LPS geometry as the DICOM headers give it. The scanner ADC is
converted to mm²/s: vendors store it as integers in 1e-6 mm²/s (Siemens, PI-CAI) or, rarely,
1e-3 mm²/s; the factor is chosen from the median of the positive stored values (>= 50:
1e-6; >= 0.05: 1e-3; else already mm²/s) and recorded as ``scale`` with ``units``.

Exams are all-or-nothing: if any chosen series fails a check, or the exam has no axial T2W or
no DWI with ``min_b_values`` b-values, nothing is written and the result has status
``"error"`` with every problem and the series folder it concerns.

Privacy: patient and study folder names often are the PatientID and the study date, so
nothing this module records names them. Series are named by their folder *relative to the
exam folder* (e.g. ``4.000000-t2tsetra-00702``) and PI-CAI files by their role
(``t2w.mha``); the exam itself only by its pseudonymous ids. ``IngestResult.source`` (the
exam folder, for the terminal) is left out of :meth:`IngestResult.to_dict`, the form that is
persisted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from tasks.classify import Selection, select_series
from tasks.derivatives import derivative_name
from tasks.dicom_enhanced import read_image_headers
from tasks.dicom_headers import DicomHeader
from tasks.discover import Exam
from tasks.errors import InputError
from tasks.io import sha256_file, sha256_files, write_image_atomic
from tasks.pseudonym import pseudonymous_id, pseudonymous_study_id
from tasks.registry import INGEST
from tasks.volumes import Volume, build_dwi_volumes, build_volume

STEP = INGEST.name  # the step's one name: tasks/registry.py
ADC_UNITS = "mm^2/s"


@dataclass(frozen=True)
class SeriesRecord:
    """One written image: what it is, where it came from, its geometry and checksums."""

    kind: Literal["t2w", "dwi", "adc", "computed_dwi"]
    b_value: float | None
    source: str  # first source series folder, relative to the exam folder
    source_folders: tuple[str, ...]
    shape: tuple[int, int, int]  # x, y, z
    spacing: tuple[float, float, float]  # mm
    origin: tuple[float, float, float]  # LPS mm
    direction: tuple[float, ...]  # 3x3, row-major
    source_sha256: str
    source_files: tuple[tuple[str, str], ...]  # (path relative to the exam folder, sha256)
    image: str  # relative to out_dir
    image_sha256: str
    units: str | None
    scale: float  # factor applied to the stored (rescaled) values
    selected: bool
    reason: str


@dataclass(frozen=True)
class RejectedSeries:
    """A series that is not used, and why."""

    source: str
    kind: str
    reason: str
    selected: bool = False


@dataclass(frozen=True)
class FoundSeries:
    """One series found in the exam and what ingest took it for (``ingest --json``).

    ``series``: folder relative to the exam folder (PI-CAI: the role's file name);
    ``b_values``: the distinct b-values (s/mm²) of a diffusion series, else empty.
    """

    series: str
    kind: str
    b_values: tuple[float, ...]
    selected: bool
    reason: str


@dataclass(frozen=True)
class IngestResult:
    """Outcome of :func:`ingest_exam`; ``to_dict()`` gives plain JSON types without
    ``source`` (the exam folder, which may name the patient)."""

    patient: str
    session: str
    source: str
    status: Literal["ok", "error"]
    error: str | None
    series: tuple[SeriesRecord, ...]
    rejected: tuple[RejectedSeries, ...]
    found: tuple[FoundSeries, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = _plain(dataclasses.asdict(self))
        del data["source"]
        return data


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def adc_scale(image: sitk.Image) -> tuple[float, str]:
    """Return (factor to mm²/s, explanation) from the magnitude of the stored ADC values."""
    values = sitk.GetArrayViewFromImage(image)
    positive = values[values > 0]
    median = float(np.median(positive)) if positive.size else 0.0
    if median >= 50:
        return 1e-6, f"stored in 1e-6 mm^2/s (median {median:.0f}); multiplied by 1e-6"
    if median >= 0.05:
        return 1e-3, f"stored in 1e-3 mm^2/s (median {median:.3g}); multiplied by 1e-3"
    return 1.0, f"stored in mm^2/s (median {median:.3g}); kept"


class _Writer:
    """Writes images for one patient and builds their records."""

    def __init__(self, exam_root: Path, out_dir: Path, patient: str, session: str) -> None:
        self.root, self.out_dir, self.patient, self.session = exam_root, out_dir, patient, session
        self.records: list[SeriesRecord] = []
        self.names: dict[Path, str] = {}  # recorded names that are not paths under the exam

    def name(self, path: Path) -> str:
        """How a source file is recorded: relative to the exam folder, never the root."""
        if path in self.names:
            return self.names[path]
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    def add(
        self,
        kind: Any,
        image: sitk.Image,
        files: tuple[Path, ...],
        folders: tuple[str, ...],
        b_value: float | None,
        reason: str,
        *,
        units: str | None = None,
        scale: float = 1.0,
    ) -> None:
        p = f"{self.patient}_{self.session}"
        name = {
            "t2w": f"anat/{derivative_name(p, suffix='T2w')}",
            "dwi": f"dwi/{derivative_name(p, suffix='dwi', b=b_value or 0)}",
            "adc": f"dwi/{derivative_name(p, suffix='adc')}",
            "computed_dwi": f"dwi/{derivative_name(p, suffix='dwi', computed=b_value)}"
            if b_value is not None
            else f"dwi/{derivative_name(p, suffix='computed_dwi')}",
        }[kind]
        relative = f"{exam_dir(self.patient, self.session)}/{name}"
        digest = write_image_atomic(image, self.out_dir / relative)
        ordered = sorted(files, key=self.name)
        self.records.append(
            SeriesRecord(
                kind=kind,
                b_value=b_value,
                source=folders[0],
                source_folders=folders,
                shape=tuple(image.GetSize()),  # type: ignore[arg-type]
                spacing=tuple(image.GetSpacing()),  # type: ignore[arg-type]
                origin=tuple(image.GetOrigin()),  # type: ignore[arg-type]
                direction=tuple(image.GetDirection()),
                source_sha256=sha256_files(ordered),
                source_files=tuple((self.name(f), sha256_file(f)) for f in ordered),
                image=relative,
                image_sha256=digest,
                units=units,
                scale=scale,
                selected=True,
                reason=reason,
            )
        )


def _problem(exc: InputError) -> str:
    return f"{exc.path}: {exc.problem}" if exc.path else exc.problem


def _read_series(exam: Exam) -> tuple[dict[str, list[DicomHeader]], dict[str, list[str]]]:
    """Image headers per series folder (one per file, or per frame of an enhanced file);
    objects that are not images (presentation states, ...) are skipped."""
    headers: dict[str, list[DicomHeader]] = {}
    broken: dict[str, list[str]] = {}
    for series in exam.series:
        for rel in series.files:
            try:
                images = read_image_headers(exam.root / rel, label=rel)
            except InputError:
                broken.setdefault(series.folder, []).append(Path(rel).name)
                continue
            if images:
                headers.setdefault(series.folder, []).extend(images)
    for rel in exam.unreadable:
        broken.setdefault(Path(rel).parent.as_posix(), []).append(Path(rel).name)
    return headers, broken


Pending = tuple[str, Volume, str, dict[str, Any]]  # kind, volume, reason, record extras


def _build_volumes(
    selection: Selection,
    headers: dict[str, list[DicomHeader]],
    reasons: dict[str, str],
    min_b_values: int,
) -> tuple[list[Pending], list[str]]:
    """Build every chosen volume in memory; return them and the problems found."""
    pending: list[Pending] = []
    errors: list[str] = []
    jobs: list[tuple[str, list[str]]] = [("t2w", [selection.t2w] if selection.t2w else [])]
    jobs += [("dwi", list(selection.dwi)), ("adc", [selection.adc] if selection.adc else [])]
    jobs += [("computed_dwi", [folder]) for folder in selection.computed]
    for kind, folders in jobs:
        if not folders:
            continue
        try:
            if kind == "dwi":
                pairs = [(f, headers[f]) for f in folders]
                for volume in build_dwi_volumes(pairs, min_b_values=min_b_values):
                    why = " | ".join([volume.note, *(reasons[f] for f in volume.folders)])
                    pending.append((kind, volume, why, {}))
                continue
            volume = build_volume(headers[folders[0]], label=folders[0])
            extra: dict[str, Any] = {}
            why = f"{reasons[folders[0]]}; {volume.note}"
            if kind == "adc":
                scale, how = adc_scale(volume.image)
                extra = {"units": ADC_UNITS, "scale": scale}
                why += f"; {how}"
            pending.append((kind, volume, why, extra))
        except InputError as exc:
            errors.append(_problem(exc))
    return pending, errors


def relative_to_exam(exam: Exam, rel: str) -> str:
    """A path relative to the data root, as recorded: relative to the exam folder."""
    folder = exam.folder.strip("/")
    if rel == folder:
        return "."
    if folder in ("", "."):
        return rel
    return rel[len(folder) + 1 :] if rel.startswith(folder + "/") else Path(rel).name


def _b_values(headers: list[DicomHeader]) -> tuple[float, ...]:
    return tuple(sorted({float(h.b_value) for h in headers if h.b_value is not None}))


def _found(
    selection: Selection, headers: dict[str, list[DicomHeader]], broken: dict[str, list[str]]
) -> list[FoundSeries]:
    """Every series of the exam with its class, b-values, whether chosen, and why."""
    found = []
    for decision in selection.decisions:
        diffusion = decision.kind in ("dwi", "computed_dwi")
        b_values = _b_values(headers[decision.folder]) if diffusion else ()
        found.append(
            FoundSeries(
                decision.folder, decision.kind, b_values, decision.selected, decision.reason
            )
        )
    for folder, names in sorted(broken.items()):
        if folder not in headers:
            reason = f"unreadable DICOM header in {len(names)} file(s)"
            found.append(FoundSeries(folder, "other", (), False, reason))
    return sorted(found, key=lambda f: f.series)


def _summary(found: list[FoundSeries]) -> str:
    """What was found, for an error message: ``3 series: t2w 1, dwi 0, other 2``."""
    kinds = [f.kind for f in found]
    counts = ", ".join(f"{k} {kinds.count(k)}" for k in ("t2w", "dwi", "adc", "other"))
    return f"{len(found)} series found: {counts}"


def _ingest_dicom(
    exam: Exam, writer: _Writer, min_b_values: int
) -> tuple[list[str], list, list[FoundSeries]]:
    headers, broken = _read_series(exam)
    headers = {relative_to_exam(exam, f): hs for f, hs in headers.items()}
    broken = {relative_to_exam(exam, f): names for f, names in broken.items()}
    selection = select_series(headers)
    found = _found(selection, headers, broken)
    reasons = {d.folder: d.reason for d in selection.decisions}
    rejected = [
        RejectedSeries(d.folder, d.kind, d.reason) for d in selection.decisions if not d.selected
    ]
    chosen = {selection.t2w, selection.adc, *selection.dwi, *selection.computed} - {None}
    errors = [
        f"{folder}: unreadable DICOM header in {', '.join(sorted(names))}"
        for folder, names in sorted(broken.items())
        if folder in chosen or folder not in headers
    ]
    rejected += [
        RejectedSeries(folder, "other", f"unreadable DICOM header in {len(names)} file(s)")
        for folder, names in sorted(broken.items())
        if folder not in chosen
    ]
    if selection.t2w is None:
        errors.append(f"no usable axial T2W series ({_summary(found)}; see found)")
    if not selection.dwi:
        errors.append(f"no usable DWI series ({_summary(found)}; see found)")
    pending, failures = _build_volumes(selection, headers, reasons, min_b_values)
    errors += failures
    if errors:
        return errors, rejected, found
    for kind, volume, why, extra in pending:
        image = volume.image
        if extra.get("scale", 1.0) != 1.0:
            image = sitk.Cast(image * extra["scale"], sitk.sitkFloat32)
        b_value = volume.b_value if kind in ("dwi", "computed_dwi") else None
        writer.add(kind, image, volume.files, volume.folders, b_value, why, **extra)
    return [], rejected, found


_IMAGE_KINDS = {"t2w": "t2w", "adc": "adc", "hbv": "computed_dwi"}


def _ingest_images(exam: Exam, writer: _Writer) -> tuple[list[str], list, list[FoundSeries]]:
    images, errors, rejected, found = {}, [], [], []
    for role, rel in exam.images:
        name = role_file(role, rel)  # PI-CAI file names hold the patient and study ids
        if role not in _IMAGE_KINDS:
            why = f"PI-CAI '{role}' image: not used"
            rejected.append(RejectedSeries(name, "other", why))
            found.append(FoundSeries(name, "other", (), False, why))
            continue
        try:
            image = sitk.Cast(sitk.ReadImage(str(exam.root / rel)), sitk.sitkFloat32)
        except RuntimeError:
            errors.append(f"{name}: unreadable image file")
            continue
        array = sitk.GetArrayViewFromImage(image)
        if image.GetDimension() != 3 or not np.isfinite(array).all() or not array.any():
            errors.append(f"{name}: not a 3D image with finite, non-zero values")
            continue
        images[role] = (image, rel, name)
        found.append(FoundSeries(name, _IMAGE_KINDS[role], (), True, f"PI-CAI '{role}' image"))
    if not any(role == "t2w" for role, _ in exam.images):
        errors.append("no t2w image")
    if errors:
        return errors, rejected, found
    for role, (image, rel, name) in sorted(images.items()):
        extra: dict[str, Any] = {}
        why = f"PI-CAI '{role}' image"
        if role == "adc":
            scale, how = adc_scale(image)
            image = sitk.Cast(image * scale, sitk.sitkFloat32)
            extra, why = {"units": ADC_UNITS, "scale": scale}, f"{why}; {how}"
        path = exam.root / rel
        writer.names[path] = name
        writer.add(_IMAGE_KINDS[role], image, (path,), (name,), None, why, **extra)
    return [], rejected, found


def role_file(role: str, rel: str) -> str:
    """``<patient>_<study>_t2w.mha`` -> ``t2w.mha``: the role and the file's suffixes."""
    name = Path(rel).name
    suffix = name[name.index(".") :] if "." in name else ""
    return f"{role}{suffix}"


def exam_ids(exam: Exam, key: str | bytes) -> tuple[str, str]:
    """Pseudonymous (patient, session) ids of an exam.

    The patient id is a keyed hash of the patient key found by discovery (the patient
    folder, or the DICOM PatientID for files lying directly in the root). The session id
    hashes the StudyInstanceUID together with the exam folder, so that two copies of one
    study in different folders stay apart.
    """
    patient = pseudonymous_id(exam.patient or exam.folder, key)
    session = pseudonymous_study_id(f"{exam.study}|{exam.folder}", key)
    return patient, session


def exam_dir(patient: str, session: str) -> str:
    """Folder of one exam's outputs, relative to the output root: ``<patient>/<session>``."""
    return f"{patient}/{session}"


def ingest_exam(
    exam: Exam, *, out_dir: str | Path, key: str | bytes, min_b_values: int = 2
) -> IngestResult:
    """Ingest one discovered exam into ``out_dir`` under its pseudonymous patient id.

    Parameters
    ----------
    exam
        From :func:`tasks.discover.discover_exams`.
    out_dir
        Output root; see the module docstring for the file names.
    key
        Secret key for the pseudonymous ids (HMAC-SHA256). Must not be empty.
    min_b_values
        Fewest distinct acquired b-values a DWI must have.

    Returns
    -------
    IngestResult
        ``status="ok"`` with one record per written image, or ``status="error"`` with every
        problem found (nothing written). Bad data never raises.

    Raises
    ------
    ValueError
        Empty ``key`` (a configuration error, not bad data).
    """
    patient, session = exam_ids(exam, key)
    if exam.problem:  # found by discovery (duplicate files, another patient's files, ...)
        return IngestResult(patient, session, exam.folder, "error", exam.problem, (), ())
    writer = _Writer(Path(exam.root) / exam.folder, Path(out_dir), patient, session)
    if exam.kind == "image":
        errors, rejected, found = _ingest_images(exam, writer)
    else:
        errors, rejected, found = _ingest_dicom(exam, writer, min_b_values)
    status: Literal["ok", "error"] = "error" if errors else "ok"
    return IngestResult(
        patient=patient,
        session=session,
        source=exam.folder,
        status=status,
        error="; ".join(errors) if errors else None,
        series=tuple(writer.records),
        rejected=tuple(rejected),
        found=tuple(found),
    )
