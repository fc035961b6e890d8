"""Serving the Streamlit app: its page list (the one list), the command line that serves it, and a
background server for browser checks and benchmarks."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from graphstore.server import free_port

APP = Path(__file__).resolve().parent / "app.py"
PORT = 8501


@dataclass(kw_only=True, frozen=True)
class Page:
    """One page: its file under ``ui/views``, its title, its URL path, and a CSS selector of its main
    figure (what the browser tests wait for)."""

    file: str
    title: str
    path: str
    figure: str


PAGES: tuple[Page, ...] = (
    Page(file="overview.py", title="Overview", path="overview", figure="svg.main-svg"),
    Page(file="image.py", title="Image", path="image", figure=".st-key-graph_img svg.main-svg"),
    Page(file="compare.py", title="Compare classes", path="compare", figure=".st-key-graph_cmp svg.main-svg"),
    Page(file="adversarial.py", title="Adversarial", path="adversarial", figure=".st-key-graph_adv svg.main-svg"),
    Page(file="variants.py", title="Variants", path="variants", figure="svg.main-svg"),
    Page(file="cypher.py", title="Cypher", path="cypher", figure="textarea"),
)


def ui_command(port: int = PORT, address: str = "127.0.0.1") -> list[str]:
    """The command line that serves the app on ``address:port`` (headless, no usage statistics)."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
            "--server.address", address, "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--theme.base", "light"]


def serve(port: int = PORT, address: str = "127.0.0.1") -> int:
    """Serve the app in the foreground until it stops (Ctrl-C); returns Streamlit's exit code."""
    return subprocess.call(ui_command(port, address))


@contextmanager
def running_ui(env: dict[str, str], timeout: float = 60.0) -> Iterator[str]:
    """Serve the app in the background on a free loopback port; yields its URL once Streamlit's
    health check answers ``ok`` (``RuntimeError`` after ``timeout`` seconds); stops it on exit."""
    port = free_port()
    proc = subprocess.Popen(ui_command(port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the UI did not start within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
