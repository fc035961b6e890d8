"""Exemplars against a brute-force recomputation, boxes against gradient support, merging of parts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from extractor.batch import BatchInputs
from extractor.contributions import forward_with_sites
from extractor.exemplars import ReceptiveFields
from extractor.inputs import TensorImages
from extractor.methods import extract_batch
from extractor.pipeline import extract_run, image_id, load_images
from extractor.settings import PathwaySettings
from records import ExemplarRows, Shard, merge_exemplar_rows, read_exemplars

if TYPE_CHECKING:
    from neo4j import Driver

    from extractor.demo import DemoData
    from extractor.models import ModelBundle
    from graphstore.server import ServerConfig

N = 4
SETTINGS = [PathwaySettings(method="mct", selection="topk", k=3)]


@pytest.fixture(scope="module")
def digits(demo: tuple[ModelBundle, DemoData], home: Path) -> tuple[ModelBundle, torch.Tensor, list[str]]:
    bundle, _ = demo
    images = load_images("demo:test", bundle, home)
    assert isinstance(images, TensorImages)
    x = images.x[:26]
    return bundle, x, [image_id(v) for v in x]


def brute_force(bundle: ModelBundle, x: torch.Tensor,
                ids: list[str]) -> dict[tuple[int, int, str], list[tuple[str, float]]]:
    """Top-N per (site, channel, kind) from one pass over all images, with plain Python sorting."""
    with torch.no_grad():
        _, acts = forward_with_sites(bundle, x)
    res = extract_batch(bundle, x, SETTINGS[0], BatchInputs(keep_maps=True))
    want: dict[tuple[int, int, str], list[tuple[str, float]]] = {}
    for s, (a, e, m) in enumerate(zip(acts, res.contrib.element, res.sel.masks, strict=True)):
        peak = a.flatten(2).amax(-1) if a.dim() > 2 else a
        contrib = (e * m).flatten(2).sum(-1) if e.dim() > 2 else e * m
        for kind, table in (("activation", peak), ("contribution", contrib)):
            for c in range(table.shape[1]):
                cands = [(ids[b], float(table[b, c])) for b in range(len(ids)) if float(table[b, c]) > 0]
                cands.sort(key=lambda t: (-t[1], t[0]))
                if cands:
                    want[(s, c, kind)] = cands[:N]
    return want


def as_dict(rows: ExemplarRows) -> dict[tuple[int, int, str], list[tuple[str, float, int]]]:
    got: dict[tuple[int, int, str], list[tuple[str, float, int]]] = {}
    assert rows.rank is not None
    for i in np.argsort(rows.rank, kind="stable"):
        got.setdefault((int(rows.site[i]), int(rows.channel[i]), str(rows.kind[i])), []).append(
            (str(rows.image_id[i]), float(rows.value[i]), int(rows.rank[i])))
    return got


def test_exemplars_equal_brute_force_and_boxes_hold_the_support(digits: tuple, tmp_path: Path) -> None:
    bundle, x, ids = digits
    from extractor.inputs import TensorImages

    extract_run(bundle, TensorImages(x), SETTINGS, [], tmp_path / "run", batch_size=5, exemplars=N,
                progress=False)
    rows = read_exemplars(tmp_path / "run")
    got = as_dict(rows)
    want = brute_force(bundle, x, ids)
    assert len(got) == len(want) > 50
    assert {k[2] for k in got} == {"activation", "contribution"}
    for key, expect in want.items():
        have = got[key]
        assert [h[0] for h in have] == [e[0] for e in expect], key
        np.testing.assert_allclose([h[1] for h in have], [e[1] for e in expect], rtol=1e-4, atol=1e-6)
        assert [h[2] for h in have] == list(range(1, len(expect) + 1))
    # every box contains the support of d activation(position) / d input on its own image
    by_id = dict(zip(ids, x, strict=True))
    rng = np.random.default_rng(0)
    spatial = [i for i in range(len(rows)) if rows.y[i] >= 0]
    checked = 0
    for i in rng.choice(spatial, 40, replace=False):
        img = by_id[str(rows.image_id[i])][None].clone().requires_grad_(True)
        _, acts = forward_with_sites(bundle, img)
        grad = torch.autograd.grad(acts[int(rows.site[i])][0, int(rows.channel[i]), int(rows.y[i]), int(rows.x[i])],
                                   img)[0]
        support = (grad[0].abs().sum(0) > 0).nonzero()
        if len(support) == 0:
            continue
        y0, x0, y1, x1 = rows.box[i].tolist()
        assert y0 <= int(support[:, 0].min()) and int(support[:, 0].max()) < y1, (rows.site[i], rows.box[i])
        assert x0 <= int(support[:, 1].min()) and int(support[:, 1].max()) < x1
        checked += 1
    assert checked > 20
    # the boxes are receptive fields, not the whole image: the first site's are 3 x 3 (one 3x3 conv)
    first = rows.box[(rows.site == 0) & (rows.y > 0) & (rows.y < 31) & (rows.x > 0) & (rows.x < 31)]
    assert len(first) and set(map(tuple, first[:, 2:] - first[:, :2])) == {(3, 3)}


def test_receptive_fields_by_conv_arithmetic(demo: tuple) -> None:
    bundle, _ = demo
    rf = ReceptiveFields(bundle)
    # demo CNN: conv3 -> conv3 -> pool2 -> conv3 -> conv3 -> pool2: fields 3, 5, then 10 and 14 at stride 2
    assert [f.stride if f else None for f in rf.fields] == [(1, 1), (1, 1), (2, 2), (2, 2), None]
    sizes = [(f.box0[2] - f.box0[0]) for f in rf.fields if f]
    assert sizes == [3, 5, 10, 14]
    assert rf.boxes(4, np.array([-1]), np.array([-1])).tolist() == [[0, 0, 32, 32]]
    assert rf.boxes(0, np.array([0]), np.array([31])).tolist() == [[0, 30, 2, 32]]  # clipped at the border


def test_merging_halves_resumes_and_shards_equals_one_run(digits: tuple, tmp_path: Path) -> None:
    bundle, x, _ = digits
    from extractor.inputs import TensorImages

    images = TensorImages(x)
    extract_run(bundle, images, SETTINGS, [], tmp_path / "one", batch_size=4, exemplars=N, progress=False)
    extract_run(bundle, images, SETTINGS, [], tmp_path / "resumed", batch_size=4, limit=12, exemplars=N,
                progress=False)
    extract_run(bundle, images, SETTINGS, [], tmp_path / "resumed", batch_size=4, exemplars=N, progress=False)
    for i in range(2):
        extract_run(bundle, images, SETTINGS, [], tmp_path / "sharded", batch_size=4, exemplars=N,
                    shard=Shard(i, 2), progress=False)
    one = as_dict(read_exemplars(tmp_path / "one"))
    assert one
    for other in ("resumed", "sharded"):
        assert as_dict(read_exemplars(tmp_path / other)) == one, other
    # merging is order-independent and keeps one row per image
    rows = read_exemplars(tmp_path / "one")
    doubled = ExemplarRows.concat([rows, rows.take(np.arange(len(rows))[::-1])])
    assert as_dict(merge_exemplar_rows(doubled, N)) == one
    # memory O(channels x N): a part stores only rows that entered the running top-N
    parts = sorted((tmp_path / "one").glob("part-*/exemplars.parquet"))
    assert len(parts) == 7
    channels = sum(s.channels for s in bundle.sites)
    assert len(read_exemplars(tmp_path / "one")) <= 2 * channels * N


@pytest.mark.store
def test_exemplars_in_the_store_and_readme_query(loaded_store: Driver, fixture_run: Path) -> None:
    import re

    from graphstore.api import Store
    from graphstore.console import run_read_only
    from graphstore.loader import load_run
    from tests.reference import Ref

    rows = read_exemplars(fixture_run)
    store = Store(loaded_store)
    _, rels = store.counts()
    assert rels["EXEMPLAR"] == len(rows) > 0
    # loading again changes nothing (merged with what is stored, one row per neuron, kind and image)
    load_run(loaded_store, fixture_run, progress=False)
    assert store.counts()[1]["EXEMPLAR"] == len(rows)
    # README's query against a recomputation from the record files
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    query = re.search(r"(// the 9 images that most excite.*?ORDER BY neuron)\n", readme, re.S)
    assert query
    got = run_read_only(loaded_store, query.group(1), {}, timeout_s=30, max_rows=10_000)
    ref = Ref.load(fixture_run)
    model = ref.manifest.model
    names = {n: i for i, n in enumerate(model.class_names)}
    shared = set()
    for cfg in {p.config for p in ref.pathways}:
        sup = ref.support(cfg)
        a, b = sup.get(names["digit 3"], {}), sup.get(names["digit 8"], {})
        shared |= {n for n in a if a[n][0] >= 0.5 and n in b and b[n][0] >= 0.5}
    source = {i.image_id: i.source for i in ref.images.values()}
    want: dict[str, list[str]] = {}
    assert rows.rank is not None
    for i in np.argsort(rows.rank, kind="stable"):
        nid = f"{model.model_id}/{model.sites[int(rows.site[i])].site_id}/{int(rows.channel[i])}"
        if nid in shared and rows.kind[i] == "activation":
            want.setdefault(nid, []).append(source[str(rows.image_id[i])])
    assert want and {r["neuron"]: r["images"] for r in got.rows} == want
    assert all(len(v) <= 9 for v in want.values())
    # the neuron card reads the same rows
    nid = next(iter(want))
    card = store.neuron_card(nid, store.default_config(model.model_id))
    assert [e.source for e in card.exemplars if e.kind == "activation"] == want[nid]
    assert all(e.png.startswith(b"\x89PNG") for e in card.exemplars)
    assert card.classes and card.attacks and any(a.gained or a.lost for a in card.attacks)


@pytest.mark.store
def test_neuron_query_from_cli(loaded_store: Driver, neo4j_server: ServerConfig, fixture_run: Path) -> None:
    import json

    from typer.testing import CliRunner

    from graphstore.server import USER, read_password
    from pathx.cli import app

    rows = read_exemplars(fixture_run)
    from records import read_manifest

    model = read_manifest(fixture_run).model
    i = int(np.nonzero((rows.rank == 1) & (rows.kind == "activation"))[0][0])
    nid = f"{model.model_id}/{model.sites[int(rows.site[i])].site_id}/{int(rows.channel[i])}"
    env = {"NEO4J_URI": neo4j_server.bolt_uri, "NEO4J_USER": USER,
           "NEO4J_PASSWORD": read_password(neo4j_server)}
    res = CliRunner().invoke(app, ["query", "neuron", "--neuron", nid], env=env)
    assert res.exit_code == 0, res.output
    card = json.loads(res.stdout)
    assert card["neuron"] == nid and card["exemplars"][0]["image_id"] == rows.image_id[i]
    assert card["exemplars"][0]["box"] == rows.box[i].tolist() and card["exemplars"][0]["png"].endswith("bytes>")
    bad = CliRunner().invoke(app, ["query", "neuron", "--neuron", "nope"], env=env)
    assert bad.exit_code == 1 and "unknown neuron 'nope'" in bad.stderr
