"""The query layer: named questions about pathways, answered from Neo4j as typed results.

Every method runs statements from ``graphstore.queries`` with parameters only, in read
transactions, and returns the typed results of ``graphstore.results``, numpy arrays or
``networkx`` graphs. Set algebra over small answers (overlaps, departures, merged graphs) is in
``graphstore.analysis``; file export in ``graphstore.export``; never in the UI.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import neo4j
import networkx as nx
import numpy as np
import pandas as pd

from graphstore import analysis as A
from graphstore import queries as Q
from graphstore.connection import DATABASE
from graphstore.console import CypherResult, run_read_only
from graphstore.errors import NotFound
from graphstore.names import edge_mode, edges_name, setting_name, variant_name
from graphstore.results import (
    Agreement,
    ClassInfo,
    ClassSimilarity,
    ConfigInfo,
    GroupedGraph,
    Hijack,
    ImageDetail,
    ImageInfo,
    LayerAgreement,
    LayerConsistency,
    LayerCount,
    NeuronCard,
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
from graphstore.rows import saliency_of
from graphstore.schema import StoredSchema
from records import parse_class_id, parse_neuron_id

EXACT_SIMILAR_LIMIT = 200  # similar_images scans exactly up to this many pathways of a setting
SIMILAR_CANDIDATES = 400  # nearest signatures fetched before exact re-ranking


class Store:
    """Named, parameterised questions over one Neo4j database.

    ``with Store.connect() as store: ...`` talks to ``NEO4J_URI`` (and ``NEO4J_DATABASE``) or the
    project's local server, and closes the connection at the end of the block.
    """

    def __init__(self, driver: neo4j.Driver, database: str = DATABASE) -> None:
        self.driver = driver
        self.database = database
        # settings found to have more than EXACT_SIMILAR_LIMIT pathways: stores only grow (a repair removes a few),
        # so similar_images asks once; a setting that shrank still answers (the scan when candidates run short)
        self._large_settings: set[str] = set()

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
        (compare with ``graphstore.schema.stored_form()``)."""
        return StoredSchema.read(self._run(Q.STORED_NODE_PROPERTIES), self._run(Q.STORED_RELATIONSHIP_PROPERTIES),
                                 self._run(Q.STORED_INDEXES))

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

    def _layer_depths(self, model_id: str) -> dict[int, tuple[str, int]]:
        return {r["index"]: (r["site"], r["depth"] or 0) for r in self.layers(model_id)}

    def _layer_list(self, model_id: str) -> list[tuple[int, str]]:
        return sorted((r["index"], r["site"]) for r in self.layers(model_id))

    # -- overview --------------------------------------------------------------------------
    def accuracy_by_class(self, model_id: str) -> list[dict[str, Any]]:
        return self._run(Q.ACCURACY_BY_CLASS, model_id=model_id)

    def accuracy_by_variant(self, model_id: str) -> list[dict[str, Any]]:
        """Per variant kind and sweep: images and accuracy; ``name`` reads like "PGD ε = 0.1, 10 steps"
        and ``targeted`` says whether the attack aimed at a chosen class."""
        rows = self._run(Q.ACCURACY_BY_VARIANT, model_id=model_id)
        for r in rows:
            r["name"] = variant_name(r["kind"], r["sweep"])
            r["targeted"] = A.targeted(r["sweep"])
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
            shape, scale = r.pop("saliency_shape"), r.pop("saliency_scale")
            r["saliency"] = saliency_of(r["saliency"], shape, scale)
            r["cut_sites"] = json.loads(r["cut_sites"])
            out.append(PathwayInfo(**r))
        return out

    def pathway_of(self, image_id: str, config: str) -> PathwayInfo:
        for p in self.pathways_of_image(image_id):
            if p.config == config:
                return p
        raise NotFound(f"image {image_id!r} has no pathway of setting {config!r}")

    def pathway_graph(self, pathway_id: str, max_edges: int | None = None) -> nx.DiGraph:
        """Neurons (contribution, rank) and weighted edges of one pathway; the graph's ``cut_sites``
        names the sites where the selection is cut (empty when it is connected), its ``edge_mode`` which
        edges it holds (``exact`` or ``direct``: ``extractor/linear.py``)."""
        head = self._require(Q.PATHWAY_EXISTS, "pathway", pathway_id=pathway_id)
        graph = nx.DiGraph(pathway_id=pathway_id, cut_sites=json.loads(head["cut_sites"]),
                           edge_mode=edge_mode(head["params"]), edges_name=edges_name(head["method"], head["params"]))
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
        flows = {"limit": edges, "neuron_id": neuron_id, "config": config}
        return A.neuron_card(
            neuron_id=neuron_id,
            info=info,
            exemplars=self._run(Q.NEURON_EXEMPLARS, neuron_id=neuron_id),
            flows_in=self._run(Q.NEURON_FLOWS_IN, **flows),
            flows_out=self._run(Q.NEURON_FLOWS_OUT, **flows),
            pairs=self._run(Q.VARIANT_PAIR_COUNTS, model_id=model_id, config=config),
            gained=self._run(Q.NEURON_GAINED, model_id=model_id, config=config, neuron_id=neuron_id),
            lost=self._run(Q.NEURON_LOST, neuron_id=neuron_id, config=config),
        )

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
            table[c][n] = NeuronScore(neuron=n, site=site, layer_index=li, channel=ch, support=sup,
                                      mean_contribution=mc)
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

        def edge_support(class_id: str) -> dict[tuple[str, str], float]:
            return {(r["src"], r["dst"]): r["support"] for r in
                    self._run(Q.CLASS_EDGE_SUPPORT, class_id=class_id, config=config, min_support=float(min_support))}

        return A.shared_pathways(
            class_a=class_a,
            class_b=class_b,
            sa=sa,
            sb=sb,
            layers=self._layer_depths(model_a),
            edges_a=edge_support(class_a),
            edges_b=edge_support(class_b),
        )

    def _support_matrix(self, model_id: str, config: str) -> tuple[list[ClassInfo], list[NeuronScore], np.ndarray,
                                                                    np.ndarray]:
        """Classes, neurons, and ``support``, ``mean_contribution`` as ``[classes, neurons]`` arrays."""
        classes = self.classes(model_id)
        cols = self._run(Q.CLASS_SUPPORT, model_id=model_id, config=config, classes=None)[0]
        return classes, *A.support_matrix(classes, cols)

    def similarity_matrix(self, model_id: str, config: str, min_support: float = 0.5) -> ClassSimilarity:
        """Jaccard of the classes' neuron sets (support >= s) and weighted Jaccard of support x |contribution|."""
        classes, _, support, mean = self._support_matrix(model_id, config)
        return A.similarity(classes, support, mean, min_support)

    def class_signature(self, class_id: str, config: str, min_support: float = 0.5,
                        max_other: float = 0.2) -> list[SignatureNeuron]:
        """Neurons with support >= s in the class and <= ``max_other`` in every other class."""
        model_id, ci = self._class_index(class_id)
        classes, neurons, support, _ = self._support_matrix(model_id, config)
        rows = [i for i, c in enumerate(classes) if c.index == ci]
        return A.signature(rows[0], neurons, support, min_support, max_other) if rows else []

    # -- variants and attacks --------------------------------------------------------------
    def _neuron_sets(self, pathway_ids: Sequence[str]) -> dict[str, A.NeuronSet]:
        sets: dict[str, A.NeuronSet] = {p: {} for p in pathway_ids}
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
        return A.perturbation(self.image(original_id).png, self.image(variant_id).png)

    def shift_graph(self, shift: Shift, original_pathway: str, variant_pathway: str) -> GroupedGraph:
        """Both pathways of an attacked pair as one graph; groups kept / lost / gained."""
        edges = [(u, v, d["weight"]) for pid in (original_pathway, variant_pathway)
                 for u, v, d in self.pathway_graph(pid).edges(data=True)]
        return A.shift_graph(shift, edges)

    def shared_graph(self, shared: SharedPathways) -> GroupedGraph:
        """Two classes' pathways as one graph: shared neurons (mean contribution of the two classes),
        neurons of one class only, and the edges both classes hold (mean support)."""
        return A.shared_graph(shared)

    def adversarial_shift(self, variant_id: str, config: str, threshold: float = 0.5) -> Shift:
        """Kept / lost / gained neurons of a variant's pathway against its original's, per-layer overlap,
        and the first layer (by depth) that changes and that departs (Jaccard < ``threshold``)."""
        detail = self.image(variant_id)
        if detail.original is None:
            raise NotFound(f"image {variant_id!r} is an original, not a variant")
        pv = self._require(Q.PATHWAY_ID_OF, "pathway for image", image_id=variant_id, config=config)["id"]
        po = self._require(Q.PATHWAY_ID_OF, "pathway for image", image_id=detail.original, config=config)["id"]
        sets = self._neuron_sets([po, pv])
        return A.shift(
            variant_id=variant_id,
            original_id=detail.original,
            kind=detail.kind,
            sweep=detail.sweep,
            so=sets[po],
            sv=sets[pv],
            layers=self._layer_depths(detail.model_id),
            threshold=threshold,
        )

    def hijacked_neurons(self, model_id: str, config: str, kind: str, label: int | None = None,
                         limit: int = 20) -> list[Hijack]:
        """Neurons most often gained by variants of ``kind`` (Bluff's "most changed"), by strength.

        Read from the ``VariantStat`` aggregates: share = pairs whose variant pathway has the
        neuron and the original's lacks it, over all pairs (and per sweep).
        """
        stats = self._run(Q.VARIANT_STATS, model_id=model_id, config=config, kind=kind, label=label)
        if not stats:
            return []
        return A.hijacks(stats, self._run(Q.HIJACKED_NEURONS, model_id=model_id, config=config, kind=kind,
                                          label=label, limit=int(limit)))

    def variant_overlap(self, model_id: str, config: str, kind: str | None = None) -> list[VariantOverlap]:
        """For each variant kind and sweep: mean per-layer overlap with the originals' pathways."""
        stats = self._run(Q.VARIANT_STATS, model_id=model_id, config=config, kind=kind, label=None)
        return A.variant_overlaps(stats, self._layer_list(model_id)) if stats else []

    def pathway_counts(self, config: str) -> list[LayerCount]:
        """Mean pathway neurons per layer for originals and for each variant kind and sweep."""
        return [LayerCount(**r, name=variant_name(r["kind"], r["sweep"]))
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
        params = {"image_id": image_id, "config": config, "limit": int(limit), "kind": kind}
        if exact is None and config not in self._large_settings:
            cap = EXACT_SIMILAR_LIMIT + 1
            exact = self._run(Q.PATHWAYS_OF_CONFIG, config=config, cap=cap)[0]["n"] < cap
            if not exact:
                self._large_settings.add(config)
        if not exact:
            rows = self._run(Q.SIMILAR_IMAGES_INDEXED, candidates=max(SIMILAR_CANDIDATES, 20 * int(limit)), **params)
            if len(rows) >= limit:  # found neighbours: the image exists (one round trip fewer)
                return [SimilarImage(**r) for r in rows]
        rows = self._run(Q.SIMILAR_IMAGES, **params)
        if not rows:  # no neighbours, or no such image: say which
            self._require(Q.IMAGE_EXISTS, "image", image_id=image_id)
        return [SimilarImage(**r) for r in rows]

    def method_agreement(self, image_id: str) -> list[Agreement]:
        """Jaccard between the neuron sets of the image's pathways of different settings."""
        pathways = self.pathways_of_image(image_id)
        return A.agreement([(p.id, p.config) for p in pathways], self._neuron_sets([p.id for p in pathways]))

    def _original_sets(self, model_id: str, config: str) -> tuple[list[dict[str, Any]], dict[str, A.NeuronSet]]:
        rows = self._run(Q.ORIGINAL_PATHWAYS, model_id=model_id, config=config)
        return rows, self._neuron_sets([r["pathway"] for r in rows])

    def layer_agreement(self, model_id: str, config_a: str, config_b: str) -> list[LayerAgreement]:
        """How two settings' selections overlap per layer on the same original images."""
        rows_a, sets_a = self._original_sets(model_id, config_a)
        rows_b, sets_b = self._original_sets(model_id, config_b)
        by_image_b = {r["image"]: r["pathway"] for r in rows_b}
        pairs = [(sets_a[r["pathway"]], sets_b[by_image_b[r["image"]]]) for r in rows_a if r["image"] in by_image_b]
        return A.layer_agreement(pairs, self._layer_list(model_id))

    def class_consistency(self, model_id: str, config: str, max_pairs: int = 20_000) -> list[LayerConsistency]:
        """Within-class against across-class Jaccard of originals' pathways, per layer (by label)."""
        rows, sets = self._original_sets(model_id, config)
        rows = [r for r in rows if r["label"] is not None and r["label"] >= 0]
        return A.class_consistency([r["label"] for r in rows], [sets[r["pathway"]] for r in rows],
                                   self._layer_list(model_id), max_pairs)
