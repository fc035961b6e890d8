"""Each page under ``streamlit.testing``: widgets present and shown values equal the query layer's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from streamlit.testing.v1 import AppTest

from graphstore.api import Store
from graphstore.names import number
from graphstore.server import USER, read_password

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

pytestmark = pytest.mark.store
UI = Path(__file__).resolve().parent.parent / "ui"


@pytest.fixture()
def app(loaded_store: Driver, neo4j_server: ServerConfig, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("NEO4J_URI", neo4j_server.bolt_uri)
    monkeypatch.setenv("NEO4J_USER", USER)
    monkeypatch.setenv("NEO4J_PASSWORD", read_password(neo4j_server))
    return Store(loaded_store)


def open_page(name: str) -> AppTest:
    at = AppTest.from_file(str(UI / "app.py"), default_timeout=120).run()
    if name != "overview":
        at.switch_page(str(UI / "views" / f"{name}.py")).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def card_images(at: AppTest) -> list[str]:
    """The exemplar patches the page's neuron cards draw (captioned "#rank · value")."""
    return [c for group in at.get("image") for c in getattr(group, "captions", []) if c.startswith("#")]


def chosen(at: AppTest, key: str) -> Any:
    """The value a select box holds (a page always has one chosen)."""
    value = at.selectbox(key=key).value
    assert value is not None, key
    return value


def assert_no_json(at: AppTest) -> None:
    """Setting and variant names read as words: no JSON in selectbox options, captions or tables."""
    texts = [o for sb in at.selectbox for o in sb.options] + [c.value for c in at.caption]
    texts += [str(v) for df in at.dataframe for col in df.value.columns for v in df.value[col].tolist()]
    assert not [t for t in texts if '{"' in t or "{'" in t], [t for t in texts if "{" in t][:3]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_overview(app: Store) -> None:
    at = open_page("overview")
    s = app.summary()
    got = metrics(at)
    assert got["Images"] == f"{s.images:,}" and got["Pathways"] == f"{s.pathways:,}"
    assert got["Edges"] == f"{s.edges:,}" and got["Classes"] == f"{s.classes:,}"
    assert len(at.get("plotly_chart")) >= 2


def test_image_page(app: Store) -> None:
    at = open_page("image")
    model = chosen(at, "model")
    config = chosen(at, "config")
    image_id = chosen(at, "img_id")
    detail = app.image(image_id)
    names = {c.index: c.name for c in app.classes(model)}
    assert metrics(at)["Prediction"] == names[detail.predicted]
    pathway = app.pathway_of(image_id, config)
    assert metrics(at)["Masked logit / full logit"] == number(pathway.logit_ratio)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    graph = next(f for f in specs if any("customdata" in t for t in f["data"]))  # the pathway graph
    nodes = next(t for t in graph["data"] if t.get("mode") == "markers")
    saliency = next(f for f in specs if any(t["type"] == "heatmap" for t in f["data"]))
    assert any(t["type"] == "image" for t in saliency["data"])  # the map lies over the photo
    assert sorted(nodes["customdata"]) == sorted(app.pathway_graph(pathway.id).nodes)
    assert len(nodes["customdata"]) == pathway.size
    # the neuron card: the selected neuron's exemplar patches, as the store holds them
    neuron = chosen(at, "img_neuron")
    card = app.neuron_card(neuron, config)
    assert card.exemplars and len(card_images(at)) == len(card.exemplars)
    assert_no_json(at)
    at.selectbox(key="img_kind").set_value("pgd").run()
    assert not at.exception
    assert app.image(chosen(at, "img_id")).kind == "pgd"


def test_image_page_setting_without_variant_pathways(app: Store) -> None:
    at = open_page("image")
    pixel = next(c.config for c in app.configs(chosen(at, "model")) if c.method == "pixel")
    at.selectbox(key="config").set_value(pixel).run()
    assert not at.exception and metrics(at)["Prediction"]
    at.selectbox(key="img_kind").set_value("fgsm").run()
    assert not at.exception
    assert at.info and "originals only" in at.info[0].value


def test_compare_page(app: Store) -> None:
    at = open_page("compare")
    model, config = chosen(at, "model"), chosen(at, "config")
    classes = {c.index: c.id for c in app.classes(model)}
    at.selectbox(key="cmp_a").set_value(2).run()
    at.selectbox(key="cmp_b").set_value(7).run()
    shared = app.shared_pathways(classes[2], classes[7], config, 0.5)
    got = metrics(at)
    assert got["Shared neurons"] == str(len(shared.shared))
    assert got["Shared edges"] == str(len(shared.shared_edges))
    assert at.get("plotly_chart")
    pick = chosen(at, "cmp_neuron")
    assert len(card_images(at)) == len(app.neuron_card(pick[1], config).exemplars) > 0
    assert_no_json(at)


def test_adversarial_page(app: Store) -> None:
    at = open_page("adversarial")
    model, config = chosen(at, "model"), chosen(at, "config")
    original = chosen(at, "adv_orig")
    pairs = [p for p in app.variant_pairs(model, config, "pgd") if p["original"] == original]
    first = pairs[0]
    shift = app.adversarial_shift(first["variant"], config)
    got = metrics(at)
    assert got["Kept"] == str(len(shift.kept)) and got["Lost"] == str(len(shift.lost))
    assert got["Gained"] == str(len(shift.gained))
    shown = [app.neuron_card(chosen(at, k) if k == "adv_hijack_neuron" else chosen(at, k)[1], config)
             for k in ("adv_neuron", "adv_hijack_neuron")]
    assert len(card_images(at)) == sum(len(c.exemplars) for c in shown) > 0
    assert_no_json(at)


def test_variants_page(app: Store) -> None:
    at = open_page("variants")
    model, config = chosen(at, "model"), chosen(at, "config")
    df = at.dataframe[0].value
    want = {o.name: o.prediction_changed for k in ("occlude", "shift", "deform", "affine")
            for o in app.variant_overlap(model, config, k)}
    got = {r.variant: r.prediction_changed for r in df.itertuples()}
    assert got == pytest.approx(want) and len(got) == 4
    assert_no_json(at)


def test_cypher_page(app: Store) -> None:
    at = open_page("cypher")
    at.selectbox(key="cy_example").set_value("Store contents").run()
    at.button(key="cy_run").click().run()
    df = at.dataframe[0].value
    nodes, _ = app.counts()
    assert dict(zip(df["label"], df["nodes"], strict=True)) == nodes
    key = next(t.key for t in at.text_area if t.key)
    at.text_area(key=key).set_value("CREATE (:Evil)").run()
    at.button(key="cy_run").click().run()
    assert at.error and "only read queries" in at.error[0].value
