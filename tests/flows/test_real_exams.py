"""The whole pipeline on the real ProstateX exams, judged against independent references.

One cohort run over ``../shared/data/dicom`` (ProstateX-0000 and -0218, TCIA layout) with the
TAPS model, then per exam:

* registration: the recorded T2 -> DWI map's scale factors lie within 0.93-1.07 and its
  similarity to the lowest-b DWI inside the gland + 10 mm is at least the scanner-coordinate
  identity's (gland: the PI-CAI reference mask of 0000; TAPS's mask for 0218, which has no
  public mask);
* ADC on its native grid vs the scanner's ADC map inside the gland: median signed
  difference within +-5 %;
* the fits used one acquisition: 0218's b100/b500/b1400 series (another echo time) are not
  in them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from db.run_queries import step_runs
from db.store import session_scope
from flows.cohort import cohort_flow
from flows.steps import engine_for
from tasks.align import gland_region, similarity
from tasks.register import load_transform

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
if not (DATA / "dicom").is_dir():
    pytest.skip(f"real exams not found at {DATA}", allow_module_level=True)
pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

REFERENCE = {"ProstateX-0000": DATA / "labels" / "ProstateX-0000" / "gland_Bosma22b.nii.gz"}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("real")
    state = cohort_flow(
        root=str(DATA / "dicom"), models=["taps"], output_root=str(out), return_state=True
    )
    result = state.result()
    patients = {p["source"].split("/")[0]: p for p in result["patients"]}
    with session_scope(engine_for(f"sqlite:///{out / 'provenance.sqlite'}")) as session:
        runs = step_runs(session)
    return {"patients": patients, "runs": runs}


def _recorded(real_run: dict, exam: str, step: str) -> dict:
    patient = real_run["patients"][exam]["patient"]
    runs = real_run["runs"]
    (row,) = runs[(runs.patient == patient) & (runs.step == step)].to_dict("records")
    return row


def _gland(real_run: dict, exam: str) -> sitk.Image:
    path = REFERENCE.get(exam) or real_run["patients"][exam]["outputs"]["mask"]
    return sitk.ReadImage(str(path)) > 0


@pytest.mark.parametrize("exam", ["ProstateX-0000", "ProstateX-0218"])
def test_registration_never_worse_than_identity(real_run: dict, exam: str) -> None:
    entry = real_run["patients"][exam]
    assert entry["status"] == "ok", entry.get("error")
    row = _recorded(real_run, exam, "register")
    details = row["details"]
    print(f"\n{exam} registration: {details['accepted_stage']}: {details['reason']}")
    assert all(0.93 <= s <= 1.07 for s in details["scales"]), details
    outputs = {o["role"]: o["path"] for o in row["outputs"]}
    t2_to_dwi = load_transform(outputs["xfm_t2_to_dwi"])
    lowest = min(
        (r for r in outputs if r.endswith("_moco")), key=lambda r: float(r[5:].split("_")[0])
    )
    dwi = sitk.ReadImage(outputs[lowest], sitk.sitkFloat32)
    (t2_input,) = [i["path"] for i in row["inputs"] if i["role"] == "t2w_n4"]
    t2 = sitk.ReadImage(t2_input, sitk.sitkFloat32)
    region = gland_region(_gland(real_run, exam), dwi, 10.0)
    ours = similarity(t2, dwi, t2_to_dwi, region)
    identity = similarity(t2, dwi, sitk.AffineTransform(3), region)
    print(f"{exam} NMI inside the gland + 10 mm: identity {identity:.4f}, pipeline {ours:.4f}")
    assert ours >= identity


@pytest.mark.parametrize("exam", ["ProstateX-0000", "ProstateX-0218"])
def test_native_adc_agrees_with_the_scanner_map(real_run: dict, exam: str) -> None:
    outputs = real_run["patients"][exam]["outputs"]
    adc = sitk.GetArrayFromImage(sitk.ReadImage(outputs["adc_native"])).astype(np.float64)
    ingest = _recorded(real_run, exam, "ingest")
    (scanner_path,) = [o["path"] for o in ingest["outputs"] if o["role"] == "adc_scanner"]
    scanner_image = sitk.ReadImage(scanner_path, sitk.sitkFloat64)
    reference = sitk.ReadImage(outputs["adc_native"])
    assert scanner_image.GetSize() == reference.GetSize()
    scanner = sitk.GetArrayFromImage(scanner_image)
    gland = sitk.GetArrayFromImage(gland_region(_gland(real_run, exam), reference, 0.0)) > 0
    inside = gland & (scanner > 0)
    difference = float(np.median((adc[inside] - scanner[inside]) / scanner[inside]))
    print(f"\n{exam} native ADC vs scanner, gland ({inside.sum()} voxels): {difference:+.2%}")
    assert abs(difference) <= 0.05


def test_fits_use_one_acquisition(real_run: dict) -> None:
    b1000 = {exam: _recorded(real_run, exam, "standardize_b1000")["details"] for exam in REFERENCE}
    assert b1000["ProstateX-0000"]["method"] == "extrapolated"
    assert b1000["ProstateX-0000"]["acquired_b"] == [50.0, 400.0, 800.0]
    other = _recorded(real_run, "ProstateX-0218", "standardize_b1000")["details"]
    assert other["acquired_b"] == [0.0, 100.0, 400.0, 800.0]  # series 8 alone
    assert other["fit_b_values"] == [100.0, 400.0, 800.0]
    adc = _recorded(real_run, "ProstateX-0218", "adc")["details"]
    assert adc["fit_b_values"] == [100.0, 400.0, 800.0]
