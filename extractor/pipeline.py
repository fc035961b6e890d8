"""From (model, images) to a run folder of records, batch by batch, resumable.

For each batch of originals: predict, build the variants (attacks use the label, or the
prediction when the label is unknown), then compute pathways for originals and variants
under every ``PathwaySettings`` and write one part. Parts already on disk are skipped, so
an interrupted extraction resumes without recomputing finished images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from extractor.batch import BatchInputs, BatchPathways
from extractor.errors import ExtractionError
from extractor.exemplars import ExemplarTracker
from extractor.inputs import FileImages, ImageSource, SkippedImage, TensorImages, block_loader, scan_folder
from extractor.methods import extract_batch
from extractor.models import ModelBundle
from extractor.settings import PathwaySettings
from extractor.variants import VariantSpec, make_variant
from records import (
    SCHEMA_VERSION,
    ExemplarRows,
    ImageRecord,
    Manifest,
    PathwayRecord,
    RunWriter,
    Shard,
    config_key,
    part_dirs,
    variant_sweep,
)

log = logging.getLogger(__name__)

SALIENCY_MAX_SIDE = 64


def image_id(x: torch.Tensor) -> str:
    """Content id of one image ``[C, H, W]``: sha256 of its float32 pixels."""
    data = x.detach().to(torch.float32).cpu().contiguous().numpy()
    return hashlib.sha256(str(data.shape).encode() + data.tobytes()).hexdigest()[:20]


def to_png(x: torch.Tensor) -> bytes:
    """PNG bytes of one image ``[C, H, W]`` in ``[0, 1]``."""
    arr = (x.detach().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(np.moveaxis(arr, 0, -1))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def load_images(spec: str, bundle: ModelBundle, demo_home: Path | None = None) -> ImageSource:
    """``demo:test`` / ``demo:train`` (the digits model's cache lives in ``demo_home``), a named source
    (``samples:imagenet``, ``fashion-mnist:test``, ...; :mod:`extractor.datasets`), a folder (one sub-folder
    per class) or one file, read lazily."""
    if spec.startswith("demo:"):
        from extractor.demo import demo_model, demo_split

        if bundle.info.arch != "demo-cnn":
            raise ExtractionError("demo images go with --model demo")
        if demo_home is None:
            raise ExtractionError("demo images need the home folder the demo model is cached in")
        _, data, _ = demo_model(demo_home)
        split = spec.split(":", 1)[1]
        x, y = demo_split(data, split)
        return TensorImages(x, y, [f"demo:{split}/{i}" for i in range(len(y))])
    from extractor.datasets import SOURCES, named_source

    named = named_source(spec, bundle.info.input_shape)
    if named is not None:
        return named
    path = Path(spec)
    if path.is_dir():
        return FileImages(path, scan_folder(path), bundle.info.input_shape, bundle.info.class_names)
    if path.is_file():
        return FileImages(path.parent, [path], bundle.info.input_shape, bundle.info.class_names)
    raise ExtractionError(f"images {spec!r}: no such file or folder; named sources: demo:test, demo:train, "
                          f"{', '.join(SOURCES)}")


def adopt_folder_names(bundle: ModelBundle, images: ImageSource) -> ModelBundle:
    """The bundle with class names from the image folders, where the model has none of its own.

    Applies when labels came from ImageFolder's sorted-name rule, there is one folder per class,
    and the model's names are the placeholders ``"0"`` .. ``"K-1"``; the user's model is not touched.
    """
    names = images.label_names()
    info = bundle.info
    if not names or len(names) != info.num_classes or info.class_names != tuple(map(str, range(info.num_classes))):
        return bundle
    return dataclasses.replace(bundle, info=dataclasses.replace(info, class_names=tuple(names)))


@dataclass(kw_only=True)
class ExtractSummary:
    """Counts and timing of one extraction call."""

    images: int = 0
    pathways: int = 0
    edges: int = 0
    skipped_originals: int = 0  # already in the run folder (resumed)
    seconds: float = 0.0
    bad: list[SkippedImage] = field(default_factory=list)  # unreadable images skipped in this call
    shard: Shard = field(default_factory=Shard)
    # (kind, sweep) -> [correct, total], labelled images only
    correct: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    unlabelled: int = 0  # originals without a label: no accuracy counts them

    def accuracy(self) -> dict[tuple[str, str], float]:
        """Top-1 accuracy per (variant kind, sweep) over the labelled images."""
        return {k: c / t for k, (c, t) in self.correct.items() if t}


def _downsample(sal: torch.Tensor) -> torch.Tensor:
    if max(sal.shape[-2:]) <= SALIENCY_MAX_SIDE:
        return sal
    return F.adaptive_avg_pool2d(sal[:, None], SALIENCY_MAX_SIDE)[:, 0]


def pathway_id(img_id: str, settings: PathwaySettings, target: int) -> str:
    """Stable id: image id / method / selection / parameters hash / target."""
    return f"{img_id}/{config_key(settings.method, settings.selection, settings.params_json())}/{target}"


def pathway_records(bundle: ModelBundle, ids: Sequence[str], res: BatchPathways) -> list[PathwayRecord]:
    """One ``PathwayRecord`` per image of a batch result."""
    out: list[PathwayRecord] = []
    contrib, sel, edges = res.contrib, res.sel, res.edges
    sal = _downsample(res.saliency).cpu().numpy()
    kept = [k.cpu() for k in sel.kept]
    chan_masked = [t.cpu() for t in res.figures.inside]
    n_elem = [t.cpu() for t in res.figures.elements]
    dead = [t.cpu() for t in res.figures.dead]
    scores = [t.detach().cpu() for t in res.scores]
    for b, img in enumerate(ids):
        site_l, chan_l, contrib_l, score_l, elem_l, dead_l = [], [], [], [], [], []
        for s in range(len(kept)):
            ch = torch.nonzero(kept[s][b]).flatten()
            site_l.append(np.full(len(ch), s, dtype=np.int32))
            chan_l.append(ch.numpy().astype(np.int32))
            contrib_l.append(chan_masked[s][b, ch].numpy().astype(np.float32))
            score_src = scores[s][b, ch] if scores else chan_masked[s][b, ch].abs()
            score_l.append(score_src.numpy().astype(np.float32))
            elem_l.append(n_elem[s][b, ch].numpy().astype(np.int32))
            dead_l.append(dead[s][b, ch].numpy())
        contribution = np.concatenate(contrib_l)
        score = np.concatenate(score_l)
        order = np.argsort(-score, kind="stable")
        rank = np.empty(len(order), dtype=np.int32)
        rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
        e = edges.b == b
        target = int(contrib.target[b])
        out.append(PathwayRecord(
            pathway_id=pathway_id(img, res.settings, target), image_id=img, model_id=bundle.info.model_id,
            method=res.settings.method, selection=res.settings.selection, params=res.settings.params_json(),
            target=target, logit_full=float(res.logit_full[b]), logit_masked=float(res.logit_masked[b]),
            neuron_site=np.concatenate(site_l), neuron_channel=np.concatenate(chan_l),
            neuron_contribution=contribution, neuron_score=score, neuron_rank=rank,
            neuron_elements=np.concatenate(elem_l),
            neuron_dead=np.concatenate(dead_l),
            edge_src_site=edges.src_site[e], edge_src_channel=edges.src_channel[e],
            edge_dst_site=edges.dst_site[e], edge_dst_channel=edges.dst_channel[e], edge_weight=edges.weight[e],
            site_gap=edges.gap[b], saliency=sal[b], extra=dict(res.extra[b]),
        ))
    return out


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def shard_blocks(n: int, batch_size: int, shard: Shard) -> list[range]:
    """This shard's blocks of image indices: blocks of ``batch_size`` consecutive indices, block
    ``b`` to shard ``b mod N``. Every image is in one block of one shard, and a block is the same
    batch whether the run is sharded or not (so the numbers are too)."""
    blocks = [range(s.start, s.stop) for s in _batches(n, batch_size)]
    return blocks[shard.index::shard.count]


def extract_run(
    bundle: ModelBundle,
    images: ImageSource,
    settings: Sequence[PathwaySettings],
    variants: Sequence[VariantSpec],
    out_dir: Path,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    workers: int = 0,
    shard: Shard | None = None,
    strict: bool = False,
    exemplars: int = 9,
) -> ExtractSummary:
    """Extract pathways of ``images`` and their variants into ``out_dir``, streaming (resumable).

    Images are decoded block by block by a ``DataLoader`` with ``workers`` processes; only the
    first ``limit`` images are ever read. Unreadable images are skipped with a warning and
    listed in the shard's status file (``strict``: the first one is an error). ``shard`` takes
    a deterministic share of the blocks; shards may run at once into one ``out_dir``.
    ``exemplars``: top-N original images kept per channel (0 = none; see ``extractor.exemplars``).
    """
    if batch_size < 1:
        raise ExtractionError(f"batch size must be at least 1; got {batch_size}")
    if limit is not None and limit < 1:
        raise ExtractionError(f"limit must be at least 1; got {limit}")
    if workers < 0:
        raise ExtractionError(f"loader workers must be 0 or more; got {workers}")
    if exemplars < 0:
        raise ExtractionError(f"exemplars must be 0 or more; got {exemplars}")
    shard = shard or Shard()
    bundle = adopt_folder_names(bundle, images)
    n = min(len(images), limit) if limit else len(images)
    manifest = Manifest(SCHEMA_VERSION, bundle.info, {
        "pathways": [{"method": s.method, "selection": s.selection, "params": s.params()} for s in settings],
        "variants": [{"kind": v.kind, "params": v.params} for v in variants],
        "exemplars": exemplars,
    })
    fresh = not out_dir.exists()
    writer = RunWriter(out_dir, manifest, shard)
    tracker = ExemplarTracker(bundle, exemplars) if exemplars else None
    done = writer.done_sources()
    blocks: list[list[int]] = []
    summary = ExtractSummary(shard=shard)
    for block in shard_blocks(n, batch_size, shard):
        todo = [i for i in block if images.source(i) not in done]
        summary.skipped_originals += len(block) - len(todo)
        if todo:
            blocks.append(todo)
    model_device = torch.device(device)
    first = next(bundle.model.parameters())
    dtype, home_device = first.dtype, first.device
    loader = block_loader(images, blocks, workers=workers if not isinstance(images, TensorImages) else 0,
                          pin_memory=model_device.type == "cuda")
    bundle.model.to(model_device)
    began = time.perf_counter()
    bar = tqdm(total=sum(map(len, blocks)), desc="extract", unit="img", disable=not progress)
    try:
        for block in loader:
            for i, reason in block.bad:
                src = images.source(i)
                if strict:
                    raise ExtractionError(f"image {src}: {reason} (without --strict it would be skipped)")
                log.warning("skipped image %s: %s", src, reason)
                writer.skip(src, reason)
                summary.bad.append(SkippedImage(src, reason))
            bar.update(len(block.bad))
            if block.x is None:
                continue
            bundle.check_input(block.x)
            ids = [image_id(x) for x in block.x]
            keep = [b for b, img in enumerate(ids) if img not in done]
            summary.skipped_originals += len(ids) - len(keep)
            bar.update(len(ids) - len(keep))
            if not keep:
                continue
            x = block.x[keep].to(model_device, dtype, non_blocking=True)
            labels = torch.tensor([block.labels[b] for b in keep], dtype=torch.long)
            part_images, part_pathways, delta = _extract_batch(
                bundle=bundle,
                x=x,
                labels=labels.to(model_device),
                ids=[ids[b] for b in keep],
                sources=[images.source(block.good[b]) for b in keep],
                settings=settings,
                variants=variants,
                batch_size=batch_size,
                summary=summary,
                tracker=tracker,
            )
            writer.write_part(part_images, part_pathways, delta)
            done.update(ids[b] for b in keep)
            summary.images += len(part_images)
            summary.pathways += len(part_pathways)
            summary.edges += sum(len(p.edge_weight) for p in part_pathways)
            bar.update(len(keep))
    finally:
        bar.close()
        bundle.model.to(home_device)  # the user's model goes back where it was
    summary.seconds = time.perf_counter() - began
    if summary.bad and not summary.images and not summary.skipped_originals and shard.count == 1:
        if fresh and not part_dirs(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)  # nothing to keep: leave no run folder behind
        bad = summary.bad[0]
        raise ExtractionError(f"none of the {len(summary.bad)} images could be read ({len(summary.bad)} skipped; "
                              f"first: {bad.source}: {bad.reason})")
    writer.finish(images=summary.images, pathways=summary.pathways, limit=limit)
    return summary


def _extract_batch(
    bundle: ModelBundle, x: torch.Tensor, *, labels: torch.Tensor, ids: list[str], sources: list[str],
    settings: Sequence[PathwaySettings], variants: Sequence[VariantSpec], batch_size: int,
    summary: ExtractSummary, tracker: ExemplarTracker | None = None,
) -> tuple[list[ImageRecord], list[PathwayRecord], ExemplarRows | None]:
    with torch.no_grad():
        pred = bundle.forward(x).argmax(1)
    attack_labels = torch.where(labels >= 0, labels, pred)
    groups: list[tuple[torch.Tensor, list[str], list[str | None], str, list[dict[str, object]]]] = [
        (x, ids, [None] * len(ids), "original", [{} for _ in ids])
    ]
    seeds = [int(i[:8], 16) for i in ids]
    for spec in variants:
        var = make_variant(spec=spec, forward=bundle.forward, x=x, labels=attack_labels,
                           num_classes=bundle.info.num_classes, seeds=seeds)
        groups.append((var.x, [image_id(v) for v in var.x], list(ids), var.kind, var.params))
    img_records: list[ImageRecord] = []
    pw_records: list[PathwayRecord] = []
    deltas: list[ExemplarRows] = []
    seen: set[str] = set()
    # exemplars follow the first contribution-based setting (pixel pathways have no contributions)
    lead = next((s for s in settings if s.method != "pixel"), None)
    for gx, gids, parents, kind, params in groups:
        with torch.no_grad():
            logits = bundle.forward(gx)
        probs = logits.softmax(1)
        keep: list[int] = []
        for b, img in enumerate(gids):
            sweep = variant_sweep(kind, params[b])  # the sweep, as the record will carry it
            if labels[b] >= 0:  # accuracy only where a label exists (never against the model's own guess)
                hit = summary.correct.setdefault((kind, sweep), [0, 0])
                hit[0] += int(logits[b].argmax() == labels[b])
                hit[1] += 1
            elif kind == "original":
                summary.unlabelled += 1
            if img in seen:  # a variant identical to an image already in this part
                continue
            seen.add(img)
            keep.append(b)
            img_records.append(ImageRecord(
                image_id=img, model_id=bundle.info.model_id,
                source=sources[b] if kind == "original" else f"{sources[b]}~{kind}",
                label=int(labels[b]), variant_of=parents[b], kind=kind,
                params=json.dumps(params[b], sort_keys=True), sweep=sweep, predicted=int(logits[b].argmax()),
                probs=probs[b].detach().cpu().numpy().astype(np.float32),
                logits=logits[b].detach().cpu().numpy().astype(np.float32), png=to_png(gx[b]),
            ))
        for sl in _batches(len(keep), batch_size):
            rows = keep[sl]
            inputs = BatchInputs(seeds=[int(gids[r][:8], 16) for r in rows])  # one per chunk: shared by methods
            for s in settings:
                if not s.applies_to(kind):
                    continue
                res = extract_batch(bundle, gx[rows], s, inputs)
                pw_records.extend(pathway_records(bundle, [gids[r] for r in rows], res))
                if tracker is not None and kind == "original" and s is lead:
                    deltas.append(tracker.update([gids[r] for r in rows], res.figures))
    uniq: dict[str, PathwayRecord] = {p.pathway_id: p for p in pw_records}
    return img_records, list(uniq.values()), ExemplarRows.concat(deltas) if tracker is not None else None


