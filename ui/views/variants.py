"""Variants: originals against occluded, shifted and deformed versions (and attacks)."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from ui.common import config_info, context, store, table

st.title("Variants")
model_id, config = context()
s = store()
kinds = st.multiselect("Kinds", s.variant_kinds(model_id), default=s.variant_kinds(model_id, attacks=False),
                       key="var_kinds")

counts = table(s.pathway_counts(config))
if counts.empty:
    st.info("No pathways for this setting.")
    st.stop()
counts = counts[counts["kind"].isin(["original", *kinds])]
fixed_size = config_info(model_id, config).selection == "topk"  # top-k keeps k per site: sizes cannot vary
st.subheader("Contribution mass per layer" if fixed_size else "Pathway neurons per layer")
st.plotly_chart(px.line(counts, x="site", y="mean_mass" if fixed_size else "mean_neurons", color="name",
                        markers=True, labels={"mean_mass": "mean Σ|contribution| of pathway neurons",
                                              "mean_neurons": "mean neurons", "name": "images"}), key="var_counts")

overlap = table([o for k in kinds for o in s.variant_overlap(model_id, config, k)])
if overlap.empty:
    st.info("None of these variant kinds is in the store.")
    st.stop()
st.subheader("Overlap with the original's pathway, per layer")
st.plotly_chart(px.line(overlap, x="site", y="mean_jaccard", color="name", markers=True, range_y=[0, 1.05],
                        labels={"name": "variant"}), key="var_overlap")
st.subheader("Prediction changes")
changes = overlap.drop_duplicates(["kind", "sweep"])[["name", "pairs", "prediction_changed"]].rename(
    columns={"name": "variant"})
st.dataframe(changes, hide_index=True, key="var_changes")
