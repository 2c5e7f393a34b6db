"""The progress line a cohort run logs as patients finish (and its artifact's description)."""

from __future__ import annotations

import pytest

from flows.patient import Progress


def test_progress_line_has_a_bar_counts_time_per_patient_and_time_left(monkeypatch) -> None:
    progress = Progress(total=4, started=100.0)
    monkeypatch.setattr("flows.patient.time.monotonic", lambda: 160.0)
    progress.add({"status": "ok"})
    progress.add({"status": "error", "step": "ingest"})
    assert progress.line() == (
        "[##########----------] 2/4 patients (1 failed), 30 s per patient, about 60 s left"
    )
    progress.add({"status": "ok"})
    progress.add({"status": "ok"})
    assert progress.line().startswith("[####################] 4/4 patients (1 failed)")
    assert progress.line().endswith("done")


@pytest.mark.parametrize(
    ("done", "elapsed", "left"), [(1, 3600.0, "2.0 h"), (10, 600.0, "30 min"), (0, 5.0, "?")]
)
def test_time_left_in_readable_units(monkeypatch, done, elapsed, left) -> None:
    progress = Progress(total=40 if done == 10 else 3, started=0.0)
    monkeypatch.setattr("flows.patient.time.monotonic", lambda: elapsed)
    for _ in range(done):
        progress.add({"status": "ok"})
    assert f"about {left} left" in progress.line()
