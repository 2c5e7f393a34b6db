"""Discovery (issue 13): flat exports, stray files of another patient, per-exam problems,
skipped folders, symbolic links, the manifest on the command line.

Tests marked ``realdata`` use the ProstateX exams in ../shared/data and skip without them;
the others build tiny DICOM / MHA files of their own.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    MRImageStorage,
    generate_uid,
)

from tasks.discover import (
    SKIP_BROKEN_LINK,
    SKIP_EMPTY,
    SKIP_HIDDEN,
    SKIP_LINK,
    SKIP_LINK_INSIDE,
    SKIP_LINK_LOOP,
    SKIP_LINK_SEEN,
    SKIP_NO_IMAGES,
    SKIP_UNREADABLE,
    Discovery,
    discover,
    discover_exams,
)
from tasks.ingest import exam_ids, ingest_exam, relative_to_exam

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
X0000 = "ProstateX-0000/07-07-2011"
X0218 = "ProstateX-0218/02-18-2011"
KEY = "k"
needs_data = pytest.mark.skipif(
    not (DATA / "dicom").is_dir(),
    reason=f"real ProstateX sample data not found at {DATA} (tests need ../shared/data)",
)


def _dicom(
    path: Path,
    *,
    patient: str = "PAT-A",
    study: str = "1.2.826.0.1.1",
    series: str | None = "1.2.826.0.1.1.1",
    number: int | None = 1,
    image: bool = True,
) -> Path:
    """A tiny DICOM file (2x2 MR image, or a presentation state) with these keys."""
    sop_class = MRImageStorage if image else GrayscaleSoftcopyPresentationStateStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.Modality = patient, study, "MR"
    if series is not None:
        ds.SeriesInstanceUID = series
    if number is not None:
        ds.SeriesNumber = number
    if image:
        ds.Rows = ds.Columns = 2
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.zeros((2, 2), np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _mha(path: Path, value: float = 1.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), value, np.float32)), str(path))
    return path


def _link_exam(source: Path, target: Path) -> None:
    """``target`` mirrors the series folders of ``source``, its files as symbolic links."""
    for series in sorted(source.iterdir()):
        (target / series.name).mkdir(parents=True)
        for file in sorted(series.iterdir()):
            (target / series.name / file.name).symlink_to(file)


# --------------------------------------------------------------------------- 1. flat exports


def test_series_of_one_folder_are_named_by_series_number(tmp_path: Path) -> None:
    flat = tmp_path / "root" / "PAT" / "export"
    for i in range(3):
        _dicom(flat / f"a{i}", series="1.2.3.4", number=4)
        _dicom(flat / f"b{i}", series="1.2.3.6", number=6)
        _dicom(flat / f"c{i}", series="1.2.3.7", number=6)  # SeriesNumber repeated
        _dicom(flat / f"d{i}", series=None, number=None)  # no SeriesInstanceUID
    _dicom(flat / "ps", series="1.2.3.99", number=0, image=False)  # not an image series
    (exam,) = discover_exams(tmp_path / "root")
    assert exam.folder == "PAT/export" and exam.patient == "PAT"
    names = {relative_to_exam(exam, s.folder): len(s.files) for s in exam.series}
    assert names == {
        "series-unnumbered": 3,
        "series-0": 1,
        "series-4": 3,
        "series-6-1": 3,
        "series-6-2": 3,
    }
    assert not any("1.2.3" in s.folder for s in exam.series)  # never a UID


def test_folder_per_series_keeps_the_folder_name(tmp_path: Path) -> None:
    """One image series per folder: the folder names it, non-image objects beside it too."""
    study = tmp_path / "root" / "PAT" / "study"
    for i in range(3):
        _dicom(study / "4-t2" / f"{i}.dcm", series="1.2.3.4", number=4)
        _dicom(study / "6-dwi" / f"{i}.dcm", series="1.2.3.6", number=6)
    _dicom(study / "6-dwi" / "ps.dcm", series="1.2.3.99", number=0, image=False)
    (exam,) = discover_exams(tmp_path / "root")
    assert exam.folder == "PAT/study"
    assert [(relative_to_exam(exam, s.folder), len(s.files)) for s in exam.series] == [
        ("4-t2", 3),
        ("6-dwi", 4),
    ]


@needs_data
@pytest.mark.realdata
def test_flat_export_ingests_like_the_tcia_layout(tmp_path: Path) -> None:
    flat = tmp_path / "root" / "ProstateX-0000" / "all"
    flat.mkdir(parents=True)
    for series in sorted((DATA / "dicom" / X0000).iterdir()):
        for file in sorted(series.iterdir()):
            (flat / f"{series.name.split('.')[0]}_{file.name}").symlink_to(file)
    (exam,) = discover_exams(tmp_path / "root")
    assert exam.folder == "ProstateX-0000/all" and len(exam.series) == 7
    flat_result = ingest_exam(exam, out_dir=tmp_path / "flat", key=KEY)
    assert flat_result.status == "ok", flat_result.error

    (tcia,) = [e for e in discover_exams(DATA / "dicom") if e.folder == X0000]
    tcia_result = ingest_exam(tcia, out_dir=tmp_path / "tcia", key=KEY)
    assert tcia_result.status == "ok", tcia_result.error

    def chosen(result: Any, number: Any) -> dict:
        return {(s.kind, s.b_value): (number(s.source), s.image_sha256) for s in result.series}

    flat_chosen = chosen(flat_result, lambda name: name.removeprefix("series-"))
    tcia_chosen = chosen(tcia_result, lambda name: name.split(".")[0])
    assert flat_chosen == tcia_chosen  # same series chosen, identical written images
    assert {k for k, _ in flat_chosen} == {"t2w", "dwi", "adc", "computed_dwi"}
    assert flat_chosen[("t2w", None)][0] == "4"
    assert sorted(b for k, b in flat_chosen if k == "dwi") == [50, 400, 800]
    rejected = sorted(r.source for r in flat_result.rejected)
    assert rejected == ["series-3", "series-5", "series-9"]
    assert all("ProstateX" not in r.source for r in flat_result.rejected)


# --------------------------------------------------------------------------- 2. pseudonyms


@needs_data
@pytest.mark.realdata
def test_stray_files_of_another_patient_keep_the_pseudonym(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _link_exam(DATA / "dicom" / X0000, root / X0000)
    t2 = root / X0000 / "4.000000-t2tsetra-00702"
    stray = sorted((DATA / "dicom" / X0218 / "5.000000-t2tsetra320p2-09906").iterdir())[:5]
    for file in stray:
        shutil.copy(file, t2 / f"stray-{file.name}")
    (clean,) = [e for e in discover_exams(DATA / "dicom") if e.folder == X0000]

    exams = discover_exams(root)
    assert len(exams) == 2
    (exam,) = [e for e in exams if e.problem is None]
    (foreign,) = [e for e in exams if e.problem is not None]
    assert exam_ids(exam, KEY) == exam_ids(clean, KEY)  # patient and session unchanged
    assert exam.patient == "ProstateX-0000"
    assert all("stray" not in f for s in exam.series for f in s.files)
    # the stray files: isolated with a reason, never under the exam's pseudonym
    assert "another patient" in foreign.problem and "5 DICOM file(s)" in foreign.problem
    assert foreign.series == () and foreign.folder == f"{X0000}/4.000000-t2tsetra-00702"
    assert exam_ids(foreign, KEY)[0] != exam_ids(exam, KEY)[0]
    assert "ProstateX" not in foreign.problem and "2011" not in foreign.problem
    result = ingest_exam(exam, out_dir=tmp_path / "out", key=KEY)
    assert result.status == "ok", result.error
    (t2w,) = [s for s in result.series if s.kind == "t2w"]
    assert t2w.source == "4.000000-t2tsetra-00702" and len(t2w.source_files) == 19
    assert ingest_exam(foreign, out_dir=tmp_path / "out", key=KEY).status == "error"


def test_two_patients_in_one_exam_folder_get_two_pseudonyms(tmp_path: Path) -> None:
    """Series folders of two patients side by side: two exams, each keyed by its patient."""
    study = tmp_path / "root" / "case" / "study"
    for i in range(3):
        _dicom(study / "t2-a" / f"{i}", patient="A", study="1.2.1", series="1.2.1.1")
        _dicom(study / "dwi-a" / f"{i}", patient="A", study="1.2.1", series="1.2.1.2")
        _dicom(study / "t2-b" / f"{i}", patient="B", study="1.2.2", series="1.2.2.1")
        _dicom(study / "dwi-b" / f"{i}", patient="B", study="1.2.2", series="1.2.2.2")
    exams = discover_exams(tmp_path / "root")
    assert [e.folder for e in exams] == ["case/study", "case/study"]
    assert len({exam_ids(e, KEY)[0] for e in exams}) == 2
    assert all(e.problem is None for e in exams)


def test_one_study_with_two_patient_ids_is_a_problem(tmp_path: Path) -> None:
    for i in range(3):
        _dicom(tmp_path / "root" / "P1" / "s" / "t2" / f"{i}", patient="A")
        _dicom(tmp_path / "root" / "P1" / "s" / "t2" / f"x{i}", patient="B")
    (exam,) = discover_exams(tmp_path / "root")
    assert "2 different PatientIDs" in exam.problem and exam.series == ()


# --------------------------------------------------------------------------- 3. per exam


def test_duplicate_picai_file_fails_only_that_exam(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for patient in ("10000", "10001"):
        for role in ("t2w", "adc", "hbv"):
            _mha(root / patient / f"{patient}_1000000_{role}.mha")
    (root / "backup").mkdir()
    shutil.copy(root / "10000" / "10000_1000000_t2w.mha", root / "backup")
    exams = discover_exams(root)  # no InputError for the whole cohort
    assert len(exams) == 2
    bad, good = sorted(exams, key=lambda e: e.problem is None)
    assert "several files for role(s) ['t2w']" in bad.problem and bad.images == ()
    assert "10000" not in bad.problem
    assert good.problem is None and good.folder == "10001" and len(good.images) == 3
    # ingest never takes one of the two files silently
    assert ingest_exam(bad, out_dir=tmp_path / "out", key=KEY).status == "error"
    assert ingest_exam(good, out_dir=tmp_path / "out", key=KEY).status == "ok"


def _cohort_with_clutter(tmp_path: Path) -> tuple[Path, Path]:
    """A root with one PI-CAI exam and every kind of folder that holds none; an exam kept
    outside the root and linked in."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    for role in ("t2w", "adc", "hbv"):
        _mha(root / "10000" / f"10000_1000000_{role}.mha")
        _mha(elsewhere / "10002" / f"10002_1000000_{role}.mha")
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("not an image")
    (root / ".git").mkdir()
    (root / "10002").symlink_to(elsewhere / "10002")
    (root / "again").symlink_to(elsewhere / "10002")  # the same folder, second link
    (root / "inside").symlink_to(root / "notes")
    (root / "gone").symlink_to(tmp_path / "nowhere")
    (elsewhere / "10002" / "loop").symlink_to(elsewhere)
    _dicom(root / "10000" / "broken" / "1.dcm")
    raw = (root / "10000" / "broken" / "1.dcm").read_bytes()
    (root / "10000" / "broken" / "1.dcm").write_bytes(raw[:140])  # header cut short
    return root, elsewhere


def test_skipped_folders_are_listed_with_reasons(tmp_path: Path) -> None:
    root, _ = _cohort_with_clutter(tmp_path)
    found = discover(root)
    assert [e.folder for e in found.exams] == ["10000"]
    assert [(s.path, s.reason) for s in found.skipped] == [
        (".git", SKIP_HIDDEN),
        ("10000/broken", SKIP_UNREADABLE),
        ("10002", SKIP_LINK),
        ("again", SKIP_LINK),
        ("empty", SKIP_EMPTY),
        ("gone", SKIP_BROKEN_LINK),
        ("inside", SKIP_LINK),
        ("notes", SKIP_NO_IMAGES),
    ]
    assert found.skipped_by_reason()[SKIP_LINK] == 3

    followed = discover(root, follow_symlinks=True)
    assert [e.folder for e in followed.exams] == ["10000", "10002"]
    reasons = {s.path: s.reason for s in followed.skipped}
    assert reasons["again"] == SKIP_LINK_SEEN
    assert reasons["inside"] == SKIP_LINK_INSIDE
    assert reasons["10002/loop"] == SKIP_LINK_LOOP
    assert "10002" not in reasons


def test_manifest_rows_are_exams_and_bad_rows_problems(tmp_path: Path) -> None:
    root, _ = _cohort_with_clutter(tmp_path)
    manifest = root / "cohort.csv"
    manifest.write_text("patient,study,path\nPX0,st1,10000\nPX1,st1,nowhere\nPX2,st1,empty\n")
    found = discover(root, manifest=manifest)
    by_patient = {e.patient: e for e in found.exams}
    assert by_patient["PX0"].problem is None and len(by_patient["PX0"].images) == 3
    assert "not a folder under the data root" in by_patient["PX1"].problem
    assert "expected one exam in the folder, found 0" in by_patient["PX2"].problem
    for exam in found.exams:
        assert exam.problem is None or "nowhere" not in exam.problem


# --------------------------------------------------------------------------- flows, CLI


def test_discovery_artifact_and_log_name_no_path(tmp_path: Path) -> None:
    from flows.cohort import discovery_markdown
    from flows.ingest import skipped_entries, skipped_summary

    root, _ = _cohort_with_clutter(tmp_path)
    (root / "ProstateX-0042").mkdir()  # an empty patient folder: named like a patient
    found = discover(root)
    persisted = discovery_markdown(found) + skipped_summary(found)
    assert "empty folder" in persisted and "--follow-symlinks" in persisted
    for name in ("ProstateX-0042", "10002", "notes", "again", "gone", "10000/broken"):
        assert name not in persisted
    assert "ProstateX-0042" in {s["path"] for s in skipped_entries(found)}  # terminal only


class _FakeFlow:
    """Stands in for a Prefect flow: records its parameters, returns a canned result."""

    def __init__(self, result: dict[str, Any], state: bool) -> None:
        self.result, self.state, self.calls = result, state, []

    def with_options(self, **_: Any) -> _FakeFlow:
        return self

    def __call__(self, **parameters: Any) -> Any:
        self.calls.append(parameters)
        if not self.state:
            return self.result
        return SimpleNamespace(
            result=lambda raise_on_failure: self.result,
            type=SimpleNamespace(value="COMPLETED"),
            message="1/1 patients completed",
        )


RESULT = {
    "patients": [
        {"patient": "P1", "source": "a", "status": "ok", "error": None, "series": []},
    ],
    "skipped": [{"path": "b", "reason": SKIP_EMPTY, "files": 0}],
}


@pytest.mark.parametrize("command", ["ingest", "run"])
def test_cli_manifest_as_root_and_follow_symlinks(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import flows.cohort
    import flows.ingest
    from flows.cli import main

    for name in list(os.environ):
        if name.startswith("PROSTATE_COHORT_"):
            monkeypatch.delenv(name)
    fake = _FakeFlow(RESULT, state=command == "run")
    target = (flows.ingest, "ingest_flow") if command == "ingest" else (flows.cohort, "cohort_flow")
    monkeypatch.setattr(*target, fake)
    manifest = tmp_path / "cohort" / "list.csv"
    manifest.parent.mkdir()
    manifest.write_text("patient,study,path\n")
    out = ["--output", str(tmp_path / "out")]
    assert main([command, str(manifest), "--follow-symlinks", "--json", *out]) == 0
    (call,) = fake.calls
    assert call["root"] == str(manifest.parent.resolve())
    assert call["manifest"] == str(manifest.resolve()) and call["follow_symlinks"] is True
    shown = json.loads(capsys.readouterr().out)
    assert shown["skipped"] == RESULT["skipped"] and shown["patients"][0]["patient"] == "P1"

    assert main([command, str(manifest.parent), "--manifest", str(manifest), *out]) == 0
    assert fake.calls[-1]["manifest"] == str(manifest.resolve())
    assert fake.calls[-1]["follow_symlinks"] is False
    text = capsys.readouterr().out
    assert f"skipped b: {SKIP_EMPTY}" in text and "1 paths skipped" in text

    assert main([command, str(manifest), "--manifest", str(manifest), *out]) == 2
    assert main([command, str(manifest.parent), "--manifest", "nope.csv", *out]) == 2
    assert "not both" in capsys.readouterr().err


def test_empty_discovery_is_sorted(tmp_path: Path) -> None:
    assert discover(tmp_path) == Discovery([], [])


def test_ingest_flow_fails_only_the_problem_exam_and_lists_skipped(
    tmp_path: Path, prefect_server
) -> None:
    """Through the flow: the duplicated exam is that exam's error (recorded), the others
    ingest; skipped paths come back for the terminal and are nowhere in the database."""
    import sqlite3

    from flows.ingest import ingest_flow

    root, _ = _cohort_with_clutter(tmp_path)
    for role in ("t2w", "adc", "hbv"):
        _mha(root / "10001" / f"10001_1000000_{role}.mha")
    (root / "old-copy-Zq").mkdir()
    shutil.copy(root / "10000" / "10000_1000000_t2w.mha", root / "old-copy-Zq")
    (root / "Zq-Skipped-Patient").mkdir()
    out = tmp_path / "out"
    result = ingest_flow(root=str(root), output_root=str(out))
    by_source = {p["source"]: p for p in result["patients"]}
    assert by_source["10001"]["status"] == "ok"
    assert by_source["."]["status"] == "error"
    assert "several files for role(s) ['t2w']" in by_source["."]["error"]
    skipped = {s["path"]: s["reason"] for s in result["skipped"]}
    assert skipped["Zq-Skipped-Patient"] == SKIP_EMPTY and skipped["10002"] == SKIP_LINK

    with sqlite3.connect(out / "provenance.sqlite") as db:
        dump = "\n".join(db.iterdump())
    assert "several files for role(s)" in dump  # the exam's failure is on record
    for name in ("Zq-Skipped-Patient", "old-copy-Zq", "notes"):
        assert name not in dump


def test_cohort_flow_reports_discovery_without_paths(tmp_path: Path, prefect_server) -> None:
    """``run``: the problem exam fails alone in ingest; the ``cohort-discovery`` artifact
    counts the skipped paths by reason and names none of them."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.cohort import cohort_flow

    root = tmp_path / "cohort"
    _mha(root / "10000" / "10000_1000000_t2w.mha")
    (root / "old-copy-Zq").mkdir()
    shutil.copy(root / "10000" / "10000_1000000_t2w.mha", root / "old-copy-Zq")
    (root / "Zq-Skipped-Patient").mkdir()
    state = cohort_flow(
        root=str(root), models=["demo"], output_root=str(tmp_path / "out"), return_state=True
    )
    outcome = state.result(raise_on_failure=False)
    (patient,) = outcome["patients"]
    assert patient["status"] == "error" and "several files" in patient["error"]
    assert outcome["skipped"] == [{"path": "Zq-Skipped-Patient", "reason": SKIP_EMPTY, "files": 0}]
    assert state.is_failed() and "1 in ingest" in state.message
    body = {"artifacts": {"key": {"any_": ["cohort-discovery"]}}, "sort": "CREATED_DESC"}
    body |= {"limit": 1, "offset": 0}
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    (artifact,) = response.json()
    assert f"| {SKIP_EMPTY} | 1 |" in artifact["data"]
    assert "1 with a problem" in artifact["data"]
    assert "Zq" not in artifact["data"]
