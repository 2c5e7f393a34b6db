"""Fixtures for flow tests: one temporary Prefect server for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real (temporary, SQLite-backed) Prefect API server for flows run in-process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, prefect_server) -> tuple[Path, dict]:
    """The demo flow's output root and result: 4 synthetic exams through the whole chain."""
    from flows.demo import demo_flow

    out = tmp_path_factory.mktemp("demo")
    result = demo_flow(patients=4, seed=0, output_root=str(out))
    return out, result
