"""The query layer: named questions about pathways, answered from Neo4j as typed results.

Every method runs statements from ``graphstore.queries`` with parameters only, in read
transactions, and returns dataclasses, numpy arrays or ``networkx`` graphs. Set algebra
over small answers (overlaps, departures) happens here, never in the UI.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import neo4j
import networkx as nx
import numpy as np
import pandas as pd
from PIL import Image

from graphstore import queries as Q
from graphstore.connection import DATABASE
from graphstore.console import CypherResult, run_read_only
from graphstore.errors import NotFound
from graphstore.names import setting_name, variant_name
from graphstore.results import (
    Agreement,
    AttackEffect,
    ClassInfo,
    ClassSimilarity,
    ConfigInfo,
    Exemplar,
    GroupedGraph,
    Hijack,
    ImageDetail,
    ImageInfo,
    LayerAgreement,
    LayerConsistency,
    LayerCount,
    NeuronCard,
    NeuronChange,
    NeuronEdge,
    NeuronScore,
    PathwayInfo,
    Perturbation,
    SharedPathways,
    Shift,
    SignatureNeuron,
    SimilarImage,
    Summary,
    VariantOverlap,
    to_frame,
)
from graphstore.rows import EDGE_SUPPORT_FLOOR
from graphstore.schema import StoredSchema
from records import jaccard, layer_overlaps, parse_class_id, parse_neuron_id, variant_setting

EXACT_SIMILAR_LIMIT = 200  # similar_images scans exactly up to this many pathways of a setting
SIMILAR_CANDIDATES = 400  # nearest signatures fetched before exact re-ranking


def _setting(text: str | None) -> dict[str, Any]:
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class Store:
    """Named, parameterised questions over one Neo4j database.

    ``with Store.connect() as store: ...`` talks to ``NEO4J_URI`` (and ``NEO4J_DATABASE``) or the
    project's local server, and closes the connection at the end of the block.
    """

    def __init__(self, driver: neo4j.Driver, database: str = DATABASE) -> None:
        self.driver = driver
        self.database = database

    @classmethod
    def connect(cls, home: Path | None = None) -> Store:
        """A store over ``NEO4J_URI``/``NEO4J_USER``/``NEO4J_PASSWORD``/``NEO4J_DATABASE`` when set,
        else the local server under ``home`` (default ``PATHX_HOME`` or ``.cache``)."""
        from graphstore.connection import open_driver, settings_from_env

        settings = settings_from_env(home)
        return cls(open_driver(settings), settings.database)

    def close(self) -> None:
        self.driver.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cypher(self, query: str, params: dict[str, Any] | None = None, timeout_s: float = 10.0,
               max_rows: int = 1000) -> CypherResult:
        """The user's own read-only Cypher (see ``graphstore.console``): ``QueryRefused`` in one line
        for writes, admin commands, errors and time-outs."""
        return run_read_only(self.driver, query, params, timeout_s=timeout_s, max_rows=max_rows,
                             database=self.database)

    def table(self, name: str, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """The named query ``name`` (a method of this class, e.g. ``"top_neurons"``) as a DataFrame."""
        method = getattr(self, name, None)
        if name.startswith("_") or not callable(method) or name in ("table", "close", "connect", "cypher"):
            raise NotFound(f"unknown query {name!r}")
        return to_frame(method(*args, **kwargs))

    # -- plumbing --------------------------------------------------------------------------
    def _run(self, query: str, **params: Any) -> list[dict[str, Any]]:
        records, _, _ = self.driver.execute_query(
            query, parameters_=params, database_=self.database, routing_=neo4j.RoutingControl.READ
        )
        return [r.data() for r in records]

    def _require(self, query: str, what: str, **params: Any) -> dict[str, Any]:
        rows = self._run(query, **params)
        if not rows:
            value = next(iter(params.values()))
            raise NotFound(f"unknown {what} {value!r}")
        return rows[0]

    # -- inventory -------------------------------------------------------------------------
    def stored_schema(self) -> StoredSchema:
        """Labels, relationship types, properties with their types, and indexes, as the store reports them
        (compare with ``graphstore.schema.stored_form()``; token lookup indexes left out)."""
        nodes: dict[str, dict[str, str]] = defaultdict(dict)
        rels: dict[str, dict[str, str]] = defaultdict(dict)
        for r in self._run(Q.STORED_NODE_PROPERTIES):
            for label in r["labels"]:
                if r["property"] is not None:
                    nodes[label][r["property"]] = "|".join(r["types"])
        for r in self._run(Q.STORED_RELATIONSHIP_PROPERTIES):
            props = rels[r["type"].lstrip(":").strip("`")]
            if r["property"] is not None:
                props[r["property"]] = "|".join(r["types"])
        indexes = {r["name"]: ("unique" if r["constraint"] else r["type"].lower(), r["target"][0],
                               tuple(r["properties"]))
                   for r in self._run(Q.STORED_INDEXES) if r["type"] != "LOOKUP"}
        return StoredSchema(dict(nodes), dict(rels), indexes)

    def summary(self) -> Summary:
        return Summary(**self._run(Q.STORE_SUMMARY)[0])

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Node counts by label and relationship counts by type."""
        nodes = {r["label"]: r["n"] for r in self._run(Q.COUNT_NODES)}
        rels = {r["type"]: r["n"] for r in self._run(Q.COUNT_RELATIONSHIPS)}
        return nodes, rels

    def models(self) -> list[dict[str, Any]]:
        return self._run(Q.LIST_MODELS)

    def default_model(self) -> str:
        models = self.models()
        if not models:
            raise NotFound("the store holds no model yet; run `pathx load RUN_DIR`")
        return str(models[0]["id"])

    def configs(self, model_id: str | None = None) -> list[ConfigInfo]:
        return [ConfigInfo(**r, name=setting_name(r["method"], r["selection"], r["params"]))
                for r in self._run(Q.LIST_CONFIGS, model_id=model_id)]

    def default_config(self, model_id: str | None = None) -> str:
        configs = self.configs(model_id)
        if not configs:
            raise NotFound("the store holds no pathways yet; run `pathx load RUN_DIR`")
        return configs[0].config

    def classes(self, model_id: str) -> list[ClassInfo]:
        self._require(Q.MODEL_EXISTS, "model", model_id=model_id)
        return [ClassInfo(**r) for r in self._run(Q.LIST_CLASSES, model_id=model_id)]

    def layers(self, model_id: str) -> list[dict[str, Any]]:
        return self._run(Q.LIST_LAYERS, model_id=model_id)

    # -- overview --------------------------------------------------------------------------
    def accuracy_by_class(self, model_id: str) -> list[dict[str, Any]]:
        return self._run(Q.ACCURACY_BY_CLASS, model_id=model_id)

    def accuracy_by_variant(self, model_id: str) -> list[dict[str, Any]]:
        """Per variant kind and sweep setting: images and accuracy; ``name`` reads like "PGD ε = 0.1, 10 steps"
        and ``targeted`` says whether the attack aimed at a chosen class."""
        rows = self._run(Q.ACCURACY_BY_VARIANT, model_id=model_id)
        for r in rows:
            r["name"] = variant_name(r["kind"], r["setting"])
            r["targeted"] = bool(_setting(r["setting"]).get("targeted", False))
        return rows

    # -- images and pathways ---------------------------------------------------------------
    def images(self, model_id: str, kind: str | None = None, label: int | None = None,
               predicted: int | None = None, limit: int = 500) -> list[ImageInfo]:
        rows = self._run(Q.LIST_IMAGES, model_id=model_id, kind=kind, label=label, predicted=predicted,
                         limit=int(limit))
        return [ImageInfo(**r) for r in rows]

    def image(self, image_id: str) -> ImageDetail:
        self._require(Q.IMAGE_EXISTS, "image", image_id=image_id)
        row = self._run(Q.IMAGE_DETAIL, image_id=image_id)[0]
        row["png"] = bytes(row["png"])
        return ImageDetail(**row)

    def pathways_of_image(self, image_id: str) -> list[PathwayInfo]:
        self._require(Q.IMAGE_EXISTS, "image", image_id=image_id)
        out = []
        for r in self._run(Q.PATHWAYS_OF_IMAGE, image_id=image_id):
            shape = r.pop("saliency_shape")
            r["saliency"] = np.asarray(r["saliency"], dtype=np.float32).reshape(shape)
            out.append(PathwayInfo(**r))
        return out

    def pathway_of(self, image_id: str, config: str) -> PathwayInfo:
        for p in self.pathways_of_image(image_id):
            if p.config == config:
                return p
        raise NotFound(f"image {image_id!r} has no pathway of setting {config!r}")

    def pathway_graph(self, pathway_id: str, max_edges: int | None = None) -> nx.DiGraph:
        """Neurons (contribution, rank) and weighted edges of one pathway."""
        self._require(Q.PATHWAY_EXISTS, "pathway", pathway_id=pathway_id)
        graph = nx.DiGraph(pathway_id=pathway_id)
        for r in self._run(Q.PATHWAY_NEURONS, pathway_id=pathway_id):
            graph.add_node(r.pop("neuron"), **r)
        edges = self._run(Q.PATHWAY_EDGES, pathway_id=pathway_id)
        for r in edges[:max_edges] if max_edges else edges:
            graph.add_edge(r["src"], r["dst"], weight=r["weight"])
        return graph

    def neuron(self, neuron_id: str, config: str) -> dict[str, Any]:
        return self._require(Q.NEURON_DETAIL, "neuron", neuron_id=neuron_id, config=config)

    def neuron_card(self, neuron_id: str, config: str, edges: int = 5) -> NeuronCard:
        """What the neuron sees (exemplar images with boxes), which classes use it, its strongest
        class-level edges in and out, and how many attacked images gain or lose it, per strength."""
        info = self.neuron(neuron_id, config)
        model_id = parse_neuron_id(neuron_id).model_id
        exemplars = [Exemplar(**{**r, "png": bytes(r["png"]), "box": list(r["box"]), "position": list(r["position"])})
                     for r in self._run(Q.NEURON_EXEMPLARS, neuron_id=neuron_id)]
        flows_in = [NeuronEdge(**r) for r in self._run(Q.NEURON_FLOWS_IN, neuron_id=neuron_id, config=config,
                                                        limit=edges)]
        flows_out = [NeuronEdge(**r) for r in self._run(Q.NEURON_FLOWS_OUT, neuron_id=neuron_id, config=config,
                                                         limit=edges)]
        pairs = {(r["kind"], r["setting"]): int(r["pairs"])
                 for r in self._run(Q.VARIANT_PAIR_COUNTS, model_id=model_id, config=config)}
        gained = {(r["kind"], r["setting"]): int(r["gained"])
                  for r in self._run(Q.NEURON_GAINED, model_id=model_id, config=config, neuron_id=neuron_id)}
        lost = {(r["kind"], r["setting"]): int(r["lost"])
                for r in self._run(Q.NEURON_LOST, neuron_id=neuron_id, config=config)}
        attacks = [AttackEffect(k, st, variant_name(k, st), n, gained.get((k, st), 0), lost.get((k, st), 0))
                   for (k, st), n in sorted(pairs.items())]
        return NeuronCard(neuron_id, info["site"], int(info["layer_index"]), int(info["channel"]), exemplars,
                          [c for c in info["classes"] if c is not None], flows_in, flows_out, attacks)

    def neuron_top_images(self, neuron_id: str, config: str, limit: int = 10) -> list[dict[str, Any]]:
        self._require(Q.NEURON_EXISTS, "neuron", neuron_id=neuron_id)
        return self._run(Q.NEURON_TOP_IMAGES, neuron_id=neuron_id, config=config, limit=int(limit))

    # -- classes ---------------------------------------------------------------------------
    def top_neurons(self, class_id: str, config: str, layer: str | None = None, limit: int = 20) -> list[NeuronScore]:
        self._require(Q.CLASS_EXISTS, "class", class_id=class_id)
        return [NeuronScore(**r) for r in self._run(Q.TOP_NEURONS_OF_CLASS, class_id=class_id, config=config,
                                                      layer=layer, limit=int(limit))]

    def _support(self, model_id: str, config: str, classes: list[int] | None = None
                 ) -> dict[int, dict[str, NeuronScore]]:
        """class index -> neuron -> score (only ``classes`` when given)."""
        cols = self._run(Q.CLASS_SUPPORT, model_id=model_id, config=config, classes=classes)[0]
        table: dict[int, dict[str, NeuronScore]] = defaultdict(dict)
        for c, n, site, li, ch, sup, mc in zip(*cols.values(), strict=True):
            table[c][n] = NeuronScore(n, site, li, ch, sup, mc)
        return table

    def _class_index(self, class_id: str) -> tuple[str, int]:
        row = self._require(Q.CLASS_EXISTS, "class", class_id=class_id)
        return str(row["model_id"]), parse_class_id(class_id)[1]

    def shared_pathways(self, class_a: str, class_b: str, config: str, min_support: float = 0.5) -> SharedPathways:
        model_a, ia = self._class_index(class_a)
        _, ib = self._class_index(class_b)
        table = self._support(model_a, config, [ia, ib])
        sa = {n: s for n, s in table.get(ia, {}).items() if s.support >= min_support}
        sb = {n: s for n, s in table.get(ib, {}).items() if s.support >= min_support}
        layers = {r["index"]: (r["site"], r["depth"] or 0) for r in self.layers(model_a)}
        per_layer = layer_overlaps({n: s.layer_index for n, s in sa.items()},
                                   {n: s.layer_index for n, s in sb.items()}, layers)
        # stored aggregates hold supports >= the floor; below it, count from the pathways themselves
        edges = Q.CLASS_EDGE_SUPPORT_STORED if min_support >= EDGE_SUPPORT_FLOOR else Q.CLASS_EDGE_SUPPORT
        ea = {(r["src"], r["dst"]): r["support"] for r in
              self._run(edges, class_id=class_a, config=config, min_support=float(min_support))}
        eb = {(r["src"], r["dst"]): r["support"] for r in
              self._run(edges, class_id=class_b, config=config, min_support=float(min_support))}
        def key(s: NeuronScore) -> tuple[int, int]:
            return (s.layer_index, s.channel)

        return SharedPathways(
            class_a, class_b,
            shared=sorted(((sa[n], sb[n]) for n in sa.keys() & sb.keys()), key=lambda p: key(p[0])),
            only_a=sorted((sa[n] for n in sa.keys() - sb.keys()), key=key),
            only_b=sorted((sb[n] for n in sb.keys() - sa.keys()), key=key),
            per_layer=per_layer,
            shared_edges=sorted((k[0], k[1], ea[k], eb[k]) for k in ea.keys() & eb.keys()),
        )

    def _support_matrix(self, model_id: str, config: str) -> tuple[list[ClassInfo], list[NeuronScore], np.ndarray,
                                                                    np.ndarray]:
        """Classes, neurons, and ``support``, ``mean_contribution`` as ``[classes, neurons]`` arrays."""
        classes = self.classes(model_id)
        cols = self._run(Q.CLASS_SUPPORT, model_id=model_id, config=config, classes=None)[0]
        names, first, col = np.unique(np.asarray(cols["neuron"], dtype=object).astype(str), return_index=True,
                                      return_inverse=True)
        row_of = {c.index: i for i, c in enumerate(classes)}
        rows = np.asarray([row_of[c] for c in cols["class_index"]], dtype=np.int64)
        support = np.zeros((len(classes), len(names)))
        mean = np.zeros((len(classes), len(names)))
        support[rows, col] = cols["support"]
        mean[rows, col] = cols["mean_contribution"]
        neurons = [NeuronScore(str(names[j]), cols["site"][f], cols["layer_index"][f], cols["channel"][f], 0.0, 0.0)
                   for j, f in enumerate(first.tolist())]
        return classes, neurons, support, mean

    def similarity_matrix(self, model_id: str, config: str, min_support: float = 0.5) -> ClassSimilarity:
        """Jaccard of the classes' neuron sets (support >= s) and weighted Jaccard of support x |contribution|."""
        classes, _, support, mean = self._support_matrix(model_id, config)
        member = (support >= min_support).astype(np.int64)
        inter = member @ member.T
        sizes = member.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - inter
        jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        w = support * np.abs(mean)
        wj = np.ones((len(classes), len(classes)))
        for i in range(len(classes)):
            num = np.minimum(w[i], w).sum(axis=1)
            den = np.maximum(w[i], w).sum(axis=1)
            wj[i] = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
        return ClassSimilarity([c.name for c in classes], jac, wj)

    def class_signature(self, class_id: str, config: str, min_support: float = 0.5,
                        max_other: float = 0.2) -> list[SignatureNeuron]:
        """Neurons with support >= s in the class and <= ``max_other`` in every other class."""
        model_id, ci = self._class_index(class_id)
        classes, neurons, support, _ = self._support_matrix(model_id, config)
        rows = [i for i, c in enumerate(classes) if c.index == ci]
        if not rows:
            return []
        own = support[rows[0]]
        others = np.delete(support, rows[0], axis=0)
        mx = others.max(axis=0) if len(others) else np.zeros_like(own)
        mean_other = others.mean(axis=0) if len(others) else np.zeros_like(own)
        out = [SignatureNeuron(n.neuron, n.site, n.layer_index, n.channel, float(own[j]), float(mx[j]),
                               float(own[j] - mean_other[j]))
               for j, n in enumerate(neurons) if own[j] > 0 and own[j] >= min_support and mx[j] <= max_other]
        return sorted(out, key=lambda x: (-x.specificity, x.neuron))

    # -- variants and attacks --------------------------------------------------------------
    def _neuron_sets(self, pathway_ids: Sequence[str]) -> dict[str, dict[str, tuple[int, str, float]]]:
        sets: dict[str, dict[str, tuple[int, str, float]]] = {p: {} for p in pathway_ids}
        for r in self._run(Q.PATHWAY_NEURON_SETS, pathway_ids=list(pathway_ids)):
            sets[r["pathway"]][r["neuron"]] = (r["layer_index"], r["site"], r["contribution"])
        return sets

    def variant_pairs(self, model_id: str, config: str, kind: str | None = None,
                      label: int | None = None) -> list[dict[str, Any]]:
        return self._run(Q.VARIANT_PAIRS, model_id=model_id, config=config, kind=kind, label=label)

    def variant_kinds(self, model_id: str, attacks: bool | None = None) -> list[str]:
        """The variant kinds stored for the model (``attacks``: only those with an ε, or only the others)."""
        rows = self._run(Q.VARIANT_KINDS, model_id=model_id)
        return [r["kind"] for r in rows if attacks is None or r["attack"] == attacks]

    def perturbation(self, original_id: str, variant_id: str) -> Perturbation:
        """The variant minus its original as a picture (grey = no change, scaled to the largest change)."""
        a = np.asarray(Image.open(io.BytesIO(self.image(original_id).png)), dtype=np.float32)
        b = np.asarray(Image.open(io.BytesIO(self.image(variant_id).png)), dtype=np.float32)
        diff = b - a
        lim = float(np.abs(diff).max()) or 1.0
        buf = io.BytesIO()
        Image.fromarray(((diff / lim) * 127 + 128).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
        return Perturbation(buf.getvalue(), lim / 255)

    def shift_graph(self, shift: Shift, original_pathway: str, variant_pathway: str) -> GroupedGraph:
        """Both pathways of an attacked pair as one graph; groups kept / lost / gained."""
        graph = nx.DiGraph()
        groups: dict[str, str] = {}
        for group, changes in (("kept", shift.kept), ("lost", shift.lost), ("gained", shift.gained)):
            for c in changes:
                graph.add_node(c.neuron, site=c.site, layer_index=c.layer_index,
                               channel=parse_neuron_id(c.neuron).channel,
                               contribution=c.variant if c.variant is not None else c.original)
                groups[c.neuron] = group
        for pid in (original_pathway, variant_pathway):
            for u, v, d in self.pathway_graph(pid).edges(data=True):
                graph.add_edge(u, v, weight=d["weight"])
        return GroupedGraph(graph, groups)

    def shared_graph(self, shared: SharedPathways) -> GroupedGraph:
        """Two classes' pathways as one graph: shared neurons (mean contribution of the two classes),
        neurons of one class only, and the edges both classes hold (mean support)."""
        graph = nx.DiGraph()
        groups: dict[str, str] = {}
        for na, nb in shared.shared:
            graph.add_node(na.neuron, site=na.site, layer_index=na.layer_index, channel=na.channel,
                           contribution=(na.mean_contribution + nb.mean_contribution) / 2)
            groups[na.neuron] = "shared"
        for group, scores in (("a", shared.only_a), ("b", shared.only_b)):
            for n in scores:
                graph.add_node(n.neuron, site=n.site, layer_index=n.layer_index, channel=n.channel,
                               contribution=n.mean_contribution)
                groups[n.neuron] = group
        for src, dst, sa, sb in shared.shared_edges:
            if src in graph and dst in graph:
                graph.add_edge(src, dst, weight=(sa + sb) / 2)
        return GroupedGraph(graph, groups)

    def adversarial_shift(self, variant_id: str, config: str, threshold: float = 0.5) -> Shift:
        detail = self.image(variant_id)
        if detail.original is None:
            raise NotFound(f"image {variant_id!r} is an original, not a variant")
        pv = self._require(Q.PATHWAY_ID_OF, "pathway for image", image_id=variant_id, config=config)["id"]
        po = self._require(Q.PATHWAY_ID_OF, "pathway for image", image_id=detail.original, config=config)["id"]
        sets = self._neuron_sets([po, pv])
        so, sv = sets[po], sets[pv]
        info = {**so, **sv}

        def change(n: str) -> NeuronChange:
            li, site, _ = info[n]
            return NeuronChange(n, site, li, so[n][2] if n in so else None, sv[n][2] if n in sv else None)

        layers = {r["index"]: (r["site"], r["depth"] or 0) for r in self.layers(detail.model_id)}
        per_layer = layer_overlaps({n: v[0] for n, v in so.items()}, {n: v[0] for n, v in sv.items()}, layers)
        by_depth = sorted(per_layer, key=lambda o: (o.depth, o.layer_index))
        first_change = next((o.layer_index for o in by_depth if o.shared != o.a or o.shared != o.b), None)
        first_dep = next((o.layer_index for o in by_depth if o.jaccard < threshold), None)
        params = json.loads(detail.params or "{}")
        def order(c: NeuronChange) -> tuple[int, str]:
            return (c.layer_index, c.neuron)

        setting = variant_setting(detail.kind, params)
        return Shift(
            variant_id, detail.original, detail.kind, setting,
            kept=sorted((change(n) for n in so.keys() & sv.keys()), key=order),
            lost=sorted((change(n) for n in so.keys() - sv.keys()), key=order),
            gained=sorted((change(n) for n in sv.keys() - so.keys()), key=order),
            per_layer=per_layer, first_change=first_change, first_departure=first_dep,
        )

    def hijacked_neurons(self, model_id: str, config: str, kind: str, label: int | None = None,
                         limit: int = 20) -> list[Hijack]:
        """Neurons most often gained by variants of ``kind`` (Bluff's "most changed"), by strength.

        Read from the ``VariantStat`` aggregates: share = pairs whose variant pathway has the
        neuron and the original's lacks it, over all pairs (and per sweep setting).
        """
        stats = self._run(Q.VARIANT_STATS, model_id=model_id, config=config, kind=kind, label=label)
        if not stats:
            return []
        per_setting: dict[str, int] = defaultdict(int)
        for st in stats:
            per_setting[st["setting"]] += st["pairs"]
        total = sum(per_setting.values())
        rows = self._run(Q.HIJACKED_NEURONS, model_id=model_id, config=config, kind=kind, label=label,
                         limit=int(limit))
        out = []
        for r in rows:
            counts: dict[str, int] = defaultdict(int)
            for setting, k in r["by_setting"]:
                counts[setting] += k
            out.append(Hijack(r["neuron"], r["site"], r["layer_index"], r["count"], r["count"] / total,
                              {s: counts.get(s, 0) / n for s, n in sorted(per_setting.items())}))
        return out

    def variant_overlap(self, model_id: str, config: str, kind: str | None = None) -> list[VariantOverlap]:
        """For each variant kind and setting: mean per-layer overlap with the originals' pathways."""
        stats = self._run(Q.VARIANT_STATS, model_id=model_id, config=config, kind=kind, label=None)
        if not stats:
            return []
        layers = sorted((r["index"], r["site"]) for r in self.layers(model_id))
        sums: dict[tuple[str, str], np.ndarray] = {}
        pairs: dict[tuple[str, str], int] = defaultdict(int)
        changed: dict[tuple[str, str], int] = defaultdict(int)
        for st in stats:
            key = (st["kind"], st["setting"])
            sums[key] = sums.get(key, 0.0) + np.asarray(st["jaccard_sum"], dtype=np.float64)
            pairs[key] += st["pairs"]
            changed[key] += st["changed"]
        out = []
        for key in sorted(sums):
            mean = sums[key] / pairs[key]
            out.extend(VariantOverlap(key[0], key[1], li, site, float(mean[li]), pairs[key],
                                      changed[key] / pairs[key], variant_name(key[0], key[1])) for li, site in layers)
        return out

    def pathway_counts(self, config: str) -> list[LayerCount]:
        """Mean pathway neurons per layer for originals and for each variant kind and setting."""
        return [LayerCount(**r, name=variant_name(r["kind"], r["setting"]))
                for r in self._run(Q.PATHWAY_SIZE_BY_LAYER, config=config)]

    def similar_images(
        self, image_id: str, config: str, limit: int = 10, kind: str | None = None, exact: bool | None = None
    ) -> list[SimilarImage]:
        """Images whose pathway under ``config`` shares the most neurons (Jaccard) with this image's.

        ``exact``: scan every pathway through the image's neurons (cost grows with the store);
        otherwise take candidates from the ``pathway_signature`` vector index and rank them by exact
        Jaccard. ``None`` picks the scan up to ``EXACT_SIMILAR_LIMIT`` pathways of the setting. The
        index answer can miss a neighbour the signature ranks low; it falls back to the scan when
        it finds fewer than ``limit`` images.
        """
        self._require(Q.IMAGE_EXISTS, "image", image_id=image_id)
        params = {"image_id": image_id, "config": config, "limit": int(limit), "kind": kind}
        if exact is None:
            cap = EXACT_SIMILAR_LIMIT + 1
            exact = self._run(Q.PATHWAYS_OF_CONFIG, config=config, cap=cap)[0]["n"] < cap
        if not exact:
            rows = self._run(Q.SIMILAR_IMAGES_INDEXED, candidates=max(SIMILAR_CANDIDATES, 20 * int(limit)), **params)
            if len(rows) >= limit:
                return [SimilarImage(**r) for r in rows]
        return [SimilarImage(**r) for r in self._run(Q.SIMILAR_IMAGES, **params)]

    def method_agreement(self, image_id: str) -> list[Agreement]:
        """Jaccard between the neuron sets of the image's pathways of different settings."""
        pathways = self.pathways_of_image(image_id)
        sets = self._neuron_sets([p.id for p in pathways])
        out = []
        for a, b in itertools.combinations(pathways, 2):
            out.append(Agreement(a.config, b.config, jaccard(set(sets[a.id]), set(sets[b.id]))))
        return out

    def _original_sets(self, model_id: str, config: str) -> tuple[list[dict[str, Any]],
                                                                   dict[str, dict[str, tuple[int, str, float]]]]:
        rows = self._run(Q.ORIGINAL_PATHWAYS, model_id=model_id, config=config)
        return rows, self._neuron_sets([r["pathway"] for r in rows])

    def layer_agreement(self, model_id: str, config_a: str, config_b: str) -> list[LayerAgreement]:
        """How two settings' selections overlap per layer on the same original images."""
        rows_a, sets_a = self._original_sets(model_id, config_a)
        rows_b, sets_b = self._original_sets(model_id, config_b)
        by_image_b = {r["image"]: r["pathway"] for r in rows_b}
        pairs = [(sets_a[r["pathway"]], sets_b[by_image_b[r["image"]]]) for r in rows_a if r["image"] in by_image_b]
        out = []
        for li, site in sorted((r["index"], r["site"]) for r in self.layers(model_id)):
            inter = sizes = 0
            jac = []
            for a, b in pairs:
                sa = {n for n, v in a.items() if v[0] == li}
                sb = {n for n, v in b.items() if v[0] == li}
                inter += len(sa & sb)
                sizes += len(sa) + len(sb)
                jac.append(jaccard(sa, sb))
            out.append(LayerAgreement(li, site, inter / sizes if sizes else 0.0,
                                      float(np.mean(jac)) if jac else 0.0, len(pairs)))
        return out

    def class_consistency(self, model_id: str, config: str, max_pairs: int = 20_000) -> list[LayerConsistency]:
        """Within-class against across-class Jaccard of originals' pathways, per layer (by label)."""
        rows, sets = self._original_sets(model_id, config)
        rows = [r for r in rows if r["label"] is not None and r["label"] >= 0]
        pairs = list(itertools.combinations(range(len(rows)), 2))[:max_pairs]
        out = []
        for li, site in sorted((r["index"], r["site"]) for r in self.layers(model_id)):
            layer_sets = [{n for n, v in sets[r["pathway"]].items() if v[0] == li} for r in rows]
            within, across = [], []
            for i, j in pairs:
                (within if rows[i]["label"] == rows[j]["label"] else across).append(
                    jaccard(layer_sets[i], layer_sets[j]))
            out.append(LayerConsistency(li, site, float(np.mean(within)) if within else float("nan"),
                                        float(np.mean(across)) if across else float("nan"), len(within), len(across)))
        return out

    # -- export ----------------------------------------------------------------------------
    def export_pathways(self, pathway_ids: Iterable[str], path: Path) -> nx.DiGraph:
        """Union of pathways as one graph, written as GraphML (``.graphml``) or GEXF (``.gexf``)."""
        graph = nx.DiGraph()
        for pid in pathway_ids:
            g = self.pathway_graph(pid)
            for n, data in g.nodes(data=True):
                graph.add_node(n, **{k: v for k, v in data.items() if v is not None})
            for u, v, data in g.edges(data=True):
                graph.add_edge(u, v, weight=data["weight"], pathway=pid)
        path = Path(path)
        if path.suffix == ".gexf":
            nx.write_gexf(graph, path)
        elif path.suffix == ".graphml":
            nx.write_graphml(graph, path)
        else:
            raise ValueError(f"export format of {path.name!r} unknown; use .graphml or .gexf")
        return graph
