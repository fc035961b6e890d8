"""Per-layer overlap of two neuron sets: the one definition every reader and writer uses."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np


def jaccard(a: set[Hashable] | frozenset[Hashable], b: set[Hashable] | frozenset[Hashable]) -> float:
    """``|a & b| / |a | b|``; 1.0 for two empty sets (nothing differs)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


@dataclass(frozen=True)
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


def layer_overlaps(a: Mapping[Hashable, int], b: Mapping[Hashable, int],
                   layers: Mapping[int, tuple[str, int]]) -> list[LayerOverlap]:
    """Per layer (``layers``: index -> (site id, depth)), how many neurons of ``a`` and ``b`` lie in
    it and how many both hold; ``a`` and ``b`` map each neuron to its layer index."""
    return [LayerOverlap(li, site, sum(1 for v in a.values() if v == li), sum(1 for v in b.values() if v == li),
                         sum(1 for n in a.keys() & b.keys() if a[n] == li), depth)
            for li, (site, depth) in sorted(layers.items())]


def jaccard_per_layer(sites_a: np.ndarray, channels_a: np.ndarray, sites_b: np.ndarray, channels_b: np.ndarray,
                      n_layers: int) -> np.ndarray:
    """Jaccard of two pathways' (site, channel) sets per layer ``[n_layers]`` (1.0 where both are empty)."""
    out = np.ones(n_layers, dtype=np.float64)
    for li in range(n_layers):
        sa = set(channels_a[sites_a == li].tolist())
        sb = set(channels_b[sites_b == li].tolist())
        out[li] = jaccard(sa, sb)
    return out
