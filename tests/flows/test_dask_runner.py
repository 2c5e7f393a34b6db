"""Scale-out on Dask: the cohort flow on a 2-worker LocalCluster gives the threaded results.

Three of the demo fixture's exams (processed there on the thread pool) are run again on a
``distributed.LocalCluster`` of two worker processes through ``prefect-dask``, into a fresh
output root that shares the demo's pseudonym key (so the ids match), and the masks, gland
volumes and ADC maps are compared with the demo's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from prefect.settings import PREFECT_API_URL

from db.queries import patient_status
from db.store import make_engine, session_scope
from flows.cli import main

pytestmark = pytest.mark.usefixtures("prefect_server")

N_EXAMS = 3


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    """Two single-threaded Dask worker processes that report to the test's Prefect server."""
    distributed = pytest.importorskip("distributed")
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # inherited by the workers
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local


def _volumes(out: Path) -> dict[str, float]:
    with make_engine(f"sqlite:///{out / 'provenance.sqlite'}").connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT p.pseudo_id, g.volume_ml FROM segmentation g "
            "JOIN patient p ON p.id = g.patient_id WHERE g.label = 1"
        ).fetchall()
    return dict(rows)


def _array(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_dask_cluster_gives_the_thread_pool_results(demo, cluster, tmp_path, monkeypatch) -> None:
    reference_out, reference = demo
    root, out = tmp_path / "cohort", tmp_path / "out"
    for exam in sorted((reference_out / "demo-cohort" / "dicom").iterdir())[:N_EXAMS]:
        shutil.copytree(exam, root / exam.name)
    out.mkdir()
    shutil.copy(reference_out / ".pseudonym-key", out / ".pseudonym-key")
    monkeypatch.setenv("PROSTATE_COHORT_THREADS__THREADS_PER_WORKER", "1")

    command = ["run", str(root), "--model", "demo", "--runner", "dask"]
    assert main([*command, "--address", cluster.scheduler_address, "--output", str(out)]) == 0

    assert cluster.scheduler.task_prefixes, "no task went through the Dask scheduler"
    expected = {p["patient"]: p for p in reference["patients"]}
    got = _volumes(out)
    assert len(got) == N_EXAMS
    reference_volumes = _volumes(reference_out)
    for patient, volume in got.items():
        assert volume == pytest.approx(reference_volumes[patient], rel=0.01), patient
    with session_scope(make_engine(f"sqlite:///{out / 'provenance.sqlite'}")) as session:
        outputs_of = {p["patient"]: p["outputs"] for p in patient_status(session)}
    for patient in got:
        outputs = outputs_of[patient]
        mine, theirs = _array(outputs["mask"]), _array(expected[patient]["outputs"]["mask"])
        dice = 2 * np.sum((mine > 0) & (theirs > 0)) / (np.sum(mine > 0) + np.sum(theirs > 0))
        assert dice > 0.99, patient
        adc, adc_ref = _array(outputs["adc"]), _array(expected[patient]["outputs"]["adc"])
        inside = theirs > 0
        assert np.median(np.abs(adc[inside] - adc_ref[inside])) < 1e-5  # mm²/s
