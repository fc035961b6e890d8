"""From (model, images) to a run folder of records, batch by batch, resumable.

For each batch of originals: predict, build the variants (attacks use the label, or the
prediction when the label is unknown), then compute pathways for originals and variants
under every ``PathwaySettings`` and write one part. Parts already on disk are skipped, so
an interrupted extraction resumes without recomputing finished images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from extractor.errors import ExtractionError
from extractor.models import ModelBundle
from extractor.pathways import BatchPathways, PathwaySettings, extract_batch
from extractor.records import SCHEMA_VERSION, ImageRecord, Manifest, PathwayRecord, RunWriter, config_key
from extractor.variants import VariantSpec, make_variant

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SALIENCY_MAX_SIDE = 64


@dataclass
class ImageSet:
    """Originals ``x`` ``[N, C, H, W]`` in ``[0, 1]``, labels ``[N]`` (-1 unknown), source names."""

    x: torch.Tensor
    labels: torch.Tensor
    sources: list[str]


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


def load_image_files(paths: Sequence[Path], bundle: ModelBundle, root: Path | None = None) -> ImageSet:
    """Read files into the model's input shape (resize shorter side, centre crop).

    Labels come from the parent folder name (ImageFolder layout) when it names a class.
    """
    if not paths:
        raise ExtractionError("no image files found")
    C, H, W = bundle.info.input_shape
    names = {name: i for i, name in enumerate(bundle.info.class_names)}
    xs, labels, sources = [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if C == 1 else "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ExtractionError(f"cannot read image {path}: {type(exc).__name__}") from exc
        arr = torch.tensor(np.asarray(img, dtype=np.float32) / 255.0)
        t = arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1)
        scale = max(H / t.shape[1], W / t.shape[2])
        size = (max(H, round(t.shape[1] * scale)), max(W, round(t.shape[2] * scale)))
        t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        top, left = (t.shape[1] - H) // 2, (t.shape[2] - W) // 2
        xs.append(t[:, top:top + H, left:left + W].clamp(0, 1))
        parent = path.parent.name if root is not None and path.parent != root else ""
        labels.append(names.get(parent, int(parent) if parent.isdigit() and int(parent) < len(names) else -1))
        sources.append(str(path.relative_to(root)) if root is not None else str(path))
    return ImageSet(torch.stack(xs), torch.tensor(labels, dtype=torch.long), sources)


def load_images(spec: str, bundle: ModelBundle, demo_home: Path | None = None) -> ImageSet:
    """``demo:test`` / ``demo:train``, a folder (one sub-folder per class) or one file."""
    if spec.startswith("demo:"):
        from extractor.demo import demo_model, demo_split

        if bundle.info.arch != "demo-cnn":
            raise ExtractionError("demo images go with --model demo")
        _, data, _ = demo_model(demo_home or Path(".cache"))
        split = spec.split(":", 1)[1]
        x, y = demo_split(data, split)
        return ImageSet(x, y, [f"demo:{split}/{i}" for i in range(len(y))])
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ExtractionError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        return load_image_files(files, bundle, root=path)
    if path.is_file():
        return load_image_files([path], bundle)
    raise ExtractionError(f"images {spec!r}: no such file or folder (or use demo:test / demo:train)")


@dataclass
class ExtractSummary:
    """Counts and timing of one extraction call."""

    images: int = 0
    pathways: int = 0
    edges: int = 0
    skipped_originals: int = 0
    seconds: float = 0.0
    correct: dict[str, list[int]] = field(default_factory=dict)  # variant key -> [correct, total]

    def accuracy(self) -> dict[str, float]:
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
    chan_masked = [((e * m).flatten(2).sum(-1) if e.dim() > 2 else e * m).cpu()
                   for e, m in zip(contrib.element, sel.masks, strict=True)]
    n_elem = [(m.flatten(2).sum(-1) if m.dim() > 2 else m).cpu() for m in sel.masks]
    dead = [((a == 0).flatten(2).all(-1) if a.dim() > 2 else a == 0).cpu() for a in contrib.acts]
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


def extract_run(
    bundle: ModelBundle,
    images: ImageSet,
    settings: Sequence[PathwaySettings],
    variants: Sequence[VariantSpec],
    out_dir: Path,
    batch_size: int = 32,
    limit: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> ExtractSummary:
    """Extract pathways of ``images`` and their variants into ``out_dir`` (resumable)."""
    if batch_size < 1:
        raise ExtractionError(f"batch size must be at least 1; got {batch_size}")
    if limit is not None and limit < 1:
        raise ExtractionError(f"limit must be at least 1; got {limit}")
    x_all = images.x[:limit] if limit else images.x
    bundle.check_input(x_all)
    manifest = Manifest(SCHEMA_VERSION, bundle.info, {
        "pathways": [{"method": s.method, "selection": s.selection, "params": s.params()} for s in settings],
        "variants": [{"kind": v.kind, "params": v.params} for v in variants],
    })
    writer = RunWriter(out_dir, manifest)
    done = writer.done_sources()
    ids = [image_id(x) for x in x_all]
    todo = [i for i, img in enumerate(ids) if img not in done]
    summary = ExtractSummary(skipped_originals=len(ids) - len(todo))
    model_device = torch.device(device)
    bundle.model.to(model_device)
    began = time.perf_counter()
    bar = tqdm(total=len(todo), desc="extract", unit="img", disable=not progress)
    try:
        for sl in _batches(len(todo), batch_size):
            idx = todo[sl]
            x = x_all[idx].to(model_device, next(bundle.model.parameters()).dtype)
            labels = images.labels[:limit][idx] if limit else images.labels[idx]
            part_images, part_pathways = _extract_batch(bundle, x, labels.to(model_device),
                                                        [ids[i] for i in idx], [images.sources[i] for i in idx],
                                                        settings, variants, batch_size, summary)
            writer.write_part(part_images, part_pathways)
            summary.images += len(part_images)
            summary.pathways += len(part_pathways)
            summary.edges += sum(len(p.edge_weight) for p in part_pathways)
            bar.update(len(idx))
    finally:
        bar.close()
        bundle.model.to("cpu")
    summary.seconds = time.perf_counter() - began
    return summary


def _extract_batch(
    bundle: ModelBundle, x: torch.Tensor, labels: torch.Tensor, ids: list[str], sources: list[str],
    settings: Sequence[PathwaySettings], variants: Sequence[VariantSpec], batch_size: int,
    summary: ExtractSummary,
) -> tuple[list[ImageRecord], list[PathwayRecord]]:
    with torch.no_grad():
        pred = bundle.forward(x).argmax(1)
    attack_labels = torch.where(labels >= 0, labels, pred)
    groups: list[tuple[torch.Tensor, list[str], list[str | None], str, list[dict[str, object]]]] = [
        (x, ids, [None] * len(ids), "original", [{} for _ in ids])
    ]
    seeds = [int(i[:8], 16) for i in ids]
    for spec in variants:
        var = make_variant(spec, bundle.forward, x, attack_labels, bundle.info.num_classes, seeds)
        groups.append((var.x, [image_id(v) for v in var.x], list(ids), var.kind, var.params))
    img_records: list[ImageRecord] = []
    pw_records: list[PathwayRecord] = []
    seen: set[str] = set()
    for gx, gids, parents, kind, params in groups:
        with torch.no_grad():
            logits = bundle.forward(gx)
        probs = logits.softmax(1)
        key = kind if kind == "original" else f"{kind}:{json.dumps(_shared(params), sort_keys=True)}"
        hit = summary.correct.setdefault(key, [0, 0])
        keep: list[int] = []
        for b, img in enumerate(gids):
            hit[0] += int(logits[b].argmax() == attack_labels[b])
            hit[1] += 1
            if img in seen:  # a variant identical to an image already in this part
                continue
            seen.add(img)
            keep.append(b)
            img_records.append(ImageRecord(
                image_id=img, model_id=bundle.info.model_id,
                source=sources[b] if kind == "original" else f"{sources[b]}~{kind}",
                label=int(labels[b]), variant_of=parents[b], kind=kind,
                params=json.dumps(params[b], sort_keys=True), predicted=int(logits[b].argmax()),
                probs=probs[b].detach().cpu().numpy().astype(np.float32),
                logits=logits[b].detach().cpu().numpy().astype(np.float32), png=to_png(gx[b]),
            ))
        for sl in _batches(len(keep), batch_size):
            rows = keep[sl]
            shared: dict[str, object] = {}  # per chunk: resampling scores reused across methods
            for s in settings:
                if not s.applies_to(kind):
                    continue
                res = extract_batch(bundle, gx[rows], s, seeds=[int(gids[r][:8], 16) for r in rows], shared=shared)
                pw_records.extend(pathway_records(bundle, [gids[r] for r in rows], res))
    uniq: dict[str, PathwayRecord] = {p.pathway_id: p for p in pw_records}
    return img_records, list(uniq.values())


def _shared(params: list[dict[str, object]]) -> dict[str, object]:
    """Parameters common to all images of a variant batch (the sweep setting)."""
    if not params:
        return {}
    return {k: v for k, v in params[0].items() if all(p.get(k) == v for p in params)}
