"""Property-based round trips, hostile CLI arguments, and concurrent clients on a real Neo4j."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from graphstore.api import Store
from graphstore.loader import load_run
from graphstore.server import USER, read_password
from pathx.cli import app
from records import (
    SCHEMA_VERSION,
    ImageRecord,
    Manifest,
    ModelInfo,
    PathwayRecord,
    RunWriter,
    SiteInfo,
    pathway_to_networkx,
)
from tests.conftest import wipe

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

pytestmark = pytest.mark.store

MODEL = ModelInfo(
    model_id="prop-0123456789ab",
    arch="prop",
    num_classes=3,
    class_names=("a'b", 'c"d', "e\\f"),
    input_shape=(1, 4, 4),
    sites=(
        SiteInfo(index=0, module_path="s0", call_index=0, kind="ReLU", shape=(4, 2, 2)),
        SiteInfo(
            index=1, module_path="s1", call_index=0, kind="ReLU", shape=(3,), layout="vector", preds=(0,), depth=1
        ),
    ),
)


@st.composite
def pathway(draw: st.DrawFn) -> PathwayRecord:
    n0 = draw(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True))
    n1 = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)
    contrib = [draw(floats) for _ in n0 + n1]
    edges = draw(st.lists(st.tuples(st.sampled_from(n0), st.sampled_from(n1), floats), max_size=6,
                          unique_by=lambda e: (e[0], e[1])))
    order = np.argsort(-np.abs(np.asarray(contrib, dtype=np.float32)), kind="stable")
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(1, len(order) + 1)
    return PathwayRecord(
        pathway_id="img0/mct/topk/00000000/" + str(draw(st.integers(0, 2))), image_id="img0",
        model_id=MODEL.model_id, method="mct", selection="topk", params="{}", target=0, logit_full=2.0,
        logit_masked=draw(st.floats(-10, 10, allow_nan=False)),
        neuron_site=np.asarray([0] * len(n0) + [1] * len(n1), dtype=np.int32),
        neuron_channel=np.asarray(n0 + n1, dtype=np.int32), neuron_contribution=np.asarray(contrib, np.float32),
        neuron_score=np.abs(np.asarray(contrib, np.float32)), neuron_rank=rank,
        neuron_elements=np.ones(len(contrib), np.int32), neuron_dead=np.zeros(len(contrib), bool),
        edge_src_site=np.zeros(len(edges), np.int32), edge_src_channel=np.asarray([e[0] for e in edges], np.int32),
        edge_dst_site=np.ones(len(edges), np.int32), edge_dst_channel=np.asarray([e[1] for e in edges], np.int32),
        edge_weight=np.asarray([e[2] for e in edges], np.float32), site_gap=np.asarray([np.nan, 0.0], np.float32),
        saliency=np.zeros((4, 4), np.float32),
    )


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pw=pathway(), source=st.text(min_size=1, max_size=30))
def test_records_round_trip_parquet_neo4j_query(driver: Driver, tmp_path_factory: pytest.TempPathFactory,
                                                pw: PathwayRecord, source: str) -> None:
    run = tmp_path_factory.mktemp("prop") / "run"
    image = ImageRecord(
        image_id="img0",
        model_id=MODEL.model_id,
        source=source,
        label=1,
        variant_of=None,
        kind="original",
        params="{}",
        predicted=0,
        probs=np.asarray([0.5, 0.3, 0.2], np.float32),
        logits=np.asarray([2.0, 1.0, 0.5], np.float32),
        png=b"png",
    )
    writer = RunWriter(run, Manifest(SCHEMA_VERSION, MODEL, {}))
    writer.write_part([image], [pw])
    writer.finish()
    wipe(driver)
    load_run(driver, run, progress=False)
    store = Store(driver)
    got = store.pathway_graph(pw.pathway_id)
    want = pathway_to_networkx(pw, MODEL)
    assert set(got.nodes) == set(want.nodes) and set(got.edges) == set(want.edges)
    for n, d in want.nodes(data=True):
        assert np.float32(got.nodes[n]["contribution"]) == np.float32(d["contribution"])
        assert got.nodes[n]["rank"] == d["rank"]
    for u, v, d in want.edges(data=True):
        assert np.float32(got.edges[u, v]["weight"]) == np.float32(d["weight"])
    detail = store.image("img0")
    assert detail.source == source and detail.png == b"png"
    assert [c.name for c in store.classes(MODEL.model_id)] == list(MODEL.class_names)


@pytest.fixture()
def cli_env(loaded_store: Driver, neo4j_server: ServerConfig) -> dict[str, str]:
    return {"NEO4J_URI": neo4j_server.bolt_uri, "NEO4J_USER": USER,
            "NEO4J_PASSWORD": read_password(neo4j_server)}


NAMES = ["top-neurons", "shared", "signature", "shift", "similar", "agreement", "pathway", "nonsense"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(NAMES), value=st.text(max_size=40), limit=st.integers(-5, 10**6))
def test_cli_arguments_never_crash(cli_env: dict[str, str], name: str, value: str, limit: int) -> None:
    runner = CliRunner()
    args = ["query", name, "--class", value, "--class-b", value, "--image", value, "--pathway", value,
            "--limit", str(limit)]
    res = runner.invoke(app, args, env=cli_env)
    assert res.exit_code in (0, 1, 2), res.output
    assert "Traceback" not in res.output
    if res.exit_code == 0:
        json.loads(res.stdout)


def test_twenty_concurrent_clients(loaded_store: Driver, artifacts: Path) -> None:
    store = Store(loaded_store)
    model = store.default_model()
    config = store.default_config(model)
    classes = store.classes(model)
    original = store.images(model, kind="original", limit=1)[0].id
    variant = store.images(model, kind="pgd", limit=1)[0].id
    calls = [lambda: store.summary(), lambda: store.top_neurons(classes[1].id, config),
             lambda: store.similarity_matrix(model, config), lambda: store.adversarial_shift(variant, config),
             lambda: store.similar_images(original, config), lambda: store.pathway_counts(config),
             lambda: store.class_signature(classes[2].id, config), lambda: store.hijacked_neurons(model, config, "pgd")]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 60.0

    def client(i: int) -> None:
        k = i
        while time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                calls[k % len(calls)]()
            except Exception as exc:  # any error fails the test below
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return
            with lock:
                latencies.append(time.perf_counter() - began)
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    latencies.sort()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    report = {"clients": 20, "seconds": 60, "queries": len(latencies), "p50_ms": statistics.median(latencies) * 1000,
              "p95_ms": p95 * 1000}
    (artifacts / "concurrent-clients.json").write_text(json.dumps(report, indent=1))
    print(report)
    assert len(latencies) > 100
