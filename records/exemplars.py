"""Exemplars: per neuron, the images that activate it most (rows, merging, reading a run's)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from records.io import EXEMPLARS, part_dirs, read_manifest, read_table

EXEMPLAR_KINDS = ("activation", "contribution")


@dataclass
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
        return cls(z, z, np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.float32), z, z,
                   np.zeros((0, 4), np.int32))

    @classmethod
    def concat(cls, parts: Sequence[ExemplarRows]) -> ExemplarRows:
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _EXEMPLAR_COLUMNS))

    def take(self, idx: np.ndarray) -> ExemplarRows:
        rank = self.rank[idx] if self.rank is not None else None
        return ExemplarRows(*(getattr(self, f)[idx] for f in _EXEMPLAR_COLUMNS), rank=rank)

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
        return cls(table["site"].to_numpy().astype(np.int32), table["channel"].to_numpy().astype(np.int32),
                   np.asarray(table["kind"].to_pylist(), object), np.asarray(table["image_id"].to_pylist(), object),
                   table["value"].to_numpy().astype(np.float32), table["y"].to_numpy().astype(np.int32),
                   table["x"].to_numpy().astype(np.int32), box)


_EXEMPLAR_COLUMNS = ("site", "channel", "kind", "image_id", "value", "y", "x", "box")


def merge_exemplar_rows(rows: ExemplarRows, n: int) -> ExemplarRows:
    """The top ``n`` rows per (site, channel, kind) by value, ties by image id, one row per image
    (its largest value); ``rank`` 1..n. Order-independent: merging any split of the candidates
    gives the same answer."""
    if not len(rows):
        return ExemplarRows.empty()
    kind = np.searchsorted(np.asarray(EXEMPLAR_KINDS), rows.kind.astype(str)).astype(np.int64)
    # image ids as integer codes in sorted order (ties go to the smaller id); all keys integers
    _, img = np.unique(rows.image_id.astype(str), return_inverse=True)
    img = img.reshape(-1).astype(np.int64)
    site, channel = rows.site.astype(np.int64), rows.channel.astype(np.int64)
    order = np.lexsort((img, -rows.value, channel, kind, site))
    group = (site * len(EXEMPLAR_KINDS) + kind) * (int(channel.max()) + 1) + channel
    # one row per (group, image): the first in sorted order has the largest value (stable unique)
    key = group[order] * (int(img.max()) + 1) + img[order]
    _, first = np.unique(key, return_index=True)
    order = order[np.sort(first)]
    g = group[order]
    starts = np.ones(len(order), bool)
    starts[1:] = g[1:] != g[:-1]
    start_idx = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - start_idx + 1
    keep = rank <= n
    out = rows.take(order[keep])
    out.rank = rank[keep].astype(np.int32)
    return out


def read_exemplars(run_dir: Path, n: int | None = None) -> ExemplarRows:
    """The run's exemplars: the top ``n`` (default: the run's setting) over every part's delta,
    merged part by part (memory O(channels x n))."""
    manifest = read_manifest(run_dir)
    n = n if n is not None else int(manifest.settings.get("exemplars", 0))
    top = ExemplarRows.empty()
    if n <= 0:
        return top
    for part in part_dirs(Path(run_dir)):
        path = part / EXEMPLARS
        if path.exists():
            delta = ExemplarRows.from_table(read_table(path, _EXEMPLAR_SCHEMA))
            top = merge_exemplar_rows(ExemplarRows.concat([top, delta]), n)
    return top


_EXEMPLAR_SCHEMA = ExemplarRows.empty().to_table().schema


