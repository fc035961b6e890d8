"""The typed answers of the query layer (:class:`graphstore.api.Store`), and their tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from records import LayerOverlap, logit_ratio


@dataclass(kw_only=True, frozen=True)
class Summary:
    models: int
    classes: int
    images: int
    originals: int
    pathways: int
    edges: int


@dataclass(kw_only=True, frozen=True)
class ConfigInfo:
    """One pathway setting present in the store."""

    config: str
    method: str
    selection: str
    params: str
    pathways: int
    name: str = ""  # as a researcher writes it, e.g. "MCT · p = 90 (elements)"


@dataclass(frozen=True)
class ClassInfo:
    id: str
    index: int
    name: str


@dataclass(kw_only=True, frozen=True)
class ImageInfo:
    id: str
    source: str
    kind: str
    label: int
    predicted: int
    prob: float
    variant_of: str | None
    sweep: str


@dataclass(kw_only=True, frozen=True)
class ImageDetail:
    id: str
    model_id: str
    source: str
    kind: str
    params: str
    sweep: str  # the variant's sweep as its record says ("" for originals)
    label: int
    predicted: int
    prob: float
    probs: list[float]
    png: bytes
    original: str | None
    variants: list[str]


@dataclass(kw_only=True, frozen=True)
class PathwayInfo:
    """A pathway's header; ``saliency`` has shape ``saliency_shape`` (Pathway Gradient map)."""

    id: str
    config: str
    method: str
    selection: str
    params: str
    target: int
    logit_full: float
    logit_masked: float
    size: int
    saliency: np.ndarray
    gaps: list[float]
    dead_fraction: float  # share of the pathway's neurons that are dead (all zero) in the clean pass
    corr_prec_overlap: float | None  # resampling methods: Lengerich's overlap of the two selections
    cut_sites: list[str]  # sites where the selection is cut (no kept neuron reads a kept one before it)

    @property
    def logit_ratio(self) -> float:
        return logit_ratio(self.logit_masked, self.logit_full)


@dataclass(kw_only=True, frozen=True)
class NeuronScore:
    neuron: str
    site: str
    layer_index: int
    channel: int
    support: float
    mean_contribution: float


@dataclass(kw_only=True)
class SharedPathways:
    """Neurons (and edges) with support >= s in both classes, plus per-layer overlap."""

    class_a: str
    class_b: str
    shared: list[tuple[NeuronScore, NeuronScore]]
    only_a: list[NeuronScore]
    only_b: list[NeuronScore]
    per_layer: list[LayerOverlap]
    shared_edges: list[tuple[str, str, float, float]]  # src, dst, support in a, support in b


@dataclass
class ClassSimilarity:
    """``jaccard[i, j]`` over neuron sets with support >= s; ``weighted`` uses support x |contribution|."""

    class_names: list[str]
    jaccard: np.ndarray
    weighted: np.ndarray


@dataclass(kw_only=True, frozen=True)
class SignatureNeuron:
    neuron: str
    site: str
    layer_index: int
    channel: int
    support: float
    max_other: float
    specificity: float  # support - mean support in the other classes


@dataclass(kw_only=True, frozen=True)
class NeuronChange:
    neuron: str
    site: str
    layer_index: int
    original: float | None  # contribution in the original's pathway (None: absent)
    variant: float | None

    @property
    def delta(self) -> float:
        return (self.variant or 0.0) - (self.original or 0.0)


@dataclass(kw_only=True)
class Shift:
    """How a variant's pathway differs from its original's, layer by layer."""

    variant: str
    original: str
    kind: str
    sweep: str
    kept: list[NeuronChange]
    lost: list[NeuronChange]
    gained: list[NeuronChange]
    per_layer: list[LayerOverlap]
    first_change: int | None  # the shallowest layer (site-graph depth, then index) whose neuron set differs
    first_departure: int | None  # the shallowest layer with Jaccard < threshold


@dataclass(kw_only=True, frozen=True)
class Hijack:
    """A neuron gained by attacked images: share of pairs, overall and per sweep."""

    neuron: str
    site: str
    layer_index: int
    count: int
    share: float
    by_sweep: dict[str, float]


@dataclass(kw_only=True, frozen=True)
class LayerCount:
    """Per layer, for originals or one variant sweep: mean pathway neurons and mean contribution
    mass (sum of |contribution| of the pathway's neurons there) over pathways with any there."""

    kind: str
    sweep: str
    layer_index: int
    site: str
    mean_neurons: float
    mean_mass: float
    pathways: int
    name: str = ""  # the variant sweep as a researcher writes it


@dataclass(kw_only=True, frozen=True)
class VariantOverlap:
    """Mean per-layer Jaccard between variants' and originals' pathways, per kind and sweep."""

    kind: str
    sweep: str
    layer_index: int
    site: str
    mean_jaccard: float
    pairs: int
    prediction_changed: float  # share of pairs whose prediction differs from the original's
    name: str = ""  # the variant sweep as a researcher writes it


@dataclass(kw_only=True, frozen=True)
class Exemplar:
    """One of a neuron's top images: ``kind`` 'activation' or 'contribution', ``box`` (y0, x0, y1, x1;
    half-open, pixels of ``png``) around the peak ``position`` (y, x in the site's map; -1 for units)."""

    kind: str
    rank: int
    value: float
    image_id: str
    source: str
    label: int
    predicted: int
    box: list[int]
    position: list[int]
    png: bytes


@dataclass(kw_only=True, frozen=True)
class NeuronEdge:
    neuron: str
    site: str
    class_name: str
    support: float
    mean_weight: float


@dataclass(kw_only=True, frozen=True)
class AttackEffect:
    """How attacks of one kind and strength change a neuron: pathways that gain or lose it, of ``pairs``."""

    kind: str
    sweep: str
    name: str
    pairs: int
    gained: int
    lost: int


@dataclass(kw_only=True)
class NeuronCard:
    """Everything a neuron card shows: exemplars, class support, strongest edges, attack effects."""

    neuron: str
    site: str
    layer_index: int
    channel: int
    exemplars: list[Exemplar]
    classes: list[dict[str, Any]]
    incoming: list[NeuronEdge]
    outgoing: list[NeuronEdge]
    attacks: list[AttackEffect]


@dataclass(kw_only=True, frozen=True)
class LayerAgreement:
    """Per layer, over images with pathways of both settings: Lengerich's overlap (max 0.5) and Jaccard."""

    layer_index: int
    site: str
    overlap: float
    jaccard: float
    images: int


@dataclass(kw_only=True, frozen=True)
class LayerConsistency:
    """Per layer: mean Jaccard of originals' neuron sets within a class and across classes."""

    layer_index: int
    site: str
    within: float
    across: float
    pairs_within: int
    pairs_across: int


@dataclass(kw_only=True, frozen=True)
class SimilarImage:
    image_id: str
    source: str
    kind: str
    label: int
    predicted: int
    jaccard: float


@dataclass(kw_only=True, frozen=True)
class Agreement:
    config_a: str
    config_b: str
    jaccard: float
    per_layer: list[LayerOverlap] = field(default_factory=list)


def as_row(item: Any) -> dict[str, Any]:
    """A result, a dict or a value as one row: a dataclass's fields (not recursed), a dict's items."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}
    return dict(item) if isinstance(item, dict) else {"value": item}


def to_frame(result: Any) -> pd.DataFrame:
    """A query result as a ``pandas.DataFrame``: one row per item of a list of results or dicts;
    for one result object, one row per item of each of its list fields (column ``part`` names the
    field), with its scalar fields in ``frame.attrs``."""
    if isinstance(result, (list, tuple)):
        return pd.DataFrame([as_row(r) for r in result])
    if isinstance(result, dict):
        return pd.DataFrame([result])
    fields = as_row(result)
    lists = {k: v for k, v in fields.items() if isinstance(v, list) and v and not isinstance(v[0], (int, float, str))}
    if not lists:
        return pd.DataFrame([fields])
    frame = pd.concat([pd.DataFrame([as_row(r) for r in v]).assign(part=k) for k, v in lists.items()],
                      ignore_index=True)
    frame.attrs.update({k: v for k, v in fields.items() if k not in lists})
    return frame


@dataclass
class GroupedGraph:
    """A graph to draw whose neurons belong to named groups (kept / lost / gained, shared / only A /
    only B); node attributes: site, layer_index, channel, contribution; edge attribute: weight."""

    graph: nx.DiGraph
    groups: dict[str, str]  # neuron id -> group name


@dataclass(frozen=True)
class Perturbation:
    """The difference variant - original as an image: ``png`` (grey = 0, scaled by ``max_abs``)."""

    png: bytes
    max_abs: float  # largest |difference| on the 0..1 pixel scale
