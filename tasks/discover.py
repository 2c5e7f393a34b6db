"""Find the exams under a data root: DICOM in any folder layout, PI-CAI image files, a manifest.

The exam rule
-------------
* DICOM: every file whose bytes 128-131 are ``DICM`` (extension irrelevant; other files,
  DICOMDIR and hidden folders are skipped). Files are grouped by StudyInstanceUID, then into
  series by SeriesInstanceUID within each folder (a folder's files without a
  SeriesInstanceUID form one series: the folder rule). A copy of a series in another folder
  stays a series of its own, never merged.
* Series names: the folder of a series (relative to the root), e.g. ``<study>/4-t2tse``, as
  long as its folder holds one image series of the study (presentation states and other
  non-image objects beside it belong to it). A folder holding several image series (a flat
  export: every file of an exam in one folder) names each ``<folder>/series-<SeriesNumber>``
  (``series-<SeriesNumber>-<k>`` where numbers repeat, ``series-unnumbered`` without one):
  stable, and never a UID.
* Exams: the series of one study whose names share a parent folder; the exam folder is the
  deepest folder holding all their files (a lone series in its own folder makes the folder
  above it the exam folder). Copies of one study in two folders are two exams.
* Patient key (what the pseudonymous patient id is derived from): the patient folder, i.e.
  the shallowest folder on the way from the root to the exam folder holding one patient's
  exams (``<root>/<patient>/...`` in the usual layout; deeper when the root holds e.g.
  ``dicom/<patient>/...``). Exams whose folder holds several patients (files lying directly
  in the root, several patients' series side by side) are keyed by their DICOM PatientID.
  Files of another patient (other PatientID) dropped into a series folder of an exam do not
  count: they are isolated as an exam of their own, with a problem and a key of their own,
  so they never change the exam's pseudonym or share it. One study whose files carry several
  PatientIDs is an exam with a problem.
* PI-CAI images: ``<patient>_<study>_<role>.mha`` (or ``.nii.gz`` / ``.nii``) with role
  ``t2w``, ``adc``, ``hbv`` (also ``sag``, ``cor``), grouped by (patient, study). Two files
  for one role (e.g. a backup copy somewhere under the root) make that exam a problem.
* Manifest: a CSV with columns ``patient, study, path``; each row is one exam, ``path`` a
  folder relative to ``root`` (or absolute, under ``root``) holding that exam's DICOM and/or
  image files. A row that is not one exam is an exam with a problem.

Problems are per exam: an :class:`Exam` with ``problem`` set is reported by ingest as that
exam's error (nothing of it is ingested); the other exams go on. Folders that hold no exam
(empty, no DICOM or image files, unreadable headers only, symbolic links not followed,
hidden) are listed in :attr:`Discovery.skipped` with the reason.

Symbolic links: links to files are read; links to folders are followed only with
``follow_symlinks=True`` (each real folder once; a link into the root is searched where it
points to).

``Exam`` keeps the original patient and study keys (needed to derive pseudonyms) out of its
``repr`` so that logs of an exam show only folders. ``Skipped.path`` and ``Exam.folder`` may
name a patient: for the terminal only, never persisted; ``Skipped.reason`` and
``Exam.problem`` name nothing.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Literal

import pydicom

from tasks.dicom_enhanced import is_image_object
from tasks.errors import InputError

STEP = "discover"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
IMAGE_PATTERN = re.compile(
    r"^(?P<patient>[^_]+)_(?P<study>[^_]+)_(?P<role>t2w|adc|hbv|sag|cor)\.(?:mha|nii\.gz|nii)$",
    re.IGNORECASE,
)

# Why a path under the root holds no exam (fixed texts: they name nothing, may be counted)
SKIP_EMPTY = "empty folder"
SKIP_NO_IMAGES = "no DICOM or PI-CAI image files"
SKIP_UNREADABLE = "DICOM files with unreadable headers, in no series of an exam"
SKIP_HIDDEN = "hidden folder"
SKIP_LINK = "symbolic link to a folder: not followed (use --follow-symlinks)"
SKIP_LINK_INSIDE = "symbolic link to a folder inside the data root: searched there"
SKIP_LINK_SEEN = "symbolic link to a folder already searched"
SKIP_LINK_LOOP = "symbolic link to a folder above it (a loop)"
SKIP_BROKEN_LINK = "broken symbolic link"
SKIP_UNLISTABLE = "folder cannot be read"
SKIP_DICOMDIR = "no DICOM images (DICOMDIR only)"
# patient key of files isolated as another patient's (never equal to a folder or an ID)
_FOREIGN = "\x00other patient\x00"


@dataclass(frozen=True)
class SeriesFiles:
    """One DICOM series: its name and its files, relative to the data root (POSIX).

    ``folder`` is the series' folder, or ``<folder>/series-<n>`` for one of several image
    series in one folder (see the module docstring).
    """

    folder: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Exam:
    """One exam to ingest. Paths are relative to ``root``; ``folder`` names the exam.

    ``problem``: why the exam cannot be ingested (no identifiers); ingest reports it as the
    exam's error and ingests nothing of it.
    """

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
    problem: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A folder (or link) under the root that holds no exam, and why.

    ``path`` is relative to the root and may name a patient (an empty patient folder, a
    link named after the patient): show it on the terminal, never persist it. ``reason`` is
    one of the fixed ``SKIP_*`` texts, ``files`` the number of files concerned (if any).
    """

    path: str
    reason: str
    files: int = 0


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found: the exams and the skipped paths."""

    exams: list[Exam]
    skipped: list[Skipped]

    def skipped_by_reason(self) -> dict[str, int]:
        """How many paths were skipped for each reason (what may be persisted)."""
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))


def is_dicom_file(path: Path) -> bool:
    """True if the file has the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------- the walk


@dataclass
class _Tree:
    """Files found under one folder, and what the walk could not enter."""

    files: list[Path] = field(default_factory=list)
    contents: dict[str, list[str]] = field(default_factory=dict)  # folder -> its files
    subfolders: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _walk(top: Path, root: Path, *, follow_symlinks: bool) -> _Tree:
    """Every non-hidden file under ``top`` (depth first, sorted by name); paths stay under
    ``root`` as written (a followed link is not resolved)."""
    tree = _Tree()
    real_root = os.path.realpath(root)
    seen = {os.path.realpath(top)}
    stack = [top]
    while stack:
        folder = stack.pop()
        key = _rel(folder, root)
        tree.contents[key], tree.subfolders[key] = [], []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            tree.skipped.append(Skipped(key, SKIP_UNLISTABLE))
            continue
        subfolders = []
        for entry in entries:
            path = folder / entry.name
            try:
                is_link, is_dir = entry.is_symlink(), entry.is_dir()
            except OSError:
                continue
            if entry.name.startswith("."):
                if is_dir:
                    tree.skipped.append(Skipped(_rel(path, root), SKIP_HIDDEN))
                continue
            if is_link and not path.exists():
                tree.skipped.append(Skipped(_rel(path, root), SKIP_BROKEN_LINK))
                continue
            if is_dir:
                real = os.path.realpath(path)
                reason = None
                if is_link and not follow_symlinks:
                    reason = SKIP_LINK
                elif is_link and _inside(real, real_root):
                    reason = SKIP_LINK_INSIDE
                elif is_link and _inside(os.path.realpath(folder), real):
                    reason = SKIP_LINK_LOOP
                elif real in seen:  # reached again through a followed link
                    reason = SKIP_LINK_SEEN
                if reason:
                    tree.skipped.append(Skipped(_rel(path, root), reason))
                    continue
                seen.add(real)
                subfolders.append(path)
            elif entry.is_file():
                tree.files.append(path)
                tree.contents[key].append(_rel(path, root))
        tree.subfolders[key] = [_rel(p, root) for p in subfolders]
        stack.extend(reversed(subfolders))
    return tree


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _unused_folders(tree: _Tree, top: str, used: set[str], dicom: set[str]) -> list[Skipped]:
    """The highest folders below ``top`` none of whose files is used, with the reason."""
    cache: dict[str, tuple[int, int, bool]] = {}

    def tally(folder: str) -> tuple[int, int, bool]:
        """(files in the subtree, used files, something skipped by the walk inside)."""
        if folder not in cache:
            files = tree.contents.get(folder, [])
            n, n_used = len(files), sum(f in used for f in files)
            inner = any(s.path.startswith(folder + "/") for s in tree.skipped)
            for sub in tree.subfolders.get(folder, []):
                sub_n, sub_used, _ = tally(sub)
                n, n_used = n + sub_n, n_used + sub_used
            cache[folder] = (n, n_used, inner)
        return cache[folder]

    skipped = []
    stack = list(reversed(tree.subfolders.get(top, [])))
    while stack:
        folder = stack.pop()
        n, n_used, inner = tally(folder)
        if n_used:
            stack.extend(reversed(tree.subfolders.get(folder, [])))
        elif n == 0 and inner:
            stack.extend(reversed(tree.subfolders.get(folder, [])))  # the links say why
        elif n == 0:
            skipped.append(Skipped(folder, SKIP_EMPTY))
        else:
            files = _subtree_files(tree, folder)
            reason = SKIP_DICOMDIR if any(f in dicom for f in files) else SKIP_NO_IMAGES
            skipped.append(Skipped(folder, reason, n))
    return skipped


def _subtree_files(tree: _Tree, folder: str) -> list[str]:
    files = list(tree.contents.get(folder, []))
    for sub in tree.subfolders.get(folder, []):
        files += _subtree_files(tree, sub)
    return files


# --------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class _Header:
    """What discovery needs of one DICOM file (kept in memory only)."""

    rel: str
    folder: str
    patient_id: str
    study: str
    series: str  # SeriesInstanceUID, "" when missing (grouped by folder)
    number: str  # SeriesNumber as a name part, "" when missing
    image: bool


def _series_number(ds: pydicom.Dataset) -> str:
    value = ds.get("SeriesNumber")
    value = "" if value is None else str(value).strip()
    try:
        number = float(value)
        return str(int(number)) if number.is_integer() else re.sub(r"[^0-9]", "p", value)
    except ValueError:
        return re.sub(r"[^0-9A-Za-z]+", "", value)[:16]


def _read_headers(root: Path, files: list[Path]) -> tuple[list[_Header], list[str], set[str]]:
    """Headers of the DICOM files, the files whose header fails to parse, every DICOM file."""
    headers, unreadable, dicom = [], [], set()
    for path in files:
        if not is_dicom_file(path):
            continue
        rel = _rel(path, root)
        dicom.add(rel)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # malformed header: reported by ingest, never dropped silently
            unreadable.append(rel)
            continue
        if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
            continue
        study = str(ds.get("StudyInstanceUID", "")).strip()
        if not study:  # header cut short (pydicom returns what it parsed)
            unreadable.append(rel)
            continue
        headers.append(
            _Header(
                rel=rel,
                folder=PurePosixPath(rel).parent.as_posix(),
                patient_id=str(ds.get("PatientID", "")).strip(),
                study=study,
                series=str(ds.get("SeriesInstanceUID", "")).strip(),
                number=_series_number(ds),
                image=is_image_object(ds),
            )
        )
    return headers, unreadable, dicom


def _series_names(headers: list[_Header]) -> dict[str, list[_Header]]:
    """The series of one study, named as the module docstring says."""
    by_folder: dict[str, dict[str, list[_Header]]] = defaultdict(lambda: defaultdict(list))
    for h in headers:
        by_folder[h.folder][h.series].append(h)
    named: dict[str, list[_Header]] = {}
    for folder, by_uid in by_folder.items():
        images = [uid for uid, members in by_uid.items() if any(h.image for h in members)]
        if len(images) <= 1:
            named[folder] = [h for members in by_uid.values() for h in members]
            continue
        groups = sorted(by_uid.values(), key=lambda members: min(h.rel for h in members))
        bases = [f"series-{g[0].number or 'unnumbered'}" for g in groups]
        repeats = Counter(bases)
        seen: Counter[str] = Counter()
        for base, members in zip(bases, groups, strict=True):
            seen[base] += 1
            name = base if repeats[base] == 1 else f"{base}-{seen[base]}"
            path = PurePosixPath(folder, name).as_posix()
            while path in by_folder or path in named:  # a real subfolder of that name
                path += "-x"
            named[path] = members
    return named


def _folder_of(files: list[str]) -> str:
    """Deepest folder (relative POSIX path, '.' for the root) holding every file."""
    parents = [PurePosixPath(f).parent.parts for f in files]
    common: list[str] = []
    for level in zip(*parents, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return PurePosixPath(*common).as_posix() if common else "."


@dataclass
class _Candidate:
    """The series of one study under one parent folder: an exam, before its key is known."""

    study: str
    series: dict[str, list[_Header]]
    folder: str = ""
    files: list[str] = field(default_factory=list)
    patient_ids: Counter[str] = field(default_factory=Counter)
    per_folder: Counter[str] = field(default_factory=Counter)  # files per folder on disk
    foreign: bool = False

    def __post_init__(self) -> None:
        headers = [h for members in self.series.values() for h in members]
        self.files = sorted(h.rel for h in headers)
        self.folder = _folder_of(self.files)
        if len(self.series) == 1 and len(PurePosixPath(self.folder).parts) > 1:
            # a lone series in its own folder: the exam is the folder above it
            self.folder = PurePosixPath(self.folder).parent.as_posix()
        self.patient_ids = Counter(h.patient_id for h in headers)
        self.per_folder = Counter(h.folder for h in headers)

    @property
    def patient_id(self) -> str:
        return self.patient_ids.most_common(1)[0][0]


def _mark_foreign(candidates: list[_Candidate]) -> None:
    """Flag the candidates whose every file lies in a series folder of another patient's
    exam (a folder holding one series of that exam, with more of its files than ours)."""
    by_folder: dict[str, list[_Candidate]] = defaultdict(list)
    for c in candidates:
        for folder in c.per_folder:
            by_folder[folder].append(c)
    for e in candidates:
        sharing = {id(f): f for d in e.per_folder for f in by_folder[d] if f is not e}
        for f in sharing.values():
            if f.patient_id != e.patient_id and all(
                d in f.series and f.per_folder[d] > n for d, n in e.per_folder.items()
            ):
                e.foreign = True
                break


def _patient_keys(candidates: list[_Candidate]) -> dict[int, str]:
    """Patient key of every candidate that is not foreign (by ``id``): the shallowest
    folder on the way to its exam folder holding one patient's exams; else (several
    patients side by side, files lying in the root) its DICOM PatientID."""
    kept = [c for c in candidates if not c.foreign]
    patients: dict[str, set[str]] = defaultdict(set)  # folder -> PatientIDs of exams in it
    for c in kept:
        parts = PurePosixPath(c.folder).parts if c.folder != "." else ()
        for depth in range(1, len(parts) + 1):
            patients[PurePosixPath(*parts[:depth]).as_posix()].add(c.patient_id)
    keys = {}
    for c in kept:
        parts = PurePosixPath(c.folder).parts if c.folder != "." else ()
        prefixes = (PurePosixPath(*parts[:depth]).as_posix() for depth in range(1, len(parts) + 1))
        keys[id(c)] = next(
            (p for p in prefixes if patients[p] == {c.patient_id}), c.patient_id or c.folder
        )
    return keys


def _dicom_exams(root: Path, files: list[Path]) -> tuple[list[Exam], set[str], set[str], set[str]]:
    """The DICOM exams among ``files``; also the files they hold, the unreadable files in no
    exam, and every DICOM file."""
    headers, unreadable, dicom = _read_headers(root, files)
    by_study: dict[str, list[_Header]] = defaultdict(list)
    for h in headers:
        by_study[h.study].append(h)
    candidates = []
    for study, members in by_study.items():
        by_parent: dict[str, dict[str, list[_Header]]] = defaultdict(dict)
        for name, series in _series_names(members).items():
            by_parent[PurePosixPath(name).parent.as_posix()][name] = series
        candidates += [_Candidate(study, series) for series in by_parent.values()]
    _mark_foreign(candidates)
    keys = _patient_keys(candidates)
    unreadable_in: dict[str, list[str]] = defaultdict(list)
    for u in unreadable:
        unreadable_in[PurePosixPath(u).parent.as_posix()].append(u)

    exams, used, orphans = [], set(), set(unreadable)
    for c in candidates:
        series = tuple(
            SeriesFiles(name, tuple(sorted(h.rel for h in members)))
            for name, members in sorted(c.series.items())
        )
        used.update(c.files)
        if c.foreign:
            problem = (
                f"{len(c.files)} DICOM file(s) of another patient (their PatientID differs) "
                "lie in series folders of another exam: isolated, not ingested; move them "
                "to their own patient folder"
            )
            folder = _folder_of(c.files)
            key = f"{folder}{_FOREIGN}{c.patient_id}"
            exams.append(Exam(root, folder, "dicom", key, c.study, (), (), (), problem))
            continue
        problem = None
        if len(c.patient_ids) > 1:
            problem = (
                f"the files of this study carry {len(c.patient_ids)} different PatientIDs "
                "(files of several patients mixed): not ingested; keep one patient per study"
            )
            series = ()
        broken = tuple(sorted(u for folder in c.per_folder for u in unreadable_in[folder]))
        orphans -= set(broken)
        used.update(broken)
        exams.append(
            Exam(root, c.folder, "dicom", keys[id(c)], c.study, series, (), broken, problem)
        )
    return exams, used, orphans, dicom


# --------------------------------------------------------------------------- PI-CAI


def _image_exams(root: Path, files: list[Path]) -> tuple[list[Exam], set[str]]:
    groups: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for path in files:
        match = IMAGE_PATTERN.match(path.name)
        if match:
            key = (match["patient"], match["study"])
            groups[key].append((match["role"].lower(), _rel(path, root)))
    exams, used = [], set()
    for (patient, study), images in groups.items():
        folder = _folder_of([p for _, p in images])
        used.update(p for _, p in images)
        roles = Counter(role for role, _ in images)
        duplicated = sorted(r for r, n in roles.items() if n > 1)
        if duplicated:
            problem = (
                f"several files for role(s) {duplicated} ({sum(roles.values())} image files; "
                "e.g. a backup copy elsewhere under the data root): not ingested; keep one "
                "file per role"
            )
            exams.append(Exam(root, folder, "image", patient, study, problem=problem))
            continue
        exams.append(Exam(root, folder, "image", patient, study, (), tuple(sorted(images))))
    return exams, used


# --------------------------------------------------------------------------- cohort


def _discover_in(root: Path, top: Path, *, follow_symlinks: bool) -> Discovery:
    """Exams and skipped paths under ``top`` (``root`` or a folder below it)."""
    tree = _walk(top, root, follow_symlinks=follow_symlinks)
    dicom_exams, used, orphans, dicom = _dicom_exams(root, tree.files)
    image_exams, images = _image_exams(root, tree.files)
    skipped = list(tree.skipped)
    by_folder = Counter(PurePosixPath(u).parent.as_posix() for u in orphans)
    skipped += [Skipped(folder, SKIP_UNREADABLE, n) for folder, n in sorted(by_folder.items())]
    accounted = used | images | orphans
    skipped += _unused_folders(tree, _rel(top, root), accounted, dicom)
    return Discovery(dicom_exams + image_exams, sorted(skipped, key=lambda s: s.path))


def _manifest_exams(root: Path, manifest: Path, *, follow_symlinks: bool) -> Discovery:
    with open(manifest, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    exams: list[Exam] = []
    skipped: list[Skipped] = []
    for number, row in enumerate(rows, start=2):
        values = {k: (row.get(k) or "").strip() for k in ("patient", "study", "path")}
        if not all(values.values()):
            raise InputError(
                f"manifest line {number}: columns patient, study and path must all be set",
                step=STEP,
            )
        folder = Path(os.path.normpath(root / values["path"]))
        if not folder.is_relative_to(root):
            folder = folder.resolve()
        if not folder.is_dir() or not folder.is_relative_to(root):
            problem = f"manifest line {number}: path is not a folder under the data root"
            exam = Exam(root, values["path"], "dicom", values["patient"], values["study"])
            exams.append(replace(exam, problem=problem))
            continue
        rel = _rel(folder, root) or "."
        found = _discover_in(root, folder, follow_symlinks=follow_symlinks)
        skipped += found.skipped
        listed = [e for e in found.exams if _FOREIGN not in e.patient]
        exams += [e for e in found.exams if e not in listed]  # isolated foreign files
        if len(listed) != 1:
            problem = (
                f"manifest line {number}: expected one exam in the folder, found {len(listed)}"
            )
            exams.append(
                Exam(root, rel, "dicom", values["patient"], values["study"], problem=problem)
            )
            continue
        (exam,) = listed
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
                exam.problem,
            )
        )
    return Discovery(exams, skipped)


def discover(
    root: str | Path,
    *,
    manifest: str | Path | None = None,
    follow_symlinks: bool = False,
) -> Discovery:
    """Find the exams under ``root`` and the paths that hold none (see the module docstring).

    Parameters
    ----------
    root
        The data root; every path in the result is relative to it.
    manifest
        Optional CSV (``patient, study, path``) listing the exams instead of the folder rule.
    follow_symlinks
        Search symbolic links to folders (each real folder once); without it they are
        listed in ``skipped``.

    Returns
    -------
    Discovery
        ``exams`` sorted by exam folder, then study and patient keys (exams with a
        ``problem`` among them); ``skipped`` sorted by path.

    Raises
    ------
    InputError
        ``root`` is not a folder, or the manifest is not a CSV with ``patient, study, path``
        on every row. Problems of single exams never raise.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise InputError("data root is not a folder", step=STEP, path=root.name)
    if manifest is not None:
        found = _manifest_exams(root, Path(manifest), follow_symlinks=follow_symlinks)
    else:
        found = _discover_in(root, root, follow_symlinks=follow_symlinks)
    exams = sorted(found.exams, key=lambda e: (e.folder, e.study, e.patient, e.kind))
    return Discovery(exams, found.skipped)


def discover_exams(
    root: str | Path,
    *,
    manifest: str | Path | None = None,
    follow_symlinks: bool = False,
) -> list[Exam]:
    """The exams of :func:`discover` (with the problem exams among them)."""
    return discover(root, manifest=manifest, follow_symlinks=follow_symlinks).exams
