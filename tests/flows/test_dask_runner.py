"""Scale-out on Dask: the cohort flow on a 2-worker cluster gives the threaded results.

Three of the demo fixture's exams (processed there on the thread pool) are run again on a
Dask cluster of two worker processes through ``prefect-dask``, into a fresh
output root that shares the demo's pseudonym key (so the ids match), and the masks, gland
volumes and ADC maps are compared with the demo's. One worker has the resource ``GPU`` and
``segmentation.dask_resources`` asks for it: segmentation runs there only, with the model
loaded once for every patient.
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
from tasks.segment import backends_created

pytestmark = pytest.mark.usefixtures("prefect_server")

N_EXAMS = 3


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch):
    """Two single-threaded Dask worker processes that report to the test's Prefect server;
    only the second has the resource ``GPU`` (as a GPU host's worker would)."""
    distributed = pytest.importorskip("distributed")
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # inherited by the workers
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    worker = {"cls": distributed.Nanny, "options": {"nthreads": 1}}
    gpu = {"cls": distributed.Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}}
    scheduler = {"cls": distributed.Scheduler, "options": {"dashboard_address": None}}
    with distributed.SpecCluster(workers={"cpu": worker, "gpu": gpu}, scheduler=scheduler) as spec:
        yield spec


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
    monkeypatch.setenv("PROSTATE_COHORT_SEGMENTATION__DASK_RESOURCES", '{"GPU": 1}')

    command = ["run", str(root), "--model", "demo", "--runner", "dask"]
    assert main([*command, "--address", cluster.scheduler_address, "--output", str(out)]) == 0

    assert cluster.scheduler.task_prefixes, "no task went through the Dask scheduler"
    # Segmentation ran only on the worker with the GPU resource, which loaded the model
    # once and kept it for every patient (a model per patient would be 3 loads).
    from distributed import Client

    with Client(cluster) as client:
        loaded = client.run(backends_created)  # {worker address: models created there}
    resources = {a: w.resources for a, w in cluster.scheduler.workers.items()}
    assert {a: n for a, n in loaded.items()} == {
        a: (1 if r.get("GPU") else 0) for a, r in resources.items()
    }, (loaded, resources)
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
