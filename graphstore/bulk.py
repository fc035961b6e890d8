"""Bulk path for large runs: records -> CSV -> ``neo4j-admin database import full``.

``pathx load`` writes through Bolt in transactions and adds to a live database. For runs of
millions of edges into a *fresh* database, Neo4j's own offline importer is far faster: this
module writes the same nodes, relationships and properties as the loader (it reuses the
loader's row builders) as typed CSV files, runs the importer from the project's jars into the
local server's ``neo4j`` database (the server is stopped for it) and starts the server again.
The class and variant aggregates are computed while the CSV files are written
(``graphstore.aggregates``) and imported with the rest; only the indexes are made after the restart.

It replaces the database's content, so callers must ask for it (``overwrite=True``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from graphstore import schema
from graphstore.aggregates import AggregateRows, Aggregates
from graphstore.errors import GraphStoreError, RecordsError, ServerError
from graphstore.loader import ensure_schema
from graphstore.rows import (
    Columns,
    NeuronIndex,
    exemplar_columns,
    flow_columns,
    groups,
    image_row,
    include_columns,
    model_rows,
    neuron_table,
    pathway_row,
    plain,
)
from graphstore.server import ADMIN_ENTRY_POINT, ServerConfig, java_executable, prepare, read_pid, start, stop
from records import (
    ExemplarRows,
    ModelInfo,
    PathwayRecord,
    RunFolder,
    class_id,
    exemplar_digest,
    iter_parts,
    merge_exemplar_rows,
    open_run,
    read_exemplars,
)

log = logging.getLogger(__name__)

ARRAY = ";"


@dataclass(kw_only=True)
class BulkSummary:
    """What one bulk import wrote, and how long each phase took."""

    nodes: int = 0
    relationships: int = 0
    csv_seconds: float = 0.0
    import_seconds: float = 0.0
    finish_seconds: float = 0.0  # restart and indexes (the aggregates came with the import)
    csv_bytes: int = 0  # the CSV files handed to the importer (deleted after it unless kept)

    @property
    def relationships_per_second(self) -> float:
        """Relationships over the importer's own time."""
        return self.relationships / self.import_seconds if self.import_seconds else 0.0


_LIST_OF = {"long[]": pa.int64(), "double[]": pa.float64(), "float[]": pa.float32(), "string[]": pa.string()}


def _floats_text(text: pa.Array) -> pa.Array:
    """Arrow's shortest round-trip float text, with non-finite values spelt as Java's ``Double.parseDouble`` reads."""
    return pc.replace_substring(pc.replace_substring(text, "nan", "NaN"), "inf", "Infinity")


def _join(lists: pa.Array) -> pa.Array:
    """A list array as one ``ARRAY``-joined text cell per row (null stays null: no property)."""
    text = pc.binary_join(pc.cast(lists, pa.list_(pa.string())), ARRAY)
    return _floats_text(text) if pa.types.is_floating(lists.type.value_type) else text


def _column(values: Any, kind: str) -> pa.Array:
    """One property's cells, of the importer's type ``kind``, as an Arrow array for pyarrow's CSV writer: numbers
    and booleans as themselves, arrays (and doubles that are not finite) as text. ``values``: a list (None: no
    property) or a numpy array."""
    if kind == "byte[]":  # Java's signed bytes
        binary = pa.array([None if v is None else bytes(v) for v in values], pa.binary())
        offsets = pa.array(np.frombuffer(binary.buffers()[1], np.int32, len(binary) + 1))
        data = binary.buffers()[2]
        flat = pa.array(np.frombuffer(data, np.int8) if data is not None else np.zeros(0, np.int8))
        return _join(pa.ListArray.from_arrays(offsets, flat, mask=binary.is_null()))
    if kind in _LIST_OF:
        return _join(pa.array(values, pa.list_(_LIST_OF[kind])))
    if kind == "double":
        column = pa.array(values, pa.float64())
        finite = pc.all(pc.or_kleene(pc.is_finite(column), pc.is_null(column))).as_py()
        return column if finite in (True, None) else _floats_text(pc.cast(column, pa.string()))
    return pa.array(values, {"long": pa.int64(), "boolean": pa.bool_(), "string": pa.string()}[kind])


class _Numbers:
    """The importer's node ids (``--id-type=integer``, cheaper to parse and map than strings): each node's string id
    numbered within its label's id space, at first sight, by node rows and relationship ends alike, so the order
    they come in does not matter. The string stays the node's ``id`` property."""

    def __init__(self) -> None:
        self.of: dict[str, dict[str, int]] = {}

    def __call__(self, label: str, values: Any) -> np.ndarray:
        """``values`` (string ids, or numbers already: an integer numpy array) as numbers ``[N]``."""
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            return values.astype(np.int64, copy=False)
        ids = self.of.setdefault(label, {})

        def number(key: Any) -> int:
            if isinstance(key, int | np.integer):
                return int(key)
            found = ids.get(key)
            if found is None:
                found = ids[key] = len(ids)
            return found

        return np.fromiter(map(number, values), np.int64, len(values))


class _Table:
    """One CSV file with a typed header, for nodes of a label or relationships of a type. Rows (:meth:`write`) are
    kept until :meth:`flush`, once a part, and whole parts' columns (:meth:`write_columns`) go at once: both through
    pyarrow's CSV writer, no Python loop over cells, on ``pool``'s one thread (Arrow lets go of the GIL, so the
    next part's rows are built meanwhile; one thread keeps each file's parts in order). ``ends``: the ID columns
    as ``(header, label)``; their string ids are written as numbers (:class:`_Numbers`)."""

    def __init__(self, path: Path, ends: list[tuple[str, str]], props: dict[str, str], numbers: _Numbers,
                 pool: ThreadPoolExecutor, strict: bool = False) -> None:
        self.path = path
        self.ends = ends
        self.props = dict(props)
        self.numbers = numbers
        self.pool = pool
        # strict: every property of a row must have a column (other tables' rows carry more keys)
        self.known = frozenset(self.props) if strict else None
        path.write_text(",".join([h for h, _ in ends] + [f"{k}:{t}" for k, t in props.items()]) + "\n")
        self.pending: list[tuple[list[Any], dict[str, Any]]] = []
        self.writing: list[Future[int]] = []

    def write(self, ends: list[Any], props: dict[str, Any]) -> None:
        if self.known is not None and not props.keys() <= self.known:
            unknown = sorted(props.keys() - self.known)
            raise GraphStoreError(f"{self.path.name}: properties {unknown} are not in graphstore.schema; "
                                  "add them there")
        self.pending.append((ends, props))

    def flush(self) -> None:
        if not self.pending:
            return
        cells: dict[str, Any] = {h: [e[i] for e, _ in self.pending] for i, (h, _) in enumerate(self.ends)}
        cells.update({k: [p.get(k) for _, p in self.pending] for k in self.props})
        self.pending = []
        self.write_columns(cells)

    def write_columns(self, columns: Columns) -> None:
        """``columns``: the ID columns, then every property, in the header's order (as :mod:`graphstore.rows`
        names them for relationships: start, end, then the schema's properties)."""
        cols = list(columns.values())
        ends = [self.numbers(label, col) for col, (_, label) in zip(cols, self.ends, strict=False)]  # this thread
        self.writing.append(self.pool.submit(self._append, ends, cols[len(self.ends):]))

    def _append(self, ends: list[np.ndarray], props: list[Any]) -> int:
        arrays = [pa.array(e) for e in ends]
        arrays += [_column(col, kind) for col, kind in zip(props, self.props.values(), strict=True)]
        table = pa.table(arrays, names=[str(i) for i in range(len(arrays))])
        with open(self.path, "ab") as fh:
            pacsv.write_csv(table, fh, write_options=pacsv.WriteOptions(include_header=False))
        return int(table.num_rows)

    @property
    def rows(self) -> int:
        """Rows written (waits for the parts in flight; raises what writing them raised)."""
        return sum(f.result() for f in self.writing)

    def close(self) -> None:
        self.flush()
        for f in self.writing:
            f.result()


def _records(runs: list[RunFolder]) -> Iterator[tuple[ModelInfo, Any]]:
    for run in runs:
        for part in iter_parts(run):
            yield run.manifest.model, part


def write_csv(runs: list[RunFolder], out: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]], int, int]:
    """Write node and relationship CSV files for ``runs`` (deduplicated by id).

    Returns ``(nodes, relationships, node_count, relationship_count)`` where the first two
    list ``(label or type, file)`` for the importer.
    """
    out.mkdir(parents=True, exist_ok=True)
    numbers = _Numbers()
    pool = ThreadPoolExecutor(1, thread_name_prefix="csv")
    node = partial(_node_table, out, numbers, pool)
    rel = partial(_rel_table, out, numbers, pool)

    n = {label: node(label, strict=label in ("Image", "Pathway"))
         for label in ("Model", "Layer", "Neuron", "Class", "Image", "Pathway")}

    r = {name: rel(name) for name in ("HAS_LAYER", "FEEDS", "HAS_NEURON", "HAS_CLASS", "PREDICTED_AS",
                                      "LABELED_AS", "VARIANT_OF", "FOR_IMAGE", "EXPLAINS")}

    includes, flows, exemplars = rel("INCLUDES"), rel("FLOWS_TO"), rel("EXEMPLAR")
    aggregates = Aggregates()
    models: set[str] = set()
    images: set[str] = set()
    pathways: set[str] = set()
    index: dict[str, NeuronIndex] = {}
    model_props: dict[str, dict[str, Any]] = {}
    covered: dict[str, int] = {}
    try:
        for model, part in _records(runs):
            if model.model_id not in models:
                models.add(model.model_id)
                rows = model_rows(model)
                model_props[model.model_id] = rows.model  # written last, with the pathways the aggregates cover
                for ly in rows.layers:
                    n["Layer"].write([ly["id"]], {**ly, "model_id": model.model_id})
                    r["HAS_LAYER"].write([model.model_id, ly["id"]], {})
                for pair in rows.pairs:
                    r["FEEDS"].write([pair["src"], pair["dst"]], {})
                for nr in rows.neurons:
                    n["Neuron"].write([nr["id"]], {**nr, "model_id": model.model_id})
                    r["HAS_NEURON"].write([nr["layer_id"], nr["id"]], {})
                for c in rows.classes:
                    n["Class"].write([c["id"]], {**c, "model_id": model.model_id})
                    r["HAS_CLASS"].write([model.model_id, c["id"]], {})
                table = neuron_table(model)
                index[model.model_id] = NeuronIndex(numbers("Neuron", [n for site in table for n in site]),
                                                    NeuronIndex.of(table).offsets)
            fresh: list[PathwayRecord] = []
            links: dict[str, PathwayRecord] = {}
            for group in groups(part.images, part.pathways):
                for im in group.images:
                    if im.image_id in images:
                        continue
                    images.add(im.image_id)
                    row = image_row(im, model)
                    n["Image"].write([im.image_id], row["props"])
                    aggregates.image(row["props"])
                    r["PREDICTED_AS"].write([im.image_id, row["predicted_class"]], row)
                    if row["label_class"] is not None:
                        r["LABELED_AS"].write([im.image_id, row["label_class"]], {})
                    if row["variant_of"] is not None:
                        r["VARIANT_OF"].write([im.image_id, row["variant_of"]], row["variant"])
                originals = group.originals()
                for pw in group.pathways:
                    if pw.pathway_id in pathways:
                        continue
                    pathways.add(pw.pathway_id)
                    covered[model.model_id] = covered.get(model.model_id, 0) + 1
                    original = originals.get(pw.pathway_id)
                    if original is not None:
                        links[pw.pathway_id] = original
                    fresh.append(pw)
                    prow = pathway_row(pw, model, original)
                    n["Pathway"].write([pw.pathway_id], {**prow["props"], "signature": prow["signature"]})
                    aggregates.pathway(prow["props"], prow["class_id"])
                    r["FOR_IMAGE"].write([pw.pathway_id, pw.image_id], {})
                    r["EXPLAINS"].write([pw.pathway_id, class_id(model.model_id, pw.target)], {})
            inc = include_columns(fresh, links, index[model.model_id])
            flow = flow_columns(fresh, index[model.model_id])
            includes.write_columns(inc)
            flows.write_columns(flow)
            aggregates.relationships(inc, flow)
            for t in [*n.values(), *r.values()]:
                t.flush()
        merged_runs = _write_exemplars(runs, exemplars)
        _write_aggregates(aggregates.rows(), n, r, node, rel)
        for model_id, props in model_props.items():
            n["Model"].write([model_id], {**props, "aggregated_pathways": covered.get(model_id, 0),
                                          "exemplar_runs": merged_runs.get(model_id)})
        for t in [*n.values(), *r.values(), includes, flows, exemplars]:
            t.close()  # the last parts written, or their error raised
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    rel_files = [(k, t.path) for k, t in r.items()] + [("INCLUDES", includes.path), ("FLOWS_TO", flows.path),
                                                       ("EXEMPLAR", exemplars.path)]
    return ([(k, t.path) for k, t in n.items()], rel_files, sum(t.rows for t in n.values()),
            sum(t.rows for t in r.values()) + includes.rows + flows.rows + exemplars.rows)


def _node_table(out: Path, numbers: _Numbers, pool: ThreadPoolExecutor, label: str, strict: bool = False) -> _Table:
    return _Table(out / f"{label.lower()}.csv", [(f":ID({label})", label)], schema.node(label).types(skip=()),
                  numbers, pool, strict)


def _rel_table(out: Path, numbers: _Numbers, pool: ThreadPoolExecutor, name: str) -> _Table:
    spec = schema.relationship(name)
    return _Table(out / f"rel-{name.lower()}.csv", [(f":START_ID({spec.start})", spec.start),
                                                     (f":END_ID({spec.end})", spec.end)], spec.types(), numbers, pool)


def _write_aggregates(rows: AggregateRows, nodes: dict[str, _Table], rels: dict[str, _Table],
                      node: Callable[[str], _Table], rel: Callable[[str], _Table]) -> None:
    """The aggregates' nodes (keyed without an id property, as the Bolt path makes them) and relationships, in
    tables that ``node(label)`` and ``rel(type)`` open."""
    for label, items in (("ClassStat", rows.class_stats), ("CountStat", rows.count_stats),
                         ("VariantStat", rows.variant_stats)):
        t = nodes[label] = node(label)
        for key, props in items:
            t.write([key], props)
    for name, links in (("USES", rows.uses), ("CLASS_FLOW", rows.class_flows), ("GAINED", rows.gained)):
        t = rels[name] = rel(name)
        for src, dst, props in links:
            t.write([src, dst], props)


def _write_exemplars(runs: list[RunFolder], table: _Table) -> dict[str, list[str]]:
    """EXEMPLAR rows: per model, the top N over all runs' exemplars (as the loader merges them); returns per
    model the digests of the runs merged (``Model.exemplar_runs``)."""
    by_model: dict[str, tuple[ModelInfo, int, list[ExemplarRows]]] = {}
    digests: dict[str, list[str]] = {}
    for run in runs:
        manifest = run.manifest
        n = int(manifest.settings.get("exemplars", 0))
        model, top, rows = by_model.get(manifest.model.model_id, (manifest.model, 0, []))
        run_rows = read_exemplars(run, n) if n else None
        if run_rows is not None and exemplar_digest(run, n) not in digests.get(model.model_id, []):
            digests.setdefault(model.model_id, []).append(exemplar_digest(run, n))
        by_model[manifest.model.model_id] = (model, max(top, n), [*rows, run_rows] if run_rows is not None else rows)
    for model, n, rows in by_model.values():
        if not n:
            continue
        merged = merge_exemplar_rows(ExemplarRows.concat(rows), n)
        cols = plain(exemplar_columns(merged, NeuronIndex.of(neuron_table(model))))
        start, end = cols.pop("start"), cols.pop("end")
        for i, (a, b) in enumerate(zip(start, end, strict=True)):
            table.write([a, b], {k: v[i] for k, v in cols.items()})
    return digests


def _run_importer(config: ServerConfig, nodes: list[tuple[str, Path]], rels: list[tuple[str, Path]]) -> None:
    args = [java_executable(), "-Xmx2g", "-cp", f"{config.lib_dir}/*", ADMIN_ENTRY_POINT, "database", "import",
            "full", "neo4j",
            "--overwrite-destination=true", f"--array-delimiter={ARRAY}", "--bad-tolerance=0", "--id-type=integer",
            f"--report-file={config.instance_dir / 'logs' / 'import.report'}",
            *[f"--nodes={label}={path}" for label, path in nodes],
            *[f"--relationships={kind}={path}" for kind, path in rels]]
    env = dict(os.environ, NEO4J_HOME=str(config.instance_dir), NEO4J_CONF=str(config.conf_dir))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=config.instance_dir, check=False)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines()
                 if ln.strip() and not ln.strip().startswith(("at ", "..."))]
        cause = [ln for ln in lines if "Exception" in ln or "rror" in ln] or lines[-3:]
        raise ServerError("neo4j-admin database import failed: " + " | ".join(cause[:3]))


def bulk_import(
    config: ServerConfig, run_dirs: Sequence[Path | RunFolder], open_driver: Callable[[], Any], overwrite: bool = False,
    keep_csv: bool = False,
) -> BulkSummary:
    """Replace the local database's content with ``run_dirs`` through the offline importer.

    ``open_driver`` makes a driver once the server runs again (schema and aggregates).
    The server is stopped for the import and started afterwards; without ``overwrite``
    nothing is touched.
    """
    if not overwrite:
        raise RecordsError("bulk import replaces the whole database; pass --overwrite "
                           "(or use `pathx load` to add to it)")
    runs = [open_run(r) for r in run_dirs]  # bad input fails before the server is touched
    summary = BulkSummary()
    work = config.instance_dir / "import" / f"bulk-{os.getpid()}"
    began = time.perf_counter()
    try:
        nodes, rels, summary.nodes, summary.relationships = write_csv(runs, work)
        summary.csv_seconds = time.perf_counter() - began
        summary.csv_bytes = sum(f.stat().st_size for f in work.iterdir())
        prepare(config)  # first use: the instance and its password, no start needed before an import
        if read_pid(config) is not None:
            stop(config)
        began = time.perf_counter()
        _run_importer(config, nodes, rels)
        summary.import_seconds = time.perf_counter() - began
    finally:
        if not keep_csv:
            shutil.rmtree(work, ignore_errors=True)
    began = time.perf_counter()
    start(config)
    driver = open_driver()
    try:
        ensure_schema(driver)  # the aggregates came with the import (graphstore.aggregates)
    finally:
        driver.close()
    summary.finish_seconds = time.perf_counter() - began
    log.info("bulk import: %d nodes, %d relationships; csv %.1f s, import %.1f s, finish %.1f s", summary.nodes,
             summary.relationships, summary.csv_seconds, summary.import_seconds, summary.finish_seconds)
    return summary
