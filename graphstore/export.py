"""Pathways out of the store as files for other tools: GraphML (Cytoscape, yEd) and GEXF (Gephi)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx

from graphstore.errors import GraphStoreError

if TYPE_CHECKING:
    from graphstore.api import Store

FORMATS = {".graphml": nx.write_graphml, ".gexf": nx.write_gexf}


def export_pathways(store: Store, pathway_ids: Iterable[str], path: Path) -> nx.DiGraph:
    """The union of pathways as one graph (neurons with their attributes; each edge keeps its weight and
    the pathway it came from), written as GraphML (``.graphml``) or GEXF (``.gexf``). Raises
    ``GraphStoreError`` for another suffix (before reading anything) and ``NotFound`` for an unknown pathway."""
    path = Path(path)
    write = FORMATS.get(path.suffix)
    if write is None:
        raise GraphStoreError(f"export format of {path.name!r} unknown; use .graphml or .gexf")
    graph = nx.DiGraph()
    for pid in pathway_ids:
        g = store.pathway_graph(pid)
        for n, data in g.nodes(data=True):
            graph.add_node(n, **{k: v for k, v in data.items() if v is not None})
        for u, v, data in g.edges(data=True):
            graph.add_edge(u, v, weight=data["weight"], pathway=pid)
    write(graph, path)
    return graph
