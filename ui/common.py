"""Shared view helpers of the Streamlit app: the store handle, the sidebar context, drawing.

Nothing here analyses: numbers come from ``graphstore.api.Store``; this module only turns
them into DOT text, Plotly figures and widgets. Graphs render offline (Streamlit's bundled
Graphviz and Plotly; no CDN).
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import networkx as nx
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image, ImageDraw

from graphstore.api import Store
from graphstore.errors import GraphStoreError
from graphstore.names import number
from graphstore.results import ConfigInfo

COLORS = {"kept": "#4c78a8", "lost": "#e45756", "gained": "#54a24b", "a": "#f58518", "b": "#4c78a8",
          "shared": "#72b7b2", "node": "#4c78a8"}


@st.cache_resource(show_spinner=False)
def _store() -> Store:
    return Store.connect()  # NEO4J_URI / NEO4J_DATABASE, or the local server


def store() -> Store:
    """The shared ``Store``; stops the page with a clear message when Neo4j cannot be reached."""
    try:
        return _store()
    except GraphStoreError as exc:
        st.error(str(exc))
        st.stop()
        raise


def context() -> tuple[str, str]:
    """Sidebar pickers for the model and the pathway setting; returns their ids."""
    s = store()
    models = [m["id"] for m in s.models()]
    if not models:
        st.info("The store is empty. Load a run with `pathx load RUN_DIR` (or run `make demo`).")
        st.stop()
    model_id = st.sidebar.selectbox("Model", models, key="model")
    configs = s.configs(model_id)
    if not configs:
        st.info("This model has no pathways yet.")
        st.stop()
    labels = {c.config: f"{c.name} ({c.pathways:,} pathways)" for c in configs}
    config = st.sidebar.selectbox("Pathway setting", list(labels), format_func=labels.__getitem__, key="config")
    st.sidebar.caption(f"setting id `{config}`")
    return str(model_id), str(config)


def config_info(model_id: str, config: str) -> ConfigInfo:
    """The chosen setting's description (method, selection rule, readable name)."""
    return next(c for c in store().configs(model_id) if c.config == config)


def setting_names(model_id: str) -> dict[str, str]:
    """Setting id -> readable name, for tables and legends."""
    return {c.config: c.name for c in store().configs(model_id)}


def layer_depths(model_id: str) -> dict[int, int]:
    """Layer index -> depth in the site graph (columns of the pathway drawings)."""
    return {int(r["index"]): int(r["depth"] or 0) for r in store().layers(model_id)}


def patch(png: bytes, box: Sequence[int], size: int = 96) -> Image.Image:
    """The image cropped around ``box`` (y0, x0, y1, x1; half-open) with a margin, enlarged to about
    ``size`` pixels, the box outlined in red."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    y0, x0, y1, x1 = (int(v) for v in box)
    m = max(2, (y1 - y0) // 4, (x1 - x0) // 4)
    top, left = max(0, y0 - m), max(0, x0 - m)
    bottom, right = min(img.height, y1 + m), min(img.width, x1 + m)
    crop = img.crop((left, top, right, bottom))
    scale = max(1, round(size / max(crop.width, crop.height)))
    crop = crop.resize((crop.width * scale, crop.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(crop)
    draw.rectangle([(x0 - left) * scale, (y0 - top) * scale, (x1 - left) * scale - 1, (y1 - top) * scale - 1],
                   outline=(228, 87, 86), width=max(1, scale // 3))
    return crop


EXEMPLAR_TITLES = {"activation": "Images that excite it most (activation)",
                   "contribution": "Images whose pathway it serves most (contribution)"}


def neuron_card(neuron_id: str, config: str, key: str) -> None:
    """A neuron's card: exemplar patches, class support, strongest edges, attack effects."""
    card = store().neuron_card(neuron_id, config)
    with st.container(border=True, key=f"card_{key}"):
        st.markdown(f"**Neuron {short(neuron_id)}** · site `{card.site}`, channel {card.channel}")
        for kind, title in EXEMPLAR_TITLES.items():
            shown = [e for e in card.exemplars if e.kind == kind]
            st.caption(title)
            if shown:
                st.image([patch(e.png, e.box) for e in shown], width=88,
                         caption=[f"#{e.rank} · {number(e.value)}" for e in shown])
            else:
                st.write("none: it is not positive on any original image of the loaded runs")
        c1, c2 = st.columns(2)
        with c1:
            st.caption("Classes whose pathways use it (support)")
            st.dataframe(pd.DataFrame([{"class": c["class_name"], "support": c["support"],
                                        "mean contribution": c["mean_contribution"]} for c in card.classes]),
                         hide_index=True, key=f"{key}_classes")
            if card.attacks:
                st.caption("Attacked or varied images whose pathway gains / loses it")
                st.dataframe(pd.DataFrame([{"variant": a.name, "pairs": a.pairs, "gained": a.gained,
                                            "lost": a.lost} for a in card.attacks]), hide_index=True,
                             key=f"{key}_attacks")
        with c2:
            for title, edges in (("Strongest incoming edges", card.incoming),
                                 ("Strongest outgoing edges", card.outgoing)):
                st.caption(title + " (class aggregates)")
                st.dataframe(pd.DataFrame([{"neuron": short(e.neuron), "class": e.class_name,
                                            "support": e.support, "mean weight": e.mean_weight} for e in edges]),
                             hide_index=True, key=f"{key}_{title.split()[1]}")


def table(rows: Any) -> pd.DataFrame:
    """Dataclasses or dicts as a DataFrame."""
    items = [asdict(r) if is_dataclass(r) and not isinstance(r, type) else dict(r) for r in rows]
    frame = pd.DataFrame(items)
    for col in frame.select_dtypes("float").columns:
        frame[col] = frame[col] + 0.0  # -0.0 + 0.0 == 0.0: no "-0" on screen
    return frame


def class_names(model_id: str) -> dict[int, str]:
    return {c.index: c.name for c in store().classes(model_id)}


def short(neuron_id: str) -> str:
    """``model/site/channel`` -> ``site/channel`` for labels."""
    return neuron_id.split("/", 1)[-1]


def pathway_dot(
    graph: nx.DiGraph,
    colors: Mapping[str, str] | None = None,
    max_edges: int = 300,
    title: str = "",
    depths: Mapping[int, int] | None = None,
) -> str:
    """A layered DOT drawing of the site graph: one column per depth (``depths``: layer index ->
    depth in the site graph; default one column per layer), parallel branches in the same column,
    node size ~ |contribution|, pen ~ |weight|.

    Only the ``max_edges`` strongest edges are drawn so large pathways stay readable.
    """
    colors = colors or {}
    nodes = list(graph.nodes(data=True))
    cmax = max((abs(d.get("contribution") or 0.0) for _, d in nodes), default=0.0) or 1.0
    edges = sorted(graph.edges(data=True), key=lambda e: -abs(e[2].get("weight", 0.0)))[:max_edges]
    wmax = max((abs(e[2].get("weight", 0.0)) for e in edges), default=1.0) or 1.0
    layers: dict[int, list[tuple[str, dict[str, Any]]]] = {}  # depth -> nodes
    for n, d in nodes:
        li = int(d.get("layer_index", 0))
        layers.setdefault(int(depths.get(li, li)) if depths is not None else li, []).append((n, d))
    lines = ["digraph P {", 'rankdir=LR; splines=false; nodesep=0.08; ranksep=1.1; bgcolor="transparent";',
             'node [shape=circle, style=filled, fontname="Helvetica", fontsize=8, fixedsize=true, label=""];',
             'edge [arrowsize=0.3];']
    if title:
        lines.append(f'label="{html.escape(title)}"; labelloc=t; fontname="Helvetica";')
    for li in sorted(layers):
        sites = list(dict.fromkeys(str(d.get("site", li)) for _, d in
                                   sorted(layers[li], key=lambda t: int(t[1].get("layer_index", 0)))))
        label = sites[0] if len(sites) == 1 else f"{len(sites)} branches: " + ", ".join(sites[:3]) + \
            (", …" if len(sites) > 3 else "")
        lines.append(f'subgraph cluster_{li} {{ label="{html.escape(label)}"; fontsize=9; color="#dddddd"; '
                     'rank=same;')
        for n, d in sorted(layers[li], key=lambda t: (int(t[1].get("layer_index", 0)), int(t[1].get("channel", 0)))):
            size = 0.18 + 0.42 * abs(d.get("contribution") or 0.0) / cmax
            color = colors.get(n, COLORS["node"])
            tip = html.escape(f"{short(n)} contribution {number(d.get('contribution', 0.0), 4)}")
            lines.append(f'"{html.escape(n)}" [width={size:.2f}, fillcolor="{color}", tooltip="{tip}", '
                         f'xlabel="{int(d.get("channel", 0))}"];')
        lines.append("}")
    for u, v, d in edges:
        w = float(d.get("weight", 0.0))
        pen = 0.3 + 3.0 * abs(w) / wmax
        color = "#e45756" if w < 0 else "#555555"
        lines.append(f'"{html.escape(u)}" -> "{html.escape(v)}" [penwidth={pen:.2f}, color="{color}80"];')
    lines.append("}")
    return "\n".join(lines)


def saliency_figure(saliency: Any, title: str = "Pathway Gradient") -> go.Figure:
    """Signed saliency (a numpy array ``[H, W]``) as a diverging heatmap (image orientation)."""
    lim = float(abs(saliency).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=saliency, zmin=-lim, zmax=lim, colorscale="RdBu_r", showscale=True))
    fig.update_layout(title=title, height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      yaxis={"autorange": "reversed", "scaleanchor": "x"}, xaxis={"visible": False})
    fig.update_yaxes(visible=False)
    return fig


def heatmap_figure(matrix: Any, labels: list[str], title: str) -> go.Figure:
    """A ``[K, K]`` numpy matrix in [0, 1] as a labelled heatmap."""
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Viridis", zmin=0, zmax=1,
                               text=matrix.round(2), texttemplate="%{text}"))
    fig.update_layout(title=title, height=480, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      yaxis={"autorange": "reversed"})
    return fig
