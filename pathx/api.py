"""The Python API for notebooks: extract, read a run, ask the store.

```python
import pathx
run = pathx.extract(model, "val/", "runs/val", methods=("mct",), top_k=8, limit=64)
records = pathx.read_run(run)
with pathx.connect() as store:
    store.table("top_neurons", class_id, config)
```

``extract`` takes the same model and image specs as ``pathx extract`` (a torchvision name,
``FILE.py:FACTORY``, ``demo``) or Python objects: an ``nn.Module``, a tensor
``[N, C, H, W]`` in ``[0, 1]``, a map-style ``Dataset`` or a ``DataLoader`` whose items are
``x`` or ``(x, label)``. Images are pixel space: pass the model's ``mean``/``std`` instead of
normalising them yourself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx
    from torch import nn

    from extractor.pipeline import ExtractSummary
    from graphstore.api import Store
    from records import ImageRecord, Manifest, PathwayRecord, RunStatus

log = logging.getLogger(__name__)


@dataclass
class Extraction:
    """What ``extract`` did: the run folder and the counts (``summary.bad`` lists skipped images)."""

    path: Path
    summary: ExtractSummary

    def __fspath__(self) -> str:
        return str(self.path)


def extract(model: nn.Module | str, images: Any, out: str | Path, **options: Any) -> Extraction:
    """Extract critical pathways of ``images`` through ``model`` into the run folder ``out``.

    ``model``: an ``nn.Module`` classifier (logits ``[B, K]``; give ``input_size`` and ``channels``, default
    3 x 224 x 224, and ``mean``/``std`` if it expects normalised input) or a model spec string as on the
    command line. ``options`` are ``extractor.options.ExtractOptions``' fields, the options of
    ``pathx extract`` under the same names: ``methods`` (``mct``, ``intgrad``, ``correlation``,
    ``precision``, ``pixel``), ``top_k`` or ``sparsity``, ``variants`` (e.g. ``"fgsm,pgd:eps=0.1"``),
    ``shard`` (``"I/N"``; default ``RANK``/``WORLD_SIZE`` under torchrun), ``exemplars`` (top-N images kept
    per neuron), ... The run resumes if ``out`` already holds part of it. Raises ``ExtractionError``
    (one line) for anything the user can fix, ``TypeError`` for an unknown option.
    """
    from extractor.launch import run_extraction
    from extractor.options import ExtractOptions
    from graphstore.server import default_home

    summary = run_extraction(model, images, Path(out), ExtractOptions(**options), default_home())
    log.info("%d images, %d pathways, %d unreadable skipped", summary.images, summary.pathways, len(summary.bad))
    return Extraction(Path(out), summary)


@dataclass(kw_only=True)
class Run:
    """A run folder in memory: its manifest, image and pathway records, and shard status."""

    path: Path
    manifest: Manifest
    images: list[ImageRecord]
    pathways: list[PathwayRecord]
    status: RunStatus

    def graph(self, pathway_id: str) -> nx.DiGraph:
        """One pathway as a directed graph over neuron ids (``contribution``, ``weight`` attributes)."""
        from records import pathway_to_networkx

        for p in self.pathways:
            if p.pathway_id == pathway_id:
                return pathway_to_networkx(p, self.manifest.model)
        raise KeyError(f"no pathway {pathway_id!r} in {self.path}")

    def pathways_of(self, image_id: str) -> list[PathwayRecord]:
        return [p for p in self.pathways if p.image_id == image_id]


def read_run(path: str | Path | Extraction) -> Run:
    """Read a whole run folder (records, no torch); ``RecordsFormatError`` for a damaged one."""
    from records import read_run as read_records
    from records import run_status

    folder = path.path if isinstance(path, Extraction) else Path(path)
    manifest, images, pathways = read_records(folder)
    return Run(path=folder, manifest=manifest, images=images, pathways=pathways, status=run_status(folder))


def connect(home: str | Path | None = None) -> Store:
    """The graph store (``NEO4J_URI`` or the local server); its methods are the named queries,
    ``store.table(name, ...)`` gives any of them as a pandas DataFrame. Use it in a ``with``."""
    from graphstore.api import Store

    return Store.connect(Path(home) if home else None)


def load(path: str | Path | Extraction, workers: int = 1, progress: bool = True) -> Any:
    """Load a finished run folder into the store (idempotent, resumable); returns the load summary."""
    from graphstore.loader import load_run

    folder = path.path if isinstance(path, Extraction) else Path(path)
    with connect() as store:
        return load_run(store.driver, folder, database=store.database, progress=progress, workers=workers)
