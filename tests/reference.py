"""Independent answers computed straight from record files (numpy / networkx), for the store tests."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from records import ImageRecord, Manifest, PathwayRecord, class_id, neuron_id, read_exemplars, read_run

if TYPE_CHECKING:
    from neo4j import Driver

# every aggregate row with all its properties, in one order (GAINED with its VariantStat)
AGGREGATES = {
    "USES": "MATCH (c:Class {model_id: $m})-[u:USES]->(n:Neuron) RETURN c.id, n.id, properties(u) AS p "
            "ORDER BY c.id, n.id, u.config",
    "CLASS_FLOW": "MATCH (c:Class {model_id: $m}) MATCH (a:Neuron)-[f:CLASS_FLOW {class_id: c.id}]->(b:Neuron) "
                  "RETURN a.id, b.id, properties(f) AS p "
                  "ORDER BY f.config, f.class_id, a.id, b.id",
    "ClassStat": "MATCH (s:ClassStat {model_id: $m}) RETURN properties(s) AS p ORDER BY s.config, s.class_id",
    "CountStat": "MATCH (s:CountStat {model_id: $m}) RETURN properties(s) AS p ORDER BY s.config, s.kind, s.sweep",
    "VariantStat": "MATCH (s:VariantStat {model_id: $m}) OPTIONAL MATCH (s)-[g:GAINED]->(n:Neuron) "
                   "WITH s, n.id AS n, g.count AS k ORDER BY n WITH s, collect([n, k]) AS gained "
                   "RETURN properties(s) AS p, gained ORDER BY s.config, s.kind, s.sweep, s.label",
}


def aggregate_rows(driver: Driver, model_id: str) -> dict[str, list[list[object]]]:
    """The model's aggregates as stored, by ``AGGREGATES`` name (property maps as sorted items)."""
    out = {}
    for name, query in AGGREGATES.items():
        records, _, _ = driver.execute_query(query, m=model_id, database_="neo4j")
        out[name] = [[sorted(v.items()) if isinstance(v, dict) else v for v in r.values()] for r in records]
    return out


def same_rows(a: object, b: object) -> bool:
    """Equal, floats to 1e-9 relative (sums may run in another order)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(map(same_rows, a, b))
    if isinstance(a, float) and isinstance(b, float | int):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@dataclass
class Ref:
    manifest: Manifest
    images: dict[str, ImageRecord]
    pathways: list[PathwayRecord]
    exemplars: int = 0  # exemplar rows of the run (checked against brute force in test_exemplars)

    @classmethod
    def load(cls, run: Path) -> Ref:
        manifest, images, pathways = read_run(run)
        return cls(manifest, {i.image_id: i for i in images}, pathways, len(read_exemplars(run)))

    @property
    def model_id(self) -> str:
        return self.manifest.model.model_id

    def nid(self, site: int, channel: int) -> str:
        return neuron_id(self.model_id, self.manifest.model.sites[site].site_id, channel)

    def neurons(self, pw: PathwayRecord) -> dict[str, tuple[int, float]]:
        return {self.nid(int(s), int(c)): (int(s), float(v))
                for s, c, v in zip(pw.neuron_site, pw.neuron_channel, pw.neuron_contribution, strict=True)}

    def edges(self, pw: PathwayRecord) -> dict[tuple[str, str], float]:
        return {(self.nid(int(a), int(b)), self.nid(int(c), int(d))): float(w) for a, b, c, d, w in
                zip(pw.edge_src_site, pw.edge_src_channel, pw.edge_dst_site, pw.edge_dst_channel, pw.edge_weight,
                    strict=True)}

    def of_config(self, config: str) -> list[PathwayRecord]:
        return [p for p in self.pathways if p.config == config]

    def pathway(self, image_id: str, config: str) -> PathwayRecord:
        return next(p for p in self.pathways if p.image_id == image_id and p.config == config)

    def support(self, config: str) -> dict[int, dict[str, tuple[float, float]]]:
        """class index -> neuron -> (support, mean contribution) over originals' pathways."""
        by_class: dict[int, list[PathwayRecord]] = defaultdict(list)
        for p in self.of_config(config):
            if self.images[p.image_id].kind == "original":
                by_class[p.target].append(p)
        out: dict[int, dict[str, tuple[float, float]]] = {}
        for c, pws in by_class.items():
            contrib: dict[str, list[float]] = defaultdict(list)
            for p in pws:
                for n, (_, v) in self.neurons(p).items():
                    contrib[n].append(v)
            out[c] = {n: (len(v) / len(pws), float(np.mean(v))) for n, v in contrib.items()}
        return out

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        m = self.manifest.model
        configs = {p.config for p in self.pathways}
        uses = sum(len(t) for cfg in configs for t in self.support(cfg).values())
        nodes = {"Model": 1, "Layer": len(m.sites), "Neuron": sum(s.channels for s in m.sites),
                 "Class": m.num_classes, "Image": len(self.images), "Pathway": len(self.pathways)}
        rels = {"HAS_LAYER": len(m.sites), "FEEDS": sum(len(s.preds) for s in m.sites), "HAS_NEURON": nodes["Neuron"],
                "HAS_CLASS": m.num_classes, "PREDICTED_AS": len(self.images),
                "LABELED_AS": sum(1 for i in self.images.values() if i.label >= 0),
                "VARIANT_OF": sum(1 for i in self.images.values() if i.variant_of),
                "FOR_IMAGE": len(self.pathways), "EXPLAINS": len(self.pathways),
                "INCLUDES": sum(len(p.neuron_channel) for p in self.pathways),
                "FLOWS_TO": sum(len(p.edge_weight) for p in self.pathways), "USES": uses}
        flows = sum(len(self.edge_support(cfg, c)) for cfg in configs for c in range(m.num_classes))
        if flows:
            rels["CLASS_FLOW"] = flows
        nodes["CountStat"] = len({(p.config, self.images[p.image_id].kind,
                                   self.images[p.image_id].sweep if self.images[p.image_id].variant_of else "")
                                  for p in self.pathways})
        stats, gained = self.variant_stats()
        if stats:
            nodes["VariantStat"] = len(stats)
        nodes["ClassStat"] = len({(p.config, p.target) for p in self.pathways
                                  if self.images[p.image_id].kind == "original"})
        if gained:
            rels["GAINED"] = len(gained)
        if self.exemplars:
            rels["EXEMPLAR"] = self.exemplars
        return nodes, rels

    def edge_support(self, config: str, cls: int, floor: float = 0.0) -> dict[tuple[str, str], float]:
        """Edges held by at least ``floor`` of the class's original pathways (by default every edge of them):
        (src, dst) -> support."""
        pws = [p for p in self.of_config(config) if p.target == cls and self.images[p.image_id].kind == "original"]
        counts: Counter[tuple[str, str]] = Counter(e for p in pws for e in self.edges(p))
        return {e: k / len(pws) for e, k in counts.items() if k / len(pws) >= floor}

    def variant_stats(self) -> tuple[set[tuple[str, str, str, int]], set[tuple[str, str, str, int, str]]]:
        """(config, kind, sweep, label) groups of variant pairs, and their gained neurons."""
        by = {(p.image_id, p.config): p for p in self.pathways}
        stats: set[tuple[str, str, str, int]] = set()
        gained: set[tuple[str, str, str, int, str]] = set()
        for pv in self.pathways:
            im = self.images[pv.image_id]
            po = by.get((im.variant_of, pv.config)) if im.variant_of else None
            if po is None:
                continue
            key = (pv.config, im.kind, im.sweep, self.images[po.image_id].label)
            stats.add(key)
            gained.update((*key, n) for n in set(self.neurons(pv)) - set(self.neurons(po)))
        return stats, gained

    def pairs(self, config: str, kind: str | None = None) -> list[tuple[ImageRecord, PathwayRecord, PathwayRecord]]:
        out = []
        for im in self.images.values():
            if im.variant_of and (kind is None or im.kind == kind):
                out.append((im, self.pathway(im.image_id, config), self.pathway(im.variant_of, config)))
        return out

    def accuracy_by_variant(self) -> dict[tuple[str, str], tuple[int, float]]:
        groups: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for im in self.images.values():
            if im.variant_of:
                groups[(im.kind, im.sweep)].append(im.predicted == self.images[im.variant_of].label)
        return {k: (len(v), float(np.mean(v))) for k, v in groups.items()}

    def class_ids(self) -> list[str]:
        return [class_id(self.model_id, i) for i in range(self.manifest.model.num_classes)]

    def hijack_counts(self, config: str, kind: str) -> Counter[str]:
        c: Counter[str] = Counter()
        for _, pv, po in self.pairs(config, kind):
            c.update(set(self.neurons(pv)) - set(self.neurons(po)))
        return c
