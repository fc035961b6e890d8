"""Exemplars: per neuron, the images that activate it most (rows, merging, reading a run's)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from records.io import EXEMPLARS, RunFolder, part_dirs, read_manifest, read_table
from records.types import ExemplarRows

EXEMPLAR_KINDS = ("activation", "contribution")


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


def read_exemplars(run_dir: Path | RunFolder, n: int | None = None) -> ExemplarRows:
    """The run's exemplars: the top ``n`` (default: the run's setting) over every part's delta,
    merged part by part (memory O(channels x n))."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(path=Path(run_dir), manifest=read_manifest(run_dir))
    n = n if n is not None else int(run.manifest.settings.get("exemplars", 0))
    top = ExemplarRows.empty()
    if n <= 0:
        return top
    for part in part_dirs(run.path):
        path = part / EXEMPLARS
        if path.exists():
            delta = ExemplarRows.from_table(read_table(path, _EXEMPLAR_SCHEMA))
            top = merge_exemplar_rows(ExemplarRows.concat([top, delta]), n)
    return top


_EXEMPLAR_SCHEMA = ExemplarRows.empty().to_table().schema


def exemplar_digest(run: RunFolder, n: int) -> str:
    """The run's exemplar candidates for the top ``n`` as 16 hex digits: a hash of ``n`` and each part's exemplar
    file, read as bytes (no decoding, no merge). The store's Model keeps the digests of the runs it merged, so
    loading a run again skips the merge, which would change nothing."""
    h = hashlib.sha256(str(n).encode())
    for part in part_dirs(run.path):
        path = part / EXEMPLARS
        if path.exists():
            h.update(part.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


