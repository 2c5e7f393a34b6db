"""The analysis queries (db/queries.py, db/run_queries.py) and the ``radiomics_wide`` view on a
cohort the pipeline made (``analysed_demo``: 4 demo exams, an evaluation, one exam that
failed at ingest), on SQLite and on PostgreSQL (the same rows copied over, ``cohort_url``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import radiomics
from sqlalchemy import inspect, text
from sqlmodel import Session, select

from db.models import RadiomicsFeature, StepRun
from db.queries import evaluation_metrics, features, volumes, wide_column
from db.run_queries import (
    pipeline_runs,
    qc_figures,
    step_failures,
    step_runs,
    step_time_summary,
    step_timings,
)
from db.store import make_engine, session_scope
from tasks.evaluate import METRICS
from tasks.measure import load_radiomics_settings, radiomics_settings_hash

N_PATIENTS = 4
#: Features per image with the shipped settings: t2w adds the 14 shape features.
N_FEATURES = {"t2w": 106, "adc": 92, "b1000": 92}


@pytest.fixture
def session(cohort_url: str) -> Iterator[Session]:
    engine = make_engine(cohort_url)
    with session_scope(engine) as session:
        yield session
    engine.dispose()


def _patients(analysed_demo) -> list[str]:
    return sorted(p["patient"] for p in analysed_demo.demo["patients"])


def shipped_feature_columns() -> list[str]:
    """Wide columns of every feature the shipped settings extract (any image type)."""
    classes = radiomics.getFeatureClasses()
    columns = set()
    for params in load_radiomics_settings().values():
        for cls, names in params["featureClass"].items():
            names = names or [n for n, old in classes[cls].getFeatureNames().items() if not old]
            columns.update(wide_column(cls, name) for name in names)
    return sorted(columns)


def test_features_trace_to_the_step_run_that_made_them(session, analysed_demo) -> None:
    long = features(session)
    assert len(long) == N_PATIENTS * sum(N_FEATURES.values())
    assert sorted(long["patient"].unique()) == _patients(analysed_demo)
    assert long.groupby("image").size().to_dict() == {
        image: N_PATIENTS * n for image, n in N_FEATURES.items()
    }
    assert set(zip(long["model"], long["zone"], long["mask"], strict=True)) == {
        ("demo", "gland", "demo:gland")
    }
    assert long["value"].notna().all()
    runs = step_runs(session, step_run_ids=long["step_run_id"].unique()).set_index("step_run_id")
    assert len(runs) == N_PATIENTS  # one radiomics run per patient
    assert set(runs["step"]) == {"radiomics_demo"} and set(runs["status"]) == {"completed"}
    for row in long.drop_duplicates(["step_run_id", "image"]).itertuples():
        run = runs.loc[row.step_run_id]
        assert run["patient"] == row.patient and run["step_version"] == row.step_version
        assert radiomics_settings_hash(run["parameters"]["settings"][row.image]) == (
            row.settings_hash
        )
        assert run["software_versions"]["pyradiomics-bhklab"] != "not installed"
        roles = {i["role"] for i in run["inputs"]}
        assert {"mask", "adc", "dwi_b1000"} <= roles and any(r.startswith("t2w") for r in roles)


def test_feature_filters(session, analysed_demo) -> None:
    patient = _patients(analysed_demo)[0]
    assert set(features(session, images="adc")["image"]) == {"adc"}
    shape = features(session, feature_classes="shape")
    assert len(shape) == N_PATIENTS * 14 and set(shape["image"]) == {"t2w"}
    mean = features(session, feature_classes=["firstorder"], feature_names="Mean")
    assert len(mean) == N_PATIENTS * 3
    one = features(session, patients=[patient], images=["t2w", "b1000"])
    assert set(one["patient"]) == {patient} and len(one) == N_FEATURES["t2w"] + 92
    assert len(features(session, zones="gland", models="demo", masks="demo:gland")) == len(
        features(session)
    )
    assert features(session, zones="pz").empty and features(session, models="taps").empty
    (demo_run,) = features(session)["pipeline_run_id"].unique()
    assert len(features(session, pipeline_run_id=demo_run, latest=False)) == len(features(session))
    ingest_run = step_failures(session)["pipeline_run_id"].iloc[0]
    assert features(session, pipeline_run_id=ingest_run).empty  # that run extracted nothing


def test_wide_values_equal_the_long_form(session) -> None:
    long = features(session)
    wide = features(session, wide=True)
    assert len(wide) == N_PATIENTS * len(N_FEATURES)  # one row per patient x image x mask
    assert list(wide.columns[8:]) == sorted(long["wide_column"].unique())
    cells = wide.set_index(["step_run_id", "image", "mask"])
    for row in long.itertuples():
        assert cells.at[(row.step_run_id, row.image, row.mask), row.wide_column] == row.value
    n_values = cells.iloc[:, 5:].notna().sum().sum()
    assert n_values == len(long)  # the other cells are NaN: shape_* outside T2
    not_t2 = cells.index.get_level_values("image") != "t2w"
    assert cells.loc[not_t2, "shape_voxelvolume"].isna().all()


def test_sql_view_equals_the_wide_export(session) -> None:
    export = features(session, wide=True)
    keys = ["patient", "image", "mask"]
    result = session.connection().execute(text("SELECT * FROM radiomics_wide"))
    view = pd.DataFrame(result.all(), columns=list(result.keys()))
    columns = [c["name"] for c in inspect(session.connection()).get_columns("radiomics_wide")]
    assert columns == list(export.columns)
    pd.testing.assert_frame_equal(
        view.sort_values(keys).reset_index(drop=True),
        export.sort_values(keys).reset_index(drop=True),
        check_dtype=False,
    )


def test_view_columns_are_the_shipped_settings_features(session) -> None:
    # Fails when tasks/radiomics.yaml (or pyradiomics) changes the feature set: then add a
    # migration that recreates radiomics_wide with the new list (see migration 0002).
    view = session.connection().execute(text("SELECT * FROM radiomics_wide LIMIT 1"))
    assert list(view.keys())[8:] == shipped_feature_columns()
    assert sorted(features(session)["wide_column"].unique()) == shipped_feature_columns()


def test_volumes_are_the_recorded_mask_volumes(session, analysed_demo) -> None:
    found = volumes(session)
    assert list(found["patient"]) == _patients(analysed_demo)
    assert set(found["model"]) == {"demo"} and set(found["label_name"]) == {"gland"}
    for row in found.itertuples():
        sidecar = json.loads(Path(row.mask_path.replace(".nii.gz", ".json")).read_text())
        assert row.volume_ml == pytest.approx(sidecar["volumes_ml"]["gland"], rel=1e-12)
        assert 20 < row.volume_ml < 80
    runs = step_runs(session, step_run_ids=found["step_run_id"])
    assert set(runs["step"]) == {"segment_demo"}
    assert volumes(session, models="taps").empty and volumes(session, labels="pz").empty
    assert len(volumes(session, patients=_patients(analysed_demo)[:2])) == 2


def test_evaluation_metrics_long_and_wide(session, analysed_demo) -> None:
    cases = {c["patient"]: c for c in analysed_demo.evaluation["cases"]}
    # the demo compared its masks with the true ones (reference "t2_gland_mask"); the fixture
    # compared them again with copies of those files (reference "phantom")
    every = evaluation_metrics(session)
    assert set(every["reference"]) == {"phantom", "t2_gland_mask"}
    by_reference = every.pivot_table(
        index=["patient", "metric"], columns="reference", values="value", dropna=False
    )
    assert by_reference["phantom"].to_numpy() == pytest.approx(
        by_reference["t2_gland_mask"].to_numpy(), rel=1e-12, nan_ok=True
    )
    long = evaluation_metrics(session, references="phantom")
    assert len(long) == N_PATIENTS * len(METRICS)
    assert set(long["reference"]) == {"phantom"} and set(long["model"]) == {"demo"}
    for row in long.itertuples():
        assert row.value == pytest.approx(cases[row.patient][row.metric], rel=1e-12)
    wide = evaluation_metrics(session, references="phantom", wide=True).set_index("patient")
    assert sorted(wide.index) == sorted(cases) and set(METRICS) <= set(wide.columns)
    for row in long.itertuples():
        assert wide.at[row.patient, row.metric] == row.value
    assert (wide["dice"] >= 0.9).all()
    assert evaluation_metrics(session, references="other").empty
    with pytest.raises(ValueError, match="latest"):
        evaluation_metrics(session, wide=True, latest=False)


def test_step_timings_failures_and_runs(session, analysed_demo) -> None:
    timings = step_timings(session)
    assert (timings["duration_s"] >= 0).all()
    elapsed = (timings["ended_at"] - timings["started_at"]).dt.total_seconds()
    assert timings["duration_s"].to_numpy() == pytest.approx(elapsed.to_numpy(), abs=1e-3)
    summary = step_time_summary(session).set_index("step")
    assert summary.loc["n4", "runs"] == N_PATIENTS
    assert summary.loc["ingest", ["runs", "completed", "failed"]].tolist() == [5, 4, 1]
    assert summary.loc["n4", "total_s"] == pytest.approx(
        timings.loc[timings["step"] == "n4", "duration_s"].sum()
    )
    assert list(summary["total_s"]) == sorted(summary["total_s"], reverse=True)

    (failure,) = step_failures(session).itertuples()
    broken = analysed_demo.broken
    assert (failure.patient, failure.step) == (broken["patient"], "ingest")
    assert broken["error"] in failure.error and failure.error_type == "InputError"
    (demo_run,) = features(session)["pipeline_run_id"].unique()
    assert step_failures(session, pipeline_run_id=demo_run).empty

    runs = pipeline_runs(session)
    # newest first: the fixture's ingest and evaluation, the demo's evaluation, the demo
    assert [c.split()[0] for c in runs["command"]] == ["ingest", "evaluate", "evaluate", "demo"]
    assert runs["status"].iloc[[0, 3]].tolist() == ["failed", "completed"]  # ingest, demo
    assert (runs["duration_s"] > 0).all() and runs.loc[3, "n_patients"] == N_PATIENTS
    assert len(pipeline_runs(session, limit=1)) == 1

    figures = qc_figures(session)
    assert list(figures["patient"]) == _patients(analysed_demo)
    assert set(figures["model"]) == {"demo"}
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in figures["path"])


@pytest.mark.postgres
def test_both_engines_give_the_same_frames(analysed_demo, postgres_cohort_url: str) -> None:
    def frames(url: str) -> dict[str, pd.DataFrame]:
        engine = make_engine(url)
        with session_scope(engine) as session:
            out = {
                "features": features(session, wide=True),
                "volumes": volumes(session),
                "evaluation": evaluation_metrics(session, wide=True),
                "timings": step_timings(session),
                "failures": step_failures(session),
                "runs": pipeline_runs(session),
            }
        engine.dispose()
        return out

    sqlite, postgres = frames(analysed_demo.url), frames(postgres_cohort_url)
    for name, frame in sqlite.items():
        pd.testing.assert_frame_equal(frame, postgres[name], check_dtype=False, obj=name)
    assert not math.isnan(sqlite["features"]["firstorder_mean"].iloc[0])


def _record_a_rerun(url: str) -> tuple[str, int]:
    """Record a second radiomics run of one patient (values doubled), as a forced recompute
    would: a new step run and its feature rows. Returns (patient, new step run id)."""
    engine = make_engine(url)
    with session_scope(engine) as session:
        old = features(session)
        run_id = int(old["step_run_id"].iloc[0])
        run = session.get(StepRun, run_id)
        again = StepRun(**run.model_dump(exclude={"id"}))
        session.add(again)
        session.flush()
        rows = session.exec(select(RadiomicsFeature).where(RadiomicsFeature.step_run_id == run_id))
        for row in rows.all():
            twice = None if row.value is None else 2 * row.value
            session.add(
                RadiomicsFeature(
                    **row.model_dump(exclude={"id", "step_run_id", "value"}),
                    step_run_id=again.id,
                    value=twice,
                )
            )
        patient, new_id = old["patient"].iloc[0], again.id
    engine.dispose()
    return patient, new_id


def test_latest_keeps_the_newest_run_in_queries_and_view(cohort_copy_url: str) -> None:
    engine = make_engine(cohort_copy_url)
    with session_scope(engine) as session:
        before = features(session)
    patient, new_id = _record_a_rerun(cohort_copy_url)
    with session_scope(engine) as session:
        latest = features(session)
        history = features(session, latest=False)
        wide = features(session, wide=True)
        result = session.connection().execute(text("SELECT * FROM radiomics_wide"))
        view = pd.DataFrame(result.all(), columns=list(result.keys()))
    engine.dispose()
    n_patient = N_FEATURES["t2w"] + N_FEATURES["adc"] + N_FEATURES["b1000"]
    assert len(latest) == len(before) and len(history) == len(before) + n_patient
    mine = latest[latest["patient"] == patient]
    assert set(mine["step_run_id"]) == {new_id}
    old = before[before["patient"] == patient]
    assert mine["value"].to_numpy() == pytest.approx(2 * old["value"].to_numpy(), rel=1e-12)
    assert len(wide) == len(view) == N_PATIENTS * len(N_FEATURES)
    assert set(view.loc[view["patient"] == patient, "step_run_id"]) == {new_id}
    keys = ["patient", "image", "mask"]
    pd.testing.assert_frame_equal(
        view.sort_values(keys).reset_index(drop=True),
        wide.sort_values(keys).reset_index(drop=True),
        check_dtype=False,
    )
