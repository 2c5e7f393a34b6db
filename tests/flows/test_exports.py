"""The ``features`` and ``volumes`` commands (flows/exports.py) on the pipeline-made cohort,
against its SQLite database and the same rows in PostgreSQL (``cohort_url``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from db.queries import features, volumes
from db.store import make_engine, session_scope
from flows.cli import main
from flows.exports import table_format


@pytest.fixture
def cli_url(cohort_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the command line at ``cohort_url`` (as an operator would, by environment)."""
    monkeypatch.setenv("PROSTATE_COHORT_DATABASE_URL", cohort_url)
    return cohort_url


def _query(url: str, function, **filters) -> pd.DataFrame:
    engine = make_engine(url)
    with session_scope(engine) as session:
        frame = function(session, **filters)
    engine.dispose()
    return frame


def test_features_export_long_and_wide_agree(cli_url: str, tmp_path: Path, capsys) -> None:
    long_file, wide_file = tmp_path / "long.csv", tmp_path / "wide.parquet"
    assert main(["features", "-o", str(long_file)]) == 0
    assert main(["features", "--wide", "-o", str(wide_file)]) == 0
    assert "12 rows x 114 columns" in capsys.readouterr().out
    long, wide = pd.read_csv(long_file), pd.read_parquet(wide_file)
    expected = _query(cli_url, features)
    assert list(long.columns) == list(expected.columns) and len(long) == len(expected)
    assert long["value"].to_numpy() == pytest.approx(expected["value"].to_numpy(), rel=1e-15)
    assert wide["firstorder_mean"].dtype == "float64"
    cells = wide.set_index(["step_run_id", "image", "mask"])
    for row in long.itertuples():  # every exported value, in both forms
        assert cells.at[(row.step_run_id, row.image, row.mask), row.wide_column] == pytest.approx(
            row.value, rel=1e-15
        )
    assert cells.iloc[:, 5:].notna().sum().sum() == len(long)


def test_features_export_filters(cli_url: str, tmp_path: Path) -> None:
    out = tmp_path / "adc.table"
    command = ["features", "--image", "adc", "--feature-class", "firstorder", "--zone", "gland"]
    assert main([*command, "--format", "csv", "-o", str(out)]) == 0
    table = pd.read_csv(out)
    assert set(table["image"]) == {"adc"} and set(table["feature_class"]) == {"firstorder"}
    assert len(table) == 4 * 18
    assert main(["features", "--model", "taps", "--wide", "-o", str(tmp_path / "n.csv")]) == 0
    assert pd.read_csv(tmp_path / "n.csv").empty


def test_volumes_command_prints_and_writes(cli_url: str, tmp_path: Path, capsys) -> None:
    assert main(["volumes"]) == 0
    printed = capsys.readouterr().out
    expected = _query(cli_url, volumes)
    lines = {line.split()[0]: line.split() for line in printed.splitlines()[1:-1]}
    for row in expected.itertuples():
        assert lines[row.patient][1:4] == ["demo", "gland", f"{row.volume_ml:.2f}"]
    assert printed.strip().endswith("4 volumes (mL)")
    assert main(["volumes", "-o", str(tmp_path / "volumes.parquet")]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "volumes.parquet"), expected)


def test_a_file_name_without_a_format_is_refused(tmp_path: Path, capsys) -> None:
    assert main(["features", "-o", str(tmp_path / "features.txt")]) == 2
    assert "--format" in capsys.readouterr().err
    assert table_format("x.PQ") == "parquet" and table_format("x.txt", "csv") == "csv"
    with pytest.raises(ValueError, match="unknown table format"):
        table_format("x.csv", "xlsx")


def test_no_database_yet(tmp_path: Path, capsys) -> None:
    assert main(["volumes", "--output", str(tmp_path)]) == 1
    assert "nothing has run yet" in capsys.readouterr().out
