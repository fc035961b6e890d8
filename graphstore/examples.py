"""The schema in words and example user queries (for the UI console and README)."""

from __future__ import annotations

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

EXAMPLES: dict[str, str] = {
    "Store contents": "MATCH (n) RETURN labels(n)[0] AS label, count(*) AS nodes ORDER BY label",
    "Top neurons of each class": """\
MATCH (c:Class)-[u:USES]->(n:Neuron)
WHERE u.support >= 0.9
RETURN c.name AS class, n.site AS site, n.channel AS channel, u.support AS support
ORDER BY class, support DESC LIMIT 50""",
    "Neurons shared by two classes": """\
MATCH (a:Class {index: 3})-[ua:USES]->(n:Neuron)<-[ub:USES]-(b:Class {index: 8})
WHERE ua.config = ub.config AND ua.support >= 0.5 AND ub.support >= 0.5
RETURN n.site AS site, n.channel AS channel, ua.support AS support_3, ub.support AS support_8
ORDER BY site, channel""",
    "Attacks that flip the prediction": """\
MATCH (v:Image)-[r:VARIANT_OF]->(o:Image)
WHERE v.predicted <> o.predicted
RETURN r.kind AS kind, r.setting AS setting, count(*) AS flipped ORDER BY kind, setting""",
    "Strongest edges of one pathway": """\
MATCH (p:Pathway) WITH p LIMIT 1
MATCH (a:Neuron)-[f:FLOWS_TO {pathway: p.id}]->(b:Neuron)
RETURN a, f, b ORDER BY abs(f.weight) DESC LIMIT 40""",
    "Method agreement on originals": """\
MATCH (a:Pathway)-[:FOR_IMAGE]->(i:Image {kind: 'original'})<-[:FOR_IMAGE]-(b:Pathway)
WHERE a.method < b.method
MATCH (a)-[:INCLUDES]->(n:Neuron)
WITH a, b, count(n) AS na, collect(n) AS ns
WITH a, b, na, size([n IN ns WHERE (b)-[:INCLUDES]->(n)]) AS both
RETURN a.method AS method_a, b.method AS method_b, avg(toFloat(both) / (na + b.size - both)) AS mean_jaccard
ORDER BY method_a, method_b""",
    "Pathway size by variant kind": """\
MATCH (p:Pathway)-[:FOR_IMAGE]->(i:Image)
RETURN i.kind AS kind, p.config AS config, avg(p.size) AS mean_size, avg(p.logit_ratio) AS mean_logit_ratio
ORDER BY kind, config""",
}
