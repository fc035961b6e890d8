"""The class and variant aggregates of a bulk import, computed from the rows as they are written.

A load through Bolt adds its pathways to ``ClassStat``, ``USES``, ``CLASS_FLOW``, ``CountStat``, ``VariantStat`` and
``GAINED`` in Cypher (``queries.ADD_*``), or refreshes them over what the store holds (``queries.REFRESH_*``). A bulk
import writes a fresh store from records, so the same aggregates are computed here in pandas while the CSV files are
written and imported with everything else: after the restart only the indexes remain to be made.
``tests/test_bulk.py`` holds every aggregate equal to the Cypher one, row by row.

Definitions (the Cypher's): over the original images' pathways of a setting, per explained class,
``ClassStat`` their number; ``USES`` a neuron with support = share of the class's pathways that include it, and the
mean contribution; ``CLASS_FLOW`` every edge with its support and mean weight;
per (image kind, sweep) a ``CountStat`` of per-site sums over all pathways; per
(variant kind, sweep, original's label) a ``VariantStat`` of the variants' pathways, and
``GAINED`` per neuron gained against the original's pathway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from graphstore.rows import Columns


@dataclass(frozen=True, kw_only=True)
class _Image:
    kind: str
    sweep: str
    predicted: int
    label: int
    variant_of: str | None


@dataclass(frozen=True, kw_only=True)
class _Pathway:
    model_id: str
    key: int
    config: str
    class_id: str
    image_id: str
    layer_sizes: list[int]
    layer_mass: list[float]
    layer_jaccard: list[float] | None


@dataclass(kw_only=True)
class AggregateRows:
    """What the importer writes: nodes ``(key, props)`` and relationships ``(start, end, props)``."""

    class_stats: list[tuple[str, dict[str, Any]]]
    count_stats: list[tuple[str, dict[str, Any]]]
    variant_stats: list[tuple[str, dict[str, Any]]]
    uses: list[tuple[str, str, dict[str, Any]]]
    class_flows: list[tuple[str, str, dict[str, Any]]]
    gained: list[tuple[str, str, dict[str, Any]]]


@dataclass(kw_only=True)
class Aggregates:
    """Collects images, pathways and their relationship columns; :meth:`rows` computes the aggregates.

    Memory grows with the distinct (setting, class, neuron) and (setting, class, edge) keys, not with the run:
    each part's ``INCLUDES`` and ``FLOWS_TO`` rows of original pathways are reduced at once to counts and sums per
    key, and those partial sums are folded together whenever they pass ``fold_rows`` rows (a 1,000,000-image run
    has 128 M original edges; held whole, they would not fit in this machine's memory)."""

    fold_rows: int = 4_000_000
    images: dict[str, _Image] = field(default_factory=dict)
    pathways: dict[str, _Pathway] = field(default_factory=dict)
    _groups: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (class, config, model) -> code
    _by_id: dict[str, int] = field(default_factory=dict)  # original pathway id -> its group's code
    _by_key: dict[int, int] = field(default_factory=dict)  # and by key
    _uses: list[pd.DataFrame] = field(default_factory=list)  # group, neuron, k, total (contribution)
    _flows: list[pd.DataFrame] = field(default_factory=list)  # group, src, dst, k, total (weight)
    _gained: list[pd.DataFrame] = field(default_factory=list)  # pathway, neuron: a variant's gained neurons

    def image(self, props: dict[str, Any]) -> None:
        """An Image node's properties (as written)."""
        self.images[props["id"]] = _Image(kind=props["kind"], sweep=props["sweep"] or "",
                                          predicted=props["predicted"], label=props["label"],
                                          variant_of=props["variant_of"])

    def pathway(self, props: dict[str, Any], class_id: str) -> None:
        """A Pathway node's properties (as written) and the class it explains."""
        self.pathways[props["id"]] = _Pathway(
            model_id=props["model_id"], key=props["key"], config=props["config"], class_id=class_id,
            image_id=props["image_id"],
            layer_sizes=props["layer_sizes"], layer_mass=props["layer_mass"],
            layer_jaccard=props.get("layer_jaccard"))
        if self.images[props["image_id"]].kind == "original":
            code = self._groups.setdefault((class_id, props["config"], props["model_id"]), len(self._groups))
            self._by_id[props["id"]] = self._by_key[props["key"]] = code

    def relationships(self, includes: Columns, flows: Columns) -> None:
        """One part's ``INCLUDES`` and ``FLOWS_TO`` columns (:func:`graphstore.rows.include_columns`,
        :func:`~graphstore.rows.flow_columns`), reduced to what an aggregate reads."""
        inc = pd.DataFrame({"group": pd.Series(includes["start"]).map(self._by_id), "neuron": includes["end"],
                            "contribution": includes["contribution"]})
        inc = inc.dropna(subset=["group"]).astype({"group": np.int64})
        self._uses.append(inc.groupby(["group", "neuron"]).agg(k=("contribution", "size"),
                                                                total=("contribution", "sum")).reset_index())
        gained = pc.fill_null(includes["gained"], False).to_numpy(zero_copy_only=False)
        self._gained.append(pd.DataFrame({"pathway": includes["start"][gained], "neuron": includes["end"][gained]}))
        flow = pd.DataFrame({"group": pd.Series(flows["pathway"]).map(self._by_key), "src": flows["start"],
                             "dst": flows["end"], "weight": flows["weight"]})
        flow = flow.dropna(subset=["group"]).astype({"group": np.int64})
        self._flows.append(flow.groupby(["group", "src", "dst"]).agg(k=("weight", "size"),
                                                                      total=("weight", "sum")).reset_index())
        for parts, keys in ((self._uses, ["group", "neuron"]), (self._flows, ["group", "src", "dst"])):
            if sum(len(d) for d in parts) > self.fold_rows:
                parts[:] = [_fold(parts, keys)]

    def rows(self) -> AggregateRows:
        groups = pd.DataFrame([(code, *key) for key, code in self._groups.items()],
                              columns=["group", "class_id", "config", "model_id"])
        counts = pd.Series(self._by_id.values(), dtype=np.int64).value_counts().rename("n")
        groups = groups.merge(counts, left_on="group", right_index=True)
        class_stats = [(f"class-{r.group}", {"model_id": r.model_id, "config": r.config, "class_id": r.class_id,
                                             "pathways": int(r.n)}) for r in groups.itertuples(index=False)]
        out = AggregateRows(class_stats=class_stats, count_stats=self._count_stats(), variant_stats=[],
                            uses=self._uses_rows(groups),
                            class_flows=self._class_flows(groups), gained=[])
        out.variant_stats, out.gained = self._variant_stats()
        return out

    def _uses_rows(self, groups: pd.DataFrame) -> list[tuple[str, str, dict[str, Any]]]:
        agg = _fold(self._uses, ["group", "neuron"]).merge(groups, on="group")
        return [(r.class_id, r.neuron, {"config": r.config, "support": float(r.k) / r.n,
                                        "mean_contribution": float(r.total) / r.k, "pathways": int(r.k)})
                for r in agg.itertuples(index=False)]

    def _class_flows(self, groups: pd.DataFrame) -> list[tuple[str, str, dict[str, Any]]]:
        agg = _fold(self._flows, ["group", "src", "dst"]).merge(groups, on="group")
        return [(r.src, r.dst, {"class_id": r.class_id, "config": r.config,
                                "support": float(r.k) / r.n, "mean_weight": float(r.total) / r.k,
                                "pathways": int(r.k)})
                for r in agg.itertuples(index=False)]

    def _count_stats(self) -> list[tuple[str, dict[str, Any]]]:
        groups: dict[tuple[str, str, str, str], list[_Pathway]] = {}
        for p in self.pathways.values():
            im = self.images[p.image_id]
            groups.setdefault((p.model_id, p.config, im.kind, im.sweep), []).append(p)
        out = []
        for n, ((model_id, config, kind, sweep), ps) in enumerate(sorted(groups.items())):
            sizes = np.asarray([p.layer_sizes for p in ps], dtype=np.int64)
            mass = np.asarray([p.layer_mass for p in ps], dtype=np.float64)
            out.append((f"count-{n}", {"model_id": model_id, "config": config, "kind": kind, "sweep": sweep or None,
                                       "pathways": len(ps), "totals": sizes.sum(0).tolist(),
                                       "mass": mass.sum(0).tolist(), "nonzero": (sizes > 0).sum(0).tolist()}))
        return out

    def _variant_stats(self) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, str, dict[str, Any]]]]:
        groups: dict[tuple[str, str, str, str, int], list[str]] = {}
        for pid, p in self.pathways.items():
            im = self.images[p.image_id]
            if im.variant_of is None or p.layer_jaccard is None:
                continue
            label = self.images[im.variant_of].label
            groups.setdefault((p.model_id, p.config, im.kind, im.sweep, label), []).append(pid)
        keys = {pid: f"variant-{n}" for n, (_, pids) in enumerate(sorted(groups.items())) for pid in pids}
        gained = pd.concat([*self._gained, pd.DataFrame(columns=["pathway", "neuron"])], ignore_index=True)
        gained = gained.assign(key=lambda d: d["pathway"].map(keys)).dropna(subset=["key"])
        links = [(key, neuron, {"count": int(k)}) for (key, neuron), k in gained.groupby(["key", "neuron"]).size()
                 .items()]
        stats = []
        for n, ((model_id, config, kind, sweep, label), pids) in enumerate(sorted(groups.items())):
            ps = [self.pathways[pid] for pid in pids]
            changed = sum(self.images[p.image_id].predicted != self.images[self.images[p.image_id].variant_of or ""]
                          .predicted for p in ps)
            jac = np.asarray([p.layer_jaccard for p in ps], dtype=np.float64).sum(0)
            stats.append((f"variant-{n}", {"model_id": model_id, "config": config, "kind": kind, "sweep": sweep,
                                "label": label, "pairs": len(ps), "changed": int(changed),
                                "jaccard_sum": jac.tolist()}))
        return stats, links


def _fold(parts: list[pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """Partial counts ``k`` and sums ``total`` per ``keys``, added up into one frame."""
    if not parts:
        return pd.DataFrame(columns=[*keys, "k", "total"])
    return pd.concat(parts, ignore_index=True).groupby(keys, sort=False)[["k", "total"]].sum().reset_index()
