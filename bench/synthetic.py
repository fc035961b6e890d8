"""Synthetic run folders shaped like the demo's records, for store-side benchmarks at scale.

``write_synthetic(out, images, methods)`` writes half originals and half variants (PGD at
three strengths and elastic deformation, alternating), each with one pathway per method, in
the sizes the demo extraction produces: the demo CNN's five sites, top-8 channels per site
(40 neurons), 8 x 8 edges between consecutive sites (256 edges), a 32 x 32 saliency map.
Channels are drawn from class-specific preferences (6 of 8 per site) so supports, overlaps and
hijacks look like real ones. Numpy only and seeded: the same arguments give the same files.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from records import (
    SCHEMA_VERSION,
    ImageRecord,
    Manifest,
    ModelInfo,
    PathwayRecord,
    RunWriter,
    SiteInfo,
    config_key,
)

SITES = (("features.1", (16, 32, 32)), ("features.3", (16, 32, 32)), ("features.6", (32, 16, 16)),
         ("features.8", (32, 16, 16)), ("classifier.2", (64,)))
METHODS = {
    "mct": {"edge_targets": 16, "edges_per_target": 8, "k": 8},
    "intgrad": {"edge_targets": 16, "edges_per_target": 8, "intgrad_steps": 11, "k": 8},
    "correlation": {"edge_targets": 16, "edges_per_target": 8, "k": 8, "noise": 0.1, "resamples": 50},
}
VARIANTS = (("pgd", {"eps": 0.05, "steps": 10, "targeted": False}), ("deform", {"alpha": 3.0, "sigma": 4.0}),
            ("pgd", {"eps": 0.1, "steps": 10, "targeted": False}), ("deform", {"alpha": 3.0, "sigma": 4.0}),
            ("pgd", {"eps": 0.2, "steps": 10, "targeted": False}))
K = 8
CLASSES = 10


def model_info() -> ModelInfo:
    sites = tuple(
        SiteInfo(
            index=i,
            module_path=path,
            call_index=0,
            kind="ReLU",
            shape=shape,
            layout="channels_first" if len(shape) == 3 else "vector",
            preds=(i - 1,) if i else (),
            depth=i,
        )
        for i, (path, shape) in enumerate(SITES)
    )
    return ModelInfo(model_id="synthetic-demo-cnn/0", arch="synthetic-demo-cnn", num_classes=CLASSES,
                     class_names=tuple(f"digit {i}" for i in range(CLASSES)), input_shape=(1, 32, 32), sites=sites)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pathway(rng: np.random.Generator, prefs: list[np.ndarray], image_id: str, method: str, target: int,
             model: ModelInfo) -> PathwayRecord:
    params = json.dumps(METHODS[method], sort_keys=True)
    sites, channels = [], []
    for s, (_, shape) in enumerate(SITES):
        own = rng.choice(prefs[s], 6, replace=False)
        rest = np.setdiff1d(np.arange(shape[0]), own)
        channels.append(np.sort(np.concatenate([own, rng.choice(rest, K - 6, replace=False)])))
        sites.append(np.full(K, s))
    site = np.concatenate(sites).astype(np.int32)
    channel = np.concatenate(channels).astype(np.int32)
    contribution = rng.exponential(1.0, site.size).astype(np.float32)
    src_s, src_c, dst_s, dst_c = [], [], [], []
    for s in range(len(SITES) - 1):
        a, b = np.meshgrid(channels[s], channels[s + 1], indexing="ij")
        src_s.append(np.full(a.size, s))
        dst_s.append(np.full(a.size, s + 1))
        src_c.append(a.ravel())
        dst_c.append(b.ravel())
    n_edges = sum(x.size for x in src_s)
    return PathwayRecord(
        pathway_id=f"{image_id}/{config_key(method, 'topk', params)}/{target}", image_id=image_id,
        model_id=model.model_id, method=method, selection="topk", params=params, target=target,
        logit_full=float(rng.uniform(5, 15)), logit_masked=float(rng.uniform(3, 12)),
        neuron_site=site, neuron_channel=channel, neuron_contribution=contribution,
        neuron_score=contribution.copy(), neuron_rank=np.argsort(np.argsort(-contribution)).astype(np.int32) + 1,
        neuron_elements=rng.integers(1, 256, site.size).astype(np.int32), neuron_dead=np.zeros(site.size, bool),
        edge_src_site=np.concatenate(src_s).astype(np.int32), edge_src_channel=np.concatenate(src_c).astype(np.int32),
        edge_dst_site=np.concatenate(dst_s).astype(np.int32), edge_dst_channel=np.concatenate(dst_c).astype(np.int32),
        edge_weight=rng.normal(0, 1, n_edges).astype(np.float32),
        site_gap=np.concatenate([[np.nan], rng.random(len(SITES) - 1)]).astype(np.float32),
        saliency=rng.random((32, 32)).astype(np.float32),
    )


def write_synthetic(out: Path, images: int, methods: tuple[str, ...] = tuple(METHODS), seed: int = 0,
                    part_originals: int = 500, labels: tuple[int, ...] = tuple(range(CLASSES))) -> Path:
    """Write ``images`` images (half originals, half variants) with one pathway per method each; the originals'
    labels cycle through ``labels``. Another ``seed`` gives other image ids."""
    rng = np.random.default_rng(seed)
    model = model_info()
    prefs = [[rng.choice(shape[0], 12, replace=False) for _, shape in SITES] for _ in range(CLASSES)]
    writer = RunWriter(out, Manifest(SCHEMA_VERSION, model, {
        "pathways": [{"method": m, "selection": "topk", "params": METHODS[m]} for m in methods],
        "variants": [{"kind": k, "params": p} for k, p in VARIANTS], "synthetic": {"images": images, "seed": seed}}))
    pngs = [_png(i) for i in range(16)]
    originals = (images + 1) // 2
    for start in range(0, originals, part_originals):
        imgs: list[ImageRecord] = []
        pws: list[PathwayRecord] = []
        for o in range(start, min(originals, start + part_originals)):
            label = labels[o % len(labels)]
            members: list[tuple[str, str, dict[str, object], str | None]] = [
                (hashlib.sha256(f"synthetic-{seed}-{o}".encode()).hexdigest(), "original", {}, None)]
            if originals + o < images:
                kind, params = VARIANTS[o % len(VARIANTS)]
                members.append((hashlib.sha256(f"synthetic-{seed}-{o}-v".encode()).hexdigest(), kind,
                                dict(params), members[0][0]))
            for image_id, kind, variant_params, parent in members:
                attacked = kind == "pgd" and rng.random() < 0.8
                predicted = (label + 1) % CLASSES if attacked else label
                logits = rng.normal(0, 1, CLASSES).astype(np.float32)
                logits[predicted] += 6.0
                probs = np.exp(logits - logits.max())
                imgs.append(
                    ImageRecord(
                        image_id=image_id,
                        model_id=model.model_id,
                        source=f"synthetic:{o}" + ("" if parent is None else f"~{kind}"),
                        label=label,
                        variant_of=parent,
                        kind=kind,
                        params=json.dumps(variant_params, sort_keys=True),
                        predicted=predicted,
                        probs=(probs / probs.sum()).astype(np.float32),
                        logits=logits,
                        png=pngs[o % len(pngs)],
                    )
                )
                pws.extend(_pathway(rng, prefs[predicted], image_id, m, predicted, model) for m in methods)
        writer.write_part(imgs, pws)
    writer.finish(images=images)
    return out
