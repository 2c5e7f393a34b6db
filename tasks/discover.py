"""Find the exams under a data root: DICOM in any folder layout, PI-CAI image files, a manifest.

The exam rule
-------------
* DICOM: every file whose bytes 128-131 are ``DICM`` (extension irrelevant; other files,
  DICOMDIR and hidden folders are skipped). Files are grouped by (patient folder,
  StudyInstanceUID), where the patient folder is the first folder under ``root``; within an
  exam, files are grouped into series by SeriesInstanceUID. A series' folder is the deepest
  folder holding all its files, the exam folder the deepest folder holding all its series.
  A lone series below the patient folder makes the folder above it the exam folder.
  The original patient key is the patient folder name (the DICOM PatientID only for files
  lying directly in ``root``); the study key is the StudyInstanceUID.
* PI-CAI images: ``<patient>_<study>_<role>.mha`` (or ``.nii.gz`` / ``.nii``) with role
  ``t2w``, ``adc``, ``hbv`` (also ``sag``, ``cor``), grouped by (patient, study).
* Manifest: a CSV with columns ``patient, study, path``; each row is one exam, ``path`` a
  folder relative to ``root`` (or absolute) holding that exam's DICOM and/or image files.
  A DICOM folder holding more than one StudyInstanceUID is an error.

``Exam`` keeps the original patient and study keys (needed to derive pseudonyms) out of its
``repr`` so that logs of an exam show only folders.
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import pydicom

from tasks.errors import InputError

STEP = "discover"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
IMAGE_PATTERN = re.compile(
    r"^(?P<patient>[^_]+)_(?P<study>[^_]+)_(?P<role>t2w|adc|hbv|sag|cor)\.(?:mha|nii\.gz|nii)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SeriesFiles:
    """One DICOM series: its folder and its files, both relative to the data root (POSIX)."""

    folder: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Exam:
    """One exam to ingest. Paths are relative to ``root``; ``folder`` names the exam."""

    root: Path
    folder: str
    kind: Literal["dicom", "image"]
    patient: str = field(repr=False)
    study: str = field(repr=False)
    series: tuple[SeriesFiles, ...] = field(default=(), repr=False)
    # (role, path) for PI-CAI style files
    images: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # files with a DICOM preamble whose header fails to parse
    unreadable: tuple[str, ...] = field(default=(), repr=False)


def is_dicom_file(path: Path) -> bool:
    """True if the file has the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _walk(folder: Path) -> list[Path]:
    found = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(current) / name for name in sorted(files) if not name.startswith("."))
    return found


def _folder_of(files: list[str]) -> str:
    """Deepest folder (relative POSIX path, '.' for the root) holding every file."""
    parents = [PurePosixPath(f).parent.parts for f in files]
    common: list[str] = []
    for level in zip(*parents, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return PurePosixPath(*common).as_posix() if common else "."


def _dicom_groups(
    root: Path, files: list[Path]
) -> tuple[dict[tuple[str, str], dict[str, list[str]]], dict[str, str], list[str]]:
    """Group DICOM files by study and series.

    Returns ``{(study, series): files}`` grouped as ``{study: {series: files}}`` keyed by
    ``(study, "")``, the DICOM PatientID of every file (kept in memory only, to find the
    patient folders; never returned by :func:`discover_exams`), and the unreadable files.
    """
    groups: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    patient_ids: dict[str, str] = {}
    unreadable = []
    for path in files:
        if not is_dicom_file(path):
            continue
        rel = path.relative_to(root).as_posix()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # malformed header: reported by ingest, never dropped silently
            unreadable.append(rel)
            continue
        if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
            continue
        study = str(ds.get("StudyInstanceUID", "")).strip()
        series = str(ds.get("SeriesInstanceUID", "")).strip()
        if not study or not series:  # header cut short (pydicom returns what it parsed)
            unreadable.append(rel)
            continue
        patient_ids[rel] = str(ds.get("PatientID", "")).strip()
        # A series is its UID within one folder: copies of a series in two folders (e.g. an
        # exam copied to make a variant) stay apart. A series split over several folders is
        # then seen as incomplete series and reported by ingest, never merged silently.
        groups[(study, "")][f"{series}|{PurePosixPath(rel).parent}"].append(rel)
    return groups, patient_ids, unreadable


def _patient_key(exam_folder: str, patient_ids: dict[str, str]) -> str:
    """The patient key of an exam: its shallowest folder under the root holding one patient.

    Walking down from the root, the first folder all of whose DICOM files share the exam's
    PatientID is the patient folder (``<root>/<patient>/...`` in the usual layout; deeper
    when the root holds e.g. ``dicom/<patient>/...``). Exams lying directly in the root
    fall back to the PatientID itself.
    """
    parts = PurePosixPath(exam_folder).parts if exam_folder != "." else ()
    for depth in range(1, len(parts) + 1):
        prefix = PurePosixPath(*parts[:depth]).as_posix() + "/"
        ids = {pid for rel, pid in patient_ids.items() if rel.startswith(prefix)}
        if len(ids) == 1:
            return prefix.rstrip("/")
    ids = {pid for rel, pid in patient_ids.items() if rel.startswith(exam_folder + "/")}
    return next(iter(ids)) if len(ids) == 1 else exam_folder


def _exam_folder(series: list[SeriesFiles]) -> str:
    folder = _folder_of([f for s in series for f in s.files])
    if len(series) == 1 and len(PurePosixPath(folder).parts) > 1:
        # a lone series in its own folder: the exam is the folder above it
        folder = PurePosixPath(folder).parent.as_posix()
    return folder


def _dicom_exams(root: Path, files: list[Path]) -> list[Exam]:
    """One exam per study and folder: copies of one study in two folders are two exams."""
    groups, patient_ids, unreadable = _dicom_groups(root, files)
    exams = []
    for (study, _), by_series in groups.items():
        all_series = [SeriesFiles(_folder_of(f), tuple(sorted(f))) for f in by_series.values()]
        by_parent: dict[str, list[SeriesFiles]] = defaultdict(list)
        for s in all_series:
            by_parent[PurePosixPath(s.folder).parent.as_posix()].append(s)
        for members in by_parent.values():
            series = tuple(sorted(members, key=lambda s: (s.folder, s.files)))
            folder = _exam_folder(list(series))
            series_folders = {s.folder for s in series}
            broken = tuple(
                u for u in unreadable if PurePosixPath(u).parent.as_posix() in series_folders
            )
            patient = _patient_key(folder, patient_ids)
            exams.append(Exam(root, folder, "dicom", patient, study, series, (), broken))
    return exams


def _image_exams(root: Path, files: list[Path]) -> list[Exam]:
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for path in files:
        match = IMAGE_PATTERN.match(path.name)
        if match:
            key = (match["patient"], match["study"])
            groups[key].append((match["role"].lower(), path.relative_to(root).as_posix()))
    exams = []
    for (patient, study), images in groups.items():
        roles = [role for role, _ in images]
        duplicated = sorted({r for r in roles if roles.count(r) > 1})
        if duplicated:
            raise InputError(
                f"exam {patient}_{study} has several files for role(s) {duplicated}",
                step=STEP,
                path=_folder_of([p for _, p in images]),
            )
        folder = _folder_of([p for _, p in images])
        exams.append(Exam(root, folder, "image", patient, study, (), tuple(sorted(images))))
    return exams


def _manifest_exams(root: Path, manifest: Path) -> list[Exam]:
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    exams = []
    for number, row in enumerate(rows, start=2):
        values = {k: (row.get(k) or "").strip() for k in ("patient", "study", "path")}
        if not all(values.values()):
            raise InputError(
                f"manifest line {number}: columns patient, study and path must all be set",
                step=STEP,
                path=manifest.name,
            )
        folder = (root / values["path"]).resolve()
        if not folder.is_dir() or not folder.is_relative_to(root):
            raise InputError(
                f"manifest line {number}: path is not a folder under the data root",
                step=STEP,
                path=values["path"],
            )
        files = _walk(folder)
        found = _dicom_exams(root, files) + _image_exams(root, files)
        if len(found) != 1:
            raise InputError(
                f"manifest line {number}: expected one exam in the folder, found {len(found)}",
                step=STEP,
                path=values["path"],
            )
        exam = found[0]
        rel = folder.relative_to(root).as_posix() or "."
        exams.append(
            Exam(
                root,
                rel,
                exam.kind,
                values["patient"],
                values["study"],
                exam.series,
                exam.images,
                exam.unreadable,
            )
        )
    return exams


def discover_exams(root: str | Path, *, manifest: str | Path | None = None) -> list[Exam]:
    """Return the exams under ``root``, sorted by exam folder, then study and patient keys.

    Parameters
    ----------
    root
        The data root; every path in the result is relative to it.
    manifest
        Optional CSV (``patient, study, path``) listing the exams instead of the folder rule.

    Raises
    ------
    InputError
        ``root`` is not a folder, or the manifest is malformed or points at no single exam.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError("data root is not a folder", step=STEP, path=root.name)
    if manifest is not None:
        exams = _manifest_exams(root, Path(manifest))
    else:
        files = _walk(root)
        exams = _dicom_exams(root, files) + _image_exams(root, files)
    return sorted(exams, key=lambda e: (e.folder, e.study, e.patient, e.kind))
