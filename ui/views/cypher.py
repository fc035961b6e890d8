"""Cypher: a read-only console with the schema at hand and example queries."""

from __future__ import annotations

import networkx as nx
import pandas as pd
import streamlit as st

from graphstore.errors import QueryRefused
from graphstore.examples import EXAMPLES, SCHEMA_TEXT
from ui.common import pathway_figure, store

st.title("Cypher")
st.caption("Read-only: writes, schema changes, LOAD CSV and admin commands are refused. 10 s limit, 1,000 rows.")
with st.expander("Schema", expanded=False):
    st.code(SCHEMA_TEXT, language="text")
example = st.selectbox("Example", list(EXAMPLES), key="cy_example")
query = st.text_area("Query", EXAMPLES[example], height=160, key=f"cy_text_{example}")
if st.button("Run", type="primary", key="cy_run"):
    try:
        res = store().cypher(query, timeout_s=10.0, max_rows=1000)
    except QueryRefused as exc:
        st.error(str(exc))
        st.stop()
    st.success(f"{len(res.rows)} rows" + (" (truncated at the row cap)" if res.truncated else ""))
    st.dataframe(pd.DataFrame(res.rows, columns=res.columns), hide_index=True, key="cy_rows")
    if res.graph.number_of_nodes():
        g = nx.DiGraph()
        for n, d in res.graph.nodes(data=True):
            g.add_node(n, site=d.get("labels", ""), layer_index=0, channel=0, contribution=1.0)
        for u, v, d in res.graph.edges(data=True):
            g.add_edge(u, v, weight=float(d.get("weight", 1.0)))
        st.plotly_chart(pathway_figure(g, max_edges=300), key="graph_cy")
