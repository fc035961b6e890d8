"""Per-layer overlap of two neuron sets: the one definition every reader and writer uses."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np


def jaccard(a: AbstractSet[Hashable], b: AbstractSet[Hashable]) -> float:
    """``|a & b| / |a | b|``; 1.0 for two empty sets (nothing differs)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


@dataclass(kw_only=True, frozen=True)
class LayerOverlap:
    """Neurons of one layer in set ``a``, in set ``b``, and in both."""

    layer_index: int
    site: str
    a: int
    b: int
    shared: int
    depth: int = 0  # the layer's depth in the site graph

    @property
    def jaccard(self) -> float:
        union = self.a + self.b - self.shared
        return self.shared / union if union else 1.0


def layer_overlaps(a: Mapping[str, int], b: Mapping[str, int],
                   layers: Mapping[int, tuple[str, int]]) -> list[LayerOverlap]:
    """Per layer (``layers``: index -> (site id, depth)), how many neurons of ``a`` and ``b`` lie in
    it and how many both hold; ``a`` and ``b`` map each neuron to its layer index."""
    return [
        LayerOverlap(
            layer_index=li,
            site=site,
            a=sum(1 for v in a.values() if v == li),
            b=sum(1 for v in b.values() if v == li),
            shared=sum(1 for n in a.keys() & b.keys() if a[n] == li),
            depth=depth,
        )
        for li, (site, depth) in sorted(layers.items())
    ]


def neuron_keys(sites: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """(site, channel) pairs ``[n]`` as one int64 key each, ``site << 32 | channel`` (the site is ``key >> 32``)."""
    return sites.astype(np.int64) << 32 | channels.astype(np.int64)


def jaccard_per_layer(sites_a: np.ndarray, channels_a: np.ndarray, sites_b: np.ndarray, channels_b: np.ndarray,
                      n_layers: int) -> np.ndarray:
    """Jaccard of two pathways' (site, channel) sets per layer ``[n_layers]`` (1.0 where both are empty)."""
    ka, kb = np.unique(neuron_keys(sites_a, channels_a)), np.unique(neuron_keys(sites_b, channels_b))

    def per_layer(keys: np.ndarray) -> np.ndarray:
        return np.bincount(keys >> 32, minlength=n_layers)[:n_layers]

    shared = per_layer(np.intersect1d(ka, kb, assume_unique=True))
    union = per_layer(ka) + per_layer(kb) - shared
    return np.where(union > 0, shared / np.maximum(union, 1), 1.0)
