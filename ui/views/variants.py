"""Variants: originals against occluded, shifted and deformed versions (and attacks)."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from ui.common import context, store, table

st.title("Variants")
model_id, config = context()
s = store()
kinds = st.multiselect("Kinds", ["occlude", "shift", "deform", "affine", "fgsm", "pgd"],
                       default=["occlude", "shift", "deform", "affine"],
                       key="var_kinds")

counts = table(s.pathway_counts(config))
if counts.empty:
    st.info("No pathways for this setting.")
    st.stop()
counts = counts[counts["kind"].isin(["original", *kinds])]
counts["group"] = counts["kind"] + " " + counts["setting"]
st.subheader("Pathway neurons per layer")
st.plotly_chart(px.line(counts, x="site", y="mean_neurons", color="group", markers=True), key="var_counts")

overlap = table([o for k in kinds for o in s.variant_overlap(model_id, config, k)])
if overlap.empty:
    st.info("None of these variant kinds is in the store.")
    st.stop()
overlap["group"] = overlap["kind"] + " " + overlap["setting"]
st.subheader("Overlap with the original's pathway, per layer")
st.plotly_chart(px.line(overlap, x="site", y="mean_jaccard", color="group", markers=True, range_y=[0, 1.05]),
                key="var_overlap")
st.subheader("Prediction changes")
changes = overlap.drop_duplicates(["kind", "setting"])[["kind", "setting", "pairs", "prediction_changed"]]
st.dataframe(changes, hide_index=True, key="var_changes")
