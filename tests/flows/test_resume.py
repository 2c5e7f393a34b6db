"""Resume after `kill -9`: the rerun does only the missing work and leaves no duplicates.

The demo command runs in its own process group; the test kills the command alone with
SIGKILL once some steps are on record and others are not, checks that its temporary Prefect
server ended with it, then runs the same command again and compares the provenance database
before and after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from tasks.io import sha256_file

PATIENTS = 3
# synthesize, ingest, denoise, n4, register, b1000, adc, segment, radiomics, qc:
STEPS_PER_PATIENT = 10
KILL_AFTER = 8  # completed step runs on record before the kill (well short of 3 x 10)


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "demo", "--patients", str(PATIENTS)] + [
        "--output",
        str(out),
        "--json",
    ]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PROSTATE_"))}
    return env | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }


def _completed(db: Path) -> list[tuple[str, str, str, int]]:
    """(patient, step, cache key, id) of every completed step run on record."""
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            return connection.execute(
                "SELECT p.pseudo_id, s.step, s.cache_key, s.id FROM step_run s "
                "LEFT JOIN patient p ON p.id = s.patient_id WHERE s.status = 'completed'"
            ).fetchall()
    except sqlite3.OperationalError:  # the schema is not created yet
        return []


def _outputs(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT path, sha256 FROM artifact").fetchall()


def test_rerun_after_kill_9_does_only_the_missing_work(tmp_path: Path) -> None:
    out, env = tmp_path / "out", _env(tmp_path)
    db = out / "provenance.sqlite"
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(
        _command(out), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while len(_completed(db)) < KILL_AFTER and process.poll() is None:
        assert time.monotonic() < deadline, "the demo run made no progress"
        time.sleep(0.5)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.kill()  # SIGKILL to the command alone: its temporary server must follow it
    process.wait()
    try:
        _assert_ends_within(_servers_of(process.pid), seconds=20)
    finally:
        _kill_group(process.pid)
    before = _completed(db)
    assert KILL_AFTER <= len(before) < PATIENTS * STEPS_PER_PATIENT

    rerun = subprocess.run(
        _command(out), env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = _completed(db)

    # Nothing finished before the kill ran again: its cache key has exactly one completed row.
    keys = Counter((patient, step, key) for patient, step, key, _ in after)
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]
    done_before = {(p, s, k) for p, s, k, _ in before}
    new = [(p, s, k) for p, s, k, i in after if i > max(r[3] for r in before)]
    assert not done_before & set(new)
    assert len(after) == len(before) + len(new)
    # ... and the rerun did all that was missing: every patient has every step.
    steps = Counter(p for p, _, _, _ in after if p is not None)
    assert sorted(steps.values()) == [STEPS_PER_PATIENT] * PATIENTS, steps
    # No output on record is missing or half-written.
    for path, sha256 in _outputs(db):
        assert Path(path).is_file() and sha256_file(path) == sha256, path
    # The killed run is closed as failed (interrupted) by the rerun, which completed (and
    # then evaluated its masks against the truth).
    with sqlite3.connect(db) as connection:
        runs = connection.execute(
            "SELECT status, summary, command FROM pipeline_run ORDER BY started_at"
        ).fetchall()
    assert [(status, command.split()[0]) for status, _, command in runs] == [
        ("failed", "demo"),
        ("completed", "demo"),
        ("completed", "evaluate"),
    ]
    assert "interrupted" in runs[0][1]


def _servers_of(parent_pid: int) -> list[psutil.Process]:
    """The temporary Prefect server processes started by the command ``parent_pid``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "flows.prefect_server" in cmdline and str(parent_pid) in cmdline:
            found.append(proc)
    return found


def _assert_ends_within(processes: list[psutil.Process], *, seconds: float) -> None:
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    assert not alive, f"left running after kill -9 of their parent: {alive}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
