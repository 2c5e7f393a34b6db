"""The cohort report (flows/report_html.py): its content from the pipeline-made cohort, its
links, and how it renders in headless Chromium (every image loads; a screenshot is kept
under ``test-output/`` at the repository root, which git ignores)."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import pandas as pd
import pytest
from sqlmodel import Session

from db.store import make_engine, session_scope
from flows.cli import main
from flows.report_html import collect_report_data, render_report, write_report

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = REPO / "test-output"
CHROMIUM = next(
    (p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None
)


class _Links(HTMLParser):
    """Every ``<img src>`` and ``<a href>`` of a document."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img":
            self.images.append(values["src"] or "")
        elif tag == "a":
            self.links.append(values["href"] or "")


def _links(text: str) -> _Links:
    parser = _Links()
    parser.feed(text)
    return parser


@pytest.fixture(scope="module")
def report(analysed_demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of ``analysed_demo``, written by the command in a folder of its own."""
    path = tmp_path_factory.mktemp("report") / "reports" / "cohort.html"
    code = main(["report", "--output", str(analysed_demo.root), "-o", str(path)])
    assert code == 0
    return path


def test_report_shows_the_cohort(report: Path, analysed_demo) -> None:
    text = report.read_text()
    patients = sorted(p["patient"] for p in analysed_demo.demo["patients"])
    broken = analysed_demo.broken
    for heading in ("Run summary", "Failures", "Time per step", "Gland volume", "QC figures"):
        assert f"<h2>{heading}</h2>" in text
    assert "5 patients: 4 without a failed step, 1 with one." in text
    assert broken["patient"] in text and "InputError" in text
    assert f"{broken['patient']}: no QC figure (failed in ingest)" in text
    assert "<td>register</td>" in text and "histogram of gland volumes in mL" in text
    for patient in patients:
        assert f"{patient} · model demo · " in text
    assert "Evaluation against reference masks" in text and "<td>phantom</td>" in text
    for case in analysed_demo.evaluation["cases"]:
        assert f"{case['dice']:.3f}" in text
    assert "SYN-0002" not in text  # exam folders (often patient ids) are not shown


def test_report_is_self_contained_and_its_links_resolve(report: Path, analysed_demo) -> None:
    found = _links(report.read_text())
    assert len(found.images) == 4 + 1  # one thumbnail per patient with a mask, one plot
    assert all(src.startswith("data:image/png;base64,") for src in found.images)
    engine = make_engine(analysed_demo.url)
    with session_scope(engine) as session:
        figures = set(collect_report_data(session).qc["path"])
    engine.dispose()
    assert len(found.links) == 4
    targets = {str((report.parent / unquote(href)).resolve()) for href in found.links}
    assert not any(href.startswith(("/", "file:", "http")) for href in found.links)  # relative
    assert targets == {str(Path(p).resolve()) for p in figures}
    assert all(Path(t).is_file() for t in targets)


def test_render_escapes_text_and_handles_an_empty_database(db_engine, tmp_path: Path) -> None:
    with Session(db_engine) as session:
        empty = collect_report_data(session)
    text = render_report(empty, base_dir=tmp_path)
    assert "No failed steps." in text and "No patients." in text and "<img" not in text
    assert "Evaluation" not in text  # no references evaluated: no table
    failure = pd.DataFrame(
        [
            {
                "patient": "P000000000001",
                "step": "n4",
                "error_type": "InputError",
                "error": "<script>alert(1)</script> & more",
                "ended_at": None,
                "step_run_id": 1,
                "pipeline_run_id": None,
            }
        ]
    )
    text = render_report(
        dataclasses.replace(empty, failures=failure, patients=["P000000000001"]),
        base_dir=tmp_path,
        title="A <b>title</b>",
    )
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in text
    assert "A &lt;b&gt;title&lt;/b&gt;" in text
    assert "P000000000001: no QC figure (failed in n4)" in text


def test_evaluation_of_one_patient_shows_its_mean(db_engine, tmp_path: Path) -> None:
    """With one patient a reference has a mean and no SD: the table shows the mean alone."""
    with Session(db_engine) as session:
        empty = collect_report_data(session)
    one = pd.DataFrame(
        [{"patient": "P000000000001", "model": "taps", "reference": "gland_Bosma22b",
          "label_name": "gland", "dice": 0.8391, "hd95": 4.25}]
    )
    text = render_report(dataclasses.replace(empty, evaluation=one), base_dir=tmp_path)
    assert "<td>0.839</td>" in text and "nan" not in text.lower()
    assert "<th>patients</th>" in text


def test_a_missing_figure_gets_a_note_not_a_broken_link(analysed_demo, tmp_path: Path) -> None:
    engine = make_engine(analysed_demo.url)
    with session_scope(engine) as session:
        data = collect_report_data(session)
    engine.dispose()
    qc = data.qc.assign(path=[str(tmp_path / "gone.png")] + list(data.qc["path"][1:]))
    text = render_report(dataclasses.replace(data, qc=qc), base_dir=tmp_path)
    assert "figure missing (gone.png)" in text and len(_links(text).links) == 3


# ------------------------------------------------------------------ headless Chromium


class _DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, socket: Any) -> None:
        self.socket, self.next_id = socket, 0

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=timeout))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def wait_for(self, event: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (
            json.loads(self.socket.recv(timeout=deadline - time.monotonic())).get("method") != event
        ):
            pass

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"]["value"]


@contextmanager
def _chromium_page(profile: Path) -> Iterator[_DevTools]:
    """Headless Chromium (started here, stopped after) and a DevTools client on its page."""
    from websockets.sync.client import connect

    browser = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,1600",
            "--hide-scrollbars",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            assert browser.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium opened no DevTools port in 60 s"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
        page = next(p for p in pages if p["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as socket:
            yield _DevTools(socket)
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()


IMAGES_JS = """JSON.stringify(Array.from(document.images, i => ({
  alt: i.alt, data: i.src.startsWith('data:image/png;base64,'),
  complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    with _chromium_page(tmp_path / "profile") as page:
        page.call("Page.enable")
        page.call("Page.navigate", url=report.as_uri())
        page.wait_for("Page.loadEventFired")
        images = json.loads(page.evaluate(IMAGES_JS))
        links = page.evaluate("Array.from(document.links, a => a.href)")
        size = page.call("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = page.call(
            "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
        )
    png = base64.b64decode(shot["data"])
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    (SCREENSHOT_DIR / "cohort-report.png").write_bytes(png)
    (tmp_path / "cohort-report.png").write_bytes(png)
    assert len(images) == 5
    broken = [i["alt"] for i in images if not (i["complete"] and i["width"] > 0)]
    assert broken == [], f"images that did not load: {broken}"
    assert all(i["data"] for i in images)
    assert len(links) == 4
    for href in links:  # the browser's own resolution of each relative link
        assert urlparse(href).scheme == "file" and Path(unquote(urlparse(href).path)).is_file()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and size["height"] > 1000


def test_write_report_returns_what_it_showed(analysed_demo, tmp_path: Path) -> None:
    engine = make_engine(analysed_demo.url)
    with session_scope(engine) as session:
        data = write_report(session, tmp_path / "r.html", title="Cohort")
    engine.dispose()
    assert len(data.patients) == 5 and len(data.failures) == 1
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
