"""A pathway record as a networkx graph."""

from __future__ import annotations

import networkx as nx

from records.ids import neuron_id
from records.types import ModelInfo, PathwayRecord


def pathway_to_networkx(pathway: PathwayRecord, model: ModelInfo) -> nx.DiGraph:
    """The pathway as a directed graph over neuron ids, with contributions and edge weights."""
    graph = nx.DiGraph(pathway_id=pathway.pathway_id, image_id=pathway.image_id, method=pathway.method)
    sites = model.sites
    for s, c, contrib, score, rank in zip(pathway.neuron_site, pathway.neuron_channel, pathway.neuron_contribution,
                                          pathway.neuron_score, pathway.neuron_rank, strict=True):
        site = sites[int(s)]
        graph.add_node(neuron_id(model.model_id, site.site_id, int(c)), site=site.site_id, layer=int(s),
                       channel=int(c), contribution=float(contrib), score=float(score), rank=int(rank))
    for ss, sc, ds, dc, w in zip(pathway.edge_src_site, pathway.edge_src_channel, pathway.edge_dst_site,
                                 pathway.edge_dst_channel, pathway.edge_weight, strict=True):
        graph.add_edge(neuron_id(model.model_id, sites[int(ss)].site_id, int(sc)),
                       neuron_id(model.model_id, sites[int(ds)].site_id, int(dc)), weight=float(w))
    return graph
