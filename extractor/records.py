"""Torch-free records: the contract between the extractor and the graph store.

A *run* is a folder::

    run/
      manifest.json              schema version, model, extraction settings
      part-00000/images.parquet  one row per image (originals and variants)
      part-00000/pathways.parquet one row per pathway, neurons and edges as list columns
      part-00001/...

Parts are written to a temporary folder and renamed, so a part is either complete or
absent; an interrupted extraction resumes by skipping originals already in a part.
Only numpy, pyarrow and networkx are used here, so the graph store can read records on a
machine without torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"


class RecordsFormatError(ValueError):
    """Record files that are missing, corrupt or of another schema version."""


def config_key(method: str, selection: str, params_json: str) -> str:
    """Short key of a pathway setting, e.g. ``mct/topk/1a2b3c4d``; equal settings share it."""
    import hashlib

    digest = hashlib.sha256(f"{selection}:{params_json}".encode()).hexdigest()[:8]
    return f"{method}/{selection}/{digest}"


def layer_id(model_id: str, site_id: str) -> str:
    """Stable layer id: ``model id / module path#call index``."""
    return f"{model_id}/{site_id}"


def neuron_id(model_id: str, site_id: str, channel: int) -> str:
    """Stable neuron id: ``model id / module path#call index / channel``."""
    return f"{model_id}/{site_id}/{int(channel)}"


def class_id(model_id: str, index: int) -> str:
    """Stable class id: ``model id / class index``."""
    return f"{model_id}/{int(index)}"


@dataclass(frozen=True)
class SiteInfo:
    """One activation call (module or functional), in call order.

    ``shape`` is the per-image shape channels first: ``(C, H, W)`` for feature maps (also of
    channels-last sites, whose raw output is ``[H, W, C]``), ``(C, N)`` for tokens, ``(C,)`` for
    units. ``layout`` is how the raw output holds it (see ``extractor.sites.LAYOUTS``).
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


@dataclass(frozen=True)
class ModelInfo:
    """Identity and structure of the model a run was extracted from."""

    model_id: str
    arch: str
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    sites: tuple[SiteInfo, ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["sites"] = [asdict(s) for s in self.sites]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        sites = tuple(
            SiteInfo(s["index"], s["module_path"], s["call_index"], s["kind"], tuple(s["shape"]), s["layout"],
                     tuple(s["preds"]), int(s["depth"]))
            for s in data["sites"]
        )
        return cls(
            model_id=data["model_id"], arch=data["arch"], num_classes=int(data["num_classes"]),
            class_names=tuple(data["class_names"]), input_shape=tuple(data["input_shape"]), sites=sites,
        )

    def class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)


@dataclass
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


@dataclass
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
        return float(self.logit_masked / self.logit_full) if self.logit_full != 0 else float("nan")


@dataclass(frozen=True)
class Manifest:
    """What a run folder holds: schema version, the model and the extraction settings."""

    schema_version: int
    model: ModelInfo
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "model": self.model.to_json(), "settings": self.settings}


_IMAGE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("model_id", pa.string()), ("source", pa.string()), ("label", pa.int32()),
    ("variant_of", pa.string()), ("kind", pa.string()), ("params", pa.string()), ("predicted", pa.int32()),
    ("probs", pa.list_(pa.float32())), ("logits", pa.list_(pa.float32())), ("png", pa.binary()),
])

_PATHWAY_ARRAYS: dict[str, pa.DataType] = {
    "neuron_site": pa.int32(), "neuron_channel": pa.int32(), "neuron_contribution": pa.float32(),
    "neuron_score": pa.float32(),
    "neuron_rank": pa.int32(), "neuron_elements": pa.int32(), "neuron_dead": pa.bool_(),
    "edge_src_site": pa.int32(), "edge_src_channel": pa.int32(), "edge_dst_site": pa.int32(),
    "edge_dst_channel": pa.int32(), "edge_weight": pa.float32(), "site_gap": pa.float32(),
}
_PATHWAY_SCHEMA = pa.schema(
    [("pathway_id", pa.string()), ("image_id", pa.string()), ("model_id", pa.string()),
     ("method", pa.string()), ("selection", pa.string()), ("params", pa.string()), ("target", pa.int32()),
     ("logit_full", pa.float64()), ("logit_masked", pa.float64())]
    + [(name, pa.list_(dtype)) for name, dtype in _PATHWAY_ARRAYS.items()]
    + [("saliency", pa.list_(pa.float32())), ("saliency_shape", pa.list_(pa.int32())), ("extra", pa.string())]
)
_NUMPY_OF = {pa.int32(): np.int32, pa.float32(): np.float32, pa.bool_(): np.bool_}


def _images_table(images: Sequence[ImageRecord]) -> pa.Table:
    cols: dict[str, list[Any]] = {name: [] for name in _IMAGE_SCHEMA.names}
    for im in images:
        for name in _IMAGE_SCHEMA.names:
            value = getattr(im, name)
            cols[name].append(np.asarray(value, dtype=np.float32) if name in ("probs", "logits") else value)
    return pa.table(cols, schema=_IMAGE_SCHEMA)


def _pathways_table(pathways: Sequence[PathwayRecord]) -> pa.Table:
    cols: dict[str, list[Any]] = {name: [] for name in _PATHWAY_SCHEMA.names}
    for pw in pathways:
        for name in ("pathway_id", "image_id", "model_id", "method", "selection", "params", "target"):
            cols[name].append(getattr(pw, name))
        cols["logit_full"].append(float(pw.logit_full))
        cols["logit_masked"].append(float(pw.logit_masked))
        for name, dtype in _PATHWAY_ARRAYS.items():
            cols[name].append(np.asarray(getattr(pw, name), dtype=_NUMPY_OF[dtype]))
        sal = np.asarray(pw.saliency, dtype=np.float32)
        cols["saliency"].append(sal.ravel())
        cols["saliency_shape"].append(list(sal.shape))
        cols["extra"].append(json.dumps(pw.extra, sort_keys=True))
    return pa.table(cols, schema=_PATHWAY_SCHEMA)


EXEMPLAR_KINDS = ("activation", "contribution")
EXEMPLARS = "exemplars.parquet"


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
    for part in _part_dirs(Path(run_dir)):
        path = part / EXEMPLARS
        if path.exists():
            delta = ExemplarRows.from_table(_read_table(path, _EXEMPLAR_SCHEMA))
            top = merge_exemplar_rows(ExemplarRows.concat([top, delta]), n)
    return top


_EXEMPLAR_SCHEMA = ExemplarRows.empty().to_table().schema


SHARDS = "shards"


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0-based) of a run's images; ``Shard(0, 1)`` is the whole run."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 0 <= I < N")

    @property
    def tag(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    @property
    def part_prefix(self) -> str:
        return "part-" if self.count == 1 else f"part-s{self.tag}-"


class RunWriter:
    """Writes a run folder part by part; each part is complete or absent.

    Several writers (one per shard, in separate processes) may share one folder: each names
    its parts after its shard and keeps its own status file ``shards/I-of-N.json`` with
    ``complete`` and the images it had to skip. The first writer creates ``manifest.json``;
    the others check that it describes the same model and settings.
    """

    def __init__(self, run_dir: Path, manifest: Manifest, shard: Shard | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.shard = shard or Shard()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / MANIFEST
        if not path.exists():
            tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(manifest.to_json(), indent=1, sort_keys=True))
            try:
                os.link(tmp, path)  # atomic create-if-absent: a concurrent shard may have won
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        existing = read_manifest(self.run_dir)
        if existing.model.model_id != manifest.model.model_id or existing.settings != manifest.settings:
            raise RecordsFormatError(
                f"{self.run_dir} holds a run of another model or other settings; choose a new --out folder"
            )
        self.status_path = self.run_dir / SHARDS / f"{self.shard.tag}.json"
        self.status_path.parent.mkdir(exist_ok=True)
        old = _read_status(self.status_path)
        self.skipped: dict[str, str] = dict(old.get("skipped", {}))
        self._write_status(complete=False)

    def _write_status(self, complete: bool, **extra: Any) -> None:
        data = {"shard": self.shard.index, "shards": self.shard.count, "complete": complete,
                "skipped": self.skipped, **extra}
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.status_path)

    def done_sources(self) -> set[str]:
        """Image ids and sources of the originals already written by any shard (for resuming)."""
        done: set[str] = set()
        for part in _part_dirs(self.run_dir):
            table = pq.read_table(part / "images.parquet", columns=["image_id", "source", "kind"])
            for image_id, source, kind in zip(table["image_id"].to_pylist(), table["source"].to_pylist(),
                                              table["kind"].to_pylist(), strict=True):
                if kind == "original":
                    done.add(image_id)
                    done.add(source)
        return done

    def skip(self, source: str, reason: str) -> None:
        """Record an image that could not be used (kept in the shard's status file)."""
        self.skipped[source] = reason

    def write_part(self, images: Sequence[ImageRecord], pathways: Sequence[PathwayRecord],
                   exemplars: ExemplarRows | None = None) -> Path:
        prefix = self.shard.part_prefix
        taken = [p.name[len(prefix):] for p in self.run_dir.glob(f"{prefix}*")]
        k = max((int(t) for t in taken if t.isdigit()), default=-1) + 1
        tmp = self.run_dir / f".{prefix}{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        pq.write_table(_images_table(images), tmp / "images.parquet")
        pq.write_table(_pathways_table(pathways), tmp / "pathways.parquet")
        if exemplars is not None:
            pq.write_table(exemplars.to_table(), tmp / EXEMPLARS)
        while True:
            final = self.run_dir / f"{prefix}{k:05d}"
            try:
                os.rename(tmp, final)  # fails if a part of that name exists (never overwrites one)
                break
            except OSError:
                if not final.exists():
                    raise
                k += 1
        self._write_status(complete=False)
        return final

    def finish(self, **summary: Any) -> None:
        """Mark this shard complete (``pathx load`` waits for every shard)."""
        self._write_status(complete=True, **summary)


def _part_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("part-*") if p.is_dir())


def _read_status(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordsFormatError(f"{path} is not valid JSON") from exc
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class RunStatus:
    """Whether every shard of a run has finished, and the images the run skipped."""

    complete: bool
    shards: dict[int, list[int]]  # shard count N -> indices of its finished shards
    skipped: dict[str, str]  # source -> reason

    def problem(self) -> str | None:
        """One line saying why the run is not ready to load, or ``None``."""
        if self.complete:
            return None
        parts = []
        for n, done in sorted(self.shards.items()):
            missing = [str(i) for i in range(n) if i not in done]
            parts.append(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of {n} not finished")
        return "; ".join(parts)


def run_status(run_dir: Path) -> RunStatus:
    """Read every shard's status file. A run without any (an older run) counts as complete."""
    files = sorted((Path(run_dir) / SHARDS).glob("*.json"))
    shards: dict[int, list[int]] = {}
    skipped: dict[str, str] = {}
    for f in files:
        data = _read_status(f)
        n = int(data.get("shards", 1))
        shards.setdefault(n, [])
        if data.get("complete"):
            shards[n].append(int(data.get("shard", 0)))
        skipped.update(data.get("skipped", {}))
    complete = not files or any(sorted(done) == list(range(n)) for n, done in shards.items())
    return RunStatus(complete, shards, skipped)


def require_complete(run_dir: Path) -> None:
    """``RecordsFormatError`` unless every shard of the run has finished."""
    problem = run_status(run_dir).problem()
    if problem:
        raise RecordsFormatError(
            f"{run_dir} is not finished ({problem}); run the same `pathx extract` again to finish it, then load"
        )


def read_manifest(run_dir: Path) -> Manifest:
    """The run's manifest; ``RecordsFormatError`` when missing, corrupt or of another version."""
    path = Path(run_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RecordsFormatError(f"{run_dir} is not a run folder: no {MANIFEST}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordsFormatError(f"{path} is not valid JSON") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise RecordsFormatError(
            f"{path} has record schema version {version!r}; this Pathway Explorer reads version {SCHEMA_VERSION}"
        )
    try:
        return Manifest(SCHEMA_VERSION, ModelInfo.from_json(data["model"]), dict(data["settings"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordsFormatError(f"{path} is missing fields: {exc}") from exc


def _read_table(path: Path, schema: pa.Schema) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RecordsFormatError(f"cannot read {path}: {exc}") from exc
    missing = set(schema.names) - set(table.column_names)
    if missing:
        raise RecordsFormatError(f"{path} lacks columns {sorted(missing)}")
    return table


def _image_from_row(row: dict[str, Any]) -> ImageRecord:
    row = dict(row)
    row["probs"] = np.asarray(row["probs"], dtype=np.float32)
    row["logits"] = np.asarray(row["logits"], dtype=np.float32)
    return ImageRecord(**row)


def _pathway_from_row(row: dict[str, Any]) -> PathwayRecord:
    arrays = {name: np.asarray(row[name], dtype=_NUMPY_OF[dt]) for name, dt in _PATHWAY_ARRAYS.items()}
    saliency = np.asarray(row["saliency"], dtype=np.float32).reshape(row["saliency_shape"])
    return PathwayRecord(
        pathway_id=row["pathway_id"], image_id=row["image_id"], model_id=row["model_id"], method=row["method"],
        selection=row["selection"], params=row["params"], target=int(row["target"]),
        logit_full=float(row["logit_full"]), logit_masked=float(row["logit_masked"]),
        saliency=saliency, extra=json.loads(row["extra"] or "{}"), **arrays,
    )


@dataclass
class RunPart:
    """The images and pathways of one part, as records."""

    images: list[ImageRecord]
    pathways: list[PathwayRecord]


def iter_parts(run_dir: Path) -> Iterator[RunPart]:
    """Yield each complete part of a run, in order."""
    read_manifest(run_dir)
    for part in _part_dirs(Path(run_dir)):
        images = _read_table(part / "images.parquet", _IMAGE_SCHEMA).to_pylist()
        pathways = _read_table(part / "pathways.parquet", _PATHWAY_SCHEMA).to_pylist()
        yield RunPart([_image_from_row(r) for r in images], [_pathway_from_row(r) for r in pathways])


def read_run(run_dir: Path) -> tuple[Manifest, list[ImageRecord], list[PathwayRecord]]:
    """A whole run in memory (fine for thousands of images; use ``iter_parts`` beyond)."""
    manifest = read_manifest(run_dir)
    images: list[ImageRecord] = []
    pathways: list[PathwayRecord] = []
    for part in iter_parts(run_dir):
        images.extend(part.images)
        pathways.extend(part.pathways)
    return manifest, images, pathways


def pathway_to_networkx(pathway: PathwayRecord, model: ModelInfo) -> nx.DiGraph:
    """The pathway as a directed graph over neuron ids, with contributions and edge weights."""
    graph = nx.DiGraph(pathway_id=pathway.pathway_id, image_id=pathway.image_id, method=pathway.method)
    sites = model.sites
    for s, c, contrib, score, rank in zip(pathway.neuron_site, pathway.neuron_channel, pathway.neuron_contribution,
                                          pathway.neuron_score, pathway.neuron_rank, strict=True):
        site = sites[int(s)]
        graph.add_node(neuron_id(model.model_id, site.site_id, int(c)), site=site.site_id, layer=int(s),
                       channel=int(c), contribution=float(contrib), score=float(score), rank=int(rank))
    for ss, sc, ds, dc, w in zip(pathway.edge_src_site, pathway.edge_src_channel, pathway.edge_dst_site,
                                 pathway.edge_dst_channel, pathway.edge_weight, strict=True):
        graph.add_edge(neuron_id(model.model_id, sites[int(ss)].site_id, int(sc)),
                       neuron_id(model.model_id, sites[int(ds)].site_id, int(dc)), weight=float(w))
    return graph
