"""Segmentation, volume, radiomics, QC and evaluation through the demo flow on a real Prefect
server, checked against the phantom's true gland masks and against direct computation."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sqlalchemy import text

from db.store import make_engine
from flows.cli import main
from flows.evaluate import evaluate_flow, find_references
from tasks.errors import InputError
from tasks.pseudonym import pseudonymous_id

pytestmark = pytest.mark.usefixtures("prefect_server")


def _rows(out: Path, sql: str) -> list[dict]:
    with make_engine(f"sqlite:///{out / 'provenance.sqlite'}").connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text(sql))]


def _truth_by_patient(out: Path) -> dict[str, Path]:
    key = (out / ".pseudonym-key").read_text().strip()
    truth = out / "demo-cohort" / "truth"
    return {pseudonymous_id(d.name, key): d for d in sorted(truth.iterdir())}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_demo_model_masks_match_the_phantom_glands(demo) -> None:
    out, result = demo
    truth = _truth_by_patient(out)
    dice = {}
    for patient in result["patients"]:
        mask = sitk.GetArrayFromImage(sitk.ReadImage(patient["outputs"]["mask"])) > 0
        true = sitk.ReadImage(str(truth[patient["patient"]] / "t2_gland_mask.nii.gz"))
        dice[patient["patient"]] = _dice(mask, sitk.GetArrayFromImage(true) > 0)
    print("demo model Dice per exam:", {k: round(v, 3) for k, v in dice.items()})
    assert min(dice.values()) >= 0.90


def test_volumes_equal_voxel_counts_and_are_recorded_once(demo) -> None:
    out, result = demo
    rows = _rows(
        out, "SELECT s.*, p.pseudo_id FROM segmentation s JOIN patient p ON p.id = s.patient_id"
    )
    assert len(rows) == len(result["patients"])  # one gland label each, no duplicates
    for row in rows:
        assert (row["model"], row["label_name"], row["label"]) == ("demo", "gland", 1)
        image = sitk.ReadImage(row["mask_path"])
        count = int((sitk.GetArrayFromImage(image) == 1).sum())
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        assert row["voxel_count"] == count
        assert row["volume_ml"] == pytest.approx(count * voxel_ml, rel=1e-9)
        assert 20 < row["volume_ml"] < 80  # phantom glands: 24x18x21 mm semi-axes +-10 %
        sidecar = json.loads(Path(row["mask_path"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["volumes_ml"]["gland"] == pytest.approx(row["volume_ml"])
        assert len(row["model_hash"]) == 64


def test_radiomics_rows_equal_the_csv_and_link_the_segmentation(demo) -> None:
    out, result = demo
    features = _rows(out, "SELECT * FROM radiomics_feature")
    segmentations = {r["id"] for r in _rows(out, "SELECT id FROM segmentation")}
    assert {f["image"] for f in features} == {"t2w", "adc", "b1000"}
    assert {f["mask"] for f in features} == {"demo:gland"}
    assert all(f["segmentation_id"] in segmentations for f in features)
    by_key = {}
    for patient in result["patients"]:
        with open(patient["outputs"]["radiomics"], newline="") as handle:
            for row in csv.DictReader(handle):
                by_key[(patient["patient"], row["image"], row["feature_class"], row["feature"])] = (
                    float(row["value"])
                )
    pseudo = {r["id"]: r["pseudo_id"] for r in _rows(out, "SELECT id, pseudo_id FROM patient")}
    assert len(features) == len(by_key)
    for f in features:
        key = (pseudo[f["patient_id"]], f["image"], f["feature_class"], f["feature"])
        assert f["value"] == pytest.approx(by_key[key], rel=1e-12)
    volumes = [
        f["value"] for f in features if f["feature"] == "VoxelVolume" and f["image"] == "t2w"
    ]
    assert len(volumes) == len(result["patients"])  # shape features once per patient and image


def test_qc_figures_are_pngs_linked_in_the_database(demo) -> None:
    out, result = demo
    artifacts = {r["path"] for r in _rows(out, "SELECT path FROM artifact WHERE role = 'qc'")}
    for patient in result["patients"]:
        path = Path(patient["outputs"]["qc"])
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(path) in artifacts


@pytest.fixture(scope="module")
def references(demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Truth gland masks named after the exam folders (as a user's reference folder)."""
    out, _ = demo
    folder = tmp_path_factory.mktemp("refs") / "phantom"
    folder.mkdir()
    for truth in sorted((out / "demo-cohort" / "truth").iterdir()):
        shutil.copy(truth / "t2_gland_mask.nii.gz", folder / f"{truth.name}.nii.gz")
    (folder / "NOT-AN-EXAM.nii.gz").write_bytes((folder / "SYN-0001.nii.gz").read_bytes())
    return folder


def test_evaluation_against_the_true_masks(demo, references: Path) -> None:
    out, result = demo
    evaluation = evaluate_flow(references=[str(references)], output_root=str(out))
    cases = evaluation["cases"]
    assert sorted(c["patient"] for c in cases) == sorted(p["patient"] for p in result["patients"])
    assert all(c["model"] == "demo" and c["reference"] == "phantom" for c in cases)
    assert min(c["dice"] for c in cases) >= 0.90
    assert all(0 <= c["hd95"] <= c["hd"] for c in cases)
    assert evaluation["unmatched"] and "NOT-AN-EXAM" in evaluation["unmatched"][0]
    (summary,) = evaluation["summary"]
    assert summary["dice"]["mean"] == pytest.approx(np.mean([c["dice"] for c in cases]))
    stored = _rows(
        out, "SELECT * FROM evaluation_metric WHERE metric = 'dice' AND reference = 'phantom'"
    )
    assert sorted(r["value"] for r in stored) == pytest.approx(sorted(c["dice"] for c in cases))
    folder = Path(evaluation["folder"])
    assert "dice" in (folder / "summary.md").read_text().lower()
    with open(folder / "metrics.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(cases)
    for case in cases:  # QC with both outlines
        assert Path(case["qc"]).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_command_prints_json(demo, references: Path, capsys) -> None:
    out, _ = demo
    code = main(["evaluate", "--reference", str(references), "--output", str(out), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(printed["cases"]) == 4 and printed["summary"][0]["dice"]["n"] == 4


def test_evaluation_compares_glands_with_glands_and_reruns_replace(demo, tmp_path: Path) -> None:
    """A PI-CAI-like label folder (gland, zonal and lesion masks per exam): the demo model
    (whole gland) is compared with the gland masks only, the others are reported as skipped;
    a rerun with a narrower pattern replaces the rows of the first run."""
    demo_out, result = demo
    out = tmp_path / "out"  # the demo's database and key; its masks stay where they are
    out.mkdir()
    shutil.copy(demo_out / ".pseudonym-key", out / ".pseudonym-key")
    with (
        contextlib.closing(sqlite3.connect(demo_out / "provenance.sqlite")) as source,
        contextlib.closing(sqlite3.connect(out / "provenance.sqlite")) as copy,
    ):
        source.backup(copy)  # with what is still in the write-ahead log
    labels = tmp_path / "labels"
    for truth in sorted((demo_out / "demo-cohort" / "truth").iterdir()):
        (labels / truth.name).mkdir(parents=True)
        gland = truth / "t2_gland_mask.nii.gz"
        for name in ("gland_A", "gland_B", "zones_Z", "lesion_expert"):
            shutil.copy(gland, labels / truth.name / f"{name}.nii.gz")

    first = evaluate_flow(references=[str(labels)], output_root=str(out))
    n = len(result["patients"])
    assert first["patients"] == n and len(first["cases"]) == 2 * n
    assert {c["reference"] for c in first["cases"]} == {"gland_A", "gland_B"}
    assert sorted(first["skipped"]) == [
        f"lesion_expert: a lesion mask, never compared as a gland ({n} masks)",
        f"zones_Z: zonal, and model demo outputs the whole gland only ({n} masks)",
    ]
    assert f"| Patients | {n} | {n} |" in (Path(first["folder"]) / "summary.md").read_text()

    evaluate_flow(references=[str(labels)], pattern="gland_A*", output_root=str(out))
    rows = _rows(out, "SELECT DISTINCT reference FROM evaluation_metric WHERE reference LIKE 'g%'")
    assert [r["reference"] for r in rows] == ["gland_A"]


def test_reference_kinds() -> None:
    from flows.evaluate import reference_kind

    assert [reference_kind(n) for n in ("gland_Bosma22b", "phantom", "ProstateX-0000")] == [
        "gland"
    ] * 3
    assert reference_kind("zones_HeviAI23") == "zones" and reference_kind("Zone-x") == "zones"
    assert reference_kind("t2_zones") == "zones" and reference_kind("t2_gland_mask") == "gland"
    assert reference_kind("lesion_expert") == reference_kind("lesions.v2") == "lesion"


def test_reference_layouts(tmp_path: Path) -> None:
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    (nested / "ProstateX-0000").mkdir(parents=True)
    flat.mkdir()
    mask = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(flat / "ProstateX-0000.nii.gz"))
    for name in ("gland_A", "gland_B", "lesion_expert"):
        sitk.WriteImage(mask, str(nested / "ProstateX-0000" / f"{name}.nii.gz"))
    (nested / "ProstateX-0000" / "notes.txt").write_text("not a mask")
    assert [(r.exam, r.name) for r in find_references(flat)] == [("ProstateX-0000", "flat")]
    found = find_references(nested, "gland_*")
    assert [(r.exam, r.name) for r in found] == [
        ("ProstateX-0000", "gland_A"),
        ("ProstateX-0000", "gland_B"),
    ]
    with pytest.raises(InputError, match="no reference masks"):
        find_references(nested, "zones_*")
    with pytest.raises(InputError, match="does not exist"):
        find_references(tmp_path / "missing")


def test_status_command_lists_steps_and_outputs(demo, capsys) -> None:
    out, result = demo
    assert main(["status", "--output", str(out), "--json"]) == 0
    printed = {p["patient"]: p for p in json.loads(capsys.readouterr().out)["patients"]}
    assert set(printed) == {p["patient"] for p in result["patients"]}
    for patient in result["patients"]:
        status = printed[patient["patient"]]
        assert "source" not in status  # the exam folder is never stored
        assert {f["kind"] for f in status["found"]} >= {"t2w", "dwi"}
        assert {"ingest", "n4", "register", "adc", "segment_demo", "qc_demo"} <= set(
            status["steps"]
        )
        assert all(s["state"] == "completed" for s in status["steps"].values())
        roles = {"t2w", "dwi_b1000", "adc", "adc_native", "mask", "qc"}
        assert set(status["outputs"]) == roles
        for role in roles:
            assert Path(status["outputs"][role]).is_file()
        assert status["outputs"]["mask"] == patient["outputs"]["mask"]


def test_a_reference_on_another_grid_fails_alone(demo, references: Path, tmp_path: Path) -> None:
    out, _ = demo
    folder = tmp_path / "mixed"
    shutil.copytree(references, folder)
    (folder / "NOT-AN-EXAM.nii.gz").unlink()
    sitk.WriteImage(sitk.Image(16, 16, 4, sitk.sitkUInt8) + 1, str(folder / "SYN-0002.nii.gz"))
    (folder / "SYN-0003.nii.gz").write_bytes(b"not an image")  # unreadable
    evaluation = evaluate_flow(references=[str(folder)], output_root=str(out))
    assert len(evaluation["cases"]) == 2  # the other two exams are still evaluated
    grid, unreadable = sorted(evaluation["errors"])
    assert "SYN-0002.nii.gz" in grid and "grid" in grid.lower()  # the terminal names the file
    assert "SYN-0003.nii.gz" in unreadable
    # ... the database does not: the exam folder's name is never stored
    (summary,) = _rows(
        out,
        "SELECT summary FROM pipeline_run WHERE command LIKE 'evaluate %mixed' "
        "ORDER BY started_at DESC LIMIT 1",
    )
    assert "SYN-000" not in summary["summary"] and "the mixed mask" in summary["summary"]
    assert main(["evaluate", "--reference", str(folder), "--output", str(out)]) == 1


def test_a_model_outputs_zones_when_its_mask_has_several_labels(tmp_path: Path) -> None:
    from flows.evaluate import model_zones
    from flows.segment import mask_paths

    exam = tmp_path / "P0123456789ab" / "S0123456789ab"
    for model, labels in (("zonal", {"1": "PZ", "2": "tz"}), ("whole", {"1": "gland"})):
        mask, sidecar = mask_paths(exam, model)
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_text(json.dumps({"labels": labels}))
        assert model_zones(str(mask), model) == ({"pz": 1, "tz": 2} if model == "zonal" else {})
    assert model_zones(str(mask_paths(exam, "missing")[0]), "missing") == {}


@pytest.mark.slow
def test_zonal_model_run_writes_zones_everywhere(demo, tmp_path: Path) -> None:
    """``run --model demo-zones`` on two phantom exams: PZ/TZ/gland volumes, radiomics keyed
    by zone (long, wide and the SQL view) and per-zone Dice against the true zones."""
    from db.queries import features
    from db.store import session_scope

    demo_out, _ = demo
    cohort, references, out = tmp_path / "cohort", tmp_path / "refs", tmp_path / "out"
    for name in ("SYN-0001", "SYN-0002"):
        shutil.copytree(demo_out / "demo-cohort" / "dicom" / name, cohort / name)
        (references / name).mkdir(parents=True)
        shutil.copy(
            demo_out / "demo-cohort" / "truth" / name / "t2_zones.nii.gz", references / name
        )
    command = ["run", str(cohort), "--model", "demo-zones", "--output", str(out)]
    assert main([*command, "--reference", str(references)]) == 0

    rows = _rows(
        out, "SELECT s.*, p.pseudo_id FROM segmentation s JOIN patient p ON p.id = s.patient_id"
    )
    by_patient: dict[str, dict[str, dict]] = {}
    for row in rows:
        assert row["model"] == "demozones"  # the file-name-safe label of the spec
        by_patient.setdefault(row["pseudo_id"], {})[row["label_name"]] = row
    assert len(by_patient) == 2
    for zones in by_patient.values():
        assert sorted(zones) == ["gland", "pz", "tz"]
        assert (zones["pz"]["label"], zones["tz"]["label"]) == (1, 2)
        total = zones["pz"]["voxel_count"] + zones["tz"]["voxel_count"]
        assert zones["gland"]["voxel_count"] == total and zones["pz"]["voxel_count"] > 1000
        mask = sitk.GetArrayFromImage(sitk.ReadImage(zones["pz"]["mask_path"]))
        assert int((mask == 2).sum()) == zones["tz"]["voxel_count"]

    engine = make_engine(f"sqlite:///{out / 'provenance.sqlite'}")
    with session_scope(engine) as session:
        long = features(session)
        wide = features(session, wide=True)
        only_pz = features(session, zones=["pz"])
    assert set(long["zone"]) == {"gland", "pz", "tz"}
    assert set(long["mask"]) == {"demozones:gland", "demozones:pz", "demozones:tz"}
    assert set(only_pz["zone"]) == {"pz"}
    assert len(wide) == 2 * 3 * 3  # patients x images x zones
    assert set(wide["zone"]) == {"gland", "pz", "tz"}
    view = _rows(out, "SELECT DISTINCT zone FROM radiomics_wide")
    assert {r["zone"] for r in view} == {"gland", "pz", "tz"}

    dice = _rows(
        out,
        "SELECT label_name, value FROM evaluation_metric "
        "WHERE metric = 'dice' AND reference = 't2_zones'",
    )
    by_label: dict[str, list[float]] = {}
    for row in dice:
        by_label.setdefault(row["label_name"], []).append(row["value"])
    assert sorted(by_label) == ["gland", "pz", "tz"]
    assert all(len(v) == 2 for v in by_label.values())
    assert min(by_label["gland"]) >= 0.90
    assert min(by_label["pz"]) >= 0.85 and min(by_label["tz"]) >= 0.85
