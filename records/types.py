"""The record types: what a run says about its model, images and pathways (no torch, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from records.ids import config_key, variant_sweep

SCHEMA_VERSION = 4


class RecordsFormatError(ValueError):
    """Record files that are missing, corrupt or of another schema version."""


def logit_ratio(masked: float, full: float) -> float:
    """How much of the target logit a pathway keeps: masked / full (NaN when the full logit is 0)."""
    return float(masked / full) if full != 0 else float("nan")


@dataclass(kw_only=True, frozen=True)
class SiteInfo:
    """One activation call (module or functional), in call order.

    ``shape`` is the per-image shape channels first: ``(C, H, W)`` for feature maps (also of
    channels-last sites, whose raw output is ``[H, W, C]``), ``(C, N)`` for tokens, ``(C,)`` for
    units. ``layout`` is how the raw output holds it (see ``extractor.layouts.LAYOUTS``).
    ``preds``: indices of the sites it reads directly (the site graph); ``depth``: the longest
    path from a site without predecessors.
    """

    index: int
    module_path: str
    call_index: int
    kind: str
    shape: tuple[int, ...]
    layout: str = "channels_first"
    preds: tuple[int, ...] = ()
    depth: int = 0

    @property
    def site_id(self) -> str:
        return f"{self.module_path}#{self.call_index}"

    @property
    def channels(self) -> int:
        return int(self.shape[0])


@dataclass(kw_only=True, frozen=True)
class ModelInfo:
    """Identity and structure of the model a run was extracted from."""

    model_id: str
    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    sites: tuple[SiteInfo, ...]
    title: str = ""  # how pages name it, e.g. "EfficientNet-Lite0 (ImageNet)"; the arch when empty

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sites"] = [asdict(s) for s in self.sites]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        sites = tuple(
            SiteInfo(index=s["index"], module_path=s["module_path"], call_index=s["call_index"], kind=s["kind"],
                     shape=tuple(s["shape"]), layout=s["layout"], preds=tuple(s["preds"]), depth=int(s["depth"]))
            for s in data["sites"]
        )
        return cls(
            model_id=data["model_id"], arch=data["arch"], num_classes=int(data["num_classes"]),
            class_names=tuple(data["class_names"]), input_shape=tuple(data["input_shape"]), sites=sites,
            title=str(data.get("title") or data["arch"]),
        )

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)


@dataclass(kw_only=True)
class ImageRecord:
    """One image (an original or a variant of one) and the model's answer on it.

    ``probs`` and ``logits`` have shape ``[num_classes]``; ``png`` is the image as shown.
    """

    image_id: str
    model_id: str
    source: str
    label: int  # -1 when unknown
    variant_of: str | None
    kind: str  # "original", "fgsm", "pgd", "occlude", "shift", "deform"
    params: str  # canonical JSON of the variant's parameters
    predicted: int
    probs: np.ndarray
    logits: np.ndarray
    png: bytes
    sweep: str = ""  # the variant's sweep (records.ids.variant_sweep); "" for originals

    def __post_init__(self) -> None:
        if not self.sweep:
            self.sweep = variant_sweep(self.kind, self.params)


@dataclass(kw_only=True)
class PathwayRecord:
    """A critical pathway of one image at channel granularity.

    Neuron arrays have shape ``[N]``; edge arrays ``[E]`` (from a predecessor site in the site
    graph to a site); ``site_gap`` ``[S]`` holds, per site, the largest completeness gap
    ``|sum over all predecessor channels w(i->j) - C_j|`` over the site's target channels ``j``
    (NaN for a site without predecessors, and for pixel pathways); ``saliency`` ``[H, W]`` is
    the Pathway Gradient map.
    """

    pathway_id: str
    image_id: str
    model_id: str
    method: str  # "mct" | "intgrad" | ...
    selection: str  # "topk" | "percentile"
    params: str  # canonical JSON
    target: int
    logit_full: float
    logit_masked: float
    neuron_site: np.ndarray
    neuron_channel: np.ndarray
    neuron_contribution: np.ndarray
    neuron_score: np.ndarray
    neuron_rank: np.ndarray
    neuron_elements: np.ndarray
    neuron_dead: np.ndarray
    edge_src_site: np.ndarray
    edge_src_channel: np.ndarray
    edge_dst_site: np.ndarray
    edge_dst_channel: np.ndarray
    edge_weight: np.ndarray
    site_gap: np.ndarray
    saliency: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> str:
        return config_key(self.method, self.selection, self.params)

    @property
    def logit_ratio(self) -> float:
        return logit_ratio(self.logit_masked, self.logit_full)


@dataclass(frozen=True)
class Manifest:
    """What a run folder holds: schema version, the model and the extraction settings."""

    schema_version: int
    model: ModelInfo
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model": self.model.to_json(), "settings": self.settings}


@dataclass(kw_only=True)
class ExemplarRows:
    """Exemplar candidates as columns, one row each: ``site``, ``channel``, ``kind``, ``image_id``,
    ``value``, peak position ``y``, ``x`` (-1 for unit vectors) and ``box`` ``[n, 4]`` (y0, x0, y1,
    x1; half-open, input pixels). After ``merge_exemplar_rows`` also ``rank`` (1 = best)."""

    site: np.ndarray
    channel: np.ndarray
    kind: np.ndarray
    image_id: np.ndarray
    value: np.ndarray
    y: np.ndarray
    x: np.ndarray
    box: np.ndarray
    rank: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.site)

    @classmethod
    def empty(cls) -> ExemplarRows:
        z = np.zeros(0, np.int32)
        return cls(site=z, channel=z, kind=np.zeros(0, object), image_id=np.zeros(0, object),
                   value=np.zeros(0, np.float32), y=z, x=z, box=np.zeros((0, 4), np.int32))

    @classmethod
    def concat(cls, parts: Sequence[ExemplarRows]) -> ExemplarRows:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in _EXEMPLAR_COLUMNS})

    def take(self, idx: np.ndarray) -> ExemplarRows:
        rank = self.rank[idx] if self.rank is not None else None
        return ExemplarRows(**{f: getattr(self, f)[idx] for f in _EXEMPLAR_COLUMNS}, rank=rank)

    def to_table(self) -> pa.Table:
        return pa.table({
            "site": pa.array(self.site, pa.int32()), "channel": pa.array(self.channel, pa.int32()),
            "kind": pa.array(self.kind.tolist(), pa.string()),
            "image_id": pa.array(self.image_id.tolist(), pa.string()),
            "value": pa.array(self.value, pa.float32()), "y": pa.array(self.y, pa.int32()),
            "x": pa.array(self.x, pa.int32()),
            "box": pa.array(self.box.astype(np.int32).tolist(), pa.list_(pa.int32())),
        })

    @classmethod
    def from_table(cls, table: pa.Table) -> ExemplarRows:
        box = np.asarray(table["box"].to_pylist(), np.int32).reshape(-1, 4)
        return cls(site=table["site"].to_numpy().astype(np.int32), channel=table["channel"].to_numpy().astype(np.int32),
                   kind=np.asarray(table["kind"].to_pylist(), object),
                   image_id=np.asarray(table["image_id"].to_pylist(), object),
                   value=table["value"].to_numpy().astype(np.float32), y=table["y"].to_numpy().astype(np.int32),
                   x=table["x"].to_numpy().astype(np.int32), box=box)


_EXEMPLAR_COLUMNS = ("site", "channel", "kind", "image_id", "value", "y", "x", "box")
