"""The Python side of the named queries: set algebra and small numerics over what ``Store`` fetched.

No driver and no Cypher here: each function takes plain rows, sets or arrays that a ``Store``
method read, and returns the typed result. ``Store`` (``graphstore.api``) does the reading; the UI
and the CLI call ``Store`` only.

A pathway's neuron set is ``{neuron id: (layer index, site, contribution)}`` throughout.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import networkx as nx
import numpy as np
from PIL import Image

from graphstore.names import variant_name
from graphstore.results import (
    Agreement,
    AttackEffect,
    ClassInfo,
    ClassSimilarity,
    Exemplar,
    GroupedGraph,
    Hijack,
    LayerAgreement,
    LayerConsistency,
    NeuronCard,
    NeuronChange,
    NeuronEdge,
    NeuronScore,
    Perturbation,
    SharedPathways,
    Shift,
    SignatureNeuron,
    VariantOverlap,
)
from records import jaccard, layer_overlaps, parse_neuron_id

NeuronSet = dict[str, tuple[int, str, float]]
Layers = Mapping[int, tuple[str, int]]  # layer index -> (site, depth)


def targeted(sweep: str | None) -> bool:
    """Whether a variant's stored sweep (JSON) names a targeted attack."""
    try:
        data = json.loads(sweep or "{}")
    except ValueError:
        return False
    return isinstance(data, dict) and bool(data.get("targeted", False))


def neuron_card(neuron_id: str, *, info: dict[str, Any], exemplars: list[dict[str, Any]],
                flows_in: list[dict[str, Any]], flows_out: list[dict[str, Any]], pairs: list[dict[str, Any]],
                gained: list[dict[str, Any]], lost: list[dict[str, Any]]) -> NeuronCard:
    """A neuron card from the rows of ``NEURON_DETAIL``, ``NEURON_EXEMPLARS``, ``NEURON_FLOWS_IN``/``OUT``,
    ``VARIANT_PAIR_COUNTS``, ``NEURON_GAINED`` and ``NEURON_LOST``."""
    shots = [Exemplar(**{**r, "png": bytes(r["png"]), "box": list(r["box"]), "position": list(r["position"])})
             for r in exemplars]
    n_pairs = {(r["kind"], r["sweep"]): int(r["pairs"]) for r in pairs}
    n_gained = {(r["kind"], r["sweep"]): int(r["gained"]) for r in gained}
    n_lost = {(r["kind"], r["sweep"]): int(r["lost"]) for r in lost}
    attacks = [
        AttackEffect(
            kind=k,
            sweep=st,
            name=variant_name(k, st),
            pairs=n,
            gained=n_gained.get((k, st), 0),
            lost=n_lost.get((k, st), 0),
        )
        for (k, st), n in sorted(n_pairs.items())
    ]
    return NeuronCard(
        neuron=neuron_id,
        site=info["site"],
        layer_index=int(info["layer_index"]),
        channel=int(info["channel"]),
        exemplars=shots,
        classes=[c for c in info["classes"] if c is not None],
        incoming=[NeuronEdge(**r) for r in flows_in],
        outgoing=[NeuronEdge(**r) for r in flows_out],
        attacks=attacks,
    )


def shared_pathways(class_a: str, class_b: str, *, sa: dict[str, NeuronScore], sb: dict[str, NeuronScore],
                    layers: Layers, edges_a: dict[tuple[str, str], float],
                    edges_b: dict[tuple[str, str], float]) -> SharedPathways:
    """Neurons (and edges) both classes use, those of one class only, and the per-layer overlap;
    ``sa``/``sb``: neuron -> score of the neurons above the support threshold."""
    per_layer = layer_overlaps({n: s.layer_index for n, s in sa.items()},
                               {n: s.layer_index for n, s in sb.items()}, layers)

    def key(s: NeuronScore) -> tuple[int, int]:
        return (s.layer_index, s.channel)

    return SharedPathways(
        class_a=class_a, class_b=class_b,
        shared=sorted(((sa[n], sb[n]) for n in sa.keys() & sb.keys()), key=lambda p: key(p[0])),
        only_a=sorted((sa[n] for n in sa.keys() - sb.keys()), key=key),
        only_b=sorted((sb[n] for n in sb.keys() - sa.keys()), key=key),
        per_layer=per_layer,
        shared_edges=sorted((k[0], k[1], edges_a[k], edges_b[k]) for k in edges_a.keys() & edges_b.keys()),
    )


def support_matrix(classes: list[ClassInfo], cols: dict[str, list[Any]]
                   ) -> tuple[list[NeuronScore], np.ndarray, np.ndarray]:
    """``CLASS_SUPPORT`` columns as neurons and ``support``, ``mean_contribution`` ``[classes, neurons]``."""
    names, first, col = np.unique(np.asarray(cols["neuron"], dtype=object).astype(str), return_index=True,
                                  return_inverse=True)
    row_of = {c.index: i for i, c in enumerate(classes)}
    rows = np.asarray([row_of[c] for c in cols["class_index"]], dtype=np.int64)
    support = np.zeros((len(classes), len(names)))
    mean = np.zeros((len(classes), len(names)))
    support[rows, col] = cols["support"]
    mean[rows, col] = cols["mean_contribution"]
    neurons = [
        NeuronScore(
            neuron=str(names[j]),
            site=cols["site"][f],
            layer_index=cols["layer_index"][f],
            channel=cols["channel"][f],
            support=0.0,
            mean_contribution=0.0,
        )
        for j, f in enumerate(first.tolist())
    ]
    return neurons, support, mean


def similarity(classes: list[ClassInfo], support: np.ndarray, mean: np.ndarray, min_support: float
               ) -> ClassSimilarity:
    """Jaccard of the classes' neuron sets (support >= s) and weighted Jaccard of support x |contribution|;
    ``support``, ``mean``: ``[classes, neurons]``."""
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


def signature(row: int, neurons: list[NeuronScore], support: np.ndarray, min_support: float,
              max_other: float) -> list[SignatureNeuron]:
    """Neurons with support >= s in class row ``row`` of ``support`` ``[classes, neurons]`` and
    <= ``max_other`` in every other class, most specific first."""
    own = support[row]
    others = np.delete(support, row, axis=0)
    mx = others.max(axis=0) if len(others) else np.zeros_like(own)
    mean_other = others.mean(axis=0) if len(others) else np.zeros_like(own)
    out = [
        SignatureNeuron(
            neuron=n.neuron,
            site=n.site,
            layer_index=n.layer_index,
            channel=n.channel,
            support=float(own[j]),
            max_other=float(mx[j]),
            specificity=float(own[j] - mean_other[j]),
        )
        for j, n in enumerate(neurons)
        if own[j] > 0 and own[j] >= min_support and mx[j] <= max_other
    ]
    return sorted(out, key=lambda x: (-x.specificity, x.neuron))


def shift(variant_id: str, original_id: str, *, kind: str, sweep: str, so: NeuronSet, sv: NeuronSet,
          layers: Layers, threshold: float) -> Shift:
    """Kept, lost and gained neurons of a variant's pathway (``sv``) against its original's (``so``), the
    per-layer overlap, and the first layer (by depth) that changes and that departs (Jaccard < threshold)."""
    info = {**so, **sv}

    def change(n: str) -> NeuronChange:
        li, site, _ = info[n]
        return NeuronChange(neuron=n, site=site, layer_index=li, original=so[n][2] if n in so else None,
                            variant=sv[n][2] if n in sv else None)

    def order(c: NeuronChange) -> tuple[int, str]:
        return (c.layer_index, c.neuron)

    per_layer = layer_overlaps({n: v[0] for n, v in so.items()}, {n: v[0] for n, v in sv.items()}, layers)
    by_depth = sorted(per_layer, key=lambda o: (o.depth, o.layer_index))
    return Shift(
        variant=variant_id, original=original_id, kind=kind, sweep=sweep,
        kept=sorted((change(n) for n in so.keys() & sv.keys()), key=order),
        lost=sorted((change(n) for n in so.keys() - sv.keys()), key=order),
        gained=sorted((change(n) for n in sv.keys() - so.keys()), key=order),
        per_layer=per_layer,
        first_change=next((o.layer_index for o in by_depth if o.shared != o.a or o.shared != o.b), None),
        first_departure=next((o.layer_index for o in by_depth if o.jaccard < threshold), None),
    )


def hijacks(stats: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[Hijack]:
    """``HIJACKED_NEURONS`` rows as shares of all pairs in ``VARIANT_STATS`` (overall and per sweep)."""
    per_sweep: dict[str, int] = defaultdict(int)
    for st in stats:
        per_sweep[st["sweep"]] += st["pairs"]
    total = sum(per_sweep.values())
    out = []
    for r in rows:
        counts: dict[str, int] = defaultdict(int)
        for sweep, k in r["by_sweep"]:
            counts[sweep] += k
        out.append(
            Hijack(
                neuron=r["neuron"],
                site=r["site"],
                layer_index=r["layer_index"],
                count=r["count"],
                share=r["count"] / total,
                by_sweep={s: counts.get(s, 0) / n for s, n in sorted(per_sweep.items())},
            )
        )
    return out


def variant_overlaps(stats: list[dict[str, Any]], layers: list[tuple[int, str]]) -> list[VariantOverlap]:
    """Mean per-layer Jaccard with the originals per variant kind and sweep, from ``VARIANT_STATS`` rows."""
    sums: dict[tuple[str, str], np.ndarray] = {}
    pairs: dict[tuple[str, str], int] = defaultdict(int)
    changed: dict[tuple[str, str], int] = defaultdict(int)
    for st in stats:
        key = (st["kind"], st["sweep"])
        sums[key] = sums.get(key, 0.0) + np.asarray(st["jaccard_sum"], dtype=np.float64)
        pairs[key] += st["pairs"]
        changed[key] += st["changed"]
    out: list[VariantOverlap] = []
    for key in sorted(sums):
        mean = sums[key] / pairs[key]
        out.extend(
            VariantOverlap(
                kind=key[0],
                sweep=key[1],
                layer_index=li,
                site=site,
                mean_jaccard=float(mean[li]),
                pairs=pairs[key],
                prediction_changed=changed[key] / pairs[key],
                name=variant_name(key[0], key[1]),
            )
            for li, site in layers
        )
    return out


def agreement(pathways: Sequence[tuple[str, str]], sets: dict[str, NeuronSet]) -> list[Agreement]:
    """Jaccard between every two of one image's pathways ``(pathway id, config)``."""
    return [Agreement(config_a=ca, config_b=cb, jaccard=jaccard(set(sets[a]), set(sets[b])))
            for (a, ca), (b, cb) in itertools.combinations(pathways, 2)]


def _in_layer(s: NeuronSet, li: int) -> set[str]:
    return {n for n, v in s.items() if v[0] == li}


def layer_agreement(pairs: list[tuple[NeuronSet, NeuronSet]], layers: list[tuple[int, str]]
                    ) -> list[LayerAgreement]:
    """Per layer: pooled overlap (shared over mean size) and mean Jaccard of two settings' sets on the same images."""
    out = []
    for li, site in layers:
        inter = sizes = 0
        jac = []
        for a, b in pairs:
            sa, sb = _in_layer(a, li), _in_layer(b, li)
            inter += len(sa & sb)
            sizes += len(sa) + len(sb)
            jac.append(jaccard(sa, sb))
        out.append(LayerAgreement(layer_index=li, site=site, overlap=inter / sizes if sizes else 0.0,
                                  jaccard=float(np.mean(jac)) if jac else 0.0, images=len(pairs)))
    return out


def class_consistency(labels: list[int], sets: list[NeuronSet], layers: list[tuple[int, str]], max_pairs: int
                      ) -> list[LayerConsistency]:
    """Per layer: mean Jaccard of pathways of the same label against different labels (the first
    ``max_pairs`` pairs in order)."""
    pairs = list(itertools.combinations(range(len(sets)), 2))[:max_pairs]
    out = []
    for li, site in layers:
        layer_sets = [_in_layer(s, li) for s in sets]
        within: list[float] = []
        across: list[float] = []
        for i, j in pairs:
            (within if labels[i] == labels[j] else across).append(jaccard(layer_sets[i], layer_sets[j]))
        out.append(
            LayerConsistency(
                layer_index=li,
                site=site,
                within=float(np.mean(within)) if within else float("nan"),
                across=float(np.mean(across)) if across else float("nan"),
                pairs_within=len(within),
                pairs_across=len(across),
            )
        )
    return out


def perturbation(original_png: bytes, variant_png: bytes) -> Perturbation:
    """The variant minus its original as a picture (grey = no change, scaled to the largest change)."""
    a = np.asarray(Image.open(io.BytesIO(original_png)), dtype=np.float32)
    b = np.asarray(Image.open(io.BytesIO(variant_png)), dtype=np.float32)
    diff = b - a
    lim = float(np.abs(diff).max()) or 1.0
    buf = io.BytesIO()
    Image.fromarray(((diff / lim) * 127 + 128).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return Perturbation(buf.getvalue(), lim / 255)


def shift_graph(s: Shift, edges: Iterable[tuple[str, str, float]]) -> GroupedGraph:
    """Both pathways of an attacked pair as one graph (``edges`` of both); groups kept / lost / gained."""
    graph = nx.DiGraph()
    groups: dict[str, str] = {}
    for group, changes in (("kept", s.kept), ("lost", s.lost), ("gained", s.gained)):
        for c in changes:
            graph.add_node(c.neuron, site=c.site, layer_index=c.layer_index,
                           channel=parse_neuron_id(c.neuron).channel,
                           contribution=c.variant if c.variant is not None else c.original)
            groups[c.neuron] = group
    for u, v, w in edges:
        graph.add_edge(u, v, weight=w)
    return GroupedGraph(graph, groups)


def shared_graph(shared: SharedPathways) -> GroupedGraph:
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
