"""The command line: help, settings errors, database commands (no Prefect server needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from db.store import head_revision
from flows.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROSTATE_COHORT_"):
            monkeypatch.delenv(name)


def test_help_imports_no_image_or_workflow_library() -> None:
    """``--help`` parses before importing the command machinery, so it answers at once."""
    code = (
        "import sys\n"
        "from flows.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('SimpleITK', 'scipy', 'torch', 'prefect', 'radiomics', 'sqlalchemy', 'itk')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_help_names_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    commands = ("demo", "run", "evaluate", "status", "train-demo-model", "ingest", "db", "config")
    commands += ("pseudonym",)
    commands += ("features", "volumes", "report")
    for command in commands:
        assert f"\n    {command}" in out


def test_unknown_flag_is_an_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--patiens", "3"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --patiens" in capsys.readouterr().err


def test_config_prints_resolved_settings(tmp_path: Path, capsys) -> None:
    assert main(["config", "--output", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["output_root"] == str(tmp_path.resolve())
    assert shown["database_url"] == f"sqlite:///{tmp_path.resolve()}/provenance.sqlite"


def test_bad_setting_exits_2_naming_it(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PROSTATE_COHORT_DATABASE_URL", "oracle://x@y/z")
    assert main(["config", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "database_url: database 'oracle' is not supported" in err
    assert "PROSTATE_COHORT_DATABASE_URL" in err


def test_ingest_of_a_missing_folder_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["ingest", str(tmp_path / "nowhere"), "--output", str(tmp_path)]) == 2
    assert "data_root: folder" in capsys.readouterr().err


def test_db_upgrade_then_current(tmp_path: Path, capsys) -> None:
    assert main(["--config", _toml(tmp_path), "db", "upgrade"]) == 0
    upgraded = capsys.readouterr().out
    assert f"database schema revision: {head_revision()}" in upgraded
    assert (tmp_path / "out" / "provenance.sqlite").is_file()
    assert main(["--config", _toml(tmp_path), "db", "current"]) == 0
    assert f"revision: {head_revision()}" in capsys.readouterr().out


def _toml(tmp_path: Path) -> str:
    config = tmp_path / "c.toml"
    config.write_text(f'output_root = "{tmp_path / "out"}"\n')
    return str(config)


def test_prefect_yaml_entrypoints_are_flows() -> None:
    import importlib

    import yaml
    from prefect import Flow

    spec = yaml.safe_load((Path(__file__).parents[2] / "prefect.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names >= {"cohort-on-demand", "cohort-nightly", "ingest-on-demand", "evaluate-on-demand"}
    nightly = next(d for d in spec["deployments"] if d["name"] == "cohort-nightly")
    assert nightly["entrypoint"] == "flows/cohort.py:cohort_flow" and nightly["schedules"]
    for deployment in spec["deployments"]:
        module, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        assert isinstance(flow, Flow)
        gpu = "gpu" in deployment["name"]
        assert deployment["work_pool"]["name"] == ("gpu-pool" if gpu else "cpu-pool")


def test_pseudonym_command_maps_folders_to_ids_with_the_key(demo, tmp_path: Path, capsys) -> None:
    """The way back from a folder to its pseudonym needs the key; nothing is stored."""
    out, result = demo
    root = out / "demo-cohort" / "dicom"
    by_folder = {p["source"]: p["patient"] for p in result["patients"]}
    assert main(["pseudonym", str(root), "SYN-0002", "--output", str(out), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["exams"]
    assert row["folder"].startswith("SYN-0002/") and by_folder[row["folder"]] == row["patient"]
    empty = tmp_path / "no-key"
    assert main(["pseudonym", str(root), "--output", str(empty)]) == 2
    assert "no pseudonymisation key" in capsys.readouterr().err
    assert not (empty / ".pseudonym-key").exists()


# -- settings checked before any work: step parameters, model, database, Prefect home ------


def _no_flow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as starting a flow."""

    def started(*_args, **_kwargs):
        raise AssertionError("the flow started despite invalid settings")

    monkeypatch.setattr("flows.cli.pipeline.run_flow", started)


def test_a_typo_under_steps_exits_2_naming_it(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PROSTATE_COHORT_STEPS__N4__ITERATONS", "1")
    assert main(["config", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "steps.n4.iteratons: unknown setting" in err
    assert "PROSTATE_COHORT_STEPS__N4__ITERATONS" in err
    monkeypatch.delenv("PROSTATE_COHORT_STEPS__N4__ITERATONS")
    config = tmp_path / "c.toml"
    config.write_text("[steps.n4]\niteratons = [10]\n")
    assert main(["--config", str(config), "run", str(tmp_path), "--output", str(tmp_path)]) == 2
    assert "steps.n4.iteratons: unknown setting" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["unet-foo", "/no/such/model/folder", "empty-folder"])
def test_an_unknown_model_stops_run_at_start(tmp_path: Path, capsys, monkeypatch, model) -> None:
    _no_flow(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "cohort").mkdir()
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "cohort"), "--model", model, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"segmentation.model (--model) {model!r}" in err
    expected = "no dataset.json" if model == "empty-folder" else "is neither one of"
    assert expected in err
    assert not (out / "patients").exists()


def test_an_unknown_model_setting_stops_demo_at_start(tmp_path: Path, capsys, monkeypatch) -> None:
    _no_flow(monkeypatch)
    monkeypatch.setenv("PROSTATE_COHORT_SEGMENTATION__MODEL", str(tmp_path / "nowhere"))
    assert main(["demo", "--output", str(tmp_path)]) == 2
    assert f"(--model) '{tmp_path / 'nowhere'}'" in capsys.readouterr().err
    assert not (tmp_path / "demo-cohort").exists()


@pytest.mark.parametrize("command", ["status", "db", "run"])
def test_an_unreachable_database_exits_2_at_start(tmp_path, capsys, monkeypatch, command) -> None:
    import time

    _no_flow(monkeypatch)
    monkeypatch.setenv("PROSTATE_COHORT_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/x")
    (tmp_path / "cohort").mkdir()
    argv = {
        "status": ["status", "--output", str(tmp_path)],
        "db": ["db", "upgrade"],
        "run": ["run", str(tmp_path / "cohort"), "--output", str(tmp_path)],
    }[command]
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert "database_url: cannot connect to postgresql://nobody@127.0.0.1:1/x" in err
    assert "Traceback" not in err


def test_a_sqlite_url_without_a_file_exits_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PROSTATE_COHORT_DATABASE_URL", "sqlite://")
    assert main(["status", "--output", str(tmp_path)]) == 2
    assert "database_url: a SQLite URL needs a file" in capsys.readouterr().err


@pytest.mark.parametrize("home", [None, "/nonexistent", "a-file"])
def test_prefect_home_moves_under_the_output_root_without_a_usable_home(
    tmp_path: Path, capsys, monkeypatch, home
) -> None:
    monkeypatch.setenv("PREFECT_HOME", "restored-after-the-test")
    monkeypatch.delenv("PREFECT_HOME")
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
    else:
        if home == "a-file":
            home = str(tmp_path / "a-file")
            Path(home).write_text("")
        monkeypatch.setenv("HOME", home)
    assert main(["config", "--output", str(tmp_path / "out")]) == 0
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "out" / ".prefect")


def test_a_usable_home_or_an_own_prefect_home_is_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", "restored-after-the-test")
    monkeypatch.delenv("PREFECT_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["config", "--output", str(tmp_path / "out")]) == 0
    assert "PREFECT_HOME" not in os.environ  # ~/.prefect, Prefect's own default
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "mine"))
    assert main(["config", "--output", str(tmp_path / "out")]) == 0
    assert os.environ["PREFECT_HOME"] == str(tmp_path / "mine")


def _without_home(tmp_path: Path, home: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PROSTATE_"))}
    env.pop("HOME", None)
    if home is not None:
        env["HOME"] = home
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def _cli() -> str:
    import sys

    return str(Path(sys.executable).parent / "prostate-cohort")


@pytest.mark.parametrize("home", [None, "/nonexistent"])
def test_config_works_without_a_home(tmp_path: Path, home: str | None) -> None:
    import subprocess

    done = subprocess.run(
        [_cli(), "config", "--output", str(tmp_path / "out")],
        env=_without_home(tmp_path, home),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output_root"] == str((tmp_path / "out").resolve())


@pytest.mark.slow
def test_a_prefect_command_works_without_a_home(tmp_path: Path) -> None:
    """``ingest`` starts Prefect's temporary server, whose database needs a writable home:
    with HOME=/nonexistent it used to time out after 3 minutes."""
    import subprocess

    (tmp_path / "cohort").mkdir()
    out = tmp_path / "out"
    done = subprocess.run(
        [_cli(), "ingest", str(tmp_path / "cohort"), "--output", str(out)],
        env=_without_home(tmp_path, "/nonexistent")
        | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "150"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "0 patients, 0 failed" in done.stdout
    assert (out / ".prefect" / "prefect.db").is_file()


def test_second_run_on_one_output_tree_stops_at_start(tmp_path: Path, capsys) -> None:
    """One run at a time per output tree; the lock goes with its process, even on kill -9."""
    import signal
    import subprocess
    import sys
    import time

    from flows.tree_lock import LOCK_NAME, output_tree_lock

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from flows.tree_lock import "
            "output_tree_lock\nwith output_tree_lock(Path(sys.argv[1])):\n"
            "    print('held', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "cohort").mkdir()
        assert main(["ingest", str(tmp_path / "cohort"), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert "another pipeline run is using the output tree" in err and f"pid {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    start = time.monotonic()
    with output_tree_lock(out):  # free again: the kernel released the killed holder's lock
        assert (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()}")
    assert time.monotonic() - start < 1


# -- the demo: its own output tree and database, its Dice, what to run next ----------------


def test_demo_writes_to_a_tree_and_database_of_its_own(
    tmp_path: Path, monkeypatch, prefect_server
) -> None:
    """Without --output the demo writes to ./demo-output with its own SQLite database, even
    when the settings name a cohort's output root and database."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROSTATE_COHORT_OUTPUT_ROOT", str(tmp_path / "cohort-out"))
    monkeypatch.setenv("PROSTATE_COHORT_DATABASE_URL", f"sqlite:///{tmp_path / 'cohort.sqlite'}")
    seen: dict = {}

    def fake_run_flow(flow, settings, runner=None, **parameters):
        seen.update(settings=settings, parameters=parameters)
        return {"patients": [], "cohort": "c", "output_root": str(settings.output_root)}

    monkeypatch.setattr("flows.cli.pipeline.run_flow", fake_run_flow)
    main(["demo"])
    settings = seen["settings"]
    assert settings.output_root == tmp_path / "demo-output"
    assert seen["parameters"]["output_root"] == str(tmp_path / "demo-output")
    assert settings.resolved_database_url == (
        f"sqlite:///{tmp_path / 'demo-output' / 'provenance.sqlite'}"
    )
    assert not (tmp_path / "cohort-out").exists() and not (tmp_path / "cohort.sqlite").exists()


def _cohort_run_on_record(out: Path) -> None:
    from db.record import begin_pipeline_run
    from db.store import make_engine, session_scope, upgrade

    url = f"sqlite:///{out / 'provenance.sqlite'}"
    upgrade(url)
    with session_scope(make_engine(url)) as session:
        begin_pipeline_run(
            session, command="run /data", settings={}, software_versions={}, host="h"
        )


def test_demo_refuses_an_output_tree_holding_a_cohort(tmp_path: Path, capsys, monkeypatch) -> None:
    _no_flow(monkeypatch)
    _cohort_run_on_record(tmp_path)
    assert main(["demo", "--output", str(tmp_path)]) == 2
    assert "holds a cohort's results (run on record)" in capsys.readouterr().err
    assert not (tmp_path / "demo-cohort").exists()


def test_demo_flow_refuses_it_too(tmp_path: Path, prefect_server) -> None:
    """As a deployment's run (no command line), the demo flow checks the tree itself."""
    from flows.demo import demo_flow
    from flows.settings import SettingsError

    _cohort_run_on_record(tmp_path)
    with pytest.raises(SettingsError, match="holds a cohort's results"):
        demo_flow(patients=1, output_root=str(tmp_path))
    assert not (tmp_path / "demo-cohort").exists()


def test_demo_ends_with_its_dice_and_the_commands_to_look(demo, monkeypatch) -> None:
    """The demo compares each mask with the exam's true gland and says where to look, with
    the commands as it was called (so they run when copied)."""
    from flows.cli.pipeline import demo_epilogue

    out, result = demo
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.setattr("sys.argv", ["/opt/pc/.venv/bin/prostate-cohort", "demo"])
    called = demo_epilogue(result, None)
    assert f"/opt/pc/.venv/bin/prostate-cohort report --output {out}" in called
    assert "/opt/pc/.venv/bin/prefect server start" in called
    monkeypatch.setattr("sys.argv", ["-m", "demo"])
    (row,) = result["evaluation"]["summary"]
    assert row["reference"] == "t2_gland_mask" and row["dice"]["n"] == 4
    assert row["dice"]["mean"] >= 0.85
    assert (out / "evaluation" / "summary.md").is_file()
    text = demo_epilogue(result, None)
    assert f"results: {out}/" in text
    assert f"mean {row['dice']['mean']:.3f}" in text and "over 4 patients" in text
    for command in ("report", "status", "qc", "features"):
        assert f"prostate-cohort {command} --output {out}" in text
    assert "prefect server start" in text
