"""Ingest of synthetic exams from every vendor variant, checked against the generator's truth."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from phantom.exam import generate_cohort
from tasks.classify import select_series
from tasks.dicom_headers import read_headers
from tasks.discover import Exam, discover_exams
from tasks.ingest import IngestResult, ingest_exam

# Exams 0-5 of cohort seed 0 cover every variant the generator has: Siemens interleaved with
# (0019,100C) as IS (0) and as OB bytes (4); GE (0043,1039) with the 1e9 offset (1) and
# without (5); Philips (2001,1003) (2); standard (0018,9087) (3); messy folder names (1, 4).
N_EXAMS = 6
VENDOR_SOURCE = {"siemens": "siemens", "ge": "ge", "philips": "philips", "standard": "standard"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Exam, dict, IngestResult]]:
    root = tmp_path_factory.mktemp("synthetic")
    out = root / "out"
    generate_cohort(root, N_EXAMS, seed=0)
    exams = discover_exams(root / "dicom")
    cases = {}
    for exam in exams:
        patient_folder = exam.folder.split("/")[0]
        truth = json.loads((root / "truth" / patient_folder / "truth.json").read_text())
        cases[patient_folder] = (exam, truth, ingest_exam(exam, out_dir=out, key="k"))
    return cases


def test_every_exam_found(cohort: dict) -> None:
    assert sorted(cohort) == [f"SYN-{i:04d}" for i in range(1, N_EXAMS + 1)]
    vendors = {truth["vendor"] for _, truth, _ in cohort.values()}
    assert vendors == set(VENDOR_SOURCE)


@pytest.mark.parametrize("index", range(N_EXAMS))
def test_b_values_parse_from_the_vendor_tag(cohort: dict, index: int) -> None:
    exam, truth, _ = cohort[f"SYN-{index + 1:04d}"]
    headers = {s.folder: read_headers([exam.root / f for f in s.files]) for s in exam.series}
    selection = select_series(headers)
    dwi_headers = [h for folder in selection.dwi for h in headers[folder]]
    assert sorted({h.b_value for h in dwi_headers}) == truth["b_values"]
    assert {h.b_value_source for h in dwi_headers} == {VENDOR_SOURCE[truth["vendor"]]}


@pytest.mark.parametrize("index", range(N_EXAMS))
def test_ingest_matches_truth(cohort: dict, index: int) -> None:
    exam, truth, result = cohort[f"SYN-{index + 1:04d}"]
    assert result.status == "ok", result.error
    assert [s.b_value for s in result.series if s.kind == "dwi"] == truth["b_values"]
    assert any(s.kind == "adc" for s in result.series) == truth["has_scanner_adc"]
    truth_t2 = next(s for s in truth["series"] if s["kind"] == "t2w")
    for record in result.series:
        grid = truth["grids"]["t2" if record.kind == "t2w" else "dwi"]
        assert list(record.shape) == grid["size"]
        assert np.allclose(record.spacing, grid["spacing"], atol=1e-4)
        assert np.allclose(record.origin, grid["origin"], atol=1e-3)
        assert np.allclose(record.direction, grid["direction"], atol=1e-4)
        if record.kind == "t2w":
            # recorded relative to the exam folder: the series folder alone
            assert record.source == truth_t2["folder"].split("/")[-1]
            assert exam.folder.split("/")[0] not in record.source
    kinds = {r.source.split("/")[-1]: r.reason for r in result.rejected}
    distractors = [s for s in truth["series"] if s["kind"] == "distractor"]
    assert {s["folder"].split("/")[-1] for s in distractors} <= set(kinds)


def test_identifiers_never_reach_outputs(cohort: dict) -> None:
    out = next(iter(cohort.values()))[0].root.parent / "out"
    texts = [json.dumps(result.to_dict()) for _, _, result in cohort.values()]
    for path in out.rglob("*"):
        texts.append(str(path.relative_to(out)))
        if path.is_file():
            texts.append(gzip.decompress(path.read_bytes()).decode("latin-1"))
    for _, truth, _ in cohort.values():
        ids = truth["identifiers"]
        secrets = [ids["patient_name"], ids["patient_id"], ids["birth_date"], ids["accession"]]
        secrets += [truth["plan"]["study_date"], *ids["patient_name"].split("^")]
        for text in texts:
            for secret in secrets:
                assert secret not in text
