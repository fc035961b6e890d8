"""Loading and every named query on a real Neo4j, checked against numpy/networkx recomputation."""

from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from graphstore import schema
from graphstore.api import Store
from graphstore.errors import GraphStoreError, NotFound
from graphstore.export import export_pathways
from graphstore.loader import load_run
from graphstore.server import USER, read_password
from records import pathway_to_networkx
from tests.conftest import fixture_schema, wipe
from tests.reference import Ref

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

pytestmark = pytest.mark.store
ROOT = Path(__file__).resolve().parent.parent


def assert_close_map(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert np.allclose(np.asarray(got[k], dtype=float), np.asarray(v, dtype=float), rtol=1e-5, atol=1e-6), k


@pytest.fixture(scope="module")
def ref(fixture_run: Path) -> Ref:
    return Ref.load(fixture_run)


@pytest.fixture()
def store(loaded_store: Driver) -> Store:
    return Store(loaded_store)


@pytest.fixture(scope="module")
def config(ref: Ref) -> str:
    return sorted({p.config for p in ref.pathways if p.method == "mct"})[0]


def test_counts_equal_records_and_reload_changes_nothing(store: Store, ref: Ref, fixture_run: Path) -> None:
    nodes, rels = store.counts()
    want_nodes, want_rels = ref.counts()
    assert nodes == want_nodes
    assert rels == want_rels
    summary = load_run(store.driver, fixture_run, progress=False)
    assert summary.pathways_new == 0 and summary.includes == 0 and summary.edges == 0
    assert store.counts() == (nodes, rels)


def test_the_store_holds_exactly_the_schema_described_in_code(store: Store) -> None:
    """Every label, relationship type, property (with its type) and index the loader writes is in
    ``graphstore.schema``, and the fixture run (every method and variant kind) writes all of them."""
    got, want = store.stored_schema(), fixture_schema()
    assert "cut_sites" in schema.stored_form().nodes["Pathway"]
    assert len(want.nodes) == 9 and len(want.relationships) == 15 and len(want.indexes) == 20
    assert got.nodes == want.nodes
    assert got.relationships == want.relationships
    assert got.indexes == want.indexes


def test_pathway_graph_equals_records(store: Store, ref: Ref) -> None:
    peaks: list[float] = []
    for pw in ref.pathways[:: max(1, len(ref.pathways) // 12)]:
        got = store.pathway_graph(pw.pathway_id)
        want = pathway_to_networkx(pw, ref.manifest.model)
        assert set(got.nodes) == set(want.nodes)
        assert set(got.edges) == set(want.edges)
        for u, v, d in want.edges(data=True):
            assert got.edges[u, v]["weight"] == pytest.approx(d["weight"], rel=1e-6)
        for n, d in want.nodes(data=True):
            assert got.nodes[n]["contribution"] == pytest.approx(d["contribution"], rel=1e-6)
            assert got.nodes[n]["rank"] == d["rank"]
        info = store.pathway_of(pw.image_id, pw.config)
        assert info.logit_ratio == pytest.approx(pw.logit_ratio, rel=1e-6)
        # float16 over the peak: within half a float16 step of each value, or of 6e-5 of the peak near zero
        peak = float(np.abs(pw.saliency).max())
        peaks.append(peak)
        np.testing.assert_allclose(info.saliency, pw.saliency, rtol=2**-11, atol=2**-24 * peak)
    assert max(peaks) > 0  # some maps were not zero


def test_top_neurons_and_support(store: Store, ref: Ref, config: str) -> None:
    support = ref.support(config)
    for cls_index, table in support.items():
        cid = ref.class_ids()[cls_index]
        got = store.top_neurons(cid, config, limit=1000)
        assert_close_map({n.neuron: (n.support, n.mean_contribution) for n in got}, table)
        assert [n.support for n in got] == sorted((n.support for n in got), reverse=True)


def test_similarity_matrix(store: Store, ref: Ref, config: str) -> None:
    support = ref.support(config)
    sim = store.similarity_matrix(ref.model_id, config, 0.5)
    k = ref.manifest.model.num_classes
    sets = [{n for n, (s, _) in support.get(i, {}).items() if s >= 0.5} for i in range(k)]
    w = [{n: s * abs(m) for n, (s, m) in support.get(i, {}).items()} for i in range(k)]
    for i, j in itertools.product(range(k), repeat=2):
        union = sets[i] | sets[j]
        assert sim.jaccard[i, j] == pytest.approx(len(sets[i] & sets[j]) / len(union) if union else 1.0)
        keys = w[i].keys() | w[j].keys()
        den = sum(max(w[i].get(n, 0), w[j].get(n, 0)) for n in keys)
        num = sum(min(w[i].get(n, 0), w[j].get(n, 0)) for n in keys)
        assert sim.weighted[i, j] == pytest.approx(num / den if den else 1.0)


def test_shared_pathways_and_signature(store: Store, ref: Ref, config: str) -> None:
    support = ref.support(config)
    a, b = sorted(support)[:2]
    ids = ref.class_ids()
    res = store.shared_pathways(ids[a], ids[b], config, 0.5)
    sa = {n for n, (s, _) in support[a].items() if s >= 0.5}
    sb = {n for n, (s, _) in support[b].items() if s >= 0.5}
    assert {x.neuron for x, _ in res.shared} == sa & sb
    assert {x.neuron for x in res.only_a} == sa - sb
    assert {x.neuron for x in res.only_b} == sb - sa
    for o in res.per_layer:
        assert o.shared == sum(1 for n in sa & sb if n.split("/")[1] == o.site)
    # edge support recomputed per class with networkx
    def edge_support(c: int, floor: float) -> dict[tuple[str, str], float]:
        pws = [p for p in ref.of_config(config) if p.target == c and ref.images[p.image_id].kind == "original"]
        g = nx.DiGraph()
        for p in pws:
            for e in ref.edges(p):
                g.add_edge(*e, k=g.edges[e]["k"] + 1 if g.has_edge(*e) else 1)
        return {(u, v): d["k"] / len(pws) for u, v, d in g.edges(data=True) if d["k"] / len(pws) >= floor}

    # every edge of a class is stored: a low floor reads as exactly as a high one
    for floor in (0.5, 0.02):
        ea, eb = edge_support(a, floor), edge_support(b, floor)
        got = store.shared_pathways(ids[a], ids[b], config, floor).shared_edges
        assert {(s, d) for s, d, _, _ in got} == ea.keys() & eb.keys()
        assert all(sa_ == pytest.approx(ea[(s, d)]) and sb_ == pytest.approx(eb[(s, d)]) for s, d, sa_, sb_ in got)
    sig = store.class_signature(ids[a], config, 0.5, 0.2)
    want = set()
    for n, (s, _) in support[a].items():
        others = [support.get(c, {}).get(n, (0.0, 0.0))[0] for c in range(len(ids)) if c != a]
        if s >= 0.5 and max(others) <= 0.2:
            want.add(n)
    assert {x.neuron for x in sig} == want


def test_adversarial_shift_and_hijacks(store: Store, ref: Ref, config: str) -> None:
    pairs = ref.pairs(config, "pgd")
    assert pairs
    for im, pv, po in pairs[:6]:
        shift = store.adversarial_shift(im.image_id, config)
        nv, no = ref.neurons(pv), ref.neurons(po)
        assert {c.neuron for c in shift.kept} == nv.keys() & no.keys()
        assert {c.neuron for c in shift.lost} == no.keys() - nv.keys()
        assert {c.neuron for c in shift.gained} == nv.keys() - no.keys()
        for c in shift.kept:
            assert c.delta == pytest.approx(nv[c.neuron][1] - no[c.neuron][1], rel=1e-5, abs=1e-6)
        first = None
        for site in range(len(ref.manifest.model.sites)):
            a = {n for n, v in no.items() if v[0] == site}
            b = {n for n, v in nv.items() if v[0] == site}
            if a != b:
                first = site
                break
        assert shift.first_change == first
    counts = ref.hijack_counts(config, "pgd")
    got = store.hijacked_neurons(ref.model_id, config, "pgd", limit=1000)
    assert {h.neuron: h.count for h in got} == dict(counts)
    assert all(h.share == pytest.approx(h.count / len(pairs)) for h in got)
    label = pairs[0][0].label
    mine = [(pv, po) for im, pv, po in pairs if ref.images[po.image_id].label == label]
    want = Counter(n for pv, po in mine for n in set(ref.neurons(pv)) - set(ref.neurons(po)))
    got_label = store.hijacked_neurons(ref.model_id, config, "pgd", label=label, limit=1000)
    assert {h.neuron: h.count for h in got_label} == dict(want)
    assert all(h.share == pytest.approx(h.count / len(mine)) for h in got_label)


def test_variant_overlap_counts_and_accuracy(store: Store, ref: Ref, config: str) -> None:
    rows = store.variant_overlap(ref.model_id, config, "occlude")
    pairs = ref.pairs(config, "occlude")
    assert pairs and len(rows) == len(ref.manifest.model.sites) * len({im.sweep for im, _, _ in pairs})
    for r in rows:
        vals = []
        for _, pv, po in pairs:
            a = {n for n, v in ref.neurons(po).items() if v[0] == r.layer_index}
            b = {n for n, v in ref.neurons(pv).items() if v[0] == r.layer_index}
            vals.append(len(a & b) / len(a | b) if a | b else 1.0)
        assert r.mean_jaccard == pytest.approx(float(np.mean(vals)))
        assert r.pairs == len(pairs)
    counts = store.pathway_counts(config)
    assert {c.kind for c in counts} == {ref.images[p.image_id].kind for p in ref.of_config(config)}
    for c in counts:
        pws = [p for p in ref.of_config(config) if ref.images[p.image_id].kind == c.kind
               and ref.images[p.image_id].sweep == c.sweep]
        assert pws
        per = [int(np.sum(p.neuron_site == c.layer_index)) for p in pws]
        per = [x for x in per if x > 0]
        assert c.mean_neurons == pytest.approx(float(np.mean(per)))
    acc = {(r["kind"], r["sweep"]): (r["images"], r["accuracy"]) for r in store.accuracy_by_variant(ref.model_id)}
    assert acc and set(acc) == set(ref.accuracy_by_variant())
    assert_close_map(acc, ref.accuracy_by_variant())


def test_similar_images_and_method_agreement(store: Store, ref: Ref, config: str) -> None:
    original = next(i for i in ref.images.values() if i.kind == "original")
    mine = ref.neurons(ref.pathway(original.image_id, config))
    want = {}
    for p in ref.of_config(config):
        if p.image_id != original.image_id:
            other = ref.neurons(p)
            inter = len(mine.keys() & other.keys())
            if inter:
                want[p.image_id] = inter / len(mine.keys() | other.keys())
    got = store.similar_images(original.image_id, config, limit=10_000)
    assert {s.image_id: s.jaccard for s in got} == pytest.approx(want)
    # the vector-index route: exact Jaccard of its candidates, and the same top-10 values as the scan
    indexed = store.similar_images(original.image_id, config, limit=10, exact=False)
    assert len(indexed) == 10
    assert {r.image_id: r.jaccard for r in indexed} == pytest.approx({r.image_id: want[r.image_id] for r in indexed})
    assert [r.jaccard for r in indexed] == pytest.approx(sorted(want.values(), reverse=True)[:10])
    auto = store.similar_images(original.image_id, config, limit=10)  # either route: the same Jaccard values
    assert [s.jaccard for s in auto] == pytest.approx([s.jaccard for s in got[:10]])
    agreement = store.method_agreement(original.image_id)
    pws = [p for p in ref.pathways if p.image_id == original.image_id]
    assert len(agreement) == len(pws) * (len(pws) - 1) // 2
    by = {p.config: set(ref.neurons(p)) for p in pws}
    for a in agreement:
        x, y = by[a.config_a], by[a.config_b]
        assert a.jaccard == pytest.approx(len(x & y) / len(x | y))


def test_unknown_ids_give_not_found(store: Store, config: str) -> None:
    with pytest.raises(NotFound, match="unknown image"):
        store.image("no-such-image")
    for exact in (True, False, None):  # every route of similar_images tells a missing image from no neighbours
        with pytest.raises(NotFound, match="unknown image"):
            store.similar_images("no-such-image", config, exact=exact)
    with pytest.raises(NotFound, match="unknown class"):
        store.top_neurons("nope/1", config)
    with pytest.raises(NotFound, match="unknown pathway"):
        store.pathway_graph("x' OR 1=1 //")


def test_export_graphml_and_gexf(store: Store, ref: Ref, tmp_path: Path) -> None:
    pws = ref.pathways[:3]
    want = nx.compose_all([pathway_to_networkx(p, ref.manifest.model) for p in pws])  # from the records
    assert want.number_of_edges() > 0
    export_pathways(store, [p.pathway_id for p in pws], tmp_path / "p.graphml")
    export_pathways(store, [p.pathway_id for p in pws], tmp_path / "p.gexf")
    with pytest.raises(GraphStoreError, match=r"use \.graphml or \.gexf"):
        export_pathways(store, [pws[0].pathway_id], tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()
    for back in (nx.read_graphml(tmp_path / "p.graphml"), nx.read_gexf(tmp_path / "p.gexf")):
        assert set(back.nodes) == set(want.nodes)
        assert set(back.edges) == set(want.edges)
    back = nx.read_graphml(tmp_path / "p.graphml")
    for n, data in want.nodes(data=True):  # each neuron's channel and site as the records say
        assert int(back.nodes[n]["channel"]) == data["channel"] and back.nodes[n]["site"] == data["site"]
    one = pathway_to_networkx(pws[0], ref.manifest.model)
    assert one.number_of_edges() > 0
    export_pathways(store, [pws[0].pathway_id], tmp_path / "one.gexf")
    back = nx.read_gexf(tmp_path / "one.gexf")
    assert set(back.edges) == set(one.edges)
    for u, v, data in one.edges(data=True):  # weights and the pathway of each edge, as recorded
        assert float(back.edges[u, v]["weight"]) == pytest.approx(data["weight"], rel=1e-6)
        assert back.edges[u, v]["pathway"] == pws[0].pathway_id


def _env(neo4j_server: ServerConfig) -> dict[str, str]:
    return dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
                NEO4J_PASSWORD=read_password(neo4j_server))


def test_killed_load_then_rerun_gives_clean_counts(driver: Driver, neo4j_server: ServerConfig, fixture_run: Path,
                                                   ref: Ref) -> None:
    wipe(driver)
    env = _env(neo4j_server)
    for delay in (2.5, 4.0, 5.5):
        proc = subprocess.Popen([sys.executable, "-m", "pathx.cli", "load", str(fixture_run)], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # no half pathway: every pathway present has all its INCLUDES and FLOWS_TO
    with driver.session(database="neo4j") as s:
        rows = s.run("MATCH (p:Pathway) OPTIONAL MATCH (p)-[i:INCLUDES]->() "
                     "RETURN p.id AS id, p.size AS size, count(i) AS n").data()
    for r in rows:
        assert r["n"] == r["size"], r["id"]
    done = subprocess.run([sys.executable, "-m", "pathx.cli", "load", str(fixture_run)], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert Store(driver).counts() == ref.counts()


NASTY = ["it's \"quoted\"", "back\\slash", "'}) MATCH (n) DETACH DELETE n //", "RETURN 1; DROP", "ünï ✓"]


def test_hostile_class_names_round_trip(empty_store: Driver, tmp_path: Path) -> None:
    from extractor.inputs import TensorImages
    from extractor.models import make_bundle
    from extractor.pipeline import extract_run
    from extractor.settings import PathwaySettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, len(NASTY)))
    bundle = make_bundle(model=model, arch="tiny", input_shape=(1, 6, 6), class_names=NASTY)
    imgs = TensorImages(torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 3]), [f"x{i}" for i in range(4)])
    extract_run(bundle, imgs, [PathwaySettings(k=2)], [], tmp_path / "run", progress=False)
    load_run(empty_store, tmp_path / "run", progress=False)
    store = Store(empty_store)
    assert [c.name for c in store.classes(bundle.info.model_id)] == NASTY
    nodes, _ = store.counts()
    assert nodes["Image"] == 4
    for name in NASTY:
        with pytest.raises(NotFound):
            store.image(name)
        with pytest.raises(NotFound):
            store.top_neurons(name, "any")
    assert store.counts()[0] == nodes


def test_accuracy_by_class_hijack_strength_and_neuron_images(store: Store, ref: Ref, config: str) -> None:
    by_class: dict[int, list[bool]] = {}
    for im in ref.images.values():
        if im.kind == "original":
            by_class.setdefault(im.label, []).append(im.predicted == im.label)
    got = {r["class_index"]: (r["images"], r["accuracy"]) for r in store.accuracy_by_class(ref.model_id)}
    assert_close_map(got, {c: (len(v), float(np.mean(v))) for c, v in by_class.items()})
    # hijacks per attack strength
    pairs = ref.pairs(config, "pgd")
    per_sweep: dict[str, list[set[str]]] = {}
    for im, pv, po in pairs:
        per_sweep.setdefault(im.sweep, []).append(set(ref.neurons(pv)) - set(ref.neurons(po)))
    for h in store.hijacked_neurons(ref.model_id, config, "pgd", limit=1000):
        for sweep, share in h.by_sweep.items():
            gained = per_sweep[sweep]
            assert share == pytest.approx(sum(h.neuron in g for g in gained) / len(gained))
    # images that use a neuron most, by |contribution|
    pw = ref.of_config(config)[0]
    neuron = next(iter(ref.neurons(pw)))
    uses = sorted(((abs(ref.neurons(p)[neuron][1]), p.image_id) for p in ref.of_config(config)
                   if neuron in ref.neurons(p)), reverse=True)
    top = store.neuron_top_images(neuron, config, limit=5)
    assert [abs(r["contribution"]) for r in top] == pytest.approx([u[0] for u in uses[:5]], rel=1e-5)
    detail = store.neuron(neuron, config)
    support = ref.support(config)
    want = {c: t[neuron][0] for c, t in support.items() if neuron in t}
    assert {c["class_index"]: c["support"] for c in detail["classes"]} == pytest.approx(want)


def test_layer_agreement_and_class_consistency(store: Store, ref: Ref) -> None:
    by_method = {p.method: p.config for p in ref.pathways}
    rows = store.layer_agreement(ref.model_id, by_method["correlation"], by_method["precision"])
    originals = [i for i in ref.images.values() if i.kind == "original"]
    for r in rows:
        inter = sizes = 0
        jac = []
        for im in originals:
            a = {n for n, v in ref.neurons(ref.pathway(im.image_id, by_method["correlation"])).items()
                 if v[0] == r.layer_index}
            b = {n for n, v in ref.neurons(ref.pathway(im.image_id, by_method["precision"])).items()
                 if v[0] == r.layer_index}
            inter += len(a & b)
            sizes += len(a) + len(b)
            jac.append(len(a & b) / len(a | b) if a | b else 1.0)
        assert r.overlap == pytest.approx(inter / sizes) and r.jaccard == pytest.approx(float(np.mean(jac)))
        assert r.images == len(originals) and r.overlap <= 0.5
    cons = store.class_consistency(ref.model_id, by_method["pixel"])
    for c in cons:
        sets = [({n for n, v in ref.neurons(ref.pathway(im.image_id, by_method["pixel"])).items()
                  if v[0] == c.layer_index}, im.label) for im in sorted(originals, key=lambda i: i.image_id)]
        within: list[float] = []
        across: list[float] = []
        for (a, la), (b, lb) in itertools.combinations(sets, 2):
            (within if la == lb else across).append(len(a & b) / len(a | b) if a | b else 1.0)
        assert c.within == pytest.approx(float(np.mean(within))) and c.across == pytest.approx(float(np.mean(across)))


def test_what_the_pages_draw_comes_from_the_store(store: Store, ref: Ref, config: str) -> None:
    """Variant kinds, the perturbation picture and the merged graphs of the Adversarial and Compare pages."""
    kinds = {im.kind for im in ref.images.values() if im.variant_of}
    assert set(store.variant_kinds(ref.model_id)) == kinds and len(kinds) >= 2
    assert set(store.variant_kinds(ref.model_id, attacks=True)) == {k for k in kinds if k in ("fgsm", "pgd")}
    im, pv, po = next((im, pv, po) for im, pv, po in ref.pairs(config) if im.kind in ("fgsm", "pgd"))
    assert im.variant_of is not None
    change = store.perturbation(im.variant_of, im.image_id)
    a = np.asarray(Image.open(io.BytesIO(ref.images[im.variant_of].png)), dtype=np.float32)
    b = np.asarray(Image.open(io.BytesIO(im.png)), dtype=np.float32)
    lim = float(np.abs(b - a).max())
    assert lim > 0 and change.max_abs == pytest.approx(lim / 255)
    pic = np.asarray(Image.open(io.BytesIO(change.png)), dtype=np.float32)
    np.testing.assert_allclose(pic, ((b - a) / lim * 127 + 128).clip(0, 255).astype(np.uint8))
    shift = store.adversarial_shift(im.image_id, config)
    drawn = store.shift_graph(shift, po.pathway_id, pv.pathway_id)
    no, nv = ref.neurons(po), ref.neurons(pv)
    assert set(drawn.graph.nodes) == no.keys() | nv.keys()
    assert {n for n, g in drawn.groups.items() if g == "kept"} == no.keys() & nv.keys()
    assert {n for n, g in drawn.groups.items() if g == "gained"} == nv.keys() - no.keys()
    assert set(drawn.graph.edges) == ref.edges(po).keys() | ref.edges(pv).keys()
    classes = ref.class_ids()
    shared = store.shared_pathways(classes[0], classes[1], config, 0.3)
    both = store.shared_graph(shared)
    assert {n for n, g in both.groups.items() if g == "shared"} == {a.neuron for a, _ in shared.shared}
    assert len(both.groups) == len(shared.shared) + len(shared.only_a) + len(shared.only_b) > 0
    for na, nb in shared.shared:
        assert both.graph.nodes[na.neuron]["contribution"] == pytest.approx(
            (na.mean_contribution + nb.mean_contribution) / 2)


def test_a_transformer_run_holds_direct_edges_and_says_so(empty_store: Driver, tmp_path: Path) -> None:
    """``--edges auto`` on a model with attention: direct edges, named in the pathway id, the setting's name,
    the pathway graph and the records (``tests/test_edge_modes.py`` holds their values to a reference)."""
    import pathx
    from graphstore.names import setting_name
    from records import read_run
    from tests.test_junctions import _small

    torch.manual_seed(0)
    images = (torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2]))
    runs = {mode: pathx.extract(_small("vit"), images, tmp_path / mode, input_size=32, top_k=4, exemplars=0,
                                progress=False, **({"edges": mode} if mode != "auto" else {}))
            for mode in ("auto", "exact")}
    manifest, _, pathways = read_run(runs["auto"].path)
    _, _, exact = read_run(runs["exact"].path)
    assert len(pathways) == 3 and all('"edges": "direct"' in p.params for p in pathways)
    assert all('"edges":' not in p.params for p in exact) and {p.config for p in exact}.isdisjoint(
        {p.config for p in pathways})
    assert any(len(p.edge_weight) != len(q.edge_weight) or not np.allclose(p.edge_weight, q.edge_weight)
               for p, q in zip(pathways, exact, strict=True))  # the modes differ on a ViT
    load_run(empty_store, runs["auto"].path, progress=False)
    store = Store(empty_store)
    for pw in pathways:
        graph = store.pathway_graph(pw.pathway_id)
        assert graph.graph["edge_mode"] == "direct" and graph.graph["edges_name"].startswith("direct edges")
        assert set(graph.edges) == set(pathway_to_networkx(pw, manifest.model).edges) and graph.number_of_edges()
    info = store.pathway_of(pathways[0].image_id, pathways[0].config)
    assert "direct edges" in setting_name(info.method, info.selection, info.params)
