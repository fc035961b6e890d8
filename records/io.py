"""Run folders: Parquet parts written atomically, shard status files, the manifest, reading back.

A *run* is a folder::

    run/
      manifest.json              schema version, model, extraction settings
      part-00000/images.parquet  one row per image (originals and variants)
      part-00000/pathways.parquet one row per pathway, neurons and edges as list columns
      part-00000/exemplars.parquet the exemplar rows that entered the running top-N in this part
      shards/I-of-N.json         per writer: complete or not, images skipped and why

Parts are written to a temporary folder and renamed, so a part is either complete or
absent; an interrupted extraction resumes by skipping originals already in a part.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from records.types import (
    SCHEMA_VERSION,
    ExemplarRows,
    ImageRecord,
    Manifest,
    ModelInfo,
    PathwayRecord,
    RecordsFormatError,
)

MANIFEST = "manifest.json"
EXEMPLARS = "exemplars.parquet"

_IMAGE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("model_id", pa.string()), ("source", pa.string()), ("label", pa.int32()),
    ("variant_of", pa.string()), ("kind", pa.string()), ("params", pa.string()), ("predicted", pa.int32()),
    ("probs", pa.list_(pa.float32())), ("logits", pa.list_(pa.float32())), ("png", pa.binary()),
    ("sweep", pa.string()),
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
        for part in part_dirs(self.run_dir):
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


def part_dirs(run_dir: Path) -> list[Path]:
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
            f"{path} has record schema version {version!r}; this Pathway Explorer reads version {SCHEMA_VERSION}: "
            "extract the run again"
        )
    try:
        return Manifest(SCHEMA_VERSION, ModelInfo.from_json(data["model"]), dict(data["settings"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordsFormatError(f"{path} is missing fields: {exc}") from exc


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
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


def _list_rows(column: pa.ChunkedArray, dtype: Any) -> list[np.ndarray]:
    """A list column as one numpy array per row: slices of one flat copy, not a Python list per row."""
    arr = column.combine_chunks()
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    offsets = arr.offsets.to_numpy()
    return np.split(flat, offsets[1:-1] - offsets[0])


def _pathways_from_table(table: pa.Table) -> list[PathwayRecord]:
    scalars = {name: table.column(name).to_pylist() for name in (
        "pathway_id", "image_id", "model_id", "method", "selection", "params", "target", "logit_full",
        "logit_masked", "extra")}
    arrays = {name: _list_rows(table.column(name), _NUMPY_OF[dt]) for name, dt in _PATHWAY_ARRAYS.items()}
    saliency = _list_rows(table.column("saliency"), np.float32)
    shapes = table.column("saliency_shape").to_pylist()
    return [PathwayRecord(
        pathway_id=scalars["pathway_id"][i], image_id=scalars["image_id"][i], model_id=scalars["model_id"][i],
        method=scalars["method"][i], selection=scalars["selection"][i], params=scalars["params"][i],
        target=int(scalars["target"][i]), logit_full=float(scalars["logit_full"][i]),
        logit_masked=float(scalars["logit_masked"][i]), saliency=saliency[i].reshape(shapes[i]),
        extra=json.loads(scalars["extra"][i] or "{}"), **{name: rows[i] for name, rows in arrays.items()},
    ) for i in range(table.num_rows)]


@dataclass
class RunPart:
    """The images and pathways of one part, as records."""

    images: list[ImageRecord]
    pathways: list[PathwayRecord]


@dataclass(frozen=True, kw_only=True)
class RunFolder:
    """A run folder checked once at an entry point (:func:`open_run`): its manifest read, every shard finished."""

    path: Path
    manifest: Manifest


def open_run(run_dir: Path | RunFolder) -> RunFolder:
    """The one check of a run folder where it enters: ``RecordsFormatError`` (one line) for a damaged or foreign
    folder or an unfinished sharded run; a ``RunFolder`` is passed through unread."""
    if isinstance(run_dir, RunFolder):
        return run_dir
    manifest = read_manifest(run_dir)
    require_complete(run_dir)
    return RunFolder(path=Path(run_dir), manifest=manifest)


def iter_parts(run_dir: Path | RunFolder) -> Iterator[RunPart]:
    """Yield each complete part of a run, in order (a ``Path``'s manifest is checked first)."""
    if not isinstance(run_dir, RunFolder):
        read_manifest(run_dir)
    for part in part_dirs(run_dir.path if isinstance(run_dir, RunFolder) else Path(run_dir)):
        images = read_table(part / "images.parquet", _IMAGE_SCHEMA).to_pylist()
        pathways = _pathways_from_table(read_table(part / "pathways.parquet", _PATHWAY_SCHEMA))
        yield RunPart([_image_from_row(r) for r in images], pathways)


def read_run(run_dir: Path) -> tuple[Manifest, list[ImageRecord], list[PathwayRecord]]:
    """A whole run in memory (fine for thousands of images; use ``iter_parts`` beyond)."""
    manifest = read_manifest(run_dir)
    images: list[ImageRecord] = []
    pathways: list[PathwayRecord] = []
    for part in iter_parts(run_dir):
        images.extend(part.images)
        pathways.extend(part.pathways)
    return manifest, images, pathways


