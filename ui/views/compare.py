"""Compare classes: similarity heatmap, shared and distinctive neurons, per-layer overlap."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from graphstore.names import neuron_name
from ui.common import (
    COLORS,
    class_names,
    context,
    heatmap_figure,
    layer_depths,
    neuron_card,
    pathway_figure,
    store,
    table,
)

st.title("Compare classes")
model_id, config = context()
s = store()
names = class_names(model_id)
classes = {c.index: c.id for c in s.classes(model_id)}
min_support = st.slider("Support threshold s", 0.05, 1.0, 0.5, step=0.05, key="cmp_support")
metric = st.radio("Similarity", ["Jaccard", "contribution-weighted"], horizontal=True, key="cmp_metric")
sim = s.similarity_matrix(model_id, config, min_support)
matrix = sim.jaccard if metric == "Jaccard" else sim.weighted
st.plotly_chart(heatmap_figure(matrix, sim.class_names, f"Class similarity ({metric})"), key="cmp_heatmap")

a_col, b_col = st.columns(2)
a = a_col.selectbox("Class A", list(names), format_func=names.__getitem__, key="cmp_a")
b = b_col.selectbox("Class B", list(names), index=min(1, len(names) - 1), format_func=names.__getitem__,
                    key="cmp_b")
shared = s.shared_pathways(classes[a], classes[b], config, min_support)
m1, m2, m3, m4 = st.columns(4)
m1.metric("Shared neurons", len(shared.shared))
m2.metric(f"Only {names[a]}", len(shared.only_a))
m3.metric(f"Only {names[b]}", len(shared.only_b))
m4.metric("Shared edges", len(shared.shared_edges))

drawn = s.shared_graph(shared)
st.caption(f"teal: shared · orange: only {names[a]} · blue: only {names[b]} · edges: shared by both classes")
st.plotly_chart(pathway_figure(drawn.graph, {n: COLORS[g] for n, g in drawn.groups.items()},
                               depths=layer_depths(model_id)), key="graph_cmp")

groups = {"shared": [na for na, _ in shared.shared], f"only {names[a]}": shared.only_a,
          f"only {names[b]}": shared.only_b}
choices = [(g, n.neuron) for g, ns in groups.items() for n in ns]
if choices:
    pick = st.selectbox("Neuron card", choices, format_func=lambda t: f"{neuron_name(t[1])} ({t[0]})", key="cmp_neuron")
    neuron_card(pick[1], config, "cmp")

overlap = table(shared.per_layer)
if not overlap.empty:
    overlap["jaccard"] = [o.jaccard for o in shared.per_layer]
    st.plotly_chart(px.line(overlap, x="site", y="jaccard", markers=True, range_y=[0, 1.05],
                            title="Per-layer overlap"), key="cmp_overlap")

st.subheader("Class signatures")
max_other = st.slider("Largest support in any other class", 0.0, 1.0, 0.2, step=0.05, key="cmp_other")
s1, s2 = st.columns(2)
for col, idx in ((s1, a), (s2, b)):
    with col:
        st.caption(names[idx])
        st.dataframe(table(s.class_signature(classes[idx], config, min_support, max_other)), hide_index=True,
                     key=f"sig_{idx}")
