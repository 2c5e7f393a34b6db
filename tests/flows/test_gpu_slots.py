"""GPU slots: the server's global concurrency limit holds GPU work to its size across
processes, and CPU work takes no slot."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.gpu import ensure_gpu_limit, gpu_slot

pytestmark = pytest.mark.usefixtures("prefect_server")

HOLD_S = 2.0
_HOLDER = """
import sys, time
from flows.gpu import gpu_slot
with gpu_slot(True, name=sys.argv[1]):
    start = time.time()
    time.sleep(float(sys.argv[2]))
    print(start, time.time())
"""


def test_a_new_limit_is_created_once_and_an_existing_one_kept() -> None:
    assert ensure_gpu_limit(slots=1, name="gpu-created") == 1
    assert ensure_gpu_limit(slots=3, name="gpu-created") == 1  # the operator's size wins
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-created").limit == 1


def test_one_slot_serialises_gpu_work_of_two_processes() -> None:
    ensure_gpu_limit(slots=1, name="gpu-one")
    env = os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, "gpu-one", str(HOLD_S)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    spans = sorted(tuple(map(float, h.communicate(timeout=120)[0].split())) for h in holders)
    assert all(h.returncode == 0 for h in holders)
    (_, first_end), (second_start, _) = spans
    assert second_start >= first_end - 0.05  # never both on the "GPU" at once


def test_cpu_work_takes_no_slot() -> None:
    ensure_gpu_limit(slots=1, name="gpu-busy")
    cpu_done = threading.Event()

    def cpu_work() -> None:
        with gpu_slot(False, name="gpu-busy"):
            cpu_done.set()

    with gpu_slot(True, name="gpu-busy"):  # the only slot is taken ...
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name("gpu-busy").active_slots == 1
        worker = threading.Thread(target=cpu_work, daemon=True)
        worker.start()
        worker.join(timeout=10)
        assert cpu_done.is_set()  # ... and CPU work went ahead without one
