"""``pathx report``: each seed paper's claims, measured here on the demo model and the store.

Model-side experiments (logit preservation vs sparsity, LeRF/MoRF, cascading randomisation,
pixel-pathway counts of variants) run through the extractor; store-side figures
(correlation/precision overlap per layer, within- vs across-class consistency) come from
``graphstore.api``. Writes ``report.md`` and PNG plots into one folder.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.figure
import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from torch import nn

from extractor.methods import extract_batch
from extractor.models import ModelBundle
from extractor.pixelpaths import PixelSettings, trace_pixels
from extractor.settings import PathwaySettings
from extractor.variants import deform, pgd
from graphstore.api import Store

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after choosing the backend

log = logging.getLogger(__name__)
SPARSITIES = (0, 50, 70, 80, 90, 95, 99)
FRACTIONS = tuple(f / 100 for f in range(1, 11))


@dataclass
class Section:
    title: str
    body: str


def _savefig(fig: matplotlib.figure.Figure, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def logit_preservation(bundle: ModelBundle, x: torch.Tensor, out: Path) -> Section:
    rows = {}
    for method in ("mct", "intgrad"):
        ratios = []
        for p in SPARSITIES:
            res = extract_batch(bundle, x, PathwaySettings(method, "percentile", sparsity=float(p), intgrad_steps=5))
            ratios.append(float((res.logit_masked / res.logit_full).median()))
        rows[method] = ratios
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, ratios in rows.items():
        ax.plot(SPARSITIES, ratios, marker="o", label=method)
    ax.axhline(0.85, ls="--", c="grey", lw=0.8, label="15% output change")
    ax.set_xlabel("sparsity p (global percentile)")
    ax.set_ylabel("median masked / full logit")
    ax.legend()
    img = _savefig(fig, out, "khakzar-logit.png")
    table = "| p | " + " | ".join(str(p) for p in SPARSITIES) + " |\n|---|" + "---|" * len(SPARSITIES) + "\n"
    table += "\n".join(f"| {m} | " + " | ".join(f"{r:.2f}" for r in v) + " |" for m, v in rows.items())
    p90 = rows["mct"][SPARSITIES.index(90)]
    return Section("Khakzar et al.: logit kept by the pathway as sparsity grows", (
        f"{len(x)} test digits, element granularity, one global percentile over all sites.\n\n{table}\n\n"
        f"![logit preservation]({img})\n\nThe paper's scripts use p = 90 for VGG16 'computed for 15% output "
        f"change' (ratio ≈ 0.85). On the demo CNN p = 90 keeps a median ratio of {p90:.2f} (mct): "
        + ("close to" if abs(p90 - 0.85) < 0.15 else "different from") + " that setting, so the sparsity that "
        "keeps 85% of the logit is model-specific."))


def _maps(bundle: ModelBundle, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Signed attribution maps ``[B, H, W]`` (per pixel the channel value of largest magnitude)."""
    def pick(g: torch.Tensor) -> torch.Tensor:
        return g.gather(1, g.abs().argmax(1, keepdim=True)).squeeze(1)

    xr = x.detach().requires_grad_(True)
    logits = bundle.forward(xr)
    target = logits.argmax(1)
    grad = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xr)[0]
    pg = extract_batch(bundle, x, PathwaySettings("mct", "percentile", sparsity=90.0)).saliency
    gen = torch.Generator().manual_seed(0)
    return {"Pathway Gradient (p=90)": pg, "gradient": pick(grad), "gradient x input": pick(grad * x),
            "random": torch.rand(x.shape[0], *x.shape[2:], generator=gen)}


def lerf_morf(bundle: ModelBundle, x: torch.Tensor, out: Path) -> Section:
    with torch.no_grad():
        p0 = bundle.forward(x).softmax(1)
    target = p0.argmax(1)
    base = p0.gather(1, target[:, None]).squeeze(1)
    maps = _maps(bundle, x)
    curves: dict[str, dict[str, list[float]]] = {"LeRF": {}, "MoRF": {}}
    for name, m in maps.items():
        order = m.flatten(1).argsort(1)  # ascending signed relevance
        for mode in curves:
            vals = []
            for f in FRACTIONS:
                k = max(1, round(f * order.shape[1]))
                idx = order[:, :k] if mode == "LeRF" else order[:, -k:]
                xm = x.clone().flatten(2)
                xm.scatter_(2, idx[:, None, :].expand(-1, x.shape[1], -1), 0.0)
                with torch.no_grad():
                    p = bundle.forward(xm.view_as(x)).softmax(1).gather(1, target[:, None]).squeeze(1)
                vals.append(float(100 * ((base - p).abs() / base).mean()))
            curves[mode][name] = vals
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (mode, rows) in zip(axes, curves.items(), strict=True):
        for name, vals in rows.items():
            ax.plot([100 * f for f in FRACTIONS], vals, marker=".", label=name)
        ax.set_title(f"{mode}: remove {'least' if mode == 'LeRF' else 'most'} relevant pixels")
        ax.set_xlabel("% pixels removed (set to 0)")
        ax.set_ylabel("100·mean|p0 − p|/p0")
    axes[0].legend(fontsize=7)
    img = _savefig(fig, out, "khakzar-lerf-morf.png")
    lines = ["| method | LeRF 10% (lower is better) | MoRF 10% (higher is better) |", "|---|---|---|"]
    lines += [f"| {n} | {curves['LeRF'][n][-1]:.1f} | {curves['MoRF'][n][-1]:.1f} |" for n in maps]
    best_lerf = min(maps, key=lambda n: curves["LeRF"][n][-1])
    return Section("Khakzar et al.: LeRF / MoRF", "\n".join(lines) + f"\n\n![LeRF MoRF]({img})\n\n"
                   f"Pixels ranked by the signed map, as in the authors' RoarTorch code. Lowest LeRF change: "
                   f"{best_lerf}. The paper reports Pathway Gradient among the best on ROAR/LeRF for ImageNet "
                   "models; the numbers here are for a 32×32 digit CNN and can disagree.")


def cascading_randomisation(bundle: ModelBundle, x: torch.Tensor, out: Path) -> Section:
    original = {k: v.abs().flatten(1).numpy() for k, v in _maps(bundle, x).items() if k != "random"}
    model = bundle.model
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)][::-1]
    saved = copy.deepcopy(model.state_dict())
    results: dict[str, list[float]] = {k: [] for k in original}
    gen = torch.Generator().manual_seed(0)
    try:
        named = dict(model.named_modules())
        for name in layers:
            with torch.no_grad():
                for param in named[name].parameters():
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            maps = _maps(bundle, x)
            for k in original:
                now = maps[k].abs().flatten(1).detach().numpy()
                rho = [spearmanr(a, b).statistic for a, b in zip(original[k], now, strict=True)]
                results[k].append(float(np.nanmean(rho)))
    finally:
        model.load_state_dict(saved)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for k, vals in results.items():
        ax.plot(range(1, len(layers) + 1), vals, marker="o", label=k)
    ax.set_xticks(range(1, len(layers) + 1), layers, rotation=30, fontsize=7)
    ax.set_ylabel("Spearman |map| vs original")
    ax.set_title("randomised top → down (cumulative)")
    ax.legend(fontsize=7)
    img = _savefig(fig, out, "khakzar-sanity.png")
    lines = ["| method | after top layer | after all |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]:.3f} | {v[-1]:.3f} |" for k, v in results.items()]
    return Section("Khakzar et al.: cascading randomisation (sanity check)", "\n".join(lines) + (
        f"\n\n![sanity]({img})\n\nParameters re-drawn from N(0, 0.1) layer by layer from the output down. The "
        "authors' ResNet50 table (reference notes §2.3) has |Spearman| after the fc layer of 0.50 (MCT), 0.49 "
        "(gradient), 0.62 (grad×input), falling to 0.12/0.04/0.18 after all layers: maps that depend on the "
        "weights decorrelate. Same shape expected here: values fall as more layers are randomised."))


def lengerich(store: Store, model_id: str) -> Section:
    configs = {c.method: c.config for c in store.configs(model_id)}
    if "correlation" not in configs or "precision" not in configs:
        return Section("Lengerich et al.: correlation vs precision", "No correlation and precision pathways in the "
                       "store; extract with `--method correlation,precision`.")
    rows = store.layer_agreement(model_id, configs["correlation"], configs["precision"])
    lines = ["| layer | overlap (max 0.5) | Jaccard | images |", "|---|---|---|---|"]
    lines += [f"| {r.site} | {r.overlap:.3f} | {r.jaccard:.3f} | {r.images} |" for r in rows]
    mean = float(np.mean([r.overlap for r in rows]))
    return Section("Lengerich et al.: overlap of correlation- and precision-selected channels", "\n".join(lines) + (
        f"\n\nMean over layers: {mean:.3f}. The authors' plotting script holds a set similarity of 0.43 (mean of the "
        "last 10 training epochs, VGG16 on INRIA Person, top-5 per layer, 2 classes); ours is top-k per site on "
        "the 10-class demo CNN. " + ("This agrees with the paper's value within 0.1." if abs(mean - 0.43) < 0.1
                                     else f"This differs from the paper's value by {abs(mean - 0.43):.2f}.")))


def lyu_consistency(store: Store, model_id: str, out: Path) -> Section:
    configs = {c.method: c.config for c in store.configs(model_id)}
    if "pixel" not in configs:
        return Section("Lyu et al.: consistency", "No pixel pathways in the store; extract with `--method pixel`.")
    rows = store.class_consistency(model_id, configs["pixel"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r.site for r in rows], [r.within for r in rows], marker="o", label="within class")
    ax.plot([r.site for r in rows], [r.across for r in rows], marker="o", label="across classes")
    ax.set_ylabel("mean Jaccard of crossed maps")
    ax.legend()
    ax.tick_params(axis="x", labelsize=7)
    img = _savefig(fig, out, "lyu-consistency.png")
    lines = ["| layer | within | across | gap |", "|---|---|---|---|"]
    lines += [f"| {r.site} | {r.within:.3f} | {r.across:.3f} | {r.within - r.across:+.3f} |" for r in rows]
    gaps = [r.within - r.across for r in rows]
    strongest = rows[int(np.argmax(gaps))].site
    return Section("Lyu et al.: pathways are more consistent within a class", "\n".join(lines) + (
        f"\n\n![consistency]({img})\n\nMaps crossed by the pixels' top pathways (pixel method, originals). "
        f"Within-class > across-class in {sum(g > 0 for g in gaps)} of {len(gaps)} layers; largest gap at "
        f"{strongest}. The paper reports category consistency strongest in early layers."))


def lyu_counts(bundle: ModelBundle, x: torch.Tensor, y: torch.Tensor, out: Path) -> Section:
    px = PixelSettings(stride=4)
    seeds = list(range(len(x)))
    groups = {"original": x, "deformed": deform(x, 3.0, 4.0, seeds),
              "adversarial (PGD ε=0.1)": pgd(bundle.forward, x, y, 0.1, 10)}
    feats: dict[str, np.ndarray] = {}
    for name, xs in groups.items():
        rows = []
        for i in range(len(xs)):
            res = trace_pixels(bundle, xs[i:i + 1], px)
            per_layer = [len(set(res.chains[:, :, l].flatten().tolist())) for l in range(len(bundle.sites))]
            rows.append([*per_layer, res.chains.shape[0] * res.chains.shape[1]])
        feats[name] = np.asarray(rows, dtype=np.float64)
    lines = ["| comparison | CV AUC (5-fold, logistic regression on per-layer counts) |", "|---|---|"]
    for other in ("deformed", "adversarial (PGD ε=0.1)"):
        a, b = feats["original"], feats[other]
        data = np.vstack([a, b])
        labels = np.r_[np.zeros(len(a)), np.ones(len(b))]
        auc = cross_val_score(LogisticRegression(max_iter=2000), data, labels, cv=5, scoring="roc_auc").mean()
        lines.append(f"| original vs {other} | {auc:.3f} |")
    means = {k: v.mean(0) for k, v in feats.items()}
    lines += ["", "| group | " + " | ".join(s.site_id for s in bundle.sites) + " | pathways |",
              "|---|" + "---|" * (len(bundle.sites) + 1)]
    lines += [f"| {k} | " + " | ".join(f"{v:.1f}" for v in m) + " |" for k, m in means.items()]
    title = "Lyu et al.: pathway counts separate original, deformed and adversarial samples"
    return Section(title, "\n".join(lines) + (
        f"\n\n{len(x)} test digits and their variants; features: number of distinct maps crossed per layer and "
        "the total pathway count (pixels × chains). The paper states that total pathway counts discriminate "
        "original, deformed and target samples; an AUC near 0.5 would contradict that on this model. Caveat: "
        "only pixels with |value| > 0.001 are traced, and an L∞ attack lights up background pixels, which "
        "raises the adversarial pathway total by itself."))


def pixel_class_maps(bundle: ModelBundle, store: Store, model_id: str, x: torch.Tensor, out: Path) -> Section:
    mct = next(c.config for c in store.configs(model_id) if c.method == "mct")
    classes = store.classes(model_id)
    fig, axes = plt.subplots(1, len(x), figsize=(2.2 * len(x), 2.4))
    for ax, xi in zip(np.atleast_1d(axes), x, strict=True):
        res = trace_pixels(bundle, xi[None], PixelSettings(stride=1, top=1, beam=3))
        with torch.no_grad():
            pred = int(bundle.forward(xi[None]).argmax())
        used = {(n.layer_index, n.channel) for n in store.top_neurons(classes[pred].id, mct, limit=10_000)
                if n.support >= 0.5}
        score = torch.zeros(xi.shape[1:])
        for p, (_, i, j) in enumerate(res.pixels.tolist()):
            chain = res.chains[p, 0].tolist()
            score[i, j] = sum((l, k) in used for l, k in enumerate(chain)) / len(chain)
        ax.imshow(xi[0].numpy(), cmap="gray")
        ax.imshow(score.numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=1)
        ax.set_title(classes[pred].name, fontsize=8)
        ax.axis("off")
    img = _savefig(fig, out, "lyu-pixel-class.png")
    return Section("Lyu et al.: pixel-to-class maps", (
        f"![pixel to class]({img})\n\nPer pixel: share of its largest pathway's maps that the predicted class's "
        "contribution pathways use (support ≥ 0.5, mct). Bright pixels route their signal through the class's maps."))


def build_report(bundle: ModelBundle, x: torch.Tensor, y: torch.Tensor, store: Store, out: Path,
                 n_model: int = 64, n_pixel: int = 30) -> Path:
    """Write ``out/report.md`` with plots; ``x``/``y`` are labelled test images."""
    out.mkdir(parents=True, exist_ok=True)
    model_id = bundle.info.model_id
    xm = x[:n_model]
    sections = [
        logit_preservation(bundle, xm, out), lerf_morf(bundle, xm, out), cascading_randomisation(bundle, xm, out),
        lengerich(store, model_id), lyu_consistency(store, model_id, out),
        lyu_counts(bundle, x[:n_pixel], y[:n_pixel], out), pixel_class_maps(bundle, store, model_id, x[:5], out),
    ]
    text = [f"# Pathway Explorer: the seed papers' claims on `{model_id}`", "",
            "Generated by `pathx report` from the store and the demo model; every number below was measured in "
            "that run. Where a figure disagrees with a paper, it is reported as measured.", ""]
    for s in sections:
        text += [f"## {s.title}", "", s.body, ""]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path
