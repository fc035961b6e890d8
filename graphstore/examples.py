"""The schema in words and example user queries (for the UI console and README)."""

from __future__ import annotations

from graphstore import queries as Q

SCHEMA_TEXT = """\
(:Model {id, arch, num_classes})-[:HAS_LAYER]->(:Layer {id, site, index, kind, channels, layout, depth})
(:Layer)-[:HAS_NEURON]->(:Neuron {id, site, layer_index, depth, channel})
(:Layer)-[:FEEDS]->(:Layer)                 # the site graph: a layer's direct predecessors
(:Model)-[:HAS_CLASS]->(:Class {id, index, name})
(:Image {id, source, kind, label, predicted, prob, setting})-[:LABELED_AS]->(:Class)
(:Image)-[:PREDICTED_AS {prob, logit}]->(:Class)
(:Image)-[:VARIANT_OF {kind, setting, eps, steps, targeted, target}]->(:Image)
(:Pathway {id, config, method, selection, params, target, logit_full, logit_masked, logit_ratio, size,
          dead_fraction, corr_prec_overlap, pixel_chains})
(:Pathway)-[:FOR_IMAGE]->(:Image)   (:Pathway)-[:EXPLAINS]->(:Class)
(:Pathway)-[:INCLUDES {contribution, score, rank, elements, dead}]->(:Neuron)
(:Neuron)-[:FLOWS_TO {pathway, weight}]->(:Neuron)
(:Class)-[:USES {config, support, mean_contribution, pathways}]->(:Neuron)
"""

# the console's example queries live with every other Cypher string, in graphstore.queries
EXAMPLES = Q.EXAMPLES
