"""Helpers for browser tests: a served app on a free localhost port and Debian's Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from components.tokens import RESULT_CLASS

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]

# A drawn result: a Plotly figure's SVG outside a figure frame (views.common.figure_frame:
# the axes of a figure still being computed), a table, or an HTML figure (the inspector's bars).
RESULT = ("[data-testid='stPlotlyChart']:not([class*='st-key-frame_'] *) .main-svg:visible, "
          f"[data-testid='stDataFrame']:visible, .{RESULT_CLASS}:visible")


def require_chromium() -> None:
    """Skip without Chromium, except where CI demands browser tests (CIRCUITSCOPE_REQUIRE_BROWSER=1)."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CIRCUITSCOPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} missing: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} missing: apt-get install chromium")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served_app(extra_env: dict[str, str] | None = None):
    """Run `streamlit run app.py` on a free port; yield its base URL; stop it afterwards."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("streamlit did not start within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


@contextmanager
def chromium_pages(count: int, width: int = 1400, height: int = 1000):
    """``count`` pages in separate browser contexts: separate users, one browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield [browser.new_context(viewport={"width": width, "height": height}).new_page() for _ in range(count)]
        finally:
            browser.close()


IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def wait_until_idle(page, timeout_ms: int = 180_000) -> None:
    """Wait until the page's script run has finished (Streamlit's own state on the app root;
    the 'running' widget is not shown with toolbarMode minimal, so waiting for it to go
    away returned at once)."""
    page.wait_for_timeout(300)  # a rerun asked for by the last action starts
    page.locator(IDLE).wait_for(state="attached", timeout=timeout_ms)
