"""A real Prefect deployment on this machine, made with the project's own scripts.

``prefect_stack`` (session)  ``deployments/start-server.sh`` on a free loopback port in a
                             temporary PREFECT_HOME, ``deployments/create-work-pools.sh
                             cpu-pool``, ``prefect --no-prompt deploy`` of ``demo`` and
                             ``cohort-on-demand`` from the repository root (prefect.yaml),
                             ``deployments/start-worker.sh
                             cpu-pool``; all stopped (process groups and every descendant)
                             at the end of the session.
``demo_flow_run`` (session)  one run of the ``demo/demo`` deployment over 3 synthetic
                             patients, executed by that worker, waited for; its flow run,
                             task runs and artifacts as the API returns them.

Every setting reaches the services through the environment of the subprocesses only; the
test process's own environment (and so other tests' Prefect settings) is never changed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = REPO / "deployments"
OUTPUTS = REPO / "test-outputs"
VENV_BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 240
FLOW_RUN_TIMEOUT = 600  # 3 demo patients: ~2 min on 2 idle cores, 7+ min on a loaded machine
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "integration: starts a real Prefect server, work pool and worker "
        "(tests/integration; deselect with -m 'not integration')",
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Prefect or platform setting, plus ``extra``.

    The project's virtualenv comes first on PATH, so the scripts find its ``prefect``.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "PROSTATE_COHORT_"))
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env.update(extra)
    return env


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (also those in sessions of their own, e.g. flow runs)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Service:
    """A long-running subprocess in a process group of its own, with its output in a file."""

    name: str
    process: subprocess.Popen
    log: Path
    extra_pids: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, command: list[str], log: Path, **kwargs: Any) -> Service:
        handle = log.open("wb")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,
            )
        finally:
            handle.close()
        return cls(name, process, log)

    def tail(self, chars: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} log ({self.log}) ---\n{text[-chars:]}"

    def stop(self) -> None:
        """SIGINT (graceful for Prefect's CLI), then SIGTERM, then SIGKILL: the process
        group, and every descendant that left it."""
        pids = [self.process.pid, *descendants(self.process.pid), *self.extra_pids]
        for sig, wait in ((signal.SIGINT, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.process.poll()
                if not any(_alive(pid) for pid in pids):
                    return
                time.sleep(0.2)
        self.process.poll()


def wait_for_line(service: Service, pattern: str, timeout: float) -> str:
    """The first line of the service's output matching ``pattern``; fails if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = service.log.read_text(errors="replace") if service.log.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match.group(0)
        if service.process.poll() is not None:
            pytest.fail(f"{service.name} exited ({service.process.returncode})\n{service.tail()}")
        time.sleep(0.5)
    pytest.fail(f"{service.name}: no '{pattern}' within {timeout}s\n{service.tail()}")


@dataclass
class PrefectStack:
    port: int
    api_url: str
    ui_url: str
    home: Path
    logs: Path
    env: dict[str, str]  # the clients' environment (PREFECT_API_URL, ...)
    server: Service
    worker: Service
    deploy_output: str

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text[:2000]}"
        )
        return response.json() if response.content else None

    def logs_tail(self) -> str:
        return f"{self.worker.tail()}\n{self.server.tail(3000)}"

    def start_run(self, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """A new flow run of ``deployment`` (``flow/name``), for the worker to pick up."""
        found = self.api("GET", f"/deployments/name/{deployment}")
        return self.api(
            "POST", f"/deployments/{found['id']}/create_flow_run",
            json={"parameters": parameters},
        )

    def wait(self, flow_run_id: str, timeout: float = FLOW_RUN_TIMEOUT) -> dict[str, Any]:
        """The flow run once it is in a terminal state (fails the test after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            flow_run = self.api("GET", f"/flow_runs/{flow_run_id}")
            if flow_run["state"]["type"] in TERMINAL:
                return flow_run
            if time.monotonic() > deadline:
                pytest.fail(
                    f"flow run {flow_run_id} not finished after {timeout}s "
                    f"(state {flow_run['state']['type']})\n{self.logs_tail()}"
                )
            time.sleep(3)

    def child_flow_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        """The flow runs nested in a flow run, each with its flow's name as ``flow``."""
        children = self.api(
            "POST",
            "/flow_runs/filter",
            json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}},
                  "limit": 200, "offset": 0},
        )
        if not children:
            return []
        flows = {f["id"]: f["name"] for f in self.api(
            "POST", "/flows/filter",
            json={"flows": {"id": {"any_": sorted({c["flow_id"] for c in children})}},
                  "limit": 50, "offset": 0},
        )}
        return [c | {"flow": flows[c["flow_id"]]} for c in children]

    def listening_addresses(self) -> set[str]:
        return listening_addresses(self.port)


def run_script(command: list[str], env: dict[str, str], log: Path, timeout: float) -> str:
    result = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    log.write_text(output)
    hint = ""
    if "422 Unprocessable Entity" in output and "'input': None" in output:
        hint = (
            "\n(the server rejects the JSON null the Prefect client sends for an omitted "
            "limit/offset: FastAPI > 0.150 validates it against `int`; Prefect 3.8.8's "
            "server needs fastapi<=0.150.0)"
        )
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}:\n{output[-6000:]}{hint}"
    )
    return output


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    base = tmp_path_factory.mktemp("prefect-stack")
    logs = base / "logs"
    logs.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_home = base / "server-home"
    server = Service.start(
        "server",
        ["bash", str(DEPLOYMENTS / "start-server.sh"), "--port", str(port),
         "--home", str(server_home), "--timeout", str(SERVER_START_TIMEOUT)],
        logs / "server.log",
        cwd=REPO,
        env=subprocess_env(),
    )
    worker: Service | None = None
    try:
        wait_for_line(server, r"prefect-server ready: \S+", SERVER_START_TIMEOUT + 10)
        client_home = base / "client-home"
        client_home.mkdir()
        env = subprocess_env(
            PREFECT_API_URL=api_url,
            PREFECT_HOME=str(client_home),
            PROSTATE_COHORT_CHECKOUT=str(REPO),
        )
        run_script(
            ["bash", str(DEPLOYMENTS / "create-work-pools.sh"), "cpu-pool"],
            env, logs / "create-work-pools.log", 180,
        )
        deploy_output = run_script(
            [str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--name", "demo",
             "--name", "cohort-on-demand"],
            env | {"PROSTATE_COHORT_DATA_ROOT": str(base / "cohort")}, logs / "deploy.log", 300,
        )
        worker = Service.start(
            "worker",
            ["bash", str(DEPLOYMENTS / "start-worker.sh"), "--name", "integration-test",
             "cpu-pool"],
            logs / "worker.log",
            cwd=REPO,
            # Poll every 2 s instead of 10 s: the run starts sooner.
            env=env | {"PREFECT_WORKER_QUERY_SECONDS": "2"},
        )
        wait_for_line(worker, r"Worker '[^']+' started", 180)
        yield PrefectStack(
            port=port,
            api_url=api_url,
            ui_url=f"http://127.0.0.1:{port}",
            home=server_home,
            logs=logs,
            env=env,
            server=server,
            worker=worker,
            deploy_output=deploy_output,
        )
    finally:
        if worker is not None:
            worker.stop()
        server.stop()
        OUTPUTS.mkdir(exist_ok=True)
        for log in logs.glob("*.log"):  # kept for a look after a failed CI run
            (OUTPUTS / f"integration-{log.name}").write_bytes(log.read_bytes())


@pytest.fixture(scope="session")
def demo_flow_run(
    prefect_stack: PrefectStack, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Run ``demo/demo`` (3 patients) through the worker and return what the API shows."""
    stack = prefect_stack
    output_root = tmp_path_factory.mktemp("demo-output")
    deployment = stack.api("GET", "/deployments/name/demo/demo")
    created = stack.start_run("demo/demo", {"patients": 3, "output_root": str(output_root)})
    flow_run = stack.wait(created["id"])
    task_runs = _task_runs(stack, [flow_run["id"]])
    # the flow runs nested in it: one `patient` flow run per patient, and the evaluation
    children = stack.child_flow_runs(flow_run["id"])
    patient_flow_runs = [c for c in children if c["flow"] == "patient"]
    # REST, with limit and offset given: the client's read_artifacts sends them as JSON null,
    # which this server's FastAPI answers with 422.
    artifacts = stack.api(
        "POST",
        "/artifacts/filter",
        json={
            "artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}},
            "limit": 50,
            "offset": 0,
        },
    )
    return {
        "deployment": deployment,
        "flow_run": flow_run,
        "task_runs": task_runs,
        "child_flows": sorted(c["flow"] for c in children),
        "patient_flow_runs": patient_flow_runs,
        "step_task_runs": _task_runs(stack, [f["id"] for f in patient_flow_runs]),
        "artifacts": {a["key"]: a for a in artifacts if a.get("key")},
        "output_root": output_root,
        "logs": stack.logs_tail(),
    }


def _task_runs(stack: PrefectStack, flow_run_ids: list[str]) -> list[dict[str, Any]]:
    return stack.api(
        "POST",
        "/task_runs/filter",
        json={"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200, "offset": 0},
    )


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on TCP ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a Prefect CLI call that needs no server (a fresh PREFECT_HOME)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    return subprocess_env(PREFECT_HOME=str(home))


class Chromium:
    """Headless Chromium driven through the DevTools protocol (one page)."""

    def __init__(self, profile: Path, log: Path) -> None:
        from websockets.sync.client import connect

        self.service = Service.start(
            "chromium",
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
             "--disable-breakpad", "--disable-crash-reporter", "--window-size=1400,1000",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            log,
        )
        self.next_id = 0
        try:
            self.ws = self._connect(profile, connect)
        except BaseException:
            self.service.stop()
            raise

    def _connect(self, profile: Path, connect: Any) -> Any:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not targets:
            if self.service.process.poll() is not None:
                raise RuntimeError(f"chromium exited\n{self.service.tail()}")
            try:
                port = port_file.read_text().split()[0]
                response = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5)
                targets = [t for t in response.json() if t["type"] == "page"]
            except (OSError, IndexError, ValueError, httpx.HTTPError):
                time.sleep(0.3)
        if not targets:
            raise RuntimeError(f"no DevTools page from chromium\n{self.service.tail()}")
        return connect(targets[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *wanted: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(w in text for w in wanted):
                return text
            time.sleep(0.5)
        raise AssertionError(f"{wanted} not in the page after {timeout}s; it shows:\n{text}")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):  # it is going away anyway
            self.call("Browser.close", timeout=10)
        try:
            self.ws.close()
        finally:
            self.service.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    """Headless Chromium (Debian package ``chromium``), one page, stopped afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"headless Chromium not found at {CHROMIUM} (Debian package 'chromium')")
    pytest.importorskip("websockets.sync.client", reason="needs websockets (a Prefect dependency)")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    chromium = Chromium(profile, tmp_path / "chromium.log")
    try:
        chromium.call("Page.enable")
        yield chromium
    finally:
        chromium.close()
