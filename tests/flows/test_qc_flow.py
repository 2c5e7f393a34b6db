"""QC on the demo's phantom exams: metrics recorded per exam, clean exams pass, each known
defect (phantom/defects.py) is flagged for itself, ``qc --json`` lists the exams with their
reasons worst first, and the report opens with the review list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db.queries import qc_metrics
from db.store import make_engine, session_scope
from flows.cli import main
from flows.qc import exam_qc_images
from flows.qc_review import review_list
from phantom import defects
from tasks.qc_flags import QcThresholds, judge
from tasks.qc_metrics import METRICS, exam_qc_metrics

pytestmark = pytest.mark.slow


def _url(out: Path) -> str:
    return f"sqlite:///{out / 'provenance.sqlite'}"


def _exams(out: Path) -> list[tuple[str, Path, dict]]:
    engine = make_engine(_url(out))
    with session_scope(engine) as session:
        entries = review_list(session)
    engine.dispose()
    return [(e["patient"], next((out / "patients" / e["patient"]).iterdir()), e) for e in entries]


def test_every_exam_has_every_metric_recorded(demo) -> None:
    out, result = demo
    engine = make_engine(_url(out))
    with session_scope(engine) as session:
        wide = qc_metrics(session, wide=True)
    engine.dispose()
    assert sorted(wide.patient) == sorted(p["patient"] for p in result["patients"])
    assert set(METRICS) <= set(wide.columns)
    assert (wide.reg_stage.isin(["affine", "rigid", "identity"])).all()
    assert (wide.volume_ml > 20).all() and (wide.components == 1).all()
    assert (wide.residual_shift_mm < 3).all()  # the registration left them aligned
    assert (wide.dwi_decay_ratio < 1).all() and (wide.dwi_covers_mask == 1).all()
    assert wide.uncertainty_mean.between(0, 0.5).all()  # the demo model gives probabilities


def test_clean_exams_pass_and_each_defect_is_flagged_for_itself(demo) -> None:
    out, _ = demo
    checked = 0
    for patient, exam_dir, entry in _exams(out):
        clean = exam_qc_images(exam_dir, "demo")
        registration = {"accepted_stage": entry["metrics"]["reg_stage"]}
        assert judge(exam_qc_metrics(clean, registration=registration)).status == "pass", patient
        cases = {
            "DWI off the T2": defects.misregistered(clean, (0.0, 5.0, 0.0)),
            "last T2 slice: gland may be cut off": defects.cut_off_top(clean),
            "pieces": defects.two_components(clean),
        }
        for reason, images in cases.items():
            verdict = judge(exam_qc_metrics(images, registration=registration))
            assert verdict.status == "review", (patient, reason, verdict)
            assert any(reason in r for r in verdict.reasons), (patient, reason, verdict)
        checked += 1
    assert checked == 4


def test_an_eroded_mask_disagrees_with_the_model_that_ran(demo) -> None:
    # With a second mask of the exam (another model), a 25 % erosion shows as disagreement.
    out, _ = demo
    patient, exam_dir, _ = _exams(out)[0]
    clean = exam_qc_images(exam_dir, "demo")
    eroded = defects.eroded(clean)
    compared = eroded.__class__(**{**eroded.__dict__, "others": {"demo": clean.mask}})
    metrics = exam_qc_metrics(compared)
    assert metrics["dice_vs_demo"] < 0.9
    reasons = judge(metrics).reasons
    assert any(r.startswith("volume -2") and r.endswith("vs model demo") for r in reasons)


def test_qc_json_lists_every_exam_worst_first_with_reasons(demo, capsys) -> None:
    out, result = demo
    strict = QcThresholds(volume_ml_review=(15.0, 40.0))
    assert main(["qc", "--json", "--output", str(out)]) == 0
    exams = json.loads(capsys.readouterr().out)["exams"]
    assert len(exams) == len(result["patients"])
    assert {e["status"] for e in exams} == {"pass"}
    assert set(exams[0]) >= {"patient", "status", "reasons", "metrics", "figure"}
    engine = make_engine(_url(out))
    with session_scope(engine) as session:
        flagged = review_list(session, strict)
    engine.dispose()
    big = [e for e in flagged if e["metrics"]["volume_ml"] > 40]
    assert big and all(e["status"] == "review" for e in big)
    assert [e["status"] for e in flagged] == sorted(
        (e["status"] for e in flagged), key=["fail", "review", "pass"].index
    )
    assert flagged[0]["reasons"][0].startswith("gland volume")


def test_qc_text_names_the_exams_to_review(demo, capsys, monkeypatch) -> None:
    out, _ = demo
    monkeypatch.setenv("PROSTATE_COHORT_QC__VOLUME_ML_REVIEW", "[15, 40]")
    assert main(["qc", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "REVIEW" in text and "gland volume" in text and "to review" in text


def test_the_qc_figure_shows_three_levels_on_three_images(demo) -> None:
    from matplotlib import image as mpimg

    out, result = demo
    figure = Path(result["patients"][0]["outputs"]["qc"])
    assert mpimg.imread(figure).shape[:2] == (3 * 256 + 28, 3 * 256)


def test_the_report_opens_with_the_flagged_exams_and_their_reasons(demo, tmp_path) -> None:
    from flows.report_html import write_report

    out, _ = demo
    strict = QcThresholds(volume_ml_review=(15.0, 40.0))
    engine = make_engine(_url(out))
    with session_scope(engine) as session:
        data = write_report(session, tmp_path / "report.html", thresholds=strict)
    engine.dispose()
    page = (tmp_path / "report.html").read_text()
    flagged = [e for e in data.review if e["status"] == "review"]
    assert flagged, data.review
    first = page.index("<h2>")
    assert page[first:].startswith("<h2>QC review list</h2>")
    review_section = page[first : page.index("<h2>Run summary</h2>")]
    assert f"{len(flagged)} to review" in review_section
    for entry in flagged:
        assert f"REVIEW {entry['patient']}" in review_section
        assert entry["reasons"][0] in review_section
    assert review_section.count("<img") == len(flagged)  # thumbnails of flagged exams only
