"""The Python API for notebooks: extract, read a run, ask the store.

```python
import pathx
run = pathx.extract(model, "val/", out="runs/val", methods=("mct",), top_k=8, limit=64)
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx
    from torch import nn

    from extractor.pipeline import ExtractSummary
    from extractor.settings import PathwaySettings
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


def _home() -> Path:
    from graphstore.server import default_home

    return default_home()


def _images(images: Any, bundle: Any) -> Any:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from extractor.inputs import DatasetImages, ImageSource, TensorImages
    from extractor.pipeline import load_images

    if isinstance(images, ImageSource):
        return images
    if isinstance(images, (str, Path)):
        return load_images(str(images), bundle, _home())
    if isinstance(images, torch.Tensor):
        return TensorImages(images)
    if isinstance(images, tuple) and len(images) == 2 and isinstance(images[0], torch.Tensor):
        return TensorImages(images[0], torch.as_tensor(images[1], dtype=torch.long))
    if isinstance(images, DataLoader):
        return DatasetImages(images.dataset)
    if isinstance(images, Dataset):
        return DatasetImages(images)
    from extractor.errors import ExtractionError

    raise ExtractionError(f"images must be a path, a tensor, a Dataset or a DataLoader; got {type(images).__name__}")


def extract(
    model: nn.Module | str,
    images: Any,
    out: str | Path,
    *,
    methods: Sequence[str] = ("mct",),
    top_k: int | None = None,
    sparsity: float | None = None,
    variants: str | Sequence[str] = (),
    input_shape: tuple[int, int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    weights_file: str | Path | None = None,
    untrained: bool = False,
    sites: Sequence[str] | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    device: str = "cpu",
    workers: int = 0,
    shard: str | None = None,
    strict: bool = False,
    originals_only: Sequence[str] = (),
    variant_kinds: Mapping[str, Sequence[str]] | None = None,
    granularity: str = "element",
    pixel_stride: int = 2,
    exemplars: int = 9,
    extra_settings: Sequence[PathwaySettings] = (),
    progress: bool = True,
) -> Extraction:
    """Extract critical pathways of ``images`` through ``model`` into the run folder ``out``.

    ``model``: an ``nn.Module`` classifier (logits ``[B, K]``; give ``input_shape`` ``(C, H, W)``,
    default ``(3, 224, 224)``, and ``mean``/``std`` if it expects normalised input) or a model spec
    string as on the command line. ``methods``: ``mct``, ``intgrad``, ``correlation``,
    ``precision``, ``pixel``. ``variants``: e.g. ``"fgsm,pgd:eps=0.1"``. ``shard``: ``"I/N"``
    (default: ``RANK``/``WORLD_SIZE`` under torchrun). ``exemplars``: top-N images kept per neuron.
    ``extra_settings``: more ``PathwaySettings`` beside those ``methods`` makes (e.g. a percentile
    rule next to top-k). The run resumes if ``out`` already holds part of it. Raises
    ``ExtractionError`` (one line) for anything the user can fix.
    """
    from torch import nn

    from extractor.config import build_settings, model_from_spec, parse_shard, shard_device, with_class_names
    from extractor.errors import ExtractionError
    from extractor.models import ModelBundle, ModelOptions, make_bundle
    from extractor.pipeline import extract_run
    from extractor.variants import VariantSpec

    if isinstance(model, ModelBundle):
        bundle = with_class_names(model, class_names) if class_names is not None else model
    elif isinstance(model, nn.Module):
        shape = tuple(input_shape) if input_shape is not None else (3, 224, 224)
        arch = type(model).__name__.lower()
        bundle = make_bundle(model, arch, shape, class_names, mean, std, sites)
    elif isinstance(model, str):
        size = None if input_shape is None else int(input_shape[1])
        channels = None if input_shape is None else int(input_shape[0])
        opts = ModelOptions(size, channels, mean, std, class_names, sites)
        bundle = model_from_spec(model, _home(), Path(weights_file) if weights_file else None, untrained, opts)
    else:
        raise ExtractionError(f"model must be an nn.Module or a model name; got {type(model).__name__}")
    settings = build_settings(list(methods), top_k, sparsity, granularity, pixel_stride=pixel_stride,
                              originals_only=originals_only, variant_kinds=variant_kinds) + list(extra_settings)
    specs = VariantSpec.parse(variants if isinstance(variants, str) else ",".join(variants))
    source = _images(images, bundle)
    summary = extract_run(bundle, source, settings, specs, Path(out), batch_size=batch_size, limit=limit,
                          device=shard_device(device), progress=progress, workers=workers,
                          shard=parse_shard(shard), strict=strict, exemplars=exemplars)
    log.info("%d images, %d pathways, %d unreadable skipped", summary.images, summary.pathways, len(summary.bad))
    return Extraction(Path(out), summary)


@dataclass
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
    return Run(folder, manifest, images, pathways, run_status(folder))


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
