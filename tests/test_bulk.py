"""Bulk import through neo4j-admin gives the same graph as the transactional loader."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import neo4j
import numpy as np
import pytest

from graphstore.api import Store
from graphstore.bulk import bulk_import
from graphstore.connection import ConnectionSettings, open_driver
from graphstore.errors import RecordsError
from graphstore.results import Summary
from graphstore.server import USER, ServerConfig, read_password, stop
from records import RecordsFormatError
from tests.conftest import ensure_loaded, fixture_schema
from tests.reference import AGGREGATES, Ref, aggregate_rows, same_rows

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


@pytest.fixture(scope="module")
def bulk_server(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[ServerConfig]:
    base = ServerConfig.default(home)
    cfg = base.instance(tmp_path_factory.mktemp("bulk"), heap_initial="512m", heap_max="1g", pagecache="256m")
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
        originals = sum(1 for i in ref.images.values() if i.kind == "original")
        assert bulk.summary() == Summary(models=1, classes=nodes["Class"], images=len(ref.images), originals=originals,
                                         pathways=len(ref.pathways), edges=rels["FLOWS_TO"])
        assert 0 < originals < len(ref.images)
        got, want = aggregate_rows(bulk_driver, ref.model_id), aggregate_rows(driver, ref.model_id)
        for name in AGGREGATES:  # computed in pandas for the import, in Cypher by a load
            assert len(want[name]) > 10 and same_rows(got[name], want[name]), name
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
    """A load into a store whose aggregates cover it adds its new pathways to every aggregate of the settings they
    belong to (so its cost does not grow with the rest of the store), and every aggregate row then equals a full
    refresh in Cypher. Here the store holds the run less one class's original pathways (its class rows are then
    made anew), every third other original pathway (added to class rows that exist), every occlusion's pathways
    (their counts made anew) and every other remaining variant pathway (added to counts that exist), aggregated."""
    from graphstore import loader
    from graphstore import queries as Q
    from graphstore.queries import COUNT_ADDED
    from records import pathway_key
    from tests.conftest import wipe

    ref = Ref.load(fixture_run)
    wipe(driver)
    loader.load_run(driver, fixture_run, progress=False)
    originals = [p for p in ref.pathways if ref.images[p.image_id].kind == "original"]
    variants = [p for p in ref.pathways if ref.images[p.image_id].kind != "original"]
    gone = ([p for p in originals if p.target == originals[0].target]
            + [p for p in originals if p.target != originals[0].target][::3]
            + [p for p in variants if ref.images[p.image_id].kind == "occlude"]
            + [p for p in variants if ref.images[p.image_id].kind != "occlude"][::2])
    loader.remove_pathways(driver, [p.pathway_id for p in gone])
    loader.refresh_aggregates(driver, ref.model_id)  # the store without them, aggregated: current
    before = aggregate_rows(driver, ref.model_id)
    calls: list[dict[str, list[int]] | None] = []
    refresh = loader.refresh_aggregates
    counted: list[int] = []

    def spy(*args: Any, added: dict[str, list[int]] | None = None, **kwargs: Any) -> list[str]:
        calls.append(added)
        return refresh(*args, added=added, **kwargs)

    def counting(tx: Any, query: str, parameters: dict[str, Any] | None = None, **params: Any) -> Any:
        result = run(tx, query, parameters, **params)
        if query == COUNT_ADDED:
            record = result.peek()
            assert record is not None
            counted.append(int(record["counted"]))
        return result

    run = neo4j.ManagedTransaction.run
    monkeypatch.setattr(loader, "refresh_aggregates", spy)
    monkeypatch.setattr(neo4j.ManagedTransaction, "run", counting)
    summary = loader.load_run(driver, fixture_run, progress=False)
    monkeypatch.undo()
    assert summary.pathways_new == len(gone)
    added = {c: sorted(pathway_key(p.pathway_id) for p in gone if p.config == c) for c in {p.config for p in gone}}
    assert [{c: sorted(k) for c, k in (a or {}).items()} for a in calls] == [added]
    assert sum(counted) == len(gone)  # each new pathway added to the counts once, none recounted
    assert loader.aggregates_current(driver, ref.model_id)
    after = aggregate_rows(driver, ref.model_id)
    assert all(before[name] != after[name] for name in AGGREGATES)
    refresh(driver, ref.model_id)  # every class and setting, in Cypher
    full = aggregate_rows(driver, ref.model_id)
    for name in AGGREGATES:
        assert len(full[name]) > 10 and same_rows(after[name], full[name]), name
    # what the adding statements read grows with the load and the touched classes: no statement scans an index,
    # and none seeks the rows of a whole setting (a planner choosing USES(config) for an edge between two nodes
    # it holds reads every class's rows once per row)
    for name in ("ADD_CLASS_STATS", "ADD_USES", "ADD_CLASS_FLOWS", "CLASS_USES_SUPPORTS", "CLASS_FLOW_SUPPORTS",
                 "ADD_COUNT_STATS", "ADD_VARIANT_STATS", "COUNT_ADDED"):
        _, explained, _ = driver.execute_query("EXPLAIN " + getattr(Q, name), keys=[1], model_id=ref.model_id,
                                               config="c", classes=["c"], database_="neo4j")
        assert explained.plan is not None, name
        steps = _operators(explained.plan)
        assert any("Seek" in op for op, _ in steps), name
        assert not [s for s in steps if "Scan" in s[0] or "USES(config)" in s[1]], (name, steps)


def _operators(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """A query plan's operators and their details, depth first."""
    return [(plan["operatorType"], str(plan.get("args", {}).get("Details", ""))),
            *(op for child in plan.get("children", []) for op in _operators(child))]
