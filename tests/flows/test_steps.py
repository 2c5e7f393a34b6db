"""execute_step: cache hits, --force and per-step invalidation (--force-step)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from db.store import upgrade
from flows.steps import FileRef, RunContext, execute_step
from tasks.io import write_text_atomic


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    url = f"sqlite:///{tmp_path / 'provenance.sqlite'}"
    upgrade(url)
    return RunContext(database_url=url, output_root=tmp_path)


def _run(ctx: RunContext, step: str, calls: list[str]) -> str:
    out = ctx.output_root / f"{step}.txt"

    def work() -> tuple[list[FileRef], dict]:
        calls.append(step)
        write_text_atomic(out, step)
        return [FileRef.of(step, out)], {}

    outcome = execute_step(
        ctx, patient=None, step=step, version="1", inputs=[], parameters={}, run=work
    )
    return outcome.status


def test_finished_steps_are_cache_hits(ctx: RunContext) -> None:
    calls: list[str] = []
    assert [_run(ctx, s, calls) for s in ("register", "register")] == ["completed", "cached"]
    assert calls == ["register"]


def test_force_recomputes_every_step(ctx: RunContext) -> None:
    calls: list[str] = []
    for step in ("n4", "register"):
        _run(ctx, step, calls)
    forced = replace(ctx, force=True)
    assert [_run(forced, s, calls) for s in ("n4", "register")] == ["completed"] * 2


def test_force_step_recomputes_that_step_and_its_variants_only(ctx: RunContext) -> None:
    calls: list[str] = []
    steps = ("n4", "register", "segment_demo", "segment_taps", "segmentation_extra")
    for step in steps:
        _run(ctx, step, calls)
    forced = replace(ctx, force_steps=frozenset({"register", "segment"}))
    statuses = {s: _run(forced, s, calls) for s in steps}
    assert statuses == {
        "n4": "cached",
        "register": "completed",
        "segment_demo": "completed",
        "segment_taps": "completed",
        "segmentation_extra": "cached",  # a prefix match needs the "_" separator
    }


def test_a_changed_output_is_not_a_cache_hit(ctx: RunContext) -> None:
    calls: list[str] = []
    _run(ctx, "adc", calls)
    (ctx.output_root / "adc.txt").write_text("tampered")
    assert _run(ctx, "adc", calls) == "completed"


def test_an_empty_recorded_output_is_not_a_cache_hit(ctx: RunContext) -> None:
    """A full disk used to leave empty outputs recorded as finished: the empty file's sha256
    matches the record, so only its size can tell."""
    calls: list[str] = []
    out = ctx.output_root / "n4.nii.gz"

    def work() -> tuple[list[FileRef], dict]:
        calls.append("n4")
        write_text_atomic(out, "" if len(calls) == 1 else "image")
        return [FileRef.of("n4", out)], {}

    def run() -> str:
        return execute_step(
            ctx, patient=None, step="n4", version="1", inputs=[], parameters={}, run=work
        ).status

    assert run() == "completed" and out.stat().st_size == 0
    assert run() == "completed"  # recomputed, not "cached"
    assert calls == ["n4", "n4"] and out.read_text() == "image"
    assert run() == "cached"


@pytest.mark.parametrize("spec_name", ["segment", "radiomics"])
def test_a_failure_before_the_work_is_recorded_under_the_steps_name(
    ctx: RunContext, spec_name: str
) -> None:
    """A missing model or a bad radiomics settings file is on record as a failed run of
    that step for that model (``segment_demo``, ``radiomics_demo``)."""
    import sqlite3

    from flows.segment import record_failure
    from tasks.errors import InputError
    from tasks.registry import BY_NAME

    error = InputError("the settings file is not valid YAML")
    record_failure(ctx, "P1", BY_NAME[spec_name], "demo", [], {"model": "demo"}, error)
    with sqlite3.connect(ctx.output_root / "provenance.sqlite") as connection:
        rows = connection.execute("SELECT step, status, error FROM step_run").fetchall()
    assert rows == [(f"{spec_name}_demo", "failed", str(error))]


def test_resources_are_recorded_but_not_part_of_the_cache_key(ctx: RunContext) -> None:
    """The same step with other threads is a cache hit; the threads it ran with are kept."""
    import sqlite3

    out = ctx.output_root / "n4.txt"

    def work() -> tuple[list[FileRef], dict]:
        write_text_atomic(out, "n4")
        return [FileRef.of("n4", out)], {}

    statuses = [
        execute_step(
            ctx,
            patient=None,
            step="n4",
            version="1",
            inputs=[],
            parameters={"iterations": [50], "threads": threads, "t2": {"threads": threads}},
            run=work,
        ).status
        for threads in (1, 2)
    ]
    assert statuses == ["completed", "cached"]
    with sqlite3.connect(ctx.output_root / "provenance.sqlite") as connection:
        parameters, resources = connection.execute(
            "SELECT parameters, resources FROM step_run"
        ).fetchone()
    assert '"threads"' not in parameters and '"iterations"' in parameters
    assert resources == '{"threads": 1, "t2.threads": 1}'
