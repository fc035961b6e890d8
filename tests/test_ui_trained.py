"""The UI at a real network's size: a store of the trained EfficientNet-Lite0 on real photos (33
sites, 1,000 class names) and an untrained DenseNet-121 (121 sites), in Debian's Chromium and AppTest.

Checks what the digit demo hid: the saliency over the photo is not blank (pixel variance of the
chart as drawn), the pathway graph's site labels are at a readable font size in the SVG, every page
loads without an exception on the trained store, and the Image page of a 121-site model renders.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from graphstore.server import USER, read_password
from tests.conftest import wipe
from tests.test_ui_apptest import open_page
from tests.test_ui_browser import ARGS, CHROMIUM
from ui.common import LABEL_FONT
from ui.serve import PAGES, running_ui

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

pytestmark = [pytest.mark.store, pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained_store(driver: Driver, tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Driver]:
    """The store holding only: EfficientNet-Lite0 over 6 labelled photos with FGSM (MCT top-8, exemplars),
    and DenseNet-121 (untrained, 64 px) over 2 of them."""
    from extractor.launch import model_from_spec
    from extractor.models import ModelOptions
    from extractor.pipeline import extract_run, load_images
    from extractor.settings import PathwaySettings
    from extractor.variants import VariantSpec
    from graphstore.loader import load_run

    runs = tmp_path_factory.mktemp("trained")
    lite = model_from_spec("efficientnet_lite0", home)
    extract_run(lite, load_images("samples:imagenet", lite), [PathwaySettings(k=8)],
                VariantSpec.parse("fgsm:eps=0.01"), runs / "lite", limit=6, batch_size=6, progress=False, exemplars=3)
    dense = model_from_spec("densenet121", home, untrained=True, opts=ModelOptions(input_size=64))
    extract_run(dense, load_images("samples:imagenet", dense), [PathwaySettings(k=4)], [], runs / "dense", limit=2,
                progress=False, exemplars=0)
    wipe(driver)
    for run in ("lite", "dense"):
        load_run(driver, runs / run, progress=False)
    yield driver
    wipe(driver)  # the next store test loads its own fixture


@pytest.fixture(scope="module")
def ui_url(trained_store: Driver, neo4j_server: ServerConfig) -> Iterator[str]:
    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server))
    with running_ui(env) as url:
        yield url


def _model_ids(driver: Driver) -> dict[str, str]:
    with driver.session(database="neo4j") as s:
        return {r["arch"]: r["id"] for r in s.run("MATCH (m:Model) RETURN m.arch AS arch, m.id AS id")}


def test_image_page_on_the_trained_model_in_chromium(ui_url: str, trained_store: Driver, artifacts: Path) -> None:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{ui_url}/image?model={_model_ids(trained_store)['efficientnet_lite0']}")
            page.get_by_role("heading", name="Image").first.wait_for(timeout=60_000)
            graph = page.locator(".st-key-graph_img svg.main-svg").first
            graph.wait_for(timeout=90_000)
            body = page.locator("body").inner_text()
            assert "samples:imagenet/" in body and "264 neurons" in body  # EfficientNet-Lite0: 33 sites x 8
            page.wait_for_timeout(2000)
            assert page.locator('[data-testid="stException"]').count() == 0
            # the saliency over the photo: a picture, not a blank box
            chart = page.locator(".st-key-saliency").first
            chart.scroll_into_view_if_needed()
            pixels = np.asarray(Image.open(io.BytesIO(chart.screenshot())).convert("L"), dtype=np.float64)
            assert pixels.std() > 20, f"saliency chart looks blank (pixel std {pixels.std():.1f})"
            # site labels at a readable size (px, as the SVG draws them), one per shown column
            sizes = page.locator(".st-key-graph_img g.xtick text").evaluate_all(
                "els => els.map(e => parseFloat(getComputedStyle(e).fontSize))")
            assert sizes and min(sizes) >= 10, sizes
            page.screenshot(path=str(artifacts / "ui-image-trained.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors[:3]


@pytest.mark.parametrize("path", [p.path for p in PAGES])
def test_every_page_loads_on_the_trained_store(ui_url: str, path: str) -> None:
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{ui_url}/{path}")
            title = next(pg.title for pg in PAGES if pg.path == path)
            page.get_by_role("heading", name=title).first.wait_for(timeout=60_000)
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(3000)
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
    assert not errors, errors[:3]


def test_pages_at_121_sites_and_1000_classes(trained_store: Driver, neo4j_server: ServerConfig,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """AppTest: the Image page of DenseNet-121 (121 sites) draws every neuron of the pathway in its
    graph, its pickers hold the 1,000 class names, and it renders in under a minute."""
    monkeypatch.setenv("NEO4J_URI", neo4j_server.bolt_uri)
    monkeypatch.setenv("NEO4J_USER", USER)
    monkeypatch.setenv("NEO4J_PASSWORD", read_password(neo4j_server))
    dense = _model_ids(trained_store)["densenet121"]
    at = open_page("image")
    began = time.perf_counter()
    at.selectbox(key="model").set_value(dense).run()
    elapsed = time.perf_counter() - began
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.selectbox(key="img_label").options) == 1001  # "any" + 1,000 names
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    graph = next(f for f in specs if any("customdata" in t for t in f["data"]))
    nodes = next(t for t in graph["data"] if t.get("mode") == "markers")
    assert len(nodes["customdata"]) == 121 * 4
    assert len(graph["layout"]["xaxis"]["categoryarray"]) > 100  # one column per depth
    assert graph["layout"]["xaxis"]["tickfont"]["size"] == LABEL_FONT
    assert elapsed < 60
