"""Record -> row builders for the graph store, and the constants both writers share.

Used by the transactional loader (:mod:`graphstore.loader`) and the bulk importer
(:mod:`graphstore.bulk`), which must write the same graph: one builder per node or
relationship kind, so the two cannot drift. No Cypher and no driver here.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from graphstore import schema
from graphstore.schema import SIGNATURE_DIMENSIONS, STORE_FORMAT
from records import (
    ExemplarRows,
    ImageRecord,
    ModelInfo,
    PathwayRecord,
    class_id,
    layer_id,
    neuron_id,
    pathway_key,
)
from records.overlap import jaccard_per_layer, neuron_keys


@dataclass(kw_only=True, frozen=True)
class ModelRows:
    """Rows for the model's structure: its node, layers, site-graph edges (``pairs``), neurons and classes."""

    model: dict[str, Any]
    layers: list[dict[str, Any]]
    pairs: list[dict[str, str]]
    neurons: list[dict[str, Any]]
    classes: list[dict[str, Any]]


def model_rows(model: ModelInfo) -> ModelRows:
    layers = [
        {"id": layer_id(model.model_id, s.site_id), "site": s.site_id, "module_path": s.module_path,
         "call_index": s.call_index, "kind": s.kind, "index": s.index, "channels": s.channels,
         "shape": list(s.shape), "layout": s.layout, "depth": s.depth}
        for s in model.sites
    ]
    meta = {"id": model.model_id, "arch": model.arch, "title": model.title or model.arch,
            "num_classes": model.num_classes,
            "input_shape": list(model.input_shape), "store_format": STORE_FORMAT}
    pairs = [{"src": str(layers[i]["id"]), "dst": str(layers[s.index]["id"])} for s in model.sites for i in s.preds]
    neurons = [
        {"id": neuron_id(model.model_id, s.site_id, c), "layer_id": layer_id(model.model_id, s.site_id),
         "site": s.site_id, "layer_index": s.index, "depth": s.depth, "channel": c}
        for s in model.sites for c in range(s.channels)
    ]
    classes = [{"id": class_id(model.model_id, i), "index": i, "name": name}
               for i, name in enumerate(model.class_names)]
    return ModelRows(model=meta, layers=layers, pairs=pairs, neurons=neurons, classes=classes)


def image_row(im: ImageRecord, model: ModelInfo) -> dict[str, Any]:
    params = json.loads(im.params or "{}")
    sweep = im.sweep
    props = {
        "id": im.image_id, "model_id": im.model_id, "source": im.source, "kind": im.kind, "params": im.params,
        # like variant_of, set on variants only: both writers then store the same (the bulk importer
        # reads an empty CSV cell as no property, so an original's "" could not be stored there)
        "sweep": sweep or None, "label": int(im.label), "predicted": int(im.predicted),
        "prob": float(im.probs[im.predicted]), "probs": [float(p) for p in im.probs], "png": bytes(im.png),
        "variant_of": im.variant_of,
    }
    variant = None
    if im.variant_of is not None:
        variant = {"kind": im.kind, "params": im.params, "sweep": sweep,
                   "eps": params.get("eps"), "steps": params.get("steps"),
                   "targeted": params.get("targeted"), "target": params.get("target")}
    return {
        "id": im.image_id, "props": props, "predicted_class": class_id(model.model_id, im.predicted),
        "prob": float(im.probs[im.predicted]), "logit": float(im.logits[im.predicted]),
        "label_class": class_id(model.model_id, im.label) if 0 <= im.label < model.num_classes else None,
        "variant_of": im.variant_of, "variant": variant,
    }


@lru_cache(maxsize=8)
def _projection(model_id: str, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-site offsets ``[S]`` and a random +-1 matrix ``[neurons, SIGNATURE_DIMENSIONS]`` seeded by the model id."""
    seed = int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(sum(sizes), SIGNATURE_DIMENSIONS), dtype=np.int8) * 2 - 1
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), signs.astype(np.float32)


def signature(pw: PathwayRecord, model: ModelInfo) -> list[float] | None:
    """The pathway's neuron set projected to ``SIGNATURE_DIMENSIONS`` (unit length; ``None`` when empty).

    The cosine of two signatures estimates |A & B| / sqrt(|A| |B|) (Johnson-Lindenstrauss), which
    ranks like Jaccard for equal sizes: good for fetching candidates, never for the final answer.
    """
    if len(pw.neuron_channel) == 0:
        return None
    offsets, signs = _projection(model.model_id, tuple(s.channels for s in model.sites))
    v = signs[offsets[pw.neuron_site.astype(np.int64)] + pw.neuron_channel.astype(np.int64)].sum(0)
    norm = float(np.linalg.norm(v))
    return [float(x) for x in v / norm] if norm > 0 else None


def saliency_bytes(saliency: np.ndarray) -> tuple[bytes, float]:
    """``Pathway.saliency`` and ``Pathway.saliency_scale`` as stored: the map ``[H, W]`` over its largest finite
    magnitude (the scale; 1.0 for a map of zeros), as float16 little-endian bytes. That keeps about three
    significant digits of every value down to 6e-5 of the peak, in half the records' float32 bytes;
    :func:`saliency_of` reads it back."""
    sal = np.asarray(saliency, dtype=np.float32)
    finite = np.abs(sal[np.isfinite(sal)])
    peak = float(finite.max()) if finite.size else 0.0
    scale = peak if peak > 0 else 1.0
    return np.ascontiguousarray(sal / np.float32(scale), dtype="<f2").tobytes(), scale


def saliency_of(stored: bytes | bytearray, shape: Sequence[int], scale: float) -> np.ndarray:
    """The stored ``Pathway.saliency`` bytes and ``saliency_scale`` as a float32 map of ``shape``."""
    return (np.frombuffer(bytes(stored), dtype="<f2").reshape(tuple(shape)).astype(np.float32)
            * np.float32(scale))


def pathway_row(pw: PathwayRecord, model: ModelInfo, original: PathwayRecord | None = None) -> dict[str, Any]:
    n = len(pw.neuron_channel)
    saliency, saliency_scale = saliency_bytes(pw.saliency)
    props = {
        "id": pw.pathway_id, "key": pathway_key(pw.pathway_id), "image_id": pw.image_id, "model_id": pw.model_id,
        "method": pw.method,
        "selection": pw.selection, "params": pw.params, "config": pw.config, "target": int(pw.target),
        "logit_full": float(pw.logit_full), "logit_masked": float(pw.logit_masked),
        "logit_ratio": float(pw.logit_ratio), "size": n,
        "dead_fraction": float(np.mean(pw.neuron_dead)) if n else 0.0,
        "saliency": saliency, "saliency_scale": saliency_scale, "saliency_shape": list(pw.saliency.shape),
        "gaps": [float(g) for g in pw.site_gap],
        "layer_sizes": np.bincount(pw.neuron_site.astype(np.int64), minlength=len(model.sites)).tolist(),
        "layer_mass": np.bincount(pw.neuron_site.astype(np.int64), weights=np.abs(pw.neuron_contribution),
                                  minlength=len(model.sites)).astype(float).tolist(),
        **{k: float(v) for k, v in pw.extra.items() if isinstance(v, int | float)},
        **{k: v for k, v in pw.extra.items() if isinstance(v, str)},
    }
    if original is not None:
        props["original_pathway"] = original.pathway_id
        props["layer_jaccard"] = jaccard_per_layer(pw.neuron_site, pw.neuron_channel, original.neuron_site,
                                                   original.neuron_channel, len(model.sites)).tolist()
    # the signature is kept apart: stored as float32 (db.create.setNodeVectorProperty; float[] in the bulk CSV)
    return {"id": pw.pathway_id, "image_id": pw.image_id, "class_id": class_id(model.model_id, pw.target),
            "props": props, "signature": signature(pw, model)}


def neuron_table(model: ModelInfo) -> list[list[str]]:
    """Neuron ids by [site index][channel]."""
    return [[neuron_id(model.model_id, s.site_id, c) for c in range(s.channels)] for s in model.sites]


def gained(pw: PathwayRecord, original: PathwayRecord | None) -> list[bool | None]:
    """Per neuron of a variant's pathway, whether its original's pathway lacks it (None for originals)."""
    if original is None:
        return [None] * len(pw.neuron_site)
    ours, theirs = neuron_keys(pw.neuron_site, pw.neuron_channel), neuron_keys(original.neuron_site,
                                                                                  original.neuron_channel)
    lacks: list[bool] = (~np.isin(ours, theirs)).tolist()
    return list(lacks)


@dataclass(frozen=True)
class NeuronIndex:
    """A model's neurons as the writer names them (ids for the bulk importer, element ids for Bolt), flat
    ``[sum of channels]``, and each site's offset into them ``[S]``."""

    names: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, table: list[list[str]]) -> NeuronIndex:
        """From names by ``[site][channel]`` (:func:`neuron_table`, or element ids in that layout)."""
        names = np.array([n for site in table for n in site], dtype=object)
        return cls(names, np.cumsum([0, *[len(site) for site in table[:-1]]]).astype(np.int64))

    @classmethod
    def numbered(cls, model: ModelInfo) -> NeuronIndex:
        """Each neuron named by its position in the model, ``0..neurons-1`` (int64), in ``neuron_table`` order."""
        sizes = [s.channels for s in model.sites]
        return cls(np.arange(sum(sizes), dtype=np.int64), np.cumsum([0, *sizes[:-1]]).astype(np.int64))

    def __call__(self, site: np.ndarray, channel: np.ndarray) -> np.ndarray:
        return np.asarray(self.names[self.offsets[site.astype(np.int64)] + channel.astype(np.int64)])


def renumber(*columns: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer columns -> (their distinct values ``[U]``, sorted; each column as positions into those)."""
    values, inverse = np.unique(np.concatenate(columns) if columns else np.zeros(0, np.int64), return_inverse=True)
    bounds = np.cumsum([0, *[len(c) for c in columns]])
    return values, [inverse[bounds[i]:bounds[i + 1]].astype(np.int64) for i in range(len(columns))]


# Relationship columns: ``start`` and ``end`` (the two nodes), then the type's properties, named and ordered as
# graphstore.schema has them. Both writers take these columns: the bulk importer as CSV, the loader over Bolt.
Columns = dict[str, Any]


def _named(type_: str, start: Any, end: Any, props: dict[str, Any]) -> Columns:
    want = list(schema.relationship(type_).types())
    if list(props) != want:
        raise AssertionError(f"{type_} columns {list(props)} differ from graphstore.schema's {want}")
    return {"start": start, "end": end, **props}


def _cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def include_columns(pws: Sequence[PathwayRecord], originals: Mapping[str, PathwayRecord],
                    index: NeuronIndex) -> Columns:
    """``INCLUDES`` of ``pws``: ``start`` pathway id, ``end`` neuron; ``gained`` a pyarrow boolean array
    (null on originals' pathways; see :func:`gained`)."""
    sizes = [len(p.neuron_site) for p in pws]
    gains = [g for p in pws for g in gained(p, originals.get(p.pathway_id))]
    return _named("INCLUDES", np.repeat(np.array([p.pathway_id for p in pws], dtype=object), sizes),
                  index(_cat([p.neuron_site for p in pws], np.int64), _cat([p.neuron_channel for p in pws], np.int64)),
                  {"contribution": _cat([p.neuron_contribution for p in pws], np.float64),
                   "score": _cat([p.neuron_score for p in pws], np.float64),
                   "rank": _cat([p.neuron_rank for p in pws], np.int64),
                   "elements": _cat([p.neuron_elements for p in pws], np.int64),
                   "dead": _cat([p.neuron_dead for p in pws], bool), "gained": pa.array(gains, type=pa.bool_())})


def flow_columns(pws: Sequence[PathwayRecord], index: NeuronIndex) -> Columns:
    """``FLOWS_TO`` of ``pws``: ``start`` source neuron, ``end`` target neuron, ``pathway`` the pathway's key."""
    n_edges = [len(p.edge_weight) for p in pws]
    src = index(_cat([p.edge_src_site for p in pws], np.int64), _cat([p.edge_src_channel for p in pws], np.int64))
    dst = index(_cat([p.edge_dst_site for p in pws], np.int64), _cat([p.edge_dst_channel for p in pws], np.int64))
    return _named("FLOWS_TO", src, dst,
                  {"pathway": np.repeat(np.array([pathway_key(p.pathway_id) for p in pws], dtype=np.int64), n_edges),
                   "weight": _cat([p.edge_weight for p in pws], np.float64)})


def exemplar_columns(rows: ExemplarRows, index: NeuronIndex) -> Columns:
    """``EXEMPLAR`` of merged exemplar rows: ``start`` neuron, ``end`` image id."""
    assert rows.rank is not None
    return _named("EXEMPLAR", index(rows.site, rows.channel), rows.image_id.astype(str).astype(object),
                  {"kind": rows.kind.astype(str).astype(object), "rank": rows.rank.astype(np.int64),
                   "value": rows.value.astype(np.float64),
                   "position": np.stack([rows.y, rows.x], 1).astype(np.int64).reshape(-1, 2),
                   "box": rows.box.astype(np.int64)})


def plain(columns: Columns, start: int = 0, stop: int | None = None) -> dict[str, list[Any]]:
    """Rows ``start:stop`` of ``columns`` as Python lists (what Bolt sends); arrays of rows become lists of lists."""
    out: dict[str, list[Any]] = {}
    for name, col in columns.items():
        part = col[start:stop]
        out[name] = part.to_pylist() if isinstance(part, pa.Array) else part.tolist()
    return out


@dataclass
class Group:
    images: list[ImageRecord]
    pathways: list[PathwayRecord]

    def originals(self) -> dict[str, PathwayRecord]:
        """Variant pathway id -> the original image's pathway of the same setting (when present)."""
        of_image = {im.image_id: im.variant_of for im in self.images}
        by = {(pw.image_id, pw.config): pw for pw in self.pathways}
        out = {}
        for pw in self.pathways:
            source = of_image.get(pw.image_id)
            if source is not None and (source, pw.config) in by:
                out[pw.pathway_id] = by[(source, pw.config)]
        return out

    @property
    def weight(self) -> int:
        return sum(len(p.edge_weight) + len(p.neuron_channel) for p in self.pathways) + 1


def groups(images: list[ImageRecord], pathways: list[PathwayRecord]) -> list[Group]:
    """Originals with their variants and every pathway of those images."""
    by_image: dict[str, list[PathwayRecord]] = defaultdict(list)
    for pw in pathways:
        by_image[pw.image_id].append(pw)
    groups: dict[str, Group] = {}
    for im in images:
        key = im.variant_of or im.image_id
        group = groups.setdefault(key, Group([], []))
        group.images.append(im)
        group.pathways.extend(by_image.get(im.image_id, []))
    for group in groups.values():  # originals first, so VARIANT_OF finds them
        group.images.sort(key=lambda i: i.variant_of is not None)
    return list(groups.values())


def exemplar_rows_of(records: list[Any]) -> ExemplarRows:
    """``EXEMPLARS_OF_MODEL`` records as ``ExemplarRows``."""
    def col(name: str, dtype: Any) -> np.ndarray:
        return np.asarray([r[name] for r in records], dtype)

    pos = np.asarray([r["position"] for r in records], np.int32).reshape(-1, 2)
    return ExemplarRows(site=col("site", np.int32), channel=col("channel", np.int32), kind=col("kind", object),
                        image_id=col("image_id", object), value=col("value", np.float32), y=pos[:, 0], x=pos[:, 1],
                        box=np.asarray([r["box"] for r in records], np.int32).reshape(-1, 4))




