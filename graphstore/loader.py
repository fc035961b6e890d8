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

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import neo4j
import numpy as np
from tqdm import tqdm

from graphstore import queries as Q
from graphstore.connection import DATABASE
from graphstore.errors import GraphStoreError, RecordsError
from graphstore.rows import (
    Group,
    NeuronIndex,
    exemplar_columns,
    exemplar_rows_of,
    flow_columns,
    groups,
    image_row,
    include_columns,
    model_rows,
    neuron_table,
    pathway_row,
    plain,
    renumber,
)
from graphstore.schema import INDEXES, STORE_FORMAT
from records import (
    ExemplarRows,
    ModelInfo,
    PathwayRecord,
    RunFolder,
    exemplar_digest,
    iter_parts,
    merge_exemplar_rows,
    open_run,
    pathway_key,
    read_exemplars,
)

log = logging.getLogger(__name__)

TX_EDGE_BUDGET = 40_000
ROW_BATCH = 10_000
LOOKUP_BATCH = 10_000  # keys or ids per lookup query
# A setting's refresh reads the touched classes' pathways in one transaction: on a 1,000,000-image store of 10
# classes that is minutes, past the server's default limit for a transaction (kept for interactive reads)
AGGREGATE_TIMEOUT_S = 6 * 3600.0
INDEX_WAIT_S = 6 * 3600.0  # an index filling longer than this is taken as stuck
LOAD_WORKERS = 1  # 2 gave 1.19x on 2 cores, with lock-deadlock retries on dense neurons


@dataclass(kw_only=True)
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
    aggregate_seconds: float = 0.0  # the aggregates' refresh (0 when nothing was added)
    exemplars: int = 0  # EXEMPLAR relationships of the model after this load

    @property
    def relationships_per_second(self) -> float:
        return (self.includes + self.edges) / self.seconds if self.seconds else 0.0

    @property
    def write_relationships_per_second(self) -> float:
        return (self.includes + self.edges) / self.write_seconds if self.write_seconds else 0.0


def ensure_schema(driver: neo4j.Driver, database: str = DATABASE) -> None:
    """Create constraints and indexes (idempotent) and wait until they are online.

    Two loaders starting at once may both create an index; ``IF NOT EXISTS`` does not cover that
    race, and the loser's "equivalent rule already exists" only says that the index is there. A store that has
    every one online already (every load after the first) is left as it is: one query."""
    records, _, _ = driver.execute_query(Q.ONLINE_INDEXES, database_=database)
    if {ix.name for ix in INDEXES} <= set(records[0]["names"]):
        return
    for statement in Q.SCHEMA:
        try:
            driver.execute_query(statement, database_=database)
        except neo4j.exceptions.ClientError as exc:
            if "EquivalentSchemaRuleAlreadyExists" not in (exc.code or "") and "already exists" not in str(exc):
                raise
    await_indexes(driver, database)


def await_indexes(driver: neo4j.Driver, database: str = DATABASE, timeout: float = INDEX_WAIT_S) -> None:
    """Wait until every key and index of the schema is online, asking in short transactions once a second (an
    import of 300 M relationships fills ``FLOWS_TO(pathway)`` for minutes, longer than the server lets one
    transaction run). An index that failed, or one still filling after ``timeout`` seconds, raises."""
    wanted = {ix.name for ix in INDEXES}
    began = time.monotonic()
    said = began
    while True:
        records, _, _ = driver.execute_query(Q.INDEX_STATES, database_=database)
        states = {r["name"]: (r["state"], r["percent"]) for r in records if r["name"] in wanted}
        failed = sorted(name for name, (state, _) in states.items() if state == "FAILED")
        if failed:
            raise GraphStoreError(f"index {failed[0]} failed to build; see the server's debug log, drop it and load "
                                  "again")
        waiting = {name: pct for name, (state, pct) in states.items() if state != "ONLINE"}
        if not waiting and len(states) == len(wanted):
            return
        if time.monotonic() - began > timeout:
            raise GraphStoreError(f"indexes still filling after {timeout:.0f} s: "
                                  + ", ".join(f"{k} {v:.0f} %" for k, v in sorted(waiting.items())))
        if time.monotonic() - said > 30:
            said = time.monotonic()
            log.info("waiting for indexes: %s", ", ".join(f"{k} {v:.0f} %" for k, v in sorted(waiting.items())))
        time.sleep(1.0)


def _chunks(rows: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def load_model(driver: neo4j.Driver, model: ModelInfo, database: str = DATABASE) -> None:
    """Model, layers, ``FEEDS`` links (the site graph), all neurons and classes (MERGE; safe to repeat)."""
    rows = model_rows(model)
    driver.execute_query(Q.MERGE_MODEL, model=rows.model, layers=rows.layers, database_=database)
    driver.execute_query(Q.LINK_LAYERS, pairs=rows.pairs, database_=database)
    for chunk in _chunks(rows.neurons, ROW_BATCH):
        driver.execute_query(Q.MERGE_NEURONS, neurons=list(chunk), model_id=model.model_id, database_=database)
    driver.execute_query(Q.MERGE_CLASSES, classes=rows.classes, model_id=model.model_id, database_=database)


def _neurons_once(element: np.ndarray, *columns: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Columns of neuron positions in the model -> what one statement carries (``queries._NEURONS_ONCE``): the element
    ids of the neurons they name, each once ``[U]``, and each column as positions into that list."""
    positions, renumbered = renumber(*(c.astype(np.int64) for c in columns))
    return element[positions].tolist(), renumbered


def _write_groups(
    tx: neo4j.ManagedTransaction, groups: Sequence[Group], model: ModelInfo, element: np.ndarray
) -> tuple[int, int, int, int]:
    """Write whole groups in one transaction; ``element`` ``[neurons]``: the element id of each neuron of the
    model, by its position (:meth:`NeuronIndex.numbered`).

    Columns go to the driver as numpy arrays: it packs them as lists, and its debug line (built whether logged
    or not) then prints a summary rather than every number."""
    images = [image_row(im, model) for g in groups for im in g.images]
    tx.run(Q.MERGE_IMAGES, images=images).consume()
    pathways = [pw for g in groups for pw in g.pathways]
    originals = {k: v for g in groups for k, v in g.originals().items()}
    rows = [pathway_row(pw, model, originals.get(pw.pathway_id)) for pw in pathways]
    created = {r["id"] for r in tx.run(Q.CLAIM_PATHWAYS, pathways=rows)}
    fresh = [pw for pw in pathways if pw.pathway_id in created]
    index = NeuronIndex.numbered(model)
    made = 0
    bounds = np.cumsum([0, *[len(pw.neuron_site) for pw in fresh]])
    n_inc, n_edges = int(bounds[-1]), sum(len(pw.edge_weight) for pw in fresh)
    inc = include_columns(fresh, originals, index)
    per = max(1, ROW_BATCH * len(fresh) // max(n_inc, 1))  # pathways per statement: about ROW_BATCH rows
    for first in range(0, len(fresh), per):
        stop = min(first + per, len(fresh))
        lo, hi = int(bounds[first]), int(bounds[stop])
        part = {k: v[lo:hi] for k, v in inc.items()}
        part["gained"] = part["gained"].to_pylist()
        part["start"] = np.repeat(np.arange(stop - first, dtype=np.int64), np.diff(bounds[first:stop + 1]))
        neurons, (part["end"],) = _neurons_once(element, part["end"])
        made += tx.run(Q.CREATE_INCLUDES, neurons=neurons, pathways=[pw.pathway_id for pw in fresh[first:stop]],
                       includes=part).single(strict=True)["created"]
    flows = flow_columns(fresh, index)
    for start in range(0, n_edges, ROW_BATCH):
        part = {k: v[start:start + ROW_BATCH] for k, v in flows.items()}
        neurons, (part["start"], part["end"]) = _neurons_once(element, part["start"], part["end"])
        made += tx.run(Q.CREATE_FLOWS, neurons=neurons, flows=part).single(strict=True)["created"]
    if made != n_inc + n_edges:  # a neuron vanished under us: roll the whole group back
        raise RecordsError(f"wrote {made} of {n_inc + n_edges} relationships: the model's neurons changed "
                           "during the load; re-run the same command")
    return len(fresh), len(pathways) - len(fresh), n_inc, n_edges


def refresh_aggregates(driver: neo4j.Driver, model_id: str, database: str = DATABASE, *,
                       added: dict[str, list[int]] | None = None) -> list[str]:
    """Recompute the ``ClassStat``, ``USES``, ``CLASS_FLOW``, ``CountStat`` and ``VariantStat`` aggregates of every
    setting, and record on the model how many pathways they cover (counted first: pathways written meanwhile make
    the next load refresh again).

    ``added``: setting -> the keys of a load's new pathways. Then just those settings change, and only by adding
    the new pathways to every aggregate (class counts, per-neuron and per-edge counts and means, per-setting sums:
    adding equals recounting), so a load into a large store pays for what it adds and for the touched classes'
    distinct neurons and edges, not for the pathways stored before. Callers pass it only when the aggregates
    covered the store before."""
    covered = 0
    if added is None:  # a full refresh covers what is there now (counted first); adding counts what it adds
        records, _, _ = driver.execute_query(Q.MODEL_PATHWAYS, model_id=model_id, database_=database)
        covered = int(records[0]["pathways"])
    records, _, _ = driver.execute_query(Q.CONFIGS_OF_MODEL, model_id=model_id, database_=database)
    configs = sorted(r["config"] for r in records if added is None or r["config"] in added)
    counted = 0
    for config in configs:
        keys = added[config] if added is not None else None

        @neo4j.unit_of_work(timeout=AGGREGATE_TIMEOUT_S)
        def work(tx: neo4j.ManagedTransaction, cfg: str = config, new: list[int] | None = keys) -> int:
            tx.run(Q.LOCK_MODEL, model_id=model_id).consume()
            if new is not None:
                classes = tx.run(Q.ADD_CLASS_STATS, model_id=model_id, config=cfg, keys=new).single(strict=True)
                tx.run(Q.ADD_USES, model_id=model_id, config=cfg, keys=new).consume()
                tx.run(Q.ADD_CLASS_FLOWS, model_id=model_id, config=cfg, keys=new).consume()
                for supports in (Q.CLASS_USES_SUPPORTS, Q.CLASS_FLOW_SUPPORTS):
                    tx.run(supports, config=cfg, classes=classes["classes"]).consume()
                tx.run(Q.ADD_VARIANT_STATS, model_id=model_id, config=cfg, keys=new).consume()
                tx.run(Q.ADD_COUNT_STATS, model_id=model_id, config=cfg, keys=new).consume()
                n = int(tx.run(Q.COUNT_ADDED, model_id=model_id, config=cfg, keys=new).single(strict=True)["counted"])
                tx.run(Q.MARK_MORE_AGGREGATED, model_id=model_id, pathways=n).consume()
                return n
            for query in (Q.CLEAR_AGGREGATES, Q.CLEAR_CLASS_STATS, Q.REFRESH_AGGREGATES, Q.CLEAR_CLASS_FLOWS,
                          Q.REFRESH_CLASS_FLOWS, Q.CLEAR_COUNT_STATS, Q.REFRESH_COUNT_STATS, Q.CLEAR_VARIANT_STATS,
                          Q.REFRESH_VARIANT_STATS, Q.CLEAR_UNCOUNTED):
                tx.run(query, model_id=model_id, config=cfg).consume()
            return 0

        with driver.session(database=database) as session:
            counted += session.execute_write(work)
    if added is None:
        driver.execute_query(Q.MARK_AGGREGATED, model_id=model_id, pathways=covered, database_=database)
    log.debug("aggregates of %s refreshed (%d settings; %d pathways added to the counts)", model_id, len(configs),
              counted)
    return configs


def aggregates_current(driver: neo4j.Driver, model_id: str, database: str = DATABASE) -> bool:
    """Whether the model's aggregates cover exactly the pathways it has now."""
    now, _, _ = driver.execute_query(Q.MODEL_PATHWAYS, model_id=model_id, database_=database)
    done, _, _ = driver.execute_query(Q.AGGREGATED_PATHWAYS, model_id=model_id, database_=database)
    return bool(done) and done[0]["pathways"] == now[0]["pathways"]


def model_state(driver: neo4j.Driver, model: ModelInfo, database: str = DATABASE) -> tuple[bool, list[str]]:
    """Whether the store holds the model's whole structure (layers, site graph, neurons, classes), and the
    digests of the runs whose exemplars it has merged (:func:`records.exemplar_digest`)."""
    records, _, _ = driver.execute_query(Q.MODEL_SHAPE, model_id=model.model_id, database_=database)
    if not records:
        return False, []
    got, want = records[0], model_rows(model)
    whole = (got["layers"], got["feeds"], got["neurons"], got["classes"]) == (
        len(want.layers), len(want.pairs), len(want.neurons), len(want.classes))
    return whole, list(got["exemplar_runs"] or [])


def stored_pathways(driver: neo4j.Driver, pathways: Sequence[PathwayRecord], database: str = DATABASE
                    ) -> tuple[set[str], list[str]]:
    """Of ``pathways``, the ids the store holds whole and those it holds broken (found by key, so the cost grows
    with the run, not with the store)."""
    whole: set[str] = set()
    broken: list[str] = []
    keys = [pathway_key(p.pathway_id) for p in pathways]
    for chunk in _chunks(keys, LOOKUP_BATCH):
        records, _, _ = driver.execute_query(Q.STORED_PATHWAYS, keys=list(chunk), database_=database)
        for r in records:
            (whole.add(r["id"]) if r["whole"] else broken.append(r["id"]))
    return whole, broken


def stored_images(driver: neo4j.Driver, ids: Sequence[str], database: str = DATABASE) -> set[str]:
    """Which of the image ``ids`` the store holds."""
    out: set[str] = set()
    for chunk in _chunks(ids, LOOKUP_BATCH):
        records, _, _ = driver.execute_query(Q.STORED_IMAGES, ids=list(chunk), database_=database)
        out |= {r["id"] for r in records}
    return out


def remove_pathways(driver: neo4j.Driver, ids: Sequence[str], database: str = DATABASE) -> int:
    """Delete the pathways ``ids`` (not whole: changed behind the loader's back) with their edges."""
    for chunk in _chunks(ids, 500):
        driver.execute_query(Q.DELETE_PATHWAYS, pathway_ids=list(chunk), database_=database)
    if ids:
        log.warning("removed %d incomplete pathways before loading them again", len(ids))
    return len(ids)


def _batches(parts: Sequence[Any], needed: Callable[[Group], bool] = lambda g: True) -> list[list[Group]]:
    """The ``needed`` groups packed into transactions of at most ``TX_EDGE_BUDGET`` rows (one group may exceed it)."""
    out: list[list[Group]] = []
    for part in parts:
        batch: list[Group] = []
        budget = 0
        for group in groups(part.images, part.pathways):
            if not needed(group):
                continue
            if batch and budget + group.weight > TX_EDGE_BUDGET:
                out.append(batch)
                batch, budget = [], 0
            batch.append(group)
            budget += group.weight
        if batch:
            out.append(batch)
    return out


def _write_batches(driver: neo4j.Driver, database: str, *, batches: list[list[Group]], model: ModelInfo,
                   element: np.ndarray, summary: LoadSummary, bar: tqdm, workers: int) -> None:
    """Each batch in its own write transaction, ``workers`` at a time (one session per thread).

    Batches hold disjoint images, so concurrent transactions only meet on shared Neuron and
    Class nodes; the driver retries the transient lock errors that can cause. On an error the
    batches not yet started are cancelled; committed ones stay whole (see ``stored_pathways``).
    """
    local = threading.local()
    sessions: list[neo4j.Session] = []
    lock = threading.Lock()

    def run(batch: list[Group]) -> None:
        if not hasattr(local, "session"):
            local.session = driver.session(database=database)
            with lock:
                sessions.append(local.session)
        new, old, inc, edg = local.session.execute_write(_write_groups, batch, model, element)
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


def load_run(driver: neo4j.Driver, run_dir: Path | RunFolder, database: str = DATABASE, progress: bool = True,
             workers: int = LOAD_WORKERS) -> LoadSummary:
    """Load every part of ``run_dir``; safe to repeat and to resume after a crash.

    ``workers`` transactions run at once (Python builds one batch's rows while Neo4j writes another's).
    """
    run = open_run(run_dir)
    model = run.manifest.model
    began = time.perf_counter()
    old, _, _ = driver.execute_query(Q.MODEL_OF_OTHER_FORMAT, format=STORE_FORMAT, database_=database)
    if old:
        raise RecordsError(f"this store was written by another Pathway Explorer (store format {old[0]['format']}, "
                           f"this one writes {STORE_FORMAT}); import all runs again with `pathx db import RUN... "
                           "--overwrite`, or load into an empty database")
    ensure_schema(driver, database)
    whole_model, merged_runs = model_state(driver, model, database)
    if not whole_model:
        load_model(driver, model, database)
    parts = list(iter_parts(run))
    pathways = [pw for part in parts for pw in part.pathways]
    for pw in pathways:
        if pw.model_id != model.model_id:
            raise RecordsError(f"pathway {pw.pathway_id} belongs to model {pw.model_id}, not {model.model_id}")
    # what the store already holds of this run (found by key and id: the cost grows with the run)
    done, broken = stored_pathways(driver, pathways, database)
    current = aggregates_current(driver, model.model_id, database)  # before this load: then refresh what it adds
    summary = LoadSummary(repaired=remove_pathways(driver, broken, database))
    images = stored_images(driver, [im.image_id for part in parts for im in part.images], database)
    batches = _batches(parts, lambda g: any(im.image_id not in images for im in g.images)
                       or any(pw.pathway_id not in done for pw in g.pathways))
    summary.images = sum(len(p.images) for p in parts) - sum(len(g.images) for b in batches for g in b)
    summary.pathways_existing = len(pathways) - sum(len(g.pathways) for b in batches for g in b)
    began_writes = time.perf_counter()
    if batches:
        records, _, _ = driver.execute_query(Q.NEURON_ELEMENT_IDS, model_id=model.model_id, database_=database)
        by_id = {r["id"]: r["element_id"] for r in records}
        element = np.array([by_id[n] for site in neuron_table(model) for n in site], dtype=object)
        bar = tqdm(total=sum(len(g.images) for b in batches for g in b), desc="load", unit="img",
                   disable=not progress)
        try:
            _write_batches(driver=driver, database=database, batches=batches, model=model, element=element,
                           summary=summary, bar=bar, workers=workers)
        finally:
            bar.close()
    summary.write_seconds = time.perf_counter() - began_writes
    summary.exemplars = load_exemplars(driver, run, model, int(run.manifest.settings.get("exemplars", 0)),
                                       database, merged_runs=merged_runs)
    if summary.pathways_new or summary.repaired or not aggregates_current(driver, model.model_id, database):
        added = _added(parts, done) if current and not summary.repaired else None
        began_aggregates = time.perf_counter()
        refresh_aggregates(driver, model.model_id, database, added=added)
        summary.aggregate_seconds = time.perf_counter() - began_aggregates
    summary.seconds = time.perf_counter() - began
    log.info("loaded %d images, %d new pathways, %d relationships in %.1f s", summary.images,
             summary.pathways_new, summary.includes + summary.edges, summary.seconds)
    return summary


def _added(parts: Sequence[Any], done: set[str]) -> dict[str, list[int]]:
    """Setting -> the keys of the run's pathways that the store did not hold whole before this load."""
    keys: dict[str, list[int]] = {}
    for pw in (pw for part in parts for pw in part.pathways if pw.pathway_id not in done):
        keys.setdefault(pw.config, []).append(pathway_key(pw.pathway_id))
    return keys


def load_exemplars(driver: neo4j.Driver, run: RunFolder, model: ModelInfo, n: int, database: str = DATABASE, *,
                   merged_runs: Sequence[str] = ()) -> int:
    """Merge the run's exemplars with those already stored for the model (top ``n`` per neuron and
    kind over both) and replace them in one transaction; returns how many are stored. A run whose
    exemplars the model has merged before (its digest in ``merged_runs``) changes nothing: skipped."""
    if n <= 0:
        return 0
    digest = exemplar_digest(run, n)
    if digest in merged_runs:
        records, _, _ = driver.execute_query(Q.EXEMPLAR_COUNT, model_id=model.model_id, database_=database)
        return int(records[0]["n"])
    records, _, _ = driver.execute_query(Q.NEURON_ELEMENT_IDS, model_id=model.model_id, database_=database)
    element = {r["id"]: r["element_id"] for r in records}
    index = NeuronIndex.of([[element[nid] for nid in site] for site in neuron_table(model)])
    run_rows = read_exemplars(run, n)

    def write(tx: neo4j.ManagedTransaction) -> int:
        tx.run(Q.LOCK_MODEL, model_id=model.model_id).consume()
        stored = stored_exemplars_tx(tx, model)
        merged = merge_exemplar_rows(ExemplarRows.concat([stored, run_rows]), n)
        tx.run(Q.MARK_EXEMPLAR_RUN, model_id=model.model_id, digest=digest).consume()
        if _exemplar_keys(merged) == _exemplar_keys(stored):
            return len(stored)  # the run's exemplars are those already stored: nothing else to write
        tx.run(Q.DELETE_EXEMPLARS, model_id=model.model_id).consume()
        cols = exemplar_columns(merged, index)
        made = 0
        for start in range(0, len(merged), 5000):
            made += tx.run(Q.CREATE_EXEMPLARS, rows=plain(cols, start, start + 5000)).single(strict=True)["created"]
        if made != len(merged):
            raise RecordsError(f"{len(merged) - made} exemplar images are not in the store; load their run first")
        return made

    with driver.session(database=database) as session:
        return int(session.execute_write(write))


def _exemplar_keys(rows: ExemplarRows) -> set[tuple[int, int, str, str]]:
    """Which image is an exemplar of which neuron and kind (an image's value there is fixed by the image)."""
    return set(zip(rows.site.tolist(), rows.channel.tolist(), rows.kind.astype(str).tolist(),
                   rows.image_id.astype(str).tolist(), strict=True))


def stored_exemplars_tx(tx: neo4j.ManagedTransaction, model: ModelInfo) -> ExemplarRows:
    records = list(tx.run(Q.EXEMPLARS_OF_MODEL, model_id=model.model_id))
    if not records:
        return ExemplarRows.empty()
    return exemplar_rows_of(records)
