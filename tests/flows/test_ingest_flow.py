"""Ingest and demo flows through a real Prefect server: provenance, caching, failure
isolation and privacy, on the synthetic cohort (whose fake identities are known)."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
from sqlalchemy import text

from db.store import make_engine
from flows.demo import demo_flow
from flows.ingest import ingest_flow

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PROSTATE_COHORT_"):
            monkeypatch.delenv(name)


def _rows(db: Path, table: str) -> list[dict]:
    with make_engine(f"sqlite:///{db}").connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text(f"SELECT * FROM {table}"))]


def test_demo_generates_and_ingests_every_patient(demo) -> None:
    out, result = demo
    assert [p["status"] for p in result["patients"]] == ["ok"] * 4
    db = out / "provenance.sqlite"
    steps = _rows(db, "step_run")
    chain = ["adc", "denoise", "ingest", "n4", "register", "b1000", "synthesize"]
    chain += ["segment_demo", "radiomics_demo", "qc_demo"]
    assert sorted(s["step"] for s in steps) == sorted(chain * 4)
    assert all(s["status"] == "completed" and s["cache_key"] for s in steps)
    assert all(s["prefect_task_run_id"] and s["prefect_flow_run_id"] for s in steps)
    series = _rows(db, "series")
    chosen = [s for s in series if s["selected"]]
    assert {s["kind"] for s in chosen} >= {"t2w", "dwi"}
    assert all(s["selection_reason"] for s in series)  # every choice and rejection explained
    assert any(not s["selected"] for s in series)  # distractors recorded as rejected
    for s in chosen:
        assert Path(s["image_path"]).is_file()
    for patient in result["patients"]:  # the chain's outputs exist for every exam
        outputs = {role: Path(path) for role, path in patient["outputs"].items()}
        assert set(outputs) == {"t2w", "adc", "adc_native", "dwi_b1000"} | {
            f"{role}{model}" for role in ("mask", "qc", "radiomics") for model in ("", ":demo")
        }
        assert outputs["t2w"].name.endswith("_desc-n4_T2w.nii.gz")
        t2 = sitk.ReadImage(str(outputs["t2w"]))
        for role in ("adc", "dwi_b1000", "mask"):  # what segmentation reads and writes
            image = sitk.ReadImage(str(outputs[role]))
            assert (image.GetSize(), image.GetOrigin()) == (t2.GetSize(), t2.GetOrigin())
            assert image.GetSpacing() == t2.GetSpacing()
            assert image.GetDirection() == t2.GetDirection()
    runs = _rows(db, "pipeline_run")  # the demo's run, then its evaluation against the truth
    assert [(r["command"].split()[0], r["status"]) for r in runs[:2]] == [
        ("demo", "completed"),
        ("evaluate", "completed"),
    ]
    assert json.loads(runs[0]["summary"])["patients"] == 4


def test_rerun_is_cached_without_duplicate_rows(demo) -> None:
    out, _ = demo
    db = out / "provenance.sqlite"
    before = {t: len(_rows(db, t)) for t in ("step_run", "series", "study", "artifact")}
    again = demo_flow(patients=4, seed=0, output_root=str(out))
    assert all(p["cached"] for p in again["patients"])
    after = {t: len(_rows(db, t)) for t in ("step_run", "series", "study", "artifact")}
    assert after == before


def test_changed_output_is_recomputed(demo) -> None:
    out, result = demo
    victim = next(
        p for p in sorted((out / "patients").rglob("*_T2w.nii.gz")) if "_desc-" not in p.name
    )  # the ingested T2, not a derivative
    victim.write_bytes(b"corrupted")
    again = demo_flow(patients=4, seed=0, output_root=str(out))
    assert sum(not p["cached"] for p in again["patients"]) == 1
    assert victim.stat().st_size > 1000


def test_bad_exam_fails_alone_and_is_recorded(demo, tmp_path: Path) -> None:
    out, _ = demo
    cohort = tmp_path / "cohort"
    shutil.copytree(out / "demo-cohort" / "dicom", cohort)
    broken = sorted(p for p in cohort.iterdir())[1]
    t2 = next(
        d
        for d in broken.rglob("*")
        if d.is_dir()
        and "t2" in d.name.lower()
        and "sag" not in d.name.lower()
        and "cor" not in d.name.lower()
    )
    middle = sorted(t2.iterdir())[len(list(t2.iterdir())) // 2]
    middle.unlink()
    result = ingest_flow(root=str(cohort), output_root=str(tmp_path / "out"))
    status = {p["source"].split("/")[0]: p for p in result["patients"]}
    assert [status[k]["status"] for k in sorted(status)] == ["ok", "error", "ok", "ok"]
    error = status[broken.name]["error"]
    assert error.startswith(f"{t2.name}: ") and "missing" in error  # the series, in the exam
    assert broken.name not in error  # never the patient (or study) folder
    db = tmp_path / "out" / "provenance.sqlite"
    failed = [s for s in _rows(db, "step_run") if s["status"] == "failed"]
    assert len(failed) == 1 and t2.name in failed[0]["error"]
    run = _rows(db, "pipeline_run")[0]
    assert (run["status"], run["n_failed"], run["n_patients"]) == ("partial", 1, 4)


def test_no_identifier_reaches_outputs_logs_or_database(
    demo, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys
) -> None:
    out, _ = demo
    identities = [
        json.loads(t.read_text())["identifiers"]
        for t in sorted((out / "demo-cohort" / "truth").glob("*/truth.json"))
    ]
    secrets_ = {
        value
        for identity in identities
        for key, value in identity.items()
        if key in ("patient_name", "patient_id", "birth_date", "accession") and value
    }
    secrets_ |= {s.split("^")[0] for s in list(secrets_) if "^" in s}  # family names alone
    assert len(secrets_) >= 12
    with caplog.at_level(logging.DEBUG):
        result = ingest_flow(
            root=str(out / "demo-cohort" / "dicom"), output_root=str(tmp_path / "out"), force=True
        )
    print(json.dumps(result))
    texts = [caplog.text, capsys.readouterr().out]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            texts.append(
                (gzip.decompress(data) if path.suffix == ".gz" else data).decode("latin-1")
            )
            texts.append(str(path))
    engine = make_engine(f"sqlite:///{tmp_path / 'out' / 'provenance.sqlite'}")
    with engine.connect() as connection:
        tables = [
            r[0]
            for r in connection.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))
        ]
        for table in tables:
            texts.extend(str(tuple(r)) for r in connection.execute(text(f"SELECT * FROM {table}")))
    everything = "\n".join(texts)
    leaked = sorted(s for s in secrets_ if s in everything)
    assert leaked == []


def test_chain_adc_matches_the_phantom_truth(demo) -> None:
    """End to end (b1000, SUSAN, N4, motion correction, fit): ADC inside the gland vs truth."""
    import numpy as np

    from tasks.pseudonym import pseudonymous_id

    out, result = demo
    key = (out / ".pseudonym-key").read_text().strip()
    by_patient = {p["patient"]: p for p in result["patients"]}
    errors = []
    for truth in sorted((out / "demo-cohort" / "truth").iterdir()):
        outputs = by_patient[pseudonymous_id(truth.name, key)]["outputs"]
        fitted = sitk.GetArrayFromImage(sitk.ReadImage(outputs["adc_native"]))
        true = sitk.GetArrayFromImage(sitk.ReadImage(str(truth / "adc_true_dwi.nii.gz")))
        gland = sitk.GetArrayFromImage(sitk.ReadImage(str(truth / "dwi_gland_mask.nii.gz"))) > 0
        errors.append(float(np.median(np.abs(fitted[gland] - true[gland]) / true[gland])))
    print("median abs relative ADC error per exam:", [f"{e:.3f}" for e in errors])
    assert float(np.median(errors)) <= 0.03
    assert max(errors) <= 0.04


def test_reingest_replaces_series_rows(demo, tmp_path: Path) -> None:
    """A forced re-ingest records each exam's series again instead of adding a second set."""
    out, _ = demo
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    db = copy / "provenance.sqlite"
    before = len(_rows(db, "series"))
    ingest_flow(root=str(copy / "demo-cohort" / "dicom"), output_root=str(copy), force=True)
    assert len(_rows(db, "series")) == before
    assert len(_rows(db, "study")) == 4


def test_moved_output_tree_is_a_cache_hit(demo, tmp_path: Path) -> None:
    """Step outputs are recorded relative to the output root: a moved tree stays valid."""
    out, _ = demo
    moved = tmp_path / "elsewhere" / "out"
    shutil.copytree(out, tmp_path / "copy")
    moved.parent.mkdir(parents=True)
    (tmp_path / "copy").rename(moved)
    db = moved / "provenance.sqlite"
    before = len(_rows(db, "step_run"))
    stored = [o["path"] for r in _rows(db, "step_run") for o in json.loads(r["outputs"])]
    assert stored and not any(Path(p).is_absolute() for p in stored)
    again = demo_flow(patients=4, seed=0, output_root=str(moved))
    assert all(p["cached"] for p in again["patients"])
    assert len(_rows(db, "step_run")) == before  # nothing recomputed, nothing re-recorded
    assert all(str(moved) in p for p in again["patients"][0]["outputs"].values())
