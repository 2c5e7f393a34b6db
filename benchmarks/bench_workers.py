"""Benchmark: warm workers vs a process per patient, on real pipeline runs.

Several hosts run one cohort's patients either on long-lived worker processes (the thread
pool of one ``run`` process, or Dask worker processes: each loads the segmentation model
once and keeps it) or with a fresh process per patient (what a process work pool with one
flow run per patient would do: every process imports the libraries, connects, and loads the
model again). This benchmark measures the three on the same synthetic exams, the same
Prefect server (``deployments/start-server.sh``, loopback) and the same 2 x 1 threads:

- **threads**: ``prostate-cohort run ROOT`` with ``threads.workers = 2``;
- **dask**: the same on a ``distributed.LocalCluster`` of 2 single-threaded worker
  processes (``--runner dask``; cluster start-up not counted: workers are long-lived);
- **process per patient**: ``prostate-cohort run ROOT --patient P`` for each patient, two
  processes at a time, each with its own output tree (one run per tree).

Every configuration starts from an empty output tree (nothing cached). Reported: wall time,
worker-seconds per patient (wall x 2 / patients), and the median seconds of each step from
the provenance databases (the segmentation step's clock starts after the model is loaded,
so a fresh process's start-up shows in the wall time only).

Usage::

    .venv/bin/python benchmarks/bench_workers.py [--patients 4]

Writes ``benchmarks/results/workers.json`` and ``workers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_scale import _free_port, start_server, stop_server  # noqa: E402

WORKERS = 2
CLI = [sys.executable, "-m", "flows.cli"]


def make_cohort(root: Path, n: int) -> None:
    """``n`` synthetic exams (seed 0) as DICOM under ``root``."""
    from phantom.exam import generate_exam
    from phantom.plan import plan_exam

    for i in range(n):
        generate_exam(root, plan_exam(0, i))


def cli(*args: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, cwd=REPO, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")


def step_seconds(outputs: list[Path]) -> dict[str, float]:
    """Median seconds of each step over the provenance databases of ``outputs``."""
    import pandas as pd

    from db.run_queries import step_timings
    from db.store import make_engine, session_scope

    frames = []
    for out in outputs:
        with session_scope(make_engine(f"sqlite:///{out / 'provenance.sqlite'}")) as session:
            frames.append(step_timings(session))
    timings = pd.concat(frames)
    timings = timings[timings["status"] == "completed"]
    medians = timings.groupby("step")["duration_s"].median()
    return {step: round(float(seconds), 2) for step, seconds in medians.items()}


def patients_of(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "patients").iterdir())


def run_threads(root: Path, work: Path, env: dict[str, str]) -> tuple[float, list[Path]]:
    out = work / "threads"
    started = time.perf_counter()
    cli("run", str(root), "--model", "demo", "--output", str(out), env=env)
    return time.perf_counter() - started, [out]


def run_dask(root: Path, work: Path, env: dict[str, str]) -> tuple[float, list[Path]]:
    from distributed import LocalCluster

    out = work / "dask"
    saved = dict(os.environ)
    os.environ.update(env)  # the worker processes inherit the Prefect API and the settings
    try:
        with LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            started = time.perf_counter()
            command = ["run", str(root), "--model", "demo", "--output", str(out)]
            cli(*command, "--runner", "dask", "--address", cluster.scheduler_address, env=env)
            return time.perf_counter() - started, [out]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_process_per_patient(
    root: Path, work: Path, env: dict[str, str], patients: list[str]
) -> tuple[float, list[Path]]:
    outs = [work / f"per-patient-{i}" for i in range(len(patients))]

    def one(i: int) -> None:
        command = ["run", str(root), "--model", "demo", "--patient", patients[i]]
        cli(*command, "--output", str(outs[i]), env=env)

    started = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, range(len(patients))))
    return time.perf_counter() - started, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    args = parser.parse_args()
    n = args.patients
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    print(f"working folder: {work}", flush=True)
    make_cohort(work / "cohort", n)
    root = work / "cohort" / "dicom"
    port = _free_port()
    server = start_server(port, work / "server.log", None)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PROSTATE_COHORT_"))
    } | {
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PROSTATE_COHORT_PSEUDONYM_KEY": secrets.token_hex(32),  # one key: the same ids
        "PROSTATE_COHORT_THREADS__WORKERS": str(WORKERS),
        "PROSTATE_COHORT_THREADS__THREADS_PER_WORKER": "1",
    }
    configs: dict[str, dict[str, Any]] = {}
    try:
        for name, run in (("threads", run_threads), ("dask", run_dask)):
            wall, outs = run(root, work, env)
            configs[name] = {"wall_s": round(wall, 1), "steps_median_s": step_seconds(outs)}
            print(f"{name}: {wall:.1f} s", flush=True)
        patients = patients_of(work / "threads")
        wall, outs = run_process_per_patient(root, work, env, patients)
        configs["process per patient"] = {
            "wall_s": round(wall, 1),
            "steps_median_s": step_seconds(outs),
        }
        print(f"process per patient: {wall:.1f} s", flush=True)
    finally:
        stop_server(server)
    for config in configs.values():
        config["worker_s_per_patient"] = round(config["wall_s"] * WORKERS / n, 1)
        config["ratio_to_threads"] = round(config["wall_s"] / configs["threads"]["wall_s"], 2)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "patients": n,
        "workers": WORKERS,
        "threads_per_worker": 1,
        "model": "demo (nnU-Net v2, bundled)",
        "load_average_end": round(os.getloadavg()[0], 2),
        "configs": configs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "workers.md").write_text(_markdown(result))
    print(json.dumps(result, indent=2))


def _markdown(r: dict[str, Any]) -> str:
    steps = sorted({s for c in r["configs"].values() for s in c["steps_median_s"]})
    head = "| | wall (s) | worker-s per patient | vs threads |"
    rows = [
        f"| {name} | {c['wall_s']} | {c['worker_s_per_patient']} | {c['ratio_to_threads']}x |"
        for name, c in r["configs"].items()
    ]
    step_head = "| step | " + " | ".join(r["configs"]) + " |"
    step_rows = [
        f"| {s} | "
        + " | ".join(str(c["steps_median_s"].get(s, "-")) for c in r["configs"].values())
        + " |"
        for s in steps
    ]
    return f"""# Warm workers vs a process per patient

`benchmarks/bench_workers.py --patients {r["patients"]}` on {r["machine"]}; {r["workers"]}
workers x {r["threads_per_worker"]} thread, model {r["model"]}, synthetic exams, nothing
cached, one Prefect server on loopback (load average at the end: {r["load_average_end"]}).

{head}
|---|---:|---:|---:|
{chr(10).join(rows)}

Median seconds per step (provenance database). Loading the model happens before the
segmentation step's clock starts, so what a fresh process pays for it (and for importing
the libraries, discovering the cohort and connecting) shows in the wall time only:

{step_head}
|---|{"---:|" * len(r["configs"])}
{chr(10).join(step_rows)}
"""


if __name__ == "__main__":
    main()
