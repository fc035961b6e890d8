"""Shared fixtures: a real Neo4j 5.26 per test run, the demo model, a small fixture run.

The server runs from the project's Maven-fetched jars in a temporary instance folder on
free loopback ports, and is stopped at the end of the session even when tests fail.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from neo4j import Driver

    from extractor.demo import DemoData
    from extractor.models import ModelBundle
    from graphstore.schema import StoredSchema
    from graphstore.server import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PATHX_HOME", ROOT / ".cache")).resolve()
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def home() -> Path:
    HOME.mkdir(parents=True, exist_ok=True)
    return HOME


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[ServerConfig]:
    from graphstore.errors import ServerError
    from graphstore.server import ServerConfig, fetch_jars, start, stop

    base = ServerConfig.default(home)
    fetch_jars(base)

    def config() -> ServerConfig:
        return base.instance(tmp_path_factory.mktemp("neo4j"), heap_initial="512m", heap_max="1g",
                             pagecache="256m", tx_memory_max="512m")

    saved = {k: os.environ.pop(k, None) for k in ("NEO4J_URI", "NEO4J_USER", "NEO4J_PASSWORD")}
    cfg = config()
    try:
        try:
            start(cfg)
        except ServerError as exc:  # a port grabbed between free_port() and the bind: once more, new ports
            print(f"first Neo4j start failed ({str(exc).splitlines()[0]}); retrying on other ports")
            cfg = config()
            start(cfg)
        yield cfg
    finally:
        stop(cfg)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


@pytest.fixture(scope="session")
def driver(neo4j_server: ServerConfig) -> Iterator[Driver]:
    from graphstore.connection import ConnectionSettings, open_driver
    from graphstore.server import USER, read_password

    cfg = neo4j_server
    drv = open_driver(ConnectionSettings(uri=cfg.bolt_uri, user=USER, password=read_password(cfg)))
    yield drv
    drv.close()


def wipe(driver: Driver) -> None:
    """Empty the database (data only; constraints and indexes stay). Relationships go first, in bounded
    transactions: a neuron of a trained model's store can hold more relationships than one transaction of
    5,000 detached nodes may free within the memory pool."""
    with driver.session(database="neo4j") as s:
        s.run("MATCH ()-[r]->() CALL (r) { DELETE r } IN TRANSACTIONS OF 20000 ROWS").consume()
        s.run("MATCH (n) CALL (n) { DELETE n } IN TRANSACTIONS OF 5000 ROWS").consume()


@pytest.fixture()
def empty_store(driver: Driver) -> Driver:
    wipe(driver)
    return driver


@pytest.fixture(scope="session")
def demo(home: Path) -> tuple[object, object]:
    from extractor.demo import demo_bundle

    return demo_bundle(home)


@pytest.fixture(scope="session")
def fixture_run(tmp_path_factory: pytest.TempPathFactory, demo: tuple[ModelBundle, DemoData], home: Path) -> Path:
    """24 test digits with FGSM/PGD/occlusion/shift/deformation variants; mct, intgrad, correlation
    (all images) and pixel pathways (originals)."""
    from extractor.pipeline import extract_run, load_images
    from extractor.settings import PathwaySettings
    from extractor.variants import VariantSpec

    bundle, _ = demo
    out = tmp_path_factory.mktemp("runs") / "fixture"
    images = load_images("demo:test", bundle, home)
    specs = VariantSpec.parse("fgsm:eps=0.1,fgsm:eps=0.2,pgd:eps=0.1:steps=5,pgd:eps=0.2:steps=10:targeted=true,"
                              "occlude,shift,deform,affine")
    settings = [
        PathwaySettings(method="mct", selection="topk", k=6),
        PathwaySettings(method="intgrad", selection="topk", k=6, intgrad_steps=5),
        PathwaySettings(method="correlation", selection="topk", k=5, resamples=20),
        PathwaySettings(method="precision", selection="topk", k=5, resamples=20, originals_only=True),
        PathwaySettings(method="pixel", selection="topk", stride=6, originals_only=True),
    ]
    extract_run(bundle, images, settings, specs, out, batch_size=16, limit=24, progress=False)
    return out


def ensure_loaded(driver: Driver, fixture_run: Path) -> Driver:
    """Make the database hold exactly the fixture run (reloaded only when something else ran)."""
    from graphstore.loader import load_run
    from records import read_run

    _, images, pathways = read_run(fixture_run)
    with driver.session(database="neo4j") as s:
        n_img = s.run("MATCH (i:Image) RETURN count(i) AS n").single(strict=True)["n"]
        n_pw = s.run("MATCH (p:Pathway) RETURN count(p) AS n").single(strict=True)["n"]
        n_model = s.run("MATCH (m:Model) RETURN count(m) AS n").single(strict=True)["n"]
    if (n_img, n_pw, n_model) != (len(images), len(pathways), 1):
        wipe(driver)
        load_run(driver, fixture_run, progress=False)
    return driver


@pytest.fixture()
def loaded_store(driver: Driver, fixture_run: Path) -> Driver:
    """The database holding exactly the fixture run."""
    return ensure_loaded(driver, fixture_run)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def replace_cfg(cfg: ServerConfig, **changes: Any) -> ServerConfig:
    return dataclasses.replace(cfg, **changes)


def fixture_schema() -> StoredSchema:
    """What the fixture store must hold: the whole schema but ``Pathway.cut_sites``, which only a selection
    cut at a per-channel segment writes (the fixture's digits CNN is a dense chain; tests/test_connected.py
    stores a cut pathway and checks the property)."""
    from graphstore import schema

    want = schema.stored_form()
    want.nodes["Pathway"].pop("cut_sites")
    return want
