"""Every page of a running ``pathx ui`` in Debian's headless Chromium, driven by Playwright."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from graphstore.server import USER, read_password
from tests.conftest import ensure_loaded
from ui.serve import PAGES, running_ui, ui_command

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

pytestmark = [pytest.mark.store, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def ui_server(driver: Driver, fixture_run: Path, neo4j_server: ServerConfig) -> Iterator[str]:
    ensure_loaded(driver, fixture_run)
    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server))
    with running_ui(env) as url:
        yield url


# Neuron cards (container keys) each page shows: their exemplar patches must render as images.
CARDS = {"image": ("card_img",), "compare": ("card_cmp",), "adversarial": ("card_adv", "card_hij")}
OPTIONAL_PATCHES = {"card_hij"}


def test_root_opens_the_overview(ui_server: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(ui_server)
            page.get_by_role("heading", name="Overview").first.wait_for(timeout=60_000)
            page.wait_for_url("**/overview", timeout=30_000)
            assert "Page not found" not in page.locator("body").inner_text()
        finally:
            browser.close()


@pytest.mark.parametrize(("path", "title", "drawn"), [(p.path, p.title, p.figure) for p in PAGES])
def test_page_in_chromium(ui_server: str, artifacts: Path, path: str, title: str, drawn: str) -> None:
    from playwright.sync_api import sync_playwright

    failed: list[str] = []
    console_errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.goto(f"{ui_server}/{path}")
            page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
            if path == "cypher":
                page.get_by_role("button", name="Run").click()
                page.get_by_text("rows").first.wait_for(timeout=30_000)
            page.locator(drawn).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
            body = page.locator("body").inner_text()
            assert "Page not found" not in body and page.url.rstrip("/").endswith(path)
            if path != "cypher":  # settings, variants and legends read as words, never as JSON
                assert '{"' not in body and '"}' not in body
                legends = " ".join(page.locator("g.legend text").all_text_contents())
                assert "{" not in legends
            for card in CARDS.get(path, ()):
                box = page.locator(f".st-key-{card}")
                box.first.wait_for(timeout=60_000)
                box.first.scroll_into_view_if_needed()
                if card in OPTIONAL_PATCHES and "none: it is not positive" in box.first.inner_text():
                    continue  # a neuron only attacks switch on has no exemplar among the originals (AppTest
                    # checks the count against the store)
                images = box.first.locator("img")
                images.first.wait_for(timeout=30_000)
                for i in range(images.count()):  # images load lazily: bring each into view
                    images.nth(i).scroll_into_view_if_needed()
                widths: list[int] = []
                for _ in range(40):
                    widths = images.evaluate_all("els => els.map(e => e.complete ? e.naturalWidth : 0)")
                    if widths and min(widths) > 0:
                        break
                    page.wait_for_timeout(250)
                assert len(widths) >= 2 and min(widths) > 0, (card, widths)
            page.screenshot(path=str(artifacts / f"ui-{path}.png"), full_page=True)
        finally:
            browser.close()
    assert not failed, f"failed requests: {failed[:5]}"
    assert not console_errors, console_errors[:3]


def test_ui_listens_on_loopback_only(ui_server: str) -> None:
    import socket

    port = int(ui_server.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # picks the outward interface; sends nothing
        ip = s.getsockname()[0]
    assert not ip.startswith("127.")
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((ip, port)) != 0
    assert "--server.address" in ui_command(port) and "127.0.0.1" in ui_command(port)
