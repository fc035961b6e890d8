"""Every Cypher statement of Pathway Explorer, named and parameterised.

No value is ever formatted into these strings: everything a user or a record supplies
arrives as a ``$parameter``. ``graphstore.api`` runs them and types the results. (Longer than
400 lines on purpose: the architecture keeps every Cypher string in this one module.)

The schema (labels, properties, keys, indexes) is described once, in ``graphstore.schema``; ``SCHEMA``
below is made from it.

A variant's pathway carries ``layer_jaccard`` (per site, against its original's pathway of the
same setting) and its ``INCLUDES`` carry ``gained`` (the original's pathway lacks the neuron);
the loader computes both from the records. ``VariantStat`` sums them per original label, variant
kind and sweep, so adversarial and variant questions read a few hundred rows.
"""

from __future__ import annotations

from graphstore.schema import INDEXES, Index

# --- schema -------------------------------------------------------------------------------

def _schema_statement(ix: Index) -> str:
    """The statement creating one key or index of ``graphstore.schema.INDEXES`` (its names, labels and
    numbers are the schema module's constants, never a user's value)."""
    v = "r" if ix.relationship else "n"
    pattern = f"()-[r:{ix.target}]-()" if ix.relationship else f"(n:{ix.target})"
    props = ", ".join(f"{v}.{p}" for p in ix.props)
    if ix.kind == "unique":
        return f"CREATE CONSTRAINT {ix.name} IF NOT EXISTS FOR {pattern} REQUIRE {props} IS UNIQUE"
    if ix.kind == "vector":
        return (f"CREATE VECTOR INDEX {ix.name} IF NOT EXISTS FOR {pattern} ON ({props}) OPTIONS {{indexConfig: "
                f"{{`vector.dimensions`: {ix.dimensions}, `vector.similarity_function`: '{ix.similarity}', "
                f"`vector.quantization.enabled`: {str(ix.quantized).lower()}}}}}")
    return f"CREATE INDEX {ix.name} IF NOT EXISTS FOR {pattern} ON ({props})"


SCHEMA: tuple[str, ...] = tuple(_schema_statement(ix) for ix in INDEXES)
# each key and index of the store, and how far its population is (polled in short transactions: the server's
# transaction timeout would end one long db.awaitIndexes while a large import's indexes are still filling)
INDEX_STATES = "SHOW INDEXES YIELD name, state, populationPercent RETURN name, state, populationPercent AS percent"
# the keys and indexes a store has online: a load that finds all of the schema's skips creating them
ONLINE_INDEXES = "SHOW INDEXES YIELD name, state WHERE state = 'ONLINE' RETURN collect(name) AS names"

# --- loading ------------------------------------------------------------------------------

MERGE_MODEL = """
MERGE (m:Model {id: $model.id})
SET m.arch = $model.arch, m.title = $model.title, m.num_classes = $model.num_classes, m.input_shape = $model.input_shape,
    m.store_format = $model.store_format
WITH m
UNWIND $layers AS l
MERGE (ly:Layer {id: l.id})
SET ly.model_id = $model.id, ly.site = l.site, ly.module_path = l.module_path, ly.call_index = l.call_index,
    ly.kind = l.kind, ly.index = l.index, ly.channels = l.channels, ly.shape = l.shape, ly.layout = l.layout,
    ly.depth = l.depth
MERGE (m)-[:HAS_LAYER]->(ly)
"""

LINK_LAYERS = """
UNWIND $pairs AS p
MATCH (a:Layer {id: p.src})
MATCH (b:Layer {id: p.dst})
MERGE (a)-[:FEEDS]->(b)
"""

MERGE_NEURONS = """
UNWIND $neurons AS n
MATCH (ly:Layer {id: n.layer_id})
MERGE (nr:Neuron {id: n.id})
SET nr.layer_id = n.layer_id, nr.model_id = $model_id, nr.site = n.site, nr.layer_index = n.layer_index,
    nr.depth = n.depth, nr.channel = n.channel
MERGE (ly)-[:HAS_NEURON]->(nr)
"""

MERGE_CLASSES = """
MATCH (m:Model {id: $model_id})
UNWIND $classes AS c
MERGE (cl:Class {id: c.id})
SET cl.model_id = $model_id, cl.index = c.index, cl.name = c.name
MERGE (m)-[:HAS_CLASS]->(cl)
"""

MERGE_IMAGES = """
UNWIND $images AS i
MERGE (im:Image {id: i.id})
ON CREATE SET im += i.props
WITH im, i
MATCH (pc:Class {id: i.predicted_class})
MERGE (im)-[pr:PREDICTED_AS]->(pc)
SET pr.prob = i.prob, pr.logit = i.logit
WITH im, i
CALL (im, i) {
  WITH im, i WHERE i.label_class IS NOT NULL
  MATCH (lc:Class {id: i.label_class})
  MERGE (im)-[:LABELED_AS]->(lc)
}
CALL (im, i) {
  WITH im, i WHERE i.variant_of IS NOT NULL
  MATCH (orig:Image {id: i.variant_of})
  MERGE (im)-[v:VARIANT_OF]->(orig)
  SET v += i.variant
}
"""

# Claims the pathways of one transaction: MERGE locks each id, so a concurrent loader waits
# and then sees the pathway as existing. Claim and link in one pass: only rows that this transaction created come back (the flag is
# set on create and cleared at once), so reloading and concurrent loaders never duplicate. The signature is
# stored as float32, as the vector index keeps it (half the bytes of Cypher's list of doubles). A new pathway
# is ``uncounted`` until the per-setting counts (``CountStat``, ``VariantStat``) hold it (``COUNT_ADDED``).
CLAIM_PATHWAYS = """
UNWIND $pathways AS p
MERGE (pw:Pathway {id: p.id})
ON CREATE SET pw += p.props, pw.loading = true
WITH pw, p WHERE pw.loading = true
REMOVE pw.loading
SET pw.uncounted = true
WITH pw, p
CALL (pw, p) {
  WITH pw, p WHERE p.signature IS NOT NULL
  CALL db.create.setNodeVectorProperty(pw, 'signature', p.signature)
}
MATCH (im:Image {id: p.image_id})
MATCH (cl:Class {id: p.class_id})
CREATE (pw)-[:FOR_IMAGE]->(im)
CREATE (pw)-[:EXPLAINS]->(cl)
RETURN pw.id AS id
"""

# Which of a run's pathways (by key) the store holds, and whether each is whole: its claim flag gone, it
# points at its image and it has exactly ``size`` INCLUDES (degree counts are O(1) in Neo4j). One transaction
# writes all of that, so a pathway is only ever not whole if the store was changed behind the loader's back.
STORED_PATHWAYS = """
UNWIND $keys AS k
MATCH (p:Pathway {key: k})
RETURN k AS key, p.id AS id, p.loading IS NULL AND EXISTS { (p)-[:FOR_IMAGE]->() }
       AND COUNT { (p)-[:INCLUDES]->() } = p.size AS whole
"""

STORED_IMAGES = """
UNWIND $ids AS i
MATCH (im:Image {id: i})
RETURN i AS id
"""

# What the store holds of a model's structure: a load that finds it whole writes none of it again.
MODEL_SHAPE = """
MATCH (m:Model {id: $model_id})
RETURN COUNT { (m)-[:HAS_LAYER]->() } AS layers, COUNT { (m)-[:HAS_CLASS]->() } AS classes,
       COUNT { (m)-[:HAS_LAYER]->()-[:HAS_NEURON]->() } AS neurons,
       COUNT { (m)-[:HAS_LAYER]->()-[:FEEDS]->() } AS feeds, m.exemplar_runs AS exemplar_runs
"""

EXEMPLAR_COUNT = """
MATCH (n:Neuron {model_id: $model_id})
RETURN sum(COUNT { (n)-[:EXEMPLAR]->() }) AS n
"""

MARK_EXEMPLAR_RUN = """
MATCH (m:Model {id: $model_id})
SET m.exemplar_runs = coalesce(m.exemplar_runs, []) + [$digest]
"""

DELETE_PATHWAYS = """
UNWIND $pathway_ids AS pid
MATCH (p:Pathway {id: pid})
CALL (p) {
  MATCH ()-[f:FLOWS_TO {pathway: p.key}]->()
  DELETE f
}
DETACH DELETE p
"""

NEURON_ELEMENT_IDS = """
MATCH (n:Neuron {model_id: $model_id})
RETURN n.id AS id, elementId(n) AS element_id
"""

# Relationships arrive as named columns (graphstore.rows: `start`, `end`, then the schema's properties). Neurons
# come once per statement, as the element ids `$neurons` (fetched once per load), and the columns name them by
# their position in that list: each neuron is sought once per statement, not once per row. The `WHERE` makes a
# statement create nothing unless every neuron was found, in order; both statements return how many
# relationships they made, and the loader checks the number.
_NEURONS_ONCE = """
UNWIND $neurons AS eid
MATCH (n:Neuron) WHERE elementId(n) = eid
WITH collect(n) AS ns, collect(elementId(n)) AS found
WHERE found = $neurons
"""

CREATE_INCLUDES = _NEURONS_ONCE + """
UNWIND $pathways AS pid
MATCH (pw:Pathway {id: pid})
WITH ns, collect(pw) AS pws, collect(pw.id) AS claimed
WHERE claimed = $pathways
WITH ns, pws, $includes AS c
UNWIND range(0, size(c.start) - 1) AS i
WITH pws[c.start[i]] AS pw, ns[c.end[i]] AS nr, c.contribution[i] AS contribution, c.score[i] AS score,
     c.rank[i] AS rank, c.elements[i] AS elements, c.dead[i] AS dead, c.gained[i] AS gained
CREATE (pw)-[:INCLUDES {contribution: contribution, score: score, rank: rank, elements: elements, dead: dead,
                        gained: gained}]->(nr)
RETURN count(*) AS created
"""

CREATE_FLOWS = _NEURONS_ONCE + """
WITH ns, $flows AS f
UNWIND range(0, size(f.start) - 1) AS i
WITH ns[f.start[i]] AS a, ns[f.end[i]] AS b, f.pathway[i] AS key, f.weight[i] AS weight
CREATE (a)-[:FLOWS_TO {pathway: key, weight: weight}]->(b)
RETURN count(*) AS created
"""

CONFIGS_OF_MODEL = """
MATCH (p:Pathway) WHERE p.model_id = $model_id
RETURN DISTINCT p.config AS config
"""

# Taking a write lock on the model node serialises concurrent aggregate refreshes (two loaders
# finishing at once would otherwise both clear and both recreate).
# a store written before pathways had keys (FLOWS_TO then held the id string) cannot take new loads
MODEL_OF_OTHER_FORMAT = """
MATCH (m:Model) WHERE coalesce(m.store_format, 0) <> $format
RETURN m.id AS id, coalesce(m.store_format, 0) AS format LIMIT 1
"""

MODEL_PATHWAYS = """
MATCH (p:Pathway {model_id: $model_id})
RETURN count(p) AS pathways
"""

# how many pathways the model's aggregates were last computed over: a load that adds nothing and finds
# the same count skips the refresh
AGGREGATED_PATHWAYS = """
MATCH (m:Model {id: $model_id})
RETURN m.aggregated_pathways AS pathways
"""

MARK_AGGREGATED = """
MATCH (m:Model {id: $model_id})
SET m.aggregated_pathways = $pathways
"""

# after counts added to (``COUNT_ADDED``): the aggregates cover $pathways more
MARK_MORE_AGGREGATED = """
MATCH (m:Model {id: $model_id})
SET m.aggregated_pathways = m.aggregated_pathways + $pathways
"""

LOCK_MODEL = """
MATCH (m:Model {id: $model_id})
SET m.aggregates_lock = true
REMOVE m.aggregates_lock
"""

CLEAR_AGGREGATES = """
MATCH (c:Class {model_id: $model_id})-[u:USES {config: $config}]->()
DELETE u
"""

CLEAR_CLASS_STATS = """
MATCH (s:ClassStat {model_id: $model_id, config: $config})
DELETE s
"""

# Support of a neuron in a class = share of the class's pathways (originals, same config) that
# include it; the class of a pathway is the class it explains (the predicted class by default).
# ClassStat holds the share's denominator, so that a load can add to it (ADD_CLASS_STATS).
REFRESH_AGGREGATES = """
MATCH (c:Class {model_id: $model_id})<-[:EXPLAINS]-(p:Pathway {config: $config})-[:FOR_IMAGE]->(:Image {kind: 'original'})
WITH c, collect(p) AS ps
CREATE (:ClassStat {model_id: $model_id, config: $config, class_id: c.id, pathways: size(ps)})
WITH c, ps, size(ps) AS n
UNWIND ps AS p
MATCH (p)-[inc:INCLUDES]->(nr:Neuron)
WITH c, n, nr, count(p) AS k, avg(inc.contribution) AS mc
CREATE (c)-[:USES {config: $config, support: toFloat(k) / n, mean_contribution: mc, pathways: k}]->(nr)
"""

CLEAR_CLASS_FLOWS = """
MATCH (c:Class {model_id: $model_id})
MATCH ()-[f:CLASS_FLOW {class_id: c.id, config: $config}]->()
DELETE f
"""

# Support of an edge in a class: share of the class's original pathways that hold it. Every edge is kept
# (at most the class's original FLOWS_TO, and far fewer where the class's pathways share edges), so that
# a load's pathways can be added to the counts.
REFRESH_CLASS_FLOWS = """
MATCH (c:Class {model_id: $model_id})<-[:EXPLAINS]-(p:Pathway {config: $config})-[:FOR_IMAGE]->(:Image {kind: 'original'})
WITH c, collect(p.key) AS keys
WITH c, keys, size(keys) AS n
UNWIND keys AS key
MATCH (a:Neuron)-[f:FLOWS_TO {pathway: key}]->(b:Neuron)
WITH c, n, a, b, count(f) AS k, avg(f.weight) AS mean_weight
CREATE (a)-[:CLASS_FLOW {class_id: c.id, config: $config, support: toFloat(k) / n,
                         mean_weight: mean_weight, pathways: k}]->(b)
"""

# A load's new original pathways of $config ($keys; those still ``uncounted``) added to the class aggregates:
# each class's ClassStat count (returns the classes), then the counts and means of USES and CLASS_FLOW (created
# where new), then CLASS_USES_SUPPORTS and CLASS_FLOW_SUPPORTS divide every row of those classes by the new count. The work grows with the
# load and with the touched classes' distinct neurons and edges (at most the model's), not with their pathways.
# Each step equals the full refresh over the pathways counted before and these (tests/test_bulk.py).
ADD_CLASS_STATS = """
UNWIND $keys AS key
MATCH (p:Pathway {key: key})-[:FOR_IMAGE]->(:Image {kind: 'original'})
WHERE p.uncounted AND p.model_id = $model_id AND p.config = $config
MATCH (p)-[:EXPLAINS]->(c:Class)
WITH c.id AS class_id, count(p) AS added
MERGE (s:ClassStat {model_id: $model_id, config: $config, class_id: class_id})
ON CREATE SET s.pathways = added
ON MATCH SET s.pathways = s.pathways + added
RETURN collect(class_id) AS classes
"""

ADD_USES = """
UNWIND $keys AS key
MATCH (p:Pathway {key: key})-[:FOR_IMAGE]->(:Image {kind: 'original'})
WHERE p.uncounted AND p.model_id = $model_id AND p.config = $config
MATCH (p)-[:EXPLAINS]->(c:Class)
MATCH (p)-[inc:INCLUDES]->(nr:Neuron)
WITH c, nr, count(p) AS k, sum(inc.contribution) AS total
WITH c, nr, k, total, [r IN [(c)-[r:USES]->(nr) | r] WHERE r.config = $config] AS found
FOREACH (_ IN CASE WHEN found = [] THEN [1] ELSE [] END |
  CREATE (c)-[:USES {config: $config, mean_contribution: total / k, pathways: k}]->(nr))
FOREACH (u IN found |
  SET u.mean_contribution = (u.mean_contribution * u.pathways + total) / (u.pathways + k), u.pathways = u.pathways + k)
"""

ADD_CLASS_FLOWS = """
UNWIND $keys AS key
MATCH (p:Pathway {key: key})-[:FOR_IMAGE]->(:Image {kind: 'original'})
WHERE p.uncounted AND p.model_id = $model_id AND p.config = $config
MATCH (p)-[:EXPLAINS]->(c:Class)
MATCH (a:Neuron)-[f:FLOWS_TO {pathway: key}]->(b:Neuron)
WITH c.id AS class_id, a, b, count(f) AS k, sum(f.weight) AS total
WITH class_id, a, b, k, total,
     [r IN [(a)-[r:CLASS_FLOW]->(b) | r] WHERE r.class_id = class_id AND r.config = $config] AS found
FOREACH (_ IN CASE WHEN found = [] THEN [1] ELSE [] END |
  CREATE (a)-[:CLASS_FLOW {class_id: class_id, config: $config, mean_weight: total / k, pathways: k}]->(b))
FOREACH (g IN found |
  SET g.mean_weight = (g.mean_weight * g.pathways + total) / (g.pathways + k), g.pathways = g.pathways + k)
"""

CLASS_USES_SUPPORTS = """
UNWIND $classes AS class_id
MATCH (s:ClassStat {class_id: class_id, config: $config})
MATCH (c:Class {id: class_id})
UNWIND [(c)-[r:USES]->() | r] AS u
WITH s, u WHERE u.config = $config
SET u.support = toFloat(u.pathways) / s.pathways
"""

CLASS_FLOW_SUPPORTS = """
UNWIND $classes AS class_id
MATCH (s:ClassStat {class_id: class_id, config: $config})
MATCH ()-[f:CLASS_FLOW {class_id: class_id, config: $config}]->()
SET f.support = toFloat(f.pathways) / s.pathways
"""

CLEAR_COUNT_STATS = """
MATCH (s:CountStat {model_id: $model_id, config: $config})
DELETE s
"""

REFRESH_COUNT_STATS = """
MATCH (p:Pathway {model_id: $model_id, config: $config})-[:FOR_IMAGE]->(i:Image)
WITH i.kind AS kind, coalesce(i.sweep, '') AS sweep, collect(p.layer_sizes) AS sizes,
     collect(coalesce(p.layer_mass, [x IN p.layer_sizes | 0.0])) AS masses
WITH kind, sweep, sizes, masses, range(0, size(sizes[0]) - 1) AS sites
CREATE (:CountStat {model_id: $model_id, config: $config, kind: kind,
                    sweep: CASE sweep WHEN '' THEN null ELSE sweep END, pathways: size(sizes),
                    totals: [i IN sites | reduce(t = 0, x IN sizes | t + x[i])],
                    mass: [i IN sites | reduce(t = 0.0, x IN masses | t + x[i])],
                    nonzero: [i IN sites | reduce(t = 0, x IN sizes | t + CASE WHEN x[i] > 0 THEN 1 ELSE 0 END)]})
"""

# a full refresh of the setting's counts holds every pathway of it
CLEAR_UNCOUNTED = """
MATCH (p:Pathway {model_id: $model_id, config: $config})
WHERE p.uncounted
REMOVE p.uncounted
"""

# A load's new pathways of $config ($keys; those still ``uncounted``) added to the per-setting counts, so that
# their cost grows with the load, not with the store; each step equals REFRESH_COUNT_STATS /
# REFRESH_VARIANT_STATS over the pathways counted before and these (``tests/test_bulk.py``). Run in one
# transaction under LOCK_MODEL: variants, then counts, then COUNT_ADDED, which clears the flags and returns
# how many were counted (a concurrent loader's refresh counts each pathway once).
ADD_COUNT_STATS = """
UNWIND $keys AS k
MATCH (p:Pathway {key: k})-[:FOR_IMAGE]->(i:Image)
WHERE p.uncounted AND p.model_id = $model_id AND p.config = $config
WITH i.kind AS kind, coalesce(i.sweep, '') AS sweep, collect(p.layer_sizes) AS sizes,
     collect(coalesce(p.layer_mass, [x IN p.layer_sizes | 0.0])) AS masses
WITH kind, sweep, sizes, masses, range(0, size(sizes[0]) - 1) AS sites
WITH kind, sweep, sites, size(sizes) AS n,
     [i IN sites | reduce(t = 0, x IN sizes | t + x[i])] AS totals,
     [i IN sites | reduce(t = 0.0, x IN masses | t + x[i])] AS mass,
     [i IN sites | reduce(t = 0, x IN sizes | t + CASE WHEN x[i] > 0 THEN 1 ELSE 0 END)] AS nonzero
OPTIONAL MATCH (old:CountStat {model_id: $model_id, config: $config, kind: kind})
WHERE coalesce(old.sweep, '') = sweep
FOREACH (_ IN CASE WHEN old IS NULL THEN [1] ELSE [] END |
  CREATE (:CountStat {model_id: $model_id, config: $config, kind: kind,
                      sweep: CASE sweep WHEN '' THEN null ELSE sweep END, pathways: 0,
                      totals: [i IN sites | 0], mass: [i IN sites | 0.0], nonzero: [i IN sites | 0]}))
WITH kind, sweep, sites, n, totals, mass, nonzero
MATCH (s:CountStat {model_id: $model_id, config: $config, kind: kind})
WHERE coalesce(s.sweep, '') = sweep
SET s.pathways = s.pathways + n,
    s.totals = [i IN sites | s.totals[i] + totals[i]],
    s.mass = [i IN sites | s.mass[i] + mass[i]],
    s.nonzero = [i IN sites | s.nonzero[i] + nonzero[i]]
"""

ADD_VARIANT_STATS = """
UNWIND $keys AS k
MATCH (pv:Pathway {key: k})
WHERE pv.uncounted AND pv.model_id = $model_id AND pv.config = $config AND pv.layer_jaccard IS NOT NULL
MATCH (v:Image {id: pv.image_id})-[r:VARIANT_OF]->(o:Image)
WITH r.kind AS kind, r.sweep AS sweep, o.label AS label, collect(pv) AS pvs,
     sum(CASE WHEN v.predicted <> o.predicted THEN 1 ELSE 0 END) AS changed
WITH kind, sweep, label, pvs, changed, range(0, size(pvs[0].layer_jaccard) - 1) AS sites
WITH kind, sweep, label, pvs, changed, sites,
     [i IN sites | reduce(t = 0.0, p IN pvs | t + p.layer_jaccard[i])] AS jaccard
OPTIONAL MATCH (old:VariantStat {model_id: $model_id, config: $config, kind: kind})
WHERE coalesce(old.sweep, '') = coalesce(sweep, '') AND coalesce(old.label, -1) = coalesce(label, -1)
FOREACH (_ IN CASE WHEN old IS NULL THEN [1] ELSE [] END |
  CREATE (:VariantStat {model_id: $model_id, config: $config, kind: kind, sweep: sweep, label: label,
                        pairs: 0, changed: 0, jaccard_sum: [i IN sites | 0.0]}))
WITH kind, sweep, label, pvs, changed, sites, jaccard
MATCH (s:VariantStat {model_id: $model_id, config: $config, kind: kind})
WHERE coalesce(s.sweep, '') = coalesce(sweep, '') AND coalesce(s.label, -1) = coalesce(label, -1)
SET s.pairs = s.pairs + size(pvs), s.changed = s.changed + changed,
    s.jaccard_sum = [i IN sites | s.jaccard_sum[i] + jaccard[i]]
WITH s, pvs
UNWIND pvs AS pv
MATCH (pv)-[:INCLUDES {gained: true}]->(n:Neuron)
WITH s, n, count(*) AS k
MERGE (s)-[g:GAINED]->(n)
ON CREATE SET g.count = k
ON MATCH SET g.count = g.count + k
"""

COUNT_ADDED = """
UNWIND $keys AS k
MATCH (p:Pathway {key: k})
WHERE p.uncounted AND p.model_id = $model_id AND p.config = $config
REMOVE p.uncounted
RETURN count(p) AS counted
"""

CLEAR_VARIANT_STATS = """
MATCH (s:VariantStat {model_id: $model_id, config: $config})
DETACH DELETE s
"""

# One VariantStat per (original label, variant kind, sweep): pairs, prediction changes,
# per-site sums of the pairs' Jaccard overlaps, and how often each neuron was gained.
REFRESH_VARIANT_STATS = """
MATCH (v:Image {model_id: $model_id})-[r:VARIANT_OF]->(o:Image)
MATCH (pv:Pathway {config: $config, image_id: v.id})
WHERE pv.layer_jaccard IS NOT NULL
WITH r.kind AS kind, r.sweep AS sweep, o.label AS label, collect(pv) AS pvs,
     sum(CASE WHEN v.predicted <> o.predicted THEN 1 ELSE 0 END) AS changed
WITH kind, sweep, label, pvs, changed, size(pvs[0].layer_jaccard) AS sites
CREATE (s:VariantStat {model_id: $model_id, config: $config, kind: kind, sweep: sweep, label: label,
                       pairs: size(pvs), changed: changed,
                       jaccard_sum: [i IN range(0, sites - 1) | reduce(t = 0.0, p IN pvs | t + p.layer_jaccard[i])]})
WITH s, pvs
UNWIND pvs AS pv
MATCH (pv)-[:INCLUDES {gained: true}]->(n:Neuron)
WITH s, n, count(*) AS k
CREATE (s)-[:GAINED {count: k}]->(n)
"""

# --- reading ------------------------------------------------------------------------------

# counts from the count store, but for the originals: entries of the Image(kind) index, no node read
STORE_SUMMARY = """
CALL () { MATCH (m:Model) RETURN count(m) AS models }
CALL () { MATCH (c:Class) RETURN count(c) AS classes }
CALL () { MATCH (i:Image) RETURN count(i) AS images }
CALL () { MATCH (i:Image {kind: 'original'}) RETURN count(i) AS originals }
CALL () { MATCH (p:Pathway) RETURN count(p) AS pathways }
CALL () { MATCH ()-[f:FLOWS_TO]->() RETURN count(f) AS edges }
RETURN models, classes, images, originals, pathways, edges
"""

COUNT_NODES = "MATCH (n) RETURN labels(n)[0] AS label, count(n) AS n ORDER BY label"
COUNT_RELATIONSHIPS = "MATCH ()-[r]->() RETURN type(r) AS type, count(r) AS n ORDER BY type"

LIST_MODELS = """
MATCH (m:Model)
OPTIONAL MATCH (m)-[:HAS_LAYER]->(l:Layer)
WITH m, count(l) AS layers
RETURN m.id AS id, m.arch AS arch, coalesce(m.title, m.arch) AS title, m.num_classes AS num_classes, layers
ORDER BY id
"""

LIST_CONFIGS = """
MATCH (p:Pathway) WHERE $model_id IS NULL OR p.model_id = $model_id
RETURN p.config AS config, p.method AS method, p.selection AS selection, p.params AS params, count(p) AS pathways
ORDER BY pathways DESC, config
"""

LIST_CLASSES = """
MATCH (c:Class {model_id: $model_id})
RETURN c.id AS id, c.index AS index, c.name AS name ORDER BY c.index
"""

LIST_LAYERS = """
MATCH (:Model {id: $model_id})-[:HAS_LAYER]->(l:Layer)
OPTIONAL MATCH (p:Layer)-[:FEEDS]->(l)
WITH l, collect(p.index) AS preds
RETURN l.id AS id, l.site AS site, l.index AS index, l.kind AS kind, l.channels AS channels, l.depth AS depth,
       l.layout AS layout, preds
ORDER BY l.index
"""

ACCURACY_BY_CLASS = """
MATCH (i:Image {model_id: $model_id, kind: 'original'})-[:LABELED_AS]->(c:Class)
MATCH (i)-[:PREDICTED_AS]->(p:Class)
RETURN c.index AS class_index, c.name AS class_name, count(i) AS images,
       toFloat(sum(CASE WHEN p = c THEN 1 ELSE 0 END)) / count(i) AS accuracy
ORDER BY class_index
"""

ACCURACY_BY_VARIANT = """
MATCH (v:Image {model_id: $model_id})-[r:VARIANT_OF]->(o:Image)-[:LABELED_AS]->(c:Class)
MATCH (v)-[:PREDICTED_AS]->(p:Class)
RETURN r.kind AS kind, r.sweep AS sweep, r.eps AS eps, count(v) AS images,
       toFloat(sum(CASE WHEN p = c THEN 1 ELSE 0 END)) / count(v) AS accuracy
ORDER BY kind, eps, sweep
"""

# Read from the CountStat aggregates (per config, image kind and sweep: per-site totals of
# pathway neurons and how many pathways have any there), built from ``Pathway.layer_sizes``.
PATHWAY_SIZE_BY_LAYER = """
MATCH (s:CountStat {config: $config})
UNWIND range(0, size(s.totals) - 1) AS layer_index
WITH s, layer_index WHERE s.nonzero[layer_index] > 0
MATCH (:Model {id: s.model_id})-[:HAS_LAYER]->(l:Layer {index: layer_index})
RETURN s.kind AS kind, coalesce(s.sweep, '') AS sweep, layer_index, l.site AS site,
       toFloat(s.totals[layer_index]) / s.nonzero[layer_index] AS mean_neurons,
       coalesce(s.mass[layer_index], 0.0) / s.nonzero[layer_index] AS mean_mass, s.nonzero[layer_index] AS pathways
ORDER BY kind, sweep, layer_index
"""

LIST_IMAGES = """
MATCH (i:Image {model_id: $model_id})
WHERE ($kind IS NULL OR i.kind = $kind)
  AND ($label IS NULL OR i.label = $label)
  AND ($predicted IS NULL OR i.predicted = $predicted)
RETURN i.id AS id, i.source AS source, i.kind AS kind, i.label AS label, i.predicted AS predicted,
       i.prob AS prob, i.variant_of AS variant_of, coalesce(i.sweep, '') AS sweep
ORDER BY i.source, i.id
LIMIT $limit
"""

IMAGE_DETAIL = """
MATCH (i:Image {id: $image_id})
OPTIONAL MATCH (i)-[:VARIANT_OF]->(o:Image)
OPTIONAL MATCH (v:Image)-[:VARIANT_OF]->(i)
WITH i, o, collect(v.id) AS variants
RETURN i.id AS id, i.model_id AS model_id, i.source AS source, i.kind AS kind, i.params AS params,
       coalesce(i.sweep, '') AS sweep, i.label AS label, i.predicted AS predicted, i.prob AS prob,
       i.probs AS probs, i.png AS png, o.id AS original, variants
"""

PATHWAYS_OF_IMAGE = """
MATCH (p:Pathway {image_id: $image_id})
RETURN p.id AS id, p.config AS config, p.method AS method, p.selection AS selection, p.params AS params,
       p.target AS target, p.logit_full AS logit_full, p.logit_masked AS logit_masked, p.size AS size,
       p.saliency AS saliency, p.saliency_shape AS saliency_shape, p.saliency_scale AS saliency_scale,
       p.gaps AS gaps,
       coalesce(p.dead_fraction, 0.0) AS dead_fraction, p.corr_prec_overlap AS corr_prec_overlap,
       coalesce(p.cut_sites, '[]') AS cut_sites
ORDER BY p.config
"""

PATHWAY_NEURONS = """
MATCH (p:Pathway {id: $pathway_id})-[inc:INCLUDES]->(n:Neuron)
RETURN n.id AS neuron, n.site AS site, n.layer_index AS layer_index, n.channel AS channel,
       inc.contribution AS contribution, inc.score AS score, inc.rank AS rank, inc.elements AS elements,
       inc.dead AS dead
ORDER BY layer_index, channel
"""

PATHWAY_EDGES = """
MATCH (p:Pathway {id: $pathway_id})
MATCH (a:Neuron)-[f:FLOWS_TO {pathway: p.key}]->(b:Neuron)
RETURN a.id AS src, b.id AS dst, f.weight AS weight
ORDER BY abs(f.weight) DESC
"""

NEURON_DETAIL = """
MATCH (n:Neuron {id: $neuron_id})
OPTIONAL MATCH (c:Class)-[u:USES {config: $config}]->(n)
WITH n, c, u ORDER BY u.support DESC
RETURN n.id AS id, n.site AS site, n.layer_index AS layer_index, n.channel AS channel,
       collect(CASE WHEN c IS NULL THEN NULL ELSE {class_index: c.index, class_name: c.name, support: u.support,
                    mean_contribution: u.mean_contribution} END) AS classes
"""

NEURON_TOP_IMAGES = """
MATCH (p:Pathway {config: $config})-[inc:INCLUDES]->(:Neuron {id: $neuron_id})
MATCH (p)-[:FOR_IMAGE]->(i:Image)
RETURN i.id AS image_id, i.source AS source, i.kind AS kind, i.label AS label, i.predicted AS predicted,
       inc.contribution AS contribution
ORDER BY abs(inc.contribution) DESC, image_id
LIMIT $limit
"""

TOP_NEURONS_OF_CLASS = """
MATCH (c:Class {id: $class_id})-[u:USES {config: $config}]->(n:Neuron)
WHERE $layer IS NULL OR n.site = $layer
RETURN n.id AS neuron, n.site AS site, n.layer_index AS layer_index, n.channel AS channel,
       u.support AS support, u.mean_contribution AS mean_contribution
ORDER BY support DESC, abs(mean_contribution) DESC, neuron
LIMIT $limit
"""

# One row of parallel lists: thousands of small records cost the driver far more than one big one.
CLASS_SUPPORT = """
MATCH (c:Class {model_id: $model_id})-[u:USES {config: $config}]->(n:Neuron)
WHERE $classes IS NULL OR c.index IN $classes
RETURN collect(c.index) AS class_index, collect(n.id) AS neuron, collect(n.site) AS site,
       collect(n.layer_index) AS layer_index, collect(n.channel) AS channel, collect(u.support) AS support,
       collect(u.mean_contribution) AS mean_contribution
"""

CLASS_EDGE_SUPPORT = """
MATCH (a:Neuron)-[f:CLASS_FLOW {class_id: $class_id, config: $config}]->(b:Neuron)
WHERE f.support >= $min_support
RETURN a.id AS src, b.id AS dst, f.support AS support, f.mean_weight AS mean_weight
"""

PATHWAY_ID_OF = "MATCH (p:Pathway {image_id: $image_id, config: $config}) RETURN p.id AS id"

VARIANT_PAIRS = """
MATCH (v:Image)-[r:VARIANT_OF]->(o:Image)
WHERE v.model_id = $model_id AND ($kind IS NULL OR r.kind = $kind)
  AND ($label IS NULL OR o.label = $label)
MATCH (pv:Pathway {config: $config, image_id: v.id}), (po:Pathway {config: $config, image_id: o.id})
RETURN v.id AS variant, o.id AS original, r.kind AS kind, r.sweep AS sweep, r.eps AS eps,
       pv.id AS variant_pathway, po.id AS original_pathway, o.label AS label,
       o.predicted AS original_predicted, v.predicted AS variant_predicted
ORDER BY kind, eps, sweep, original
"""

VARIANT_KINDS = """
MATCH (v:Image {model_id: $model_id})-[r:VARIANT_OF]->(:Image)
WITH r.kind AS kind, count(*) AS images, max(r.eps) AS eps
RETURN kind, images, eps IS NOT NULL AS attack
ORDER BY attack DESC, kind
"""

VARIANT_STATS = """
MATCH (s:VariantStat {model_id: $model_id, config: $config})
WHERE ($kind IS NULL OR s.kind = $kind) AND ($label IS NULL OR s.label = $label)
RETURN s.kind AS kind, s.sweep AS sweep, s.label AS label, s.pairs AS pairs, s.changed AS changed,
       s.jaccard_sum AS jaccard_sum
ORDER BY kind, sweep, label
"""

HIJACKED_NEURONS = """
MATCH (s:VariantStat {model_id: $model_id, config: $config, kind: $kind})-[g:GAINED]->(n:Neuron)
WHERE $label IS NULL OR s.label = $label
WITH n, sum(g.count) AS count, collect([s.sweep, g.count]) AS by_sweep
RETURN n.id AS neuron, n.site AS site, n.layer_index AS layer_index, count, by_sweep
ORDER BY count DESC, neuron
LIMIT $limit
"""

PATHWAY_NEURON_SETS = """
UNWIND $pathway_ids AS pid
MATCH (p:Pathway {id: pid})-[inc:INCLUDES]->(n:Neuron)
RETURN pid AS pathway, n.id AS neuron, n.layer_index AS layer_index, n.site AS site, inc.contribution AS contribution
"""

SIMILAR_IMAGES = """
MATCH (p:Pathway {image_id: $image_id, config: $config})-[:INCLUDES]->(n:Neuron)<-[:INCLUDES]-(q:Pathway {config: $config})
WHERE q <> p AND ($kind IS NULL OR EXISTS { (q)-[:FOR_IMAGE]->(:Image {kind: $kind}) })
WITH p, q, count(n) AS inter
MATCH (q)-[:FOR_IMAGE]->(i:Image)
RETURN i.id AS image_id, i.source AS source, i.kind AS kind, i.label AS label, i.predicted AS predicted,
       toFloat(inter) / (p.size + q.size - inter) AS jaccard
ORDER BY jaccard DESC, image_id
LIMIT $limit
"""

# The same answer from candidates: the pathways nearest by signature (HNSW vector index), then
# exact Jaccard, counting each candidate's own INCLUDES against the image's neuron ids (so dense
# neurons are never scanned).
SIMILAR_IMAGES_INDEXED = """
MATCH (p:Pathway {image_id: $image_id, config: $config}) WHERE p.signature IS NOT NULL
WITH p, COLLECT { MATCH (p)-[:INCLUDES]->(n:Neuron) RETURN elementId(n) } AS mine
CALL db.index.vector.queryNodes('pathway_signature', $candidates, p.signature) YIELD node AS q
WITH p, mine, q WHERE q.config = $config AND q <> p
WITH p, q, size([(q)-[:INCLUDES]->(n:Neuron) WHERE elementId(n) IN mine | n]) AS inter
WHERE inter > 0
MATCH (i:Image {id: q.image_id})
WHERE $kind IS NULL OR i.kind = $kind
RETURN i.id AS image_id, i.source AS source, i.kind AS kind, i.label AS label, i.predicted AS predicted,
       toFloat(inter) / (p.size + q.size - inter) AS jaccard
ORDER BY jaccard DESC, image_id
LIMIT $limit
"""

# stops counting at $cap: enough to tell a small setting from a large one
PATHWAYS_OF_CONFIG = "MATCH (p:Pathway {config: $config}) WITH p LIMIT $cap RETURN count(p) AS n"

ORIGINAL_PATHWAYS = """
MATCH (p:Pathway {config: $config})-[:FOR_IMAGE]->(i:Image {kind: 'original'})
WHERE i.model_id = $model_id
RETURN p.id AS pathway, i.id AS image, i.label AS label, p.target AS target
ORDER BY image
"""

PATHWAY_EXISTS = """
MATCH (p:Pathway {id: $pathway_id})
RETURN p.id AS id, coalesce(p.cut_sites, '[]') AS cut_sites, p.method AS method, p.params AS params
"""
IMAGE_EXISTS = "MATCH (i:Image {id: $image_id}) RETURN i.id AS id, i.model_id AS model_id"
CLASS_EXISTS = "MATCH (c:Class {id: $class_id}) RETURN c.id AS id, c.model_id AS model_id"
NEURON_EXISTS = "MATCH (n:Neuron {id: $neuron_id}) RETURN n.id AS id"
MODEL_EXISTS = "MATCH (m:Model {id: $model_id}) RETURN m.id AS id"

# --- exemplars (top-N images per neuron; merged over every run loaded for the model) -------

EXEMPLARS_OF_MODEL = """
MATCH (n:Neuron {model_id: $model_id})-[e:EXEMPLAR]->(i:Image)
RETURN n.layer_index AS site, n.channel AS channel, e.kind AS kind, i.id AS image_id, e.value AS value,
       e.position AS position, e.box AS box
"""

DELETE_EXEMPLARS = """
MATCH (n:Neuron {model_id: $model_id})-[e:EXEMPLAR]->()
DELETE e
"""

CREATE_EXEMPLARS = """
WITH $rows AS r
UNWIND range(0, size(r.start) - 1) AS i
MATCH (n:Neuron) WHERE elementId(n) = r.start[i]
MATCH (im:Image {id: r.end[i]})
CREATE (n)-[:EXEMPLAR {kind: r.kind[i], rank: r.rank[i], value: r.value[i], position: r.position[i],
                       box: r.box[i]}]->(im)
RETURN count(*) AS created
"""

NEURON_EXEMPLARS = """
MATCH (:Neuron {id: $neuron_id})-[e:EXEMPLAR]->(i:Image)
RETURN e.kind AS kind, e.rank AS rank, e.value AS value, e.position AS position, e.box AS box, i.id AS image_id,
       i.source AS source, i.label AS label, i.predicted AS predicted, i.png AS png
ORDER BY kind, rank
"""

NEURON_FLOWS_OUT = """
MATCH (:Neuron {id: $neuron_id})-[f:CLASS_FLOW {config: $config}]->(m:Neuron)
MATCH (c:Class {id: f.class_id})
RETURN m.id AS neuron, m.site AS site, c.name AS class_name, f.support AS support, f.mean_weight AS mean_weight
ORDER BY abs(f.mean_weight) * f.support DESC, neuron LIMIT $limit
"""

NEURON_FLOWS_IN = """
MATCH (m:Neuron)-[f:CLASS_FLOW {config: $config}]->(:Neuron {id: $neuron_id})
MATCH (c:Class {id: f.class_id})
RETURN m.id AS neuron, m.site AS site, c.name AS class_name, f.support AS support, f.mean_weight AS mean_weight
ORDER BY abs(f.mean_weight) * f.support DESC, neuron LIMIT $limit
"""

NEURON_GAINED = """
MATCH (s:VariantStat {model_id: $model_id, config: $config})-[g:GAINED]->(:Neuron {id: $neuron_id})
RETURN s.kind AS kind, s.sweep AS sweep, sum(g.count) AS gained
"""

NEURON_LOST = """
MATCH (n:Neuron {id: $neuron_id})<-[:INCLUDES]-(po:Pathway {config: $config})-[:FOR_IMAGE]->(o:Image {kind: 'original'})
MATCH (v:Image)-[r:VARIANT_OF]->(o)
MATCH (pv:Pathway {image_id: v.id, config: $config})
WHERE NOT (pv)-[:INCLUDES]->(n)
RETURN r.kind AS kind, r.sweep AS sweep, count(*) AS lost
"""

VARIANT_PAIR_COUNTS = """
MATCH (s:VariantStat {model_id: $model_id, config: $config})
RETURN s.kind AS kind, s.sweep AS sweep, sum(s.pairs) AS pairs
"""

# --- the console's example queries (shown to users, run read-only) --------------------------

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
RETURN r.kind AS kind, r.sweep AS sweep, count(*) AS flipped ORDER BY kind, sweep""",
    "Strongest edges of one pathway": """\
MATCH (p:Pathway) WITH p LIMIT 1
MATCH (a:Neuron)-[f:FLOWS_TO {pathway: p.key}]->(b:Neuron)
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

# --- the schema a store holds (checked against graphstore.schema) ---------------------------------

STORED_NODE_PROPERTIES = """
CALL db.schema.nodeTypeProperties() YIELD nodeLabels, propertyName, propertyTypes
RETURN nodeLabels AS labels, propertyName AS property, propertyTypes AS types
"""

STORED_RELATIONSHIP_PROPERTIES = """
CALL db.schema.relTypeProperties() YIELD relType, propertyName, propertyTypes
RETURN relType AS type, propertyName AS property, propertyTypes AS types
"""

STORED_INDEXES = """
SHOW INDEXES YIELD name, type, labelsOrTypes, properties, owningConstraint
RETURN name, type, labelsOrTypes AS target, properties, owningConstraint AS constraint
"""
