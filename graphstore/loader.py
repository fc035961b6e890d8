"""Load a run folder of records into Neo4j: idempotent, atomic per image group, batched.

- Schema (constraints, indexes) first, ``IF NOT EXISTS``.
- Model, layers (with ``FEEDS``, the site graph), every neuron of every site, and classes: ``MERGE``.
- Then groups of originals with their variants and all their pathways, each group in one
  managed write transaction (retried by the driver on transient errors). A pathway is
  claimed with ``MERGE`` and only a transaction that *created* it writes its ``INCLUDES``
  and ``FLOWS_TO`` relationships, so reloading adds nothing and concurrent loaders never
  duplicate. A killed load leaves whole groups or nothing; re-running completes it.
- Class aggregates (``USES``) are recomputed for the model's pathway settings at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import neo4j
import numpy as np
from tqdm import tqdm

from extractor.records import (
    ExemplarRows,
    ImageRecord,
    ModelInfo,
    PathwayRecord,
    RecordsFormatError,
    class_id,
    iter_parts,
    layer_id,
    merge_exemplar_rows,
    neuron_id,
    read_exemplars,
    read_manifest,
    require_complete,
)
from graphstore import queries as Q
from graphstore.api import EDGE_SUPPORT_FLOOR, PER_IMAGE_KEYS, SIGNATURE_DIMENSIONS
from graphstore.connection import DATABASE
from graphstore.errors import RecordsError

log = logging.getLogger(__name__)

TX_EDGE_BUDGET = 40_000
ROW_BATCH = 10_000
LOAD_WORKERS = 1  # 2 gave 1.19x on 2 cores, with lock-deadlock retries on dense neurons


@dataclass
class LoadSummary:
    """What one ``load_run`` wrote: new pathways and relationships, and its throughput."""

    images: int = 0
    pathways_new: int = 0
    pathways_existing: int = 0
    includes: int = 0
    edges: int = 0
    seconds: float = 0.0  # all of it: schema, model, repair, writes, aggregates
    repaired: int = 0  # incomplete pathways found in the store and removed before loading
    write_seconds: float = 0.0  # the image-group transactions only
    exemplars: int = 0  # EXEMPLAR relationships of the model after this load

    @property
    def relationships_per_second(self) -> float:
        return (self.includes + self.edges) / self.seconds if self.seconds else 0.0

    @property
    def write_relationships_per_second(self) -> float:
        return (self.includes + self.edges) / self.write_seconds if self.write_seconds else 0.0


def ensure_schema(driver: neo4j.Driver, database: str = DATABASE) -> None:
    """Create constraints and indexes (idempotent) and wait until they are online."""
    for statement in Q.SCHEMA:
        driver.execute_query(statement, database_=database)
    driver.execute_query(Q.AWAIT_INDEXES, database_=database)


def _chunks(rows: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


@dataclass(frozen=True)
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
    meta = {"id": model.model_id, "arch": model.arch, "num_classes": model.num_classes,
            "input_shape": list(model.input_shape)}
    pairs = [{"src": layers[i]["id"], "dst": layers[s.index]["id"]} for s in model.sites for i in s.preds]
    neurons = [
        {"id": neuron_id(model.model_id, s.site_id, c), "layer_id": layer_id(model.model_id, s.site_id),
         "site": s.site_id, "layer_index": s.index, "depth": s.depth, "channel": c}
        for s in model.sites for c in range(s.channels)
    ]
    classes = [{"id": class_id(model.model_id, i), "index": i, "name": name}
               for i, name in enumerate(model.class_names)]
    return ModelRows(meta, layers, pairs, neurons, classes)


def load_model(driver: neo4j.Driver, model: ModelInfo, database: str = DATABASE) -> None:
    """Model, layers, ``FEEDS`` links (the site graph), all neurons and classes (MERGE; safe to repeat)."""
    rows = model_rows(model)
    driver.execute_query(Q.MERGE_MODEL, model=rows.model, layers=rows.layers, database_=database)
    driver.execute_query(Q.LINK_LAYERS, pairs=rows.pairs, database_=database)
    for chunk in _chunks(rows.neurons, ROW_BATCH):
        driver.execute_query(Q.MERGE_NEURONS, neurons=list(chunk), model_id=model.model_id, database_=database)
    driver.execute_query(Q.MERGE_CLASSES, classes=rows.classes, model_id=model.model_id, database_=database)


def variant_setting(params: dict[str, Any]) -> str:
    """The sweep setting of a variant: its parameters without the per-image ones."""
    return json.dumps({k: v for k, v in params.items() if k not in PER_IMAGE_KEYS}, sort_keys=True)


def image_row(im: ImageRecord, model: ModelInfo) -> dict[str, Any]:
    params = json.loads(im.params or "{}")
    setting = variant_setting(params) if im.kind != "original" else ""
    props = {
        "id": im.image_id, "model_id": im.model_id, "source": im.source, "kind": im.kind, "params": im.params,
        "setting": setting, "label": int(im.label), "predicted": int(im.predicted),
        "prob": float(im.probs[im.predicted]), "probs": [float(p) for p in im.probs], "png": bytes(im.png),
        "variant_of": im.variant_of,
    }
    variant = None
    if im.variant_of is not None:
        variant = {"kind": im.kind, "params": im.params, "setting": setting,
                   "eps": params.get("eps"), "steps": params.get("steps"),
                   "targeted": params.get("targeted"), "target": params.get("target")}
    return {
        "id": im.image_id, "props": props, "predicted_class": class_id(model.model_id, im.predicted),
        "prob": float(im.probs[im.predicted]), "logit": float(im.logits[im.predicted]),
        "label_class": class_id(model.model_id, im.label) if 0 <= im.label < model.num_classes else None,
        "variant_of": im.variant_of, "variant": variant,
    }


def _keys(pw: PathwayRecord) -> np.ndarray:
    """Neuron keys ``site * 2**32 + channel`` of a pathway, shape (n,)."""
    return pw.neuron_site.astype(np.int64) * (1 << 32) + pw.neuron_channel.astype(np.int64)


def layer_jaccard(variant: PathwayRecord, original: PathwayRecord, sites: int) -> list[float]:
    """Per site, Jaccard of the two pathways' channel sets (1.0 where both are empty)."""
    out = []
    for s in range(sites):
        a = set(variant.neuron_channel[variant.neuron_site == s].tolist())
        b = set(original.neuron_channel[original.neuron_site == s].tolist())
        union = a | b
        out.append(len(a & b) / len(union) if union else 1.0)
    return out


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


def pathway_row(pw: PathwayRecord, model: ModelInfo, original: PathwayRecord | None = None) -> dict[str, Any]:
    n = len(pw.neuron_channel)
    props = {
        "id": pw.pathway_id, "image_id": pw.image_id, "model_id": pw.model_id, "method": pw.method,
        "selection": pw.selection, "params": pw.params, "config": pw.config, "target": int(pw.target),
        "logit_full": float(pw.logit_full), "logit_masked": float(pw.logit_masked),
        "logit_ratio": float(pw.logit_ratio), "size": n,
        "dead_fraction": float(np.mean(pw.neuron_dead)) if n else 0.0,
        "saliency": [float(v) for v in pw.saliency.ravel()], "saliency_shape": list(pw.saliency.shape),
        "gaps": [float(g) for g in pw.site_gap],
        "layer_sizes": np.bincount(pw.neuron_site.astype(np.int64), minlength=len(model.sites)).tolist(),
        "layer_mass": np.bincount(pw.neuron_site.astype(np.int64), weights=np.abs(pw.neuron_contribution),
                                  minlength=len(model.sites)).astype(float).tolist(),
        **{k: float(v) for k, v in pw.extra.items() if isinstance(v, int | float)},
        **{k: v for k, v in pw.extra.items() if isinstance(v, str)},
    }
    sig = signature(pw, model)
    if sig is not None:
        props["signature"] = sig
    if original is not None:
        props["original_pathway"] = original.pathway_id
        props["layer_jaccard"] = layer_jaccard(pw, original, len(model.sites))
    return {"id": pw.pathway_id, "image_id": pw.image_id, "class_id": class_id(model.model_id, pw.target),
            "props": props}


def neuron_table(model: ModelInfo) -> list[list[str]]:
    """Neuron ids by [site index][channel]."""
    return [[neuron_id(model.model_id, s.site_id, c) for c in range(s.channels)] for s in model.sites]


def _include_rows(pw: PathwayRecord, table: list[list[str]], original: PathwayRecord | None = None) -> list[list[Any]]:
    """INCLUDES rows ``[neuron, contribution, score, rank, elements, dead, gained]``; for a variant's
    pathway ``gained`` marks neurons its original's pathway lacks (None for originals)."""
    gained = (~np.isin(_keys(pw), _keys(original))).tolist() if original is not None else [None] * len(pw.neuron_site)
    return [
        [table[s][c], v, sc, r, e, d, g]
        for s, c, v, sc, r, e, d, g in zip(pw.neuron_site.tolist(), pw.neuron_channel.tolist(),
                                           pw.neuron_contribution.tolist(), pw.neuron_score.tolist(),
                                           pw.neuron_rank.tolist(), pw.neuron_elements.tolist(),
                                           pw.neuron_dead.tolist(), gained, strict=True)
    ]


def edge_rows(pw: PathwayRecord, table: list[list[str]]) -> list[list[Any]]:
    """FLOWS_TO rows ``[source neuron, target neuron, pathway id, weight]``."""
    return [
        [table[ss][sc], table[ds][dc], pw.pathway_id, w]
        for ss, sc, ds, dc, w in zip(pw.edge_src_site.tolist(), pw.edge_src_channel.tolist(),
                                     pw.edge_dst_site.tolist(), pw.edge_dst_channel.tolist(),
                                     pw.edge_weight.tolist(), strict=True)
    ]


@dataclass
class _Group:
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


def _groups(images: list[ImageRecord], pathways: list[PathwayRecord]) -> list[_Group]:
    """Originals with their variants and every pathway of those images."""
    by_image: dict[str, list[PathwayRecord]] = defaultdict(list)
    for pw in pathways:
        by_image[pw.image_id].append(pw)
    groups: dict[str, _Group] = {}
    for im in images:
        key = im.variant_of or im.image_id
        group = groups.setdefault(key, _Group([], []))
        group.images.append(im)
        group.pathways.extend(by_image.get(im.image_id, []))
    for group in groups.values():  # originals first, so VARIANT_OF finds them
        group.images.sort(key=lambda i: i.variant_of is not None)
    return list(groups.values())


def _write_groups(
    tx: neo4j.ManagedTransaction, groups: Sequence[_Group], model: ModelInfo, table: list[list[str]]
) -> tuple[int, int, int, int]:
    """Write whole groups in one transaction; ``table`` holds neuron element ids by [site][channel]."""
    images = [image_row(im, model) for g in groups for im in g.images]
    tx.run(Q.MERGE_IMAGES, images=images).consume()
    pathways = [pw for g in groups for pw in g.pathways]
    originals = {k: v for g in groups for k, v in g.originals().items()}
    rows = [pathway_row(pw, model, originals.get(pw.pathway_id)) for pw in pathways]
    created = {r["id"] for r in tx.run(Q.CLAIM_PATHWAYS, pathways=rows)}
    fresh = [pw for pw in pathways if pw.pathway_id in created]
    includes = [{"id": pw.pathway_id, "rows": _include_rows(pw, table, originals.get(pw.pathway_id))}
                for pw in fresh]
    edges = [row for pw in fresh for row in edge_rows(pw, table)]
    n_inc = sum(len(p["rows"]) for p in includes)
    made = 0
    batch: list[dict[str, Any]] = []
    for item in [*includes, None]:
        if item is not None and sum(len(b["rows"]) for b in batch) + len(item["rows"]) <= ROW_BATCH:
            batch.append(item)
            continue
        if batch:
            made += tx.run(Q.CREATE_INCLUDES, pathways=batch).single(strict=True)["created"]
        batch = [item] if item is not None else []
    for chunk in _chunks(edges, ROW_BATCH):
        made += tx.run(Q.CREATE_FLOWS, rows=list(chunk)).single(strict=True)["created"]
    if made != n_inc + len(edges):  # a neuron vanished under us: roll the whole group back
        raise RecordsError(f"wrote {made} of {n_inc + len(edges)} relationships: the model's neurons changed "
                           "during the load; re-run the same command")
    return len(fresh), len(pathways) - len(fresh), n_inc, len(edges)


def refresh_aggregates(driver: neo4j.Driver, model_id: str, database: str = DATABASE) -> list[str]:
    """Recompute the ``USES``, ``CLASS_FLOW``, ``CountStat`` and ``VariantStat`` aggregates of every setting."""
    records, _, _ = driver.execute_query(Q.CONFIGS_OF_MODEL, model_id=model_id, database_=database)
    configs = sorted(r["config"] for r in records)
    for config in configs:
        def work(tx: neo4j.ManagedTransaction, cfg: str = config) -> None:
            tx.run(Q.LOCK_MODEL, model_id=model_id).consume()
            tx.run(Q.CLEAR_AGGREGATES, model_id=model_id, config=cfg).consume()
            tx.run(Q.REFRESH_AGGREGATES, model_id=model_id, config=cfg).consume()
            tx.run(Q.CLEAR_CLASS_FLOWS, model_id=model_id, config=cfg).consume()
            tx.run(Q.REFRESH_CLASS_FLOWS, model_id=model_id, config=cfg, floor=EDGE_SUPPORT_FLOOR).consume()
            tx.run(Q.CLEAR_COUNT_STATS, model_id=model_id, config=cfg).consume()
            tx.run(Q.REFRESH_COUNT_STATS, model_id=model_id, config=cfg).consume()
            tx.run(Q.CLEAR_VARIANT_STATS, model_id=model_id, config=cfg).consume()
            tx.run(Q.REFRESH_VARIANT_STATS, model_id=model_id, config=cfg).consume()

        with driver.session(database=database) as session:
            session.execute_write(work)
    return configs


def remove_incomplete(driver: neo4j.Driver, model_id: str, database: str = DATABASE) -> int:
    """Delete pathways of ``model_id`` that are not whole (with their edges); returns how many."""
    records, _, _ = driver.execute_query(Q.INCOMPLETE_PATHWAYS, model_id=model_id, database_=database)
    ids = [r["id"] for r in records]
    for chunk in _chunks(ids, 500):
        driver.execute_query(Q.DELETE_PATHWAYS, pathway_ids=list(chunk), database_=database)
    if ids:
        log.warning("removed %d incomplete pathways of %s before loading", len(ids), model_id)
    return len(ids)


def _batches(parts: Sequence[Any]) -> list[list[_Group]]:
    """Whole groups packed into transactions of at most ``TX_EDGE_BUDGET`` rows (one group may exceed it)."""
    out: list[list[_Group]] = []
    for part in parts:
        batch: list[_Group] = []
        budget = 0
        for group in _groups(part.images, part.pathways):
            if batch and budget + group.weight > TX_EDGE_BUDGET:
                out.append(batch)
                batch, budget = [], 0
            batch.append(group)
            budget += group.weight
        if batch:
            out.append(batch)
    return out


def _write_batches(driver: neo4j.Driver, database: str, batches: list[list[_Group]], model: ModelInfo,
                   table: list[list[str]], summary: LoadSummary, bar: tqdm, workers: int) -> None:
    """Each batch in its own write transaction, ``workers`` at a time (one session per thread).

    Batches hold disjoint images, so concurrent transactions only meet on shared Neuron and
    Class nodes; the driver retries the transient lock errors that can cause. On an error the
    batches not yet started are cancelled; committed ones stay whole (see ``remove_incomplete``).
    """
    local = threading.local()
    sessions: list[neo4j.Session] = []
    lock = threading.Lock()

    def run(batch: list[_Group]) -> None:
        if not hasattr(local, "session"):
            local.session = driver.session(database=database)
            with lock:
                sessions.append(local.session)
        new, old, inc, edg = local.session.execute_write(_write_groups, batch, model, table)
        n_img = sum(len(g.images) for g in batch)
        with lock:
            summary.pathways_new += new
            summary.pathways_existing += old
            summary.includes += inc
            summary.edges += edg
            summary.images += n_img
            bar.update(n_img)

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="pathx-load")
    futures: list[Future[None]] = []
    try:
        futures = [pool.submit(run, b) for b in batches]
        for fut in as_completed(futures):
            fut.result()
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
        for session in sessions:
            session.close()


def load_run(driver: neo4j.Driver, run_dir: Path, database: str = DATABASE, progress: bool = True,
             workers: int = LOAD_WORKERS) -> LoadSummary:
    """Load every part of ``run_dir``; safe to repeat and to resume after a crash.

    ``workers`` transactions run at once (Python builds one batch's rows while Neo4j writes another's).
    """
    try:
        manifest = read_manifest(run_dir)
        require_complete(run_dir)
    except RecordsFormatError as exc:
        raise RecordsError(str(exc)) from exc
    model = manifest.model
    began = time.perf_counter()
    ensure_schema(driver, database)
    load_model(driver, model, database)
    summary = LoadSummary(repaired=remove_incomplete(driver, model.model_id, database))
    records, _, _ = driver.execute_query(Q.NEURON_ELEMENT_IDS, model_id=model.model_id, database_=database)
    element = {r["id"]: r["element_id"] for r in records}
    table = [[element[n] for n in site] for site in neuron_table(model)]
    try:
        parts = list(iter_parts(run_dir))
    except RecordsFormatError as exc:
        raise RecordsError(str(exc)) from exc
    for part in parts:
        for pw in part.pathways:
            if pw.model_id != model.model_id:
                raise RecordsError(f"pathway {pw.pathway_id} belongs to model {pw.model_id}, not {model.model_id}")
    total = sum(len(p.images) for p in parts)
    bar = tqdm(total=total, desc="load", unit="img", disable=not progress)
    began_writes = time.perf_counter()
    try:
        _write_batches(driver, database, _batches(parts), model, table, summary, bar, workers)
    finally:
        bar.close()
    summary.write_seconds = time.perf_counter() - began_writes
    summary.exemplars = load_exemplars(driver, run_dir, model, int(manifest.settings.get("exemplars", 0)), database)
    refresh_aggregates(driver, model.model_id, database)
    summary.seconds = time.perf_counter() - began
    log.info("loaded %d images, %d new pathways, %d relationships in %.1f s", summary.images,
             summary.pathways_new, summary.includes + summary.edges, summary.seconds)
    return summary


def _exemplar_rows_of(records: list[Any]) -> ExemplarRows:
    """``EXEMPLARS_OF_MODEL`` records as ``ExemplarRows``."""
    def col(name: str, dtype: Any) -> np.ndarray:
        return np.asarray([r[name] for r in records], dtype)

    pos = np.asarray([r["position"] for r in records], np.int32).reshape(-1, 2)
    return ExemplarRows(site=col("site", np.int32), channel=col("channel", np.int32), kind=col("kind", object),
                        image_id=col("image_id", object), value=col("value", np.float32), y=pos[:, 0], x=pos[:, 1],
                        box=np.asarray([r["box"] for r in records], np.int32).reshape(-1, 4))


def exemplar_rows(rows: ExemplarRows, table: list[list[str]]) -> list[list[Any]]:
    """CREATE_EXEMPLARS rows ``[neuron element id or id, image id, kind, rank, value, position, box]``."""
    assert rows.rank is not None
    return [[table[int(s)][int(c)], str(i), str(k), int(r), float(v), [int(y), int(x)], [int(b) for b in box]]
            for s, c, i, k, r, v, y, x, box in zip(rows.site, rows.channel, rows.image_id, rows.kind, rows.rank,
                                                   rows.value, rows.y, rows.x, rows.box, strict=True)]


def load_exemplars(driver: neo4j.Driver, run_dir: Path, model: ModelInfo, n: int, database: str = DATABASE) -> int:
    """Merge the run's exemplars with those already stored for the model (top ``n`` per neuron and
    kind over both) and replace them in one transaction; returns how many are stored."""
    if n <= 0:
        return 0
    try:
        run_rows = read_exemplars(run_dir, n)
    except RecordsFormatError as exc:
        raise RecordsError(str(exc)) from exc
    records, _, _ = driver.execute_query(Q.NEURON_ELEMENT_IDS, model_id=model.model_id, database_=database)
    element = {r["id"]: r["element_id"] for r in records}
    table = [[element[nid] for nid in site] for site in neuron_table(model)]

    def write(tx: neo4j.ManagedTransaction) -> int:
        tx.run(Q.LOCK_MODEL, model_id=model.model_id).consume()
        merged = merge_exemplar_rows(ExemplarRows.concat([stored_exemplars_tx(tx, model), run_rows]), n)
        tx.run(Q.DELETE_EXEMPLARS, model_id=model.model_id).consume()
        rows = exemplar_rows(merged, table)
        made = 0
        for chunk in _chunks(rows, 5000):
            made += tx.run(Q.CREATE_EXEMPLARS, rows=list(chunk)).single()["created"]
        if made != len(rows):
            raise RecordsError(f"{len(rows) - made} exemplar images are not in the store; load their run first")
        return made

    with driver.session(database=database) as session:
        return int(session.execute_write(write))


def stored_exemplars_tx(tx: neo4j.ManagedTransaction, model: ModelInfo) -> ExemplarRows:
    records = list(tx.run(Q.EXEMPLARS_OF_MODEL, model_id=model.model_id))
    if not records:
        return ExemplarRows.empty()
    return _exemplar_rows_of(records)
