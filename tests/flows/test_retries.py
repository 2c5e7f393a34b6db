"""Retries: transient failures (I/O, GPU out of memory) are retried, bad input never is."""

from __future__ import annotations

import pytest
from prefect import flow, task

from flows.steps import is_transient
from tasks.errors import InputError, TransientError

pytestmark = pytest.mark.usefixtures("prefect_server")


def _attempts(error: Exception) -> int:
    """How many times a task with 2 retries runs when its first attempt raises ``error``."""
    attempts: list[int] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=is_transient)
    def flaky() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise error

    @flow
    def one_task() -> None:
        flaky(return_state=True)

    one_task()
    return len(attempts)


@pytest.mark.parametrize(
    ("error", "runs"),
    [
        (InputError("b-value tag missing", step="ingest"), 1),
        (ValueError("a bug"), 1),
        (TransientError("database busy", step="register"), 2),
        (OSError("disk full"), 2),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), 2),
    ],
)
def test_only_transient_errors_are_retried(error: Exception, runs: int) -> None:
    assert _attempts(error) == runs
