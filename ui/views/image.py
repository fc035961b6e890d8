"""Image: the image, its prediction, Pathway Gradient saliency, and the pathway as a layered graph."""

from __future__ import annotations

import streamlit as st

from graphstore.errors import NotFound
from graphstore.names import edges_name, neuron_name, number, variant_name
from ui.common import (
    class_names,
    context,
    layer_depths,
    neuron_card,
    pathway_figure,
    saliency_figure,
    setting_names,
    store,
    table,
)

st.title("Image")
model_id, config = context()
s = store()
names = class_names(model_id)

f1, f2, f3 = st.columns(3)
kinds = ["original", *s.variant_kinds(model_id)]
kind = f1.selectbox("Kind", kinds, key="img_kind")
label = f2.selectbox("Label", [None, *names], format_func=lambda i: "any" if i is None else names[i], key="img_label")
pred = f3.selectbox("Prediction", [None, *names], format_func=lambda i: "any" if i is None else names[i],
                    key="img_pred")
images = s.images(model_id, kind=kind, label=label, predicted=pred, limit=500)
if not images:
    st.info("No image matches these filters.")
    st.stop()
by_id = {im.id: im for im in images}
image_id = st.selectbox("Image", list(by_id), key="img_id",
                        format_func=lambda i: f"{by_id[i].source} · {variant_name(by_id[i].kind, by_id[i].sweep)}")
detail = s.image(image_id)
try:
    pathway = s.pathway_of(image_id, config)
except NotFound:
    st.image(detail.png, width=180, caption=detail.source)
    st.info(f"This image has no pathway of the setting {setting_names(model_id)[config]} (that method ran on "
            "originals only). "
            "Pick another setting in the sidebar or an original image.")
    st.stop()

c1, c2, c3 = st.columns([1, 1, 2])
with c1:
    st.image(detail.png, width=180, caption=detail.source)
with c2:
    st.metric("Prediction", names.get(detail.predicted, str(detail.predicted)), f"p = {detail.prob:.3f}",
              delta_color="off")
    st.metric("Label", names.get(detail.label, "unknown"))
    st.metric("Masked logit / full logit", number(pathway.logit_ratio))
    st.caption(f"pathway {pathway.id} · {pathway.size} neurons · {edges_name(pathway.method, pathway.params)}")
with c3:
    title = "Largest pixel pathway per pixel" if pathway.method == "pixel" else "Pathway Gradient"
    st.plotly_chart(saliency_figure(pathway.saliency, title, detail.png), key="saliency")

if pathway.cut_sites:
    shown = ", ".join(pathway.cut_sites[:3]) + (", …" if len(pathway.cut_sites) > 3 else "")
    st.warning(f"This pathway is cut at {len(pathway.cut_sites)} site(s) ({shown}): no neuron kept there reads a "
               "neuron kept before it, so the signal reaches the output only around those sites (through skips), "
               "or not at all (a Pathway Gradient of 0).")

st.subheader("Pathway")
max_edges = st.slider("Strongest edges shown", 20, 1000, 200, step=20, key="img_edges")
graph = s.pathway_graph(pathway.id)
st.caption("Drag to pan, scroll or box-select to zoom, double-click to reset; hover a neuron for its id.")
st.plotly_chart(pathway_figure(graph, max_edges=max_edges, depths=layer_depths(model_id)), key="graph_img")

st.subheader("Neuron")
neurons = sorted(graph.nodes(data=True), key=lambda t: t[1]["rank"])
neuron = st.selectbox("Neuron (by rank in this pathway)", [n for n, _ in neurons], key="img_neuron",
                      format_func=lambda n: f"{neuron_name(n)} · contribution "
                                            f"{number(graph.nodes[n]['contribution'], 4)}")
n1, n2 = st.columns([3, 2])
with n1:
    neuron_card(neuron, config, "img")
with n2:
    st.caption("Images whose pathways use it most")
    st.dataframe(table(s.neuron_top_images(neuron, config, 10)), hide_index=True, key="neuron_images")

st.subheader("Nearest images by pathway overlap")
st.dataframe(table(s.similar_images(image_id, config, 8)), hide_index=True, key="similar")
st.subheader("Pathways of this image")
names_of = setting_names(model_id)
st.dataframe(table([{"setting": names_of.get(p.config, p.config), "neurons": p.size, "logit ratio": p.logit_ratio,
                     "dead fraction": p.dead_fraction, "corr/prec overlap": p.corr_prec_overlap}
                    for p in s.pathways_of_image(image_id)]), hide_index=True, key="img_pathways")
agreement = s.method_agreement(image_id)
if agreement:
    st.subheader("Agreement between pathway settings (Jaccard)")
    st.dataframe(table([{"setting A": names_of.get(a.config_a, a.config_a), "setting B": names_of.get(a.config_b,
                                                                                                      a.config_b),
                         "jaccard": a.jaccard} for a in agreement]), hide_index=True, key="agreement")
