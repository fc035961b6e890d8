"""Bulk import through neo4j-admin gives the same graph as the transactional loader."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from graphstore.api import Store
from graphstore.bulk import bulk_import
from graphstore.connection import ConnectionSettings, open_driver
from graphstore.errors import RecordsError
from graphstore.server import USER, ServerConfig, free_port, read_password, stop
from records import RecordsFormatError
from tests.conftest import ensure_loaded, fixture_schema
from tests.reference import Ref

if TYPE_CHECKING:
    from neo4j import Driver

pytestmark = [pytest.mark.store, pytest.mark.slow]


def _flat(x: Any) -> list[object]:
    out: list[object] = []
    for f in dataclasses.fields(x):
        v = getattr(x, f.name)
        out.extend(v for kv in sorted(v.items()) for v in kv) if isinstance(v, dict) else out.append(v)
    return out


def _close(a: Sequence[object], b: Sequence[object]) -> bool:
    """Equal field by field, floats to 1e-9 (sums may run in another order)."""
    def same(u: object, v: object) -> bool:
        return u == pytest.approx(v, rel=1e-9) if isinstance(u, float) else u == v

    return len(a) == len(b) and all(len(_flat(x)) == len(_flat(y)) and all(map(same, _flat(x), _flat(y)))
                                    for x, y in zip(a, b, strict=True))


# every aggregate row with all its properties, in one order (GAINED with its VariantStat)
AGGREGATES = {
    "USES": "MATCH (c:Class {model_id: $m})-[u:USES]->(n:Neuron) RETURN c.id, n.id, properties(u) AS p "
            "ORDER BY c.id, n.id, u.config",
    "CLASS_FLOW": "MATCH (a:Neuron)-[f:CLASS_FLOW {model_id: $m}]->(b:Neuron) RETURN a.id, b.id, properties(f) AS p "
                  "ORDER BY f.config, f.class_id, a.id, b.id",
    "CountStat": "MATCH (s:CountStat {model_id: $m}) RETURN properties(s) AS p ORDER BY s.config, s.kind, s.sweep",
    "VariantStat": "MATCH (s:VariantStat {model_id: $m}) OPTIONAL MATCH (s)-[g:GAINED]->(n:Neuron) "
                   "WITH s, n.id AS n, g.count AS k ORDER BY n WITH s, collect([n, k]) AS gained "
                   "RETURN properties(s) AS p, gained ORDER BY s.config, s.kind, s.sweep, s.label",
}


def _rows(driver: Driver, query: str, model_id: str) -> list[list[object]]:
    records, _, _ = driver.execute_query(query, m=model_id, database_="neo4j")
    return [[sorted(v.items()) if isinstance(v, dict) else v for v in r.values()] for r in records]


def _same_rows(a: list[list[object]], b: list[list[object]]) -> bool:
    """Equal, floats to 1e-9 relative (sums may run in another order)."""
    def same(u: object, v: object) -> bool:
        if isinstance(u, list | tuple) and isinstance(v, list | tuple):
            return len(u) == len(v) and all(map(same, u, v))
        return u == pytest.approx(v, rel=1e-9, abs=1e-12) if isinstance(u, float) else u == v

    return same(a, b)


@pytest.fixture(scope="module")
def bulk_server(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[ServerConfig]:
    base = ServerConfig.default(home)
    cfg = ServerConfig(lib_dir=base.lib_dir, instance_dir=tmp_path_factory.mktemp("bulk"), bolt_port=free_port(),
                       http_port=free_port(), heap_initial="512m", heap_max="1g", pagecache="256m")
    try:
        yield cfg
    finally:
        stop(cfg)


def test_bulk_import_equals_transactional_load(bulk_server: ServerConfig, fixture_run: Path, driver: Driver) -> None:
    def connect() -> Driver:
        return open_driver(ConnectionSettings(uri=bulk_server.bolt_uri, user=USER, password=read_password(bulk_server)))

    with pytest.raises(RecordsError, match="pass --overwrite"):
        bulk_import(bulk_server, [fixture_run], connect)
    with pytest.raises(RecordsFormatError, match="not a run folder"):
        bulk_import(bulk_server, [fixture_run.parent / "nothing"], connect, overwrite=True)
    summary = bulk_import(bulk_server, [fixture_run, fixture_run], connect, overwrite=True)  # duplicates dropped
    ref = Ref.load(fixture_run)
    nodes, rels = ref.counts()
    assert summary.relationships == sum(rels.values())  # the aggregates come with the import
    bulk_driver = connect()
    try:
        bulk, loaded = Store(bulk_driver), Store(ensure_loaded(driver, fixture_run))
        assert bulk.counts() == (nodes, rels)
        for name, query in AGGREGATES.items():  # computed in pandas for the import, in Cypher by a load
            got = _rows(bulk_driver, query, ref.model_id)
            want = _rows(driver, query, ref.model_id)
            assert len(want) > 10 and _same_rows(got, want), name
        assert bulk.stored_schema() == fixture_schema()  # CSV headers typed from graphstore.schema
        model = ref.model_id
        for config in [c.config for c in loaded.configs(model)]:
            assert _close(bulk.pathway_counts(config), loaded.pathway_counts(config))
            assert _close(bulk.variant_overlap(model, config), loaded.variant_overlap(model, config))
            assert _close(bulk.hijacked_neurons(model, config, "pgd", limit=50),
                          loaded.hijacked_neurons(model, config, "pgd", limit=50))
            assert np.allclose(bulk.similarity_matrix(model, config).jaccard,
                               loaded.similarity_matrix(model, config).jaccard, rtol=1e-9)
        original = loaded.images(model, kind="original", limit=1)[0].id
        ia, ib = bulk.image(original), loaded.image(original)
        assert dataclasses.replace(ia, variants=sorted(ia.variants)) == \
            dataclasses.replace(ib, variants=sorted(ib.variants))
        for a, b in zip(bulk.pathways_of_image(original), loaded.pathways_of_image(original), strict=True):
            assert (a.id, a.size, a.saliency.tolist()) == (b.id, b.size, b.saliency.tolist())
            assert np.array_equal(a.gaps, b.gaps, equal_nan=True)
            ga, gb = bulk.pathway_graph(a.id), loaded.pathway_graph(b.id)
            assert sorted(ga.edges(data=True)) == sorted(gb.edges(data=True))
    finally:
        bulk_driver.close()


def test_a_load_refreshes_the_aggregates_of_the_classes_it_adds_to(driver: Driver, fixture_run: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A load into a store whose aggregates cover it refreshes only the settings and classes its new original
    pathways touch (so its cost does not grow with the rest of the store), and every aggregate row then equals a
    full refresh in Cypher. Here the store holds the run less one class's original pathways, aggregated."""
    from graphstore import loader
    from records import class_id
    from tests.conftest import wipe

    ref = Ref.load(fixture_run)
    wipe(driver)
    loader.load_run(driver, fixture_run, progress=False)
    first = next(p for p in ref.pathways if ref.images[p.image_id].kind == "original")
    gone = [p for p in ref.pathways if ref.images[p.image_id].kind == "original" and p.target == first.target]
    loader.remove_pathways(driver, [p.pathway_id for p in gone])
    loader.refresh_aggregates(driver, ref.model_id)  # the store without them, aggregated: current
    before = {name: _rows(driver, query, ref.model_id) for name, query in AGGREGATES.items()}
    calls: list[dict[str, set[str]] | None] = []
    refresh = loader.refresh_aggregates

    def spy(*args: Any, only: dict[str, set[str]] | None = None, **kwargs: Any) -> list[str]:
        calls.append(only)
        return refresh(*args, only=only, **kwargs)

    monkeypatch.setattr(loader, "refresh_aggregates", spy)
    summary = loader.load_run(driver, fixture_run, progress=False)
    assert summary.pathways_new == len(gone)
    touched = class_id(ref.model_id, first.target)
    assert calls == [{p.config: {touched} for p in gone}]
    after = {name: _rows(driver, query, ref.model_id) for name, query in AGGREGATES.items()}
    assert before["USES"] != after["USES"] and before["CLASS_FLOW"] != after["CLASS_FLOW"]
    refresh(driver, ref.model_id)  # every class and setting, in Cypher
    for name, query in AGGREGATES.items():
        full = _rows(driver, query, ref.model_id)
        assert len(full) > 10 and _same_rows(after[name], full), name
