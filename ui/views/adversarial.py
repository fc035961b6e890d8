"""Adversarial: original vs attacked image, both pathways in one graph, overlap by layer, hijacked neurons."""

from __future__ import annotations

import plotly.express as px
import streamlit as st

from graphstore.names import neuron_name, variant_name
from ui.common import (
    COLORS,
    class_names,
    context,
    layer_depths,
    neuron_card,
    pathway_figure,
    setting_names,
    store,
    table,
)

st.title("Adversarial")
model_id, config = context()
s = store()
names = class_names(model_id)
attacks = s.variant_kinds(model_id, attacks=True)
if not attacks:
    st.info("No attacked images (FGSM, PGD) in the store.")
    st.stop()
attack = st.selectbox("Attack", attacks, index=attacks.index("pgd") if "pgd" in attacks else 0, key="adv_kind")
pairs = s.variant_pairs(model_id, config, attack)
if not pairs:
    st.info(f"No {attack} variants with pathways of the setting {setting_names(model_id)[config]} in the store.")
    st.stop()
originals = sorted({p["original"] for p in pairs})
sources = {im.id: im.source for im in s.images(model_id, kind="original", limit=100_000)}
original = st.selectbox("Original image", originals, format_func=lambda i: sources.get(i, i), key="adv_orig")
mine = [p for p in pairs if p["original"] == original]
sweeps = [p["sweep"] for p in mine]
sweep = (st.select_slider("Strength", options=sweeps, key="adv_strength",
                            format_func=lambda v: variant_name(attack, v)) if len(sweeps) > 1 else sweeps[0])
pair = next(p for p in mine if p["sweep"] == sweep)

orig, adv = s.image(pair["original"]), s.image(pair["variant"])
c1, c2, c3 = st.columns(3)
with c1:
    st.image(orig.png, width=180, caption=f"original: {names.get(orig.predicted)} ({orig.prob:.2f})")
with c2:
    st.image(adv.png, width=180, caption=f"{variant_name(attack, sweep)}: {names.get(adv.predicted)} "
                                         f"({adv.prob:.2f})")
with c3:
    change = s.perturbation(pair["original"], pair["variant"])
    st.image(change.png, width=180, caption=f"perturbation (max |Δ| = {change.max_abs:.3f})")

shift = s.adversarial_shift(pair["variant"], config)
m1, m2, m3, m4 = st.columns(4)
m1.metric("Kept", len(shift.kept))
m2.metric("Lost", len(shift.lost))
m3.metric("Gained", len(shift.gained))
first = shift.first_departure if shift.first_departure is not None else shift.first_change
site_of = {o.layer_index: o.site for o in shift.per_layer}
m4.metric("First layer of departure", site_of.get(first, "none") if first is not None else "none")

drawn = s.shift_graph(shift, pair["original_pathway"], pair["variant_pathway"])
st.caption("blue: kept · red: lost (only in the original's pathway) · green: gained (only under attack)")
st.plotly_chart(pathway_figure(drawn.graph, {n: COLORS[g] for n, g in drawn.groups.items()}, max_edges=250,
                               depths=layer_depths(model_id)), key="graph_adv")

overlap = table(shift.per_layer)
overlap["jaccard"] = [o.jaccard for o in shift.per_layer]
st.plotly_chart(px.line(overlap, x="site", y="jaccard", markers=True, range_y=[0, 1.05],
                        title="Overlap of the two pathways per layer"), key="adv_overlap")
st.dataframe(table([{"neuron": c.neuron, "site": c.site, "original": c.original, "variant": c.variant,
                     "delta": c.delta} for c in shift.kept + shift.lost + shift.gained]),
             hide_index=True, key="adv_changes")
changed = [(g, c.neuron) for g, cs in (("lost", shift.lost), ("gained", shift.gained), ("kept", shift.kept))
           for c in cs]
if changed:
    pick = st.selectbox("Neuron card", changed, format_func=lambda t: f"{neuron_name(t[1])} ({t[0]})", key="adv_neuron")
    neuron_card(pick[1], config, "adv")

st.subheader("Most hijacked neurons")
label = st.selectbox("Class of the originals", [None, *names], format_func=lambda i: "all" if i is None else names[i],
                     key="adv_class")
hijacked = s.hijacked_neurons(model_id, config, attack, label, 15)
if hijacked:
    rows = [{"neuron": neuron_name(h.neuron), "site": h.site, "strength": variant_name(attack, k), "share": v}
            for h in hijacked for k, v in h.by_sweep.items()]
    st.plotly_chart(px.bar(table(rows), x="neuron", y="share", color="strength", barmode="group",
                           title="Share of attacked images that gain the neuron, by strength"), key="adv_hijack")
    st.dataframe(table([{"neuron": neuron_name(h.neuron), "site": h.site, "gained by": h.count, "share": h.share}
                        for h in hijacked]), hide_index=True, key="adv_hijack_table")
    pick_h = st.selectbox("Neuron card (hijacked)", [h.neuron for h in hijacked], format_func=neuron_name,
                          key="adv_hijack_neuron")
    neuron_card(pick_h, config, "hij")
else:
    st.info("No gained neurons for this selection.")
