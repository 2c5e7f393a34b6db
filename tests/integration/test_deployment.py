"""The platform as an operator runs it: Prefect server, work pool, prefect.yaml, worker, UI.

Everything is started with the project's own scripts (``deployments/*.sh``) and
``prefect deploy`` from the repository root (see ``conftest.py``); the demo deployment runs
over 3 synthetic patients in a process worker, and its result is checked through the REST
API and in the Prefect UI rendered by headless Chromium (screenshots in ``test-outputs/``).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = REPO / "deployments"
OUTPUTS = REPO / "test-outputs"
VENV_BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATIENT = r"P[0-9a-f]{12}"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# --- the files an operator uses (no server needed) ---------------------------------------


def test_prefect_yaml_deployments_and_pools() -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert config["pull"] == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $PROSTATE_COHORT_CHECKOUT }}"
            }
        }
    ]
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"cpu-pool", "gpu-pool"}
    gpu = deployments["cohort-on-demand-gpu"]
    assert gpu["work_pool"]["name"] == "gpu-pool"
    assert gpu["entrypoint"] == "flows/cohort.py:cohort_flow"
    assert deployments["cohort-nightly"]["schedules"] == [{"cron": "0 1 * * *", "timezone": "UTC"}]
    assert deployments["demo"]["entrypoint"] == "flows/demo.py:demo_flow"
    for deployment in deployments.values():
        module, function = deployment["entrypoint"].split(":")
        assert f"def {function}(" in (REPO / module).read_text()


def test_work_pool_templates_are_prefects_process_template_plus_env(
    offline_env: dict[str, str],
) -> None:
    """The pools' base job templates differ from Prefect's own only in their env default."""
    result = subprocess.run(
        [str(VENV_BIN / "prefect"), "work-pool", "get-default-base-job-template",
         "--type", "process"],
        env=offline_env,
        capture_output=True, text=True, timeout=120, check=True,
    )
    default = json.loads(result.stdout)
    for pool, device in (("cpu-pool", "cpu"), ("gpu-pool", "cuda")):
        template = read_json(DEPLOYMENTS / "work-pools" / f"{pool}.json")
        env = template["variables"]["properties"]["env"].pop("default")
        assert template == default, f"{pool}.json drifted from Prefect's process template"
        assert int(env["PROSTATE_COHORT_THREADS__WORKERS"]) >= 1
        assert env["PROSTATE_COHORT_SEGMENTATION__DEVICE"] == device
        assert all(isinstance(value, str) for value in env.values())


def test_env_example_names_only_real_prefect_settings(offline_env: dict[str, str]) -> None:
    """Every PREFECT_* name in the env example is a setting of the installed Prefect."""
    names = set(re.findall(r"^#?\s*(PREFECT_[A-Z0-9_]+)=", _env_example(), re.M))
    assert {"PREFECT_API_URL", "PREFECT_SERVER_API_HOST", "PREFECT_API_AUTH_STRING",
            "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_MESSAGING_BROKER"} <= names
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-c", _SETTING_NAMES, *sorted(names)],
        env=offline_env,
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [], f"not Prefect 3.8.8 settings: {result.stdout}"


def _env_example() -> str:
    return (DEPLOYMENTS / "prostate-cohort.env.example").read_text()


# Prints the names among argv that are neither a Prefect setting (or one of its aliases)
# nor a prefect-redis setting (PREFECT_REDIS_MESSAGING_*, a package not installed here).
_SETTING_NAMES = """
import sys
from pydantic import AliasChoices, AliasPath
from prefect.settings.models.root import Settings

known = set()
def walk(model, prefix):
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            walk(annotation, prefix + name.upper() + "_")
            continue
        known.add("PREFECT_" + prefix + name.upper())
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            known.update(c.upper() for c in alias.choices if isinstance(c, str))
walk(Settings, "")
redis = {"PREFECT_REDIS_MESSAGING_" + n for n in
         ("URL", "HOST", "PORT", "DB", "USERNAME", "PASSWORD", "SSL")}
print(" ".join(n for n in sys.argv[1:] if n not in known | redis))
"""


# --- the running deployment ---------------------------------------------------------------


def test_server_listens_on_loopback_only(prefect_stack: Any) -> None:
    assert prefect_stack.api("GET", "/health") is True
    addresses = prefect_stack.listening_addresses()
    assert addresses, f"nothing listens on port {prefect_stack.port}"
    assert addresses <= {"127.0.0.1"}, addresses


def test_work_pool_as_the_script_made_it(prefect_stack: Any) -> None:
    pool = prefect_stack.api("GET", "/work_pools/cpu-pool")
    assert pool["type"] == "process"
    assert pool["concurrency_limit"] == 1
    env = pool["base_job_template"]["variables"]["properties"]["env"]["default"]
    assert env == read_json(DEPLOYMENTS / "work-pools" / "cpu-pool.json")["variables"][
        "properties"]["env"]["default"]
    workers = prefect_stack.api("POST", "/work_pools/cpu-pool/workers/filter",
                                json={"limit": 10, "offset": 0})
    assert "integration-test" in {w["name"] for w in workers}


def test_demo_deployment_from_prefect_yaml(demo_flow_run: dict[str, Any]) -> None:
    deployment = demo_flow_run["deployment"]
    assert deployment["work_pool_name"] == "cpu-pool"
    assert deployment["entrypoint"] == "flows/demo.py:demo_flow"
    # prefect deploy fills in $PROSTATE_COHORT_CHECKOUT (the repository root here).
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]


def test_demo_run_completes_in_the_worker(demo_flow_run: dict[str, Any]) -> None:
    flow_run = demo_flow_run["flow_run"]
    assert flow_run["state"]["type"] == "COMPLETED", (
        f"{flow_run['state']['type']}: {flow_run['state'].get('message')}\n{demo_flow_run['logs']}"
    )
    assert flow_run["state"]["message"] == "3/3 patients completed"
    assert flow_run["work_pool_name"] == "cpu-pool"
    assert flow_run["parameters"]["patients"] == 3
    assert flow_run["deployment_id"] == demo_flow_run["deployment"]["id"]
    patients = sorted(p.name for p in (demo_flow_run["output_root"] / "patients").iterdir())
    assert len(patients) == 3 and all(re.fullmatch(PATIENT, p) for p in patients)


def test_work_pool_env_reached_the_flow_run(demo_flow_run: dict[str, Any]) -> None:
    """The settings the flow run recorded in its provenance database came from cpu-pool's
    job template (the thread limit of the task runner, the segmentation device)."""
    database = demo_flow_run["output_root"] / "provenance.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as connection:
        rows = connection.execute(
            "SELECT settings FROM pipeline_run WHERE prefect_flow_run_id = ?",
            (demo_flow_run["flow_run"]["id"],),
        ).fetchall()
    assert len(rows) == 1, rows
    settings = json.loads(rows[0][0])
    env = read_json(DEPLOYMENTS / "work-pools" / "cpu-pool.json")["variables"]["properties"][
        "env"]["default"]
    assert settings["threads"]["workers"] == int(env["PROSTATE_COHORT_THREADS__WORKERS"])
    assert settings["segmentation"]["device"] == "cpu"
    assert Path(settings["output_root"]) == demo_flow_run["output_root"]


def test_one_flow_run_per_patient_its_steps_all_completed(
    demo_flow_run: dict[str, Any],
) -> None:
    """The demo flow run holds a synthesize and a patient task run per patient; each patient
    has a `patient` flow run named by its pseudonym, whose task runs are its steps."""
    patients = sorted(p.name for p in (demo_flow_run["output_root"] / "patients").iterdir())
    runs = demo_flow_run["task_runs"] + demo_flow_run["step_task_runs"]
    not_completed = {t["name"]: t["state"]["type"] for t in runs
                     if t["state"]["type"] != "COMPLETED"}
    assert not not_completed, f"{not_completed}\n{demo_flow_run['logs']}"
    assert demo_flow_run["child_flows"] == ["evaluate", "patient", "patient", "patient"]

    flow_runs = demo_flow_run["patient_flow_runs"]
    assert sorted(f["name"] for f in flow_runs) == patients
    assert {f["state"]["type"] for f in flow_runs} == {"COMPLETED"}

    top = {t["name"] for t in demo_flow_run["task_runs"]}
    for patient in patients:
        assert {f"synthesize-{patient}", f"patient-{patient}"} <= top, top

    steps: dict[str, set[str]] = defaultdict(set)
    patient_of = {f["id"]: f["name"] for f in flow_runs}
    for run in demo_flow_run["step_task_runs"]:
        patient = patient_of[run["flow_run_id"]]
        match = re.fullmatch(rf"(.+)-{patient}", run["name"])
        assert match, f"task run {run['name']!r} of {patient}'s flow run is not named for it"
        steps[patient].add(match.group(1))
    assert sorted(steps) == patients
    for patient, done in steps.items():
        assert {"ingest", "denoise", "n4", "register", "adc", "segment-demo",
                "radiomics-demo", "qc-demo"} <= done, (patient, done)


def test_run_artifacts(demo_flow_run: dict[str, Any]) -> None:
    artifacts = demo_flow_run["artifacts"]
    assert {"cohort-progress", "cohort-summary"} <= set(artifacts)
    summary, progress = artifacts["cohort-summary"], artifacts["cohort-progress"]
    assert summary["type"] == "markdown"
    assert "3 patients: 3 completed, 0 failed." in summary["data"]
    assert progress["type"] == "table"
    for patient in (demo_flow_run["output_root"] / "patients").iterdir():
        assert patient.name in str(progress["data"])


# --- the Prefect UI in a browser ----------------------------------------------------------


def test_ui_shows_the_flow_run_and_its_artifacts(
    prefect_stack: Any, demo_flow_run: dict[str, Any], browser: Any
) -> None:
    """The UI's flow-run page shows the run and, in its Artifacts tab, both artifacts; the
    artifact page shows the summary. Screenshots: test-outputs/prefect-ui-*.png."""
    flow_run = demo_flow_run["flow_run"]
    summary = demo_flow_run["artifacts"]["cohort-summary"]
    OUTPUTS.mkdir(exist_ok=True)
    ui = prefect_stack.ui_url
    browser.call("Page.navigate", url=f"{ui}/runs/flow-run/{flow_run['id']}")
    browser.wait_for_text(flow_run["name"], "Completed", "cpu-pool", "Artifacts")
    assert _click_tab(browser, "Artifacts"), "no Artifacts tab on the flow-run page"
    browser.wait_for_text(flow_run["name"], "cohort-summary", "cohort-progress")
    browser.screenshot(OUTPUTS / "prefect-ui-flow-run.png")

    browser.call("Page.navigate", url=f"{ui}/artifacts/artifact/{summary['id']}")
    browser.wait_for_text("cohort-summary", "3 patients: 3 completed, 0 failed.")
    browser.screenshot(OUTPUTS / "prefect-ui-artifact.png")
    assert (OUTPUTS / "prefect-ui-flow-run.png").stat().st_size > 10_000


def test_a_broken_exam_watched_and_retried_in_the_ui(
    prefect_stack: Any, demo_flow_run: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    """Two good exams and one without DWI through the ``cohort-on-demand`` deployment: while
    it runs, the UI lists the patients' flow runs under the cohort run; the broken patient's
    flow run is Failed with its step and reason (in its log too); the cohort run is "Completed with
    failures"; a run with ``patients=[that patient]`` makes one new patient flow run only.
    Screenshots: test-outputs/prefect-ui-patients-during-run.png, prefect-ui-failed-patient.png.
    """
    stack, ui = prefect_stack, prefect_stack.ui_url
    exams = sorted((demo_flow_run["output_root"] / "demo-cohort" / "dicom").iterdir())
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    for exam in exams[:2]:
        shutil.copytree(exam, cohort / exam.name)
    broken = cohort / "SYN-BROKEN"
    shutil.copytree(exams[0], broken)  # its DWI series folders are named "...diff..."
    dwis = [d for d in broken.rglob("*") if d.is_dir() and "diff" in d.name.lower()]
    assert dwis
    for dwi in dwis:
        shutil.rmtree(dwi)  # no DWI left: the exam cannot be processed
    parameters = {"root": str(cohort), "output_root": str(out), "models": ["demo"]}
    cohort_run = stack.start_run("cohort/cohort-on-demand", parameters)

    # During the run: the cohort run's "Subflow Runs" tab lists its patients as they run.
    deadline = time.monotonic() + 300
    while not any(c["flow"] == "patient" for c in stack.child_flow_runs(cohort_run["id"])):
        assert time.monotonic() < deadline, f"no patient flow run yet\n{stack.logs_tail()}"
        time.sleep(1)
    running = stack.api("GET", f"/flow_runs/{cohort_run['id']}")["state"]["type"]
    browser.call("Page.navigate", url=f"{ui}/runs/flow-run/{cohort_run['id']}")
    browser.wait_for_text(cohort_run["name"], "Subflow Runs")
    assert _click_tab(browser, "Subflow Runs")
    first = next(c for c in stack.child_flow_runs(cohort_run["id"]) if c["flow"] == "patient")
    browser.wait_for_text(first["name"])
    browser.screenshot(OUTPUTS / "prefect-ui-patients-during-run.png")
    assert running == "RUNNING", "the cohort run ended before its patients could be watched"

    finished = stack.wait(cohort_run["id"])
    assert finished["state"]["type"] == "COMPLETED", finished["state"]
    assert finished["state"]["name"] == "Completed with failures"
    assert finished["state"]["message"] == "2/3 patients completed; 1 failed (1 in ingest)"
    patients = [c for c in stack.child_flow_runs(cohort_run["id"]) if c["flow"] == "patient"]
    assert len(patients) == 3 and all(re.fullmatch(PATIENT, p["name"]) for p in patients)
    failed = [p for p in patients if p["state"]["type"] == "FAILED"]
    assert len(failed) == 1 and failed[0]["state"]["message"].startswith("ingest: ")
    assert sum(p["state"]["type"] == "COMPLETED" for p in patients) == 2

    browser.call("Page.navigate", url=f"{ui}/runs/flow-run/{failed[0]['id']}")
    # its Logs tab says which step failed and why
    browser.wait_for_text(failed[0]["name"], "Failed", failed[0]["state"]["message"])
    browser.screenshot(OUTPUTS / "prefect-ui-failed-patient.png")

    # Retry that patient alone: one new patient flow run, no other.
    retry = stack.wait(
        stack.start_run(
            "cohort/cohort-on-demand", parameters | {"patients": [failed[0]["name"]]}
        )["id"]
    )
    again = [c for c in stack.child_flow_runs(retry["id"]) if c["flow"] == "patient"]
    assert [c["name"] for c in again] == [failed[0]["name"]], again
    assert again[0]["state"]["type"] == "FAILED" and retry["state"]["type"] == "FAILED"


def _click_tab(browser: Any, name: str) -> bool:
    return bool(browser.evaluate(
        f"""(() => {{
            const tab = [...document.querySelectorAll('[role=tab], .p-tab, button, li')]
                .find(e => e.textContent.trim() === {json.dumps(name)});
            if (tab) {{ tab.click(); return true; }}
            return false;
        }})()"""
    ))
