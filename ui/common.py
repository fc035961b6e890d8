"""Shared view helpers of the Streamlit app: the store handle, the sidebar context, drawing.

Nothing here analyses: numbers come from ``graphstore.api.Store``; this module only turns
them into DOT text, Plotly figures and widgets. Graphs render offline (Streamlit's bundled
Graphviz and Plotly; no CDN).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image, ImageDraw

from graphstore.api import Store
from graphstore.errors import GraphStoreError
from graphstore.names import neuron_name, number
from graphstore.results import ConfigInfo, as_row

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
    """Sidebar pickers for the model (``?model=ID`` in the URL preselects it) and the pathway setting;
    returns their ids."""
    s = store()
    titles = {m["id"]: f"{m['title']} · {m['id'].rsplit('-', 1)[-1]}" for m in s.models()}
    if not titles:
        st.info("The store is empty. Load a run with `pathx load RUN_DIR` (or run `make demo`).")
        st.stop()
    ids = list(titles)
    asked = st.query_params.get("model")  # a link can name the model: /image?model=ID
    model_id = st.sidebar.selectbox("Model", ids, format_func=titles.__getitem__, key="model",
                                    index=ids.index(asked) if asked in ids else 0)
    configs = s.configs(model_id)
    if not configs:
        st.info("This model has no pathways yet.")
        st.stop()
    labels = {c.config: f"{c.name} ({c.pathways:,} pathways)" for c in configs}
    # first an MCT top-k setting where there is one: k neurons per site draw fast and read well on any network
    first = next((i for i, c in enumerate(configs) if c.selection == "topk" and c.method == "mct"), 0)
    config = st.sidebar.selectbox("Pathway setting", list(labels), format_func=labels.__getitem__, key="config",
                                  index=first)
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
        st.markdown(f"**Neuron {neuron_name(neuron_id)}** · site `{card.site}`, channel {card.channel}")
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
                st.dataframe(pd.DataFrame([{"neuron": neuron_name(e.neuron), "class": e.class_name,
                                            "support": e.support, "mean weight": e.mean_weight} for e in edges]),
                             hide_index=True, key=f"{key}_{title.split()[1]}")


def table(rows: Any) -> pd.DataFrame:
    """Dataclasses or dicts as a DataFrame."""
    frame = pd.DataFrame([as_row(r) for r in rows])
    for col in frame.select_dtypes("float").columns:
        frame[col] = frame[col] + 0.0  # -0.0 + 0.0 == 0.0: no "-0" on screen
    return frame


def class_names(model_id: str) -> dict[int, str]:
    return {c.index: c.name for c in store().classes(model_id)}


EDGE_BINS = 4  # edges drawn in this many width classes (one Plotly trace each)
LABEL_FONT = 11  # px: site labels on the pathway graph's axis


def pathway_figure(
    graph: nx.DiGraph,
    colors: Mapping[str, str] | None = None,
    max_edges: int = 300,
    title: str = "",
    depths: Mapping[int, int] | None = None,
) -> go.Figure:
    """The pathway laid out by depth, left to right: one column per depth in the site graph
    (``depths``: layer index -> depth; default one column per layer), a column's sites stacked in it
    (parallel branches), a site's neurons stacked in its block. Node size ~ |contribution|, edge
    width ~ |weight| (red = negative). Plotly's zoom and pan work on it; the site of each column is
    its axis label (thinned by Plotly where they would overlap, shown in full on zoom and in every
    node's hover). Only the ``max_edges`` strongest edges are drawn.
    """
    colors = colors or {}
    nodes = list(graph.nodes(data=True))
    columns: dict[int, dict[str, list[tuple[str, dict[str, Any]]]]] = {}  # depth -> site -> nodes
    for n, d in nodes:
        li = int(d.get("layer_index", 0))
        depth = int(depths.get(li, li)) if depths is not None else li
        columns.setdefault(depth, {}).setdefault(str(d.get("site", li)), []).append((n, d))
    pos: dict[str, tuple[str, float]] = {}
    labels: list[str] = []
    for depth in sorted(columns):
        sites = columns[depth]
        label = next(iter(sites)) if len(sites) == 1 else f"{len(sites)} branches: {', '.join(list(sites)[:2])}, …"
        label = f"{depth}. {label}"  # unique per column, in depth order
        labels.append(label)
        y = 0.0
        blocks = []
        for site in sorted(sites, key=lambda t: int(sites[t][0][1].get("layer_index", 0))):
            members = sorted(sites[site], key=lambda t: int(t[1].get("channel", 0)))
            blocks.append([(n, y + i) for i, (n, _) in enumerate(members)])
            y += len(members) + 1.5  # a gap between the sites of one column
        centre = (y - 1.5 - 1) / 2
        for block in blocks:
            for n, yy in block:
                pos[n] = (label, yy - centre)
    cmax = max((abs(d.get("contribution") or 0.0) for _, d in nodes), default=0.0) or 1.0
    edges = sorted(graph.edges(data=True), key=lambda e: -abs(e[2].get("weight", 0.0)))[:max_edges]
    wmax = max((abs(e[2].get("weight", 0.0)) for e in edges), default=1.0) or 1.0
    fig = go.Figure()
    for sign, color in ((1, "rgba(85,85,85,0.45)"), (-1, "rgba(228,87,86,0.55)")):
        for b in range(EDGE_BINS):
            xs: list[Any] = []
            ys: list[Any] = []
            for u, v, d in edges:
                w = float(d.get("weight", 0.0))
                if (w < 0) != (sign < 0) or min(EDGE_BINS - 1, int(EDGE_BINS * abs(w) / wmax)) != b:
                    continue
                if u in pos and v in pos:
                    xs += [pos[u][0], pos[v][0], None]
                    ys += [pos[u][1], pos[v][1], None]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                         line={"width": 0.5 + 3.0 * (b + 0.5) / EDGE_BINS, "color": color}))
    ordered = [(n, d) for n, d in nodes if n in pos]
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n, _ in ordered], y=[pos[n][1] for n, _ in ordered], mode="markers", showlegend=False,
        customdata=[n for n, _ in ordered],
        marker={"size": [6 + 16 * abs(d.get("contribution") or 0.0) / cmax for _, d in ordered],
                "color": [colors.get(n, COLORS["node"]) for n, _ in ordered], "line": {"width": 0.5, "color": "#fff"}},
        hovertext=[f"{neuron_name(n)}<br>contribution {number(d.get('contribution', 0.0), 4)}" for n, d in ordered],
        hoverinfo="text"))
    fig.update_layout(
        title=title or None, height=max(420, min(900, 40 + 14 * max((len(c) for c in columns.values()), default=1)
                                                  * max((len(v) for c in columns.values() for v in c.values()),
                                                        default=1))),
        margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 10}, dragmode="pan", plot_bgcolor="white",
        xaxis={"type": "category", "categoryorder": "array", "categoryarray": labels, "tickangle": -90,
               "tickfont": {"size": LABEL_FONT}, "showgrid": False, "automargin": True},
        yaxis={"visible": False, "showgrid": False, "zeroline": False})
    return fig


def saliency_figure(saliency: Any, title: str = "Pathway Gradient", png: bytes | None = None) -> go.Figure:
    """Signed saliency (a numpy array ``[H, W]``) as a diverging heatmap (image orientation); with the
    image's ``png``, laid over the photo (the map stretched to the image, faint where it is small). The
    colour scale ends at the 99th percentile of |saliency|, so a few extreme pixels do not wash out the rest."""
    magnitude = abs(saliency).ravel()
    lim = float(sorted(magnitude)[int(0.99 * (len(magnitude) - 1))]) or float(magnitude.max()) or 1.0
    h, w = saliency.shape
    fig = go.Figure()
    scale: str | list[list[object]] = "RdBu_r"
    if png is not None:
        img = Image.open(io.BytesIO(png))
        fig.add_trace(go.Image(source="data:image/png;base64," + base64.b64encode(png).decode(), x0=w / img.width / 2,
                               y0=h / img.height / 2,
                               dx=w / img.width, dy=h / img.height, hoverinfo="skip"))
        # transparent near 0, opaque blue/red at the extremes, so the photo shows where the map is small
        scale = [[0.0, "rgba(33,102,172,0.9)"], [0.3, "rgba(67,147,195,0.7)"], [0.44, "rgba(146,197,222,0.4)"],
                 [0.5, "rgba(247,247,247,0)"], [0.56, "rgba(244,165,130,0.4)"], [0.7, "rgba(214,96,77,0.7)"],
                 [1.0, "rgba(178,24,43,0.9)"]]
    fig.add_trace(go.Heatmap(z=saliency, zmin=-lim, zmax=lim, colorscale=scale, showscale=True, x0=0.5, dx=1,
                             colorbar={"tickformat": ".1e", "thickness": 12},
                             y0=0.5, dy=1, hovertemplate="%{z:.3g}<extra></extra>"))
    fig.update_layout(title=title, height=340, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      yaxis={"autorange": "reversed", "scaleanchor": "x", "visible": False,
                             "range": [h, 0]}, xaxis={"visible": False, "range": [0, w]})
    return fig


def heatmap_figure(matrix: Any, labels: list[str], title: str) -> go.Figure:
    """A ``[K, K]`` numpy matrix in [0, 1] as a labelled heatmap."""
    fig = go.Figure(go.Heatmap(z=matrix, x=labels, y=labels, colorscale="Viridis", zmin=0, zmax=1,
                               text=matrix.round(2), texttemplate="%{text}"))
    fig.update_layout(title=title, height=480, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      yaxis={"autorange": "reversed"})
    return fig
