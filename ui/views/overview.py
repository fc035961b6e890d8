"""Overview: what the store holds, accuracy per class and per attack strength, pathway size per layer."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from ui.common import config_info, context, store, table

st.title("Overview")
model_id, config = context()
s = store()
summary = s.summary()
cols = st.columns(6)
for col, (label, value) in zip(cols, [("Models", summary.models), ("Classes", summary.classes),
                                      ("Images", summary.images), ("Originals", summary.originals),
                                      ("Pathways", summary.pathways), ("Edges", summary.edges)], strict=True):
    col.metric(label, f"{value:,}")

st.subheader("Models")
st.dataframe(table(s.models()), hide_index=True, width="stretch")

left, right = st.columns(2)
with left:
    st.subheader("Accuracy per class (originals)")
    by_class = table(s.accuracy_by_class(model_id))
    if by_class.empty:
        st.info("No labelled originals.")
    else:
        fig = px.bar(by_class, x="class_name", y="accuracy", hover_data=["images"], range_y=[0, 1])
        st.plotly_chart(fig, key="acc_class")
with right:
    st.subheader("Accuracy per variant and strength")
    by_var = table(s.accuracy_by_variant(model_id))
    if by_var.empty:
        st.info("No variants in the store.")
    else:
        st.dataframe(by_var[["name", "images", "accuracy"]].rename(columns={"name": "variant"}), hide_index=True,
                     width="stretch", key="acc_variant")
        attacks = by_var[by_var["eps"].notna()]
        if not attacks.empty:
            attacks = attacks.assign(attack=attacks["kind"].str.upper() + attacks["targeted"].map(
                {True: " targeted", False: " untargeted"}))
            fig = px.line(attacks, x="eps", y="accuracy", color="attack", markers=True, range_y=[0, 1])
            st.plotly_chart(fig, key="acc_eps")

fixed_size = config_info(model_id, config).selection == "topk"  # top-k keeps k per site: sizes cannot vary
st.subheader("Contribution mass per layer" if fixed_size else "Pathway size per layer")
counts = table(s.pathway_counts(config))
if not counts.empty:
    fig = px.line(counts, x="site", y="mean_mass" if fixed_size else "mean_neurons", color="name", markers=True,
                  labels={"mean_mass": "mean Σ|contribution| of pathway neurons", "mean_neurons": "mean neurons",
                          "name": "images"})
    st.plotly_chart(fig, key="size_layer")
