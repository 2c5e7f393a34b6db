"""The cohort flow on a real Prefect server: failure isolation, final state, artifacts."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL

from flows.cohort import cohort_flow

pytestmark = pytest.mark.usefixtures("prefect_server")


def _latest_artifact(key: str) -> dict:
    """The newest artifact with ``key``, read from the server's REST API."""
    body = {
        "artifacts": {"key": {"any_": [key]}},
        "sort": "CREATED_DESC",
        "limit": 1,
        "offset": 0,
    }
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    (artifact,) = response.json()
    return artifact


def test_one_broken_exam_of_five_fails_alone(demo, tmp_path: Path) -> None:
    demo_out, _ = demo
    out = tmp_path / "out"  # a copy: the shared demo output stays as the other tests expect
    shutil.copytree(demo_out, out)
    cohort = tmp_path / "cohort"
    shutil.copytree(out / "demo-cohort" / "dicom", cohort)
    broken = cohort / "SYN-9999"
    shutil.copytree(cohort / "SYN-0001", broken)
    for dwi in [d for d in broken.rglob("*") if d.is_dir() and "diff" in d.name.lower()]:
        shutil.rmtree(dwi)  # no DWI left: the exam cannot be processed
    state = cohort_flow(root=str(cohort), models=["demo"], output_root=str(out), return_state=True)
    outcome = state.result(raise_on_failure=False)
    status = {p["source"].split("/")[0]: p for p in outcome["patients"]}
    assert sorted(status) == ["SYN-0001", "SYN-0002", "SYN-0003", "SYN-0004", "SYN-9999"]
    assert [status[k]["status"] for k in sorted(status)] == ["ok"] * 4 + ["error"]
    assert "DWI" in status["SYN-9999"]["error"] or "dwi" in status["SYN-9999"]["error"]
    assert state.is_completed()
    assert state.message == "4/5 patients completed; 1 failed (1 in ingest)"
    for name in ("SYN-0001", "SYN-0004"):  # the others still have every output
        assert Path(status[name]["outputs"]["mask"]).is_file()
    summary = _latest_artifact("cohort-summary")
    assert "5 patients: 4 completed, 1 failed." in summary["data"]
    assert status["SYN-9999"]["patient"] in summary["data"]
    progress = _latest_artifact("cohort-progress")
    assert progress["type"] == "table"
    assert status["SYN-9999"]["patient"] in str(progress["data"])

    # One flow run per patient under the cohort run, named by pseudonym; the broken exam's
    # is Failed with its step and reason; the cohort run says that some failed.
    assert state.name == "Completed with failures"
    runs = _patient_flow_runs(state.state_details.flow_run_id)
    assert sorted(r["name"] for r in runs) == sorted(p["patient"] for p in status.values())
    by_name = {r["name"]: r for r in runs}
    broken_id = status["SYN-9999"]["patient"]
    assert by_name[broken_id]["state_type"] == "FAILED"
    assert by_name[broken_id]["state"]["message"].startswith("ingest: ")
    assert all(r["state_type"] == "COMPLETED" for n, r in by_name.items() if n != broken_id)

    # Retrying the failed patient alone runs one patient flow, nothing else.
    again = cohort_flow(
        root=str(cohort),
        models=["demo"],
        output_root=str(out),
        patients=[broken_id],
        return_state=True,
    )
    (entry,) = again.result(raise_on_failure=False)["patients"]
    assert entry["patient"] == broken_id and entry["status"] == "error"
    assert [r["name"] for r in _patient_flow_runs(again.state_details.flow_run_id)] == [broken_id]


def _patient_flow_runs(cohort_run_id) -> list[dict]:
    """The patient flow runs nested under one cohort run (read from the server's API)."""
    body = {"flows": {"name": {"any_": ["patient"]}}, "limit": 200, "offset": 0}
    response = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter", json=body, timeout=30)
    response.raise_for_status()
    task_runs = httpx.post(
        f"{PREFECT_API_URL.value()}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [str(cohort_run_id)]}}, "limit": 200, "offset": 0},
        timeout=30,
    )
    task_runs.raise_for_status()
    parents = {t["id"] for t in task_runs.json()}
    return [r for r in response.json() if r["parent_task_run_id"] in parents]


def test_every_exam_broken_is_a_failed_run(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort" / "P1"
    cohort.mkdir(parents=True)
    (cohort / "notes.txt").write_text("no images here")
    state = cohort_flow(
        root=str(tmp_path / "cohort"),
        models=["demo"],
        output_root=str(tmp_path / "out"),
        return_state=True,
    )
    assert state.is_failed()
    assert state.message == "no exams found"


def test_another_worker_count_reuses_every_finished_step(
    demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads and device are resources, not parameters: the demo run again with another
    worker and thread count records no new completed step."""
    import sqlite3

    from flows.demo import demo_flow
    from flows.settings import load_settings

    demo_out, _ = demo
    out = tmp_path / "out"
    shutil.copytree(demo_out, out)
    db = out / "provenance.sqlite"
    query = "SELECT count(*) FROM step_run WHERE status = 'completed'"
    with sqlite3.connect(db) as connection:
        before = connection.execute(query).fetchone()[0]
        threads = connection.execute(
            "SELECT DISTINCT json_extract(resources, '$.threads') FROM step_run WHERE step = 'n4'"
        ).fetchall()
    (first,) = {row[0] for row in threads}
    workers, per_worker = (1, 2) if first == 1 else (2, 1)  # fits the 2 cores of CI
    monkeypatch.setenv("PROSTATE_COHORT_THREADS__WORKERS", str(workers))
    monkeypatch.setenv("PROSTATE_COHORT_THREADS__THREADS_PER_WORKER", str(per_worker))
    assert load_settings().threads.per_worker() == per_worker != first
    state = demo_flow(patients=4, seed=0, output_root=str(out), return_state=True)
    assert state.is_completed()
    with sqlite3.connect(db) as connection:
        after = connection.execute(query).fetchone()[0]
    assert after == before


def test_patients_finish_one_by_one_and_progress_shows_during_the_run(demo) -> None:
    """Progressive completion: the first patient's mask exists before the last patient
    starts segmentation, and the progress artifact was published (and changed) while the
    demo run went on, not only at its end."""
    import json
    import sqlite3

    demo_out, _ = demo
    with sqlite3.connect(demo_out / "provenance.sqlite") as connection:
        segment = connection.execute(
            "SELECT started_at, ended_at FROM step_run WHERE step = 'segment_demo' "
            "ORDER BY started_at"
        ).fetchall()
        (flow_run_id,) = connection.execute(
            "SELECT prefect_flow_run_id FROM pipeline_run ORDER BY started_at LIMIT 1"
        ).fetchone()
    assert len(segment) == 4
    assert segment[0][1] < segment[-1][0]  # first mask written before the last one starts
    body = {
        "artifacts": {"key": {"any_": ["cohort-progress"]}, "flow_run_id": {"any_": [flow_run_id]}},
        "sort": "CREATED_DESC",
        "limit": 50,
        "offset": 0,
    }
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    versions = response.json()[::-1]  # oldest first
    flow_run = httpx.get(f"{PREFECT_API_URL.value()}/flow_runs/{flow_run_id}", timeout=30).json()
    assert len(versions) >= 2
    assert versions[0]["created"] < flow_run["end_time"]
    first = json.dumps(versions[0]["data"])
    assert "waiting" in first or "running" in first  # published while patients were left
    assert first != json.dumps(versions[-1]["data"])
