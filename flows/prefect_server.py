"""The temporary Prefect server of one command: it lives exactly as long as that command.

Without ``PREFECT_API_URL`` Prefect starts a server of its own in a subprocess and stops it
at exit; after ``kill -9`` of the command that server is left running. Here the command
starts the same server itself, and the server watches its parent: it ends when the parent
ends, however the parent ended (``prctl(PR_SET_PDEATHSIG)`` on Linux, and a watchdog thread
everywhere). An operator's server (``PREFECT_API_URL`` set) is used as it is.

Run as ``python -m flows.prefect_server PARENT_PID PORT`` (what :func:`temporary_server` does).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: How often the server checks that its parent is alive (s).
WATCH_INTERVAL_S = 0.5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent thread dies (Linux only)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _server_environment() -> dict[str, str]:
    """The environment of Prefect's own temporary server (no UI, ephemeral database)."""
    from prefect.settings import get_current_settings

    return {
        **os.environ,
        **get_current_settings().to_environment_variables(exclude_unset=True),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }


def _wait_healthy(process: subprocess.Popen[bytes], api_url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the temporary Prefect server exited with code {process.returncode} "
                    "before it answered (is PREFECT_HOME writable?)"
                )
            try:
                if client.get(f"{api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect server did not answer within {timeout_s:.0f} s")


def _drain_to_server() -> None:
    """Send the logs and events still queued for the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def temporary_server() -> Iterator[str]:
    """Use the operator's Prefect API, else start a temporary server for the block.

    Yields the API URL. Prefect is pointed at it through its settings context for the
    block; the server is stopped at the end of the block, and ends by itself if this
    process is killed.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        yield str(configured)
        return
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.prefect_server", str(os.getpid()), str(port)],
        env=_server_environment(),
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads started yet that matter)
    )
    try:
        timeout = get_current_settings().server.ephemeral.startup_timeout_seconds
        _wait_healthy(process, api_url, float(timeout))
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            try:
                yield api_url
            finally:
                _drain_to_server()
    finally:
        _stop(process)


def _watch_parent(parent_pid: int) -> None:
    """End this server (SIGTERM, then a hard exit) once ``parent_pid`` is gone."""
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    os._exit(1)


def main(argv: list[str]) -> None:
    parent_pid, port = int(argv[0]), int(argv[1])
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
