"""The command line: help, settings errors, database commands (no Prefect server needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from db.store import head_revision
from flows.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROSTATE_COHORT_"):
            monkeypatch.delenv(name)


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
