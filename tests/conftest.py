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

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("PATHX_HOME", ROOT / ".cache")).resolve()
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def home() -> Path:
    HOME.mkdir(parents=True, exist_ok=True)
    return HOME


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[object]:
    from graphstore.errors import ServerError
    from graphstore.server import ServerConfig, fetch_jars, free_port, start, stop

    base = ServerConfig.default(home)
    fetch_jars(base)

    def config() -> ServerConfig:
        return ServerConfig(lib_dir=base.lib_dir, instance_dir=tmp_path_factory.mktemp("neo4j"),
                            bolt_port=free_port(), http_port=free_port(), heap_initial="512m", heap_max="1g",
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
def driver(neo4j_server: object) -> Iterator[object]:
    from graphstore.connection import ConnectionSettings, open_driver
    from graphstore.server import USER, read_password

    cfg = neo4j_server
    drv = open_driver(ConnectionSettings(cfg.bolt_uri, USER, read_password(cfg)))  # type: ignore[attr-defined]
    yield drv
    drv.close()


def wipe(driver: object) -> None:
    """Empty the database (data only; constraints and indexes stay). Relationships go first, in bounded
    transactions: a neuron of a trained model's store can hold more relationships than one transaction of
    5,000 detached nodes may free within the memory pool."""
    with driver.session(database="neo4j") as s:  # type: ignore[attr-defined]
        s.run("MATCH ()-[r]->() CALL (r) { DELETE r } IN TRANSACTIONS OF 20000 ROWS").consume()
        s.run("MATCH (n) CALL (n) { DELETE n } IN TRANSACTIONS OF 5000 ROWS").consume()


@pytest.fixture()
def empty_store(driver: object) -> object:
    wipe(driver)
    return driver


@pytest.fixture(scope="session")
def demo(home: Path) -> tuple[object, object]:
    from extractor.demo import demo_bundle

    return demo_bundle(home)


@pytest.fixture(scope="session")
def fixture_run(tmp_path_factory: pytest.TempPathFactory, demo: tuple[object, object], home: Path) -> Path:
    """24 test digits with FGSM/PGD/occlusion/shift/deformation variants; mct, intgrad, correlation
    (all images) and pixel pathways (originals)."""
    from extractor.pipeline import extract_run, load_images
    from extractor.settings import PathwaySettings
    from extractor.variants import VariantSpec

    bundle, _ = demo
    out = tmp_path_factory.mktemp("runs") / "fixture"
    images = load_images("demo:test", bundle, home)  # type: ignore[arg-type]
    specs = VariantSpec.parse("fgsm:eps=0.1,fgsm:eps=0.2,pgd:eps=0.1:steps=5,pgd:eps=0.2:steps=10:targeted=true,"
                              "occlude,shift,deform,affine")
    settings = [PathwaySettings("mct", "topk", k=6), PathwaySettings("intgrad", "topk", k=6, intgrad_steps=5),
                PathwaySettings("correlation", "topk", k=5, resamples=20),
                PathwaySettings("precision", "topk", k=5, resamples=20, originals_only=True),
                PathwaySettings("pixel", "topk", stride=6, originals_only=True)]
    extract_run(bundle, images, settings, specs, out, batch_size=16, limit=24, progress=False)  # type: ignore[arg-type]
    return out


def ensure_loaded(driver: object, fixture_run: Path) -> object:
    """Make the database hold exactly the fixture run (reloaded only when something else ran)."""
    from graphstore.loader import load_run
    from records import read_run

    _, images, pathways = read_run(fixture_run)
    with driver.session(database="neo4j") as s:  # type: ignore[attr-defined]
        n_img = s.run("MATCH (i:Image) RETURN count(i) AS n").single()["n"]
        n_pw = s.run("MATCH (p:Pathway) RETURN count(p) AS n").single()["n"]
        n_model = s.run("MATCH (m:Model) RETURN count(m) AS n").single()["n"]
    if (n_img, n_pw, n_model) != (len(images), len(pathways), 1):
        wipe(driver)
        load_run(driver, fixture_run, progress=False)  # type: ignore[arg-type]
    return driver


@pytest.fixture()
def loaded_store(driver: object, fixture_run: Path) -> object:
    """The database holding exactly the fixture run."""
    return ensure_loaded(driver, fixture_run)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def replace_cfg(cfg: object, **changes: object) -> object:
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def fixture_schema() -> object:
    """What the fixture store must hold: the whole schema but ``Pathway.cut_sites``, which only a selection
    cut at a per-channel segment writes (the fixture's digits CNN is a dense chain; tests/test_connected.py
    stores a cut pathway and checks the property)."""
    from graphstore import schema

    want = schema.stored_form()
    want.nodes["Pathway"].pop("cut_sites")
    return want
