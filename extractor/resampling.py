"""Resampling-based neuron selection (Lengerich, Konam, Xing, Rosenthal, Veloso, 2017).

As in the authors' code: ``n`` (50) copies ``x_p = x * (1 + p * eps_p)``, ``eps_p ~ N(0, sigma)``
(0.1) i.i.d. per pixel, ``p = 0 .. n-1`` (copy 0 is the clean image, the noise grows linearly).
Per channel ``c`` of each site, over the copies:

- correlation(c) = mean over positions (h, w) of |Pearson(a_{c,h,w}(x_p), y_p)|, with ``y_p`` the
  softmax probability of the target class; positions with zero variance are left out (nanmean);
- precision(c) = 1 / mean over positions of Var_p(a_{c,h,w}(x_p)); channels whose mean activation
  is below 0.1 are skipped (score -inf, never selected).

The top ``k`` (5) channels per site by each score form the two selections; ``set_overlap`` is the
paper's measure sum|S1 ∩ S2| / sum(|S1| + |S2|) over layers (maximum 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from extractor.batch import BatchPathways, finish_batch
from extractor.contributions import check_finite, mct_contributions
from extractor.models import ModelBundle
from extractor.selection import Selection, channel_mask
from extractor.settings import PathwaySettings
from extractor.sites import SiteHooks

MIN_MEAN_ACTIVATION = 0.1


@dataclass
class ResamplingScores:
    """Per site: correlation and precision ``[B, C]`` (precision is -inf for skipped channels)."""

    correlation: list[torch.Tensor]
    precision: list[torch.Tensor]


def perturbed_copies(x: torch.Tensor, n: int, sigma: float, seeds: list[int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, n, C, H, W]``: copy ``p`` is ``x * (1 + p * eps_p)``."""
    out = []
    for b, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn((n, *x.shape[1:]), generator=gen, dtype=torch.float64).to(x) * sigma
        scale = 1 + torch.arange(n, dtype=x.dtype, device=x.device).view(n, 1, 1, 1) * eps
        out.append(x[b].unsqueeze(0) * scale)
    return torch.stack(out)


def resampling_scores(
    bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor, seeds: list[int], n: int = 50,
    sigma: float = 0.1,
) -> ResamplingScores:
    """Correlation and precision scores of every channel of every site, for each image."""
    B = x.shape[0]
    copies = perturbed_copies(x, n, sigma, seeds).reshape(B * n, *x.shape[1:])
    with torch.no_grad(), SiteHooks(bundle.model, bundle.sites) as hooks:
        rec = hooks.begin()
        probs = bundle.forward(copies).softmax(1)
    # statistics in float64: probabilities near 1 and tiny activation changes cancel badly in float32
    y = probs.view(B, n, -1).gather(2, target.view(B, 1, 1).expand(B, n, 1)).squeeze(2).double()  # [B, n]
    corr, prec = [], []
    for site in bundle.sites:
        a = rec.acts[site.index].detach().double().reshape(B, n, site.channels, -1)  # [B, n, C, P]
        ac = a - a.mean(1, keepdim=True)
        yc = (y - y.mean(1, keepdim=True)).view(B, n, 1, 1)
        cov = (ac * yc).mean(1)
        var = ac.pow(2).mean(1)  # [B, C, P], population variance over the copies
        std_a = var.sqrt()
        std_y = yc.pow(2).mean(1).sqrt()
        r = (cov / (std_a * std_y)).abs()  # nan where the activation does not vary
        corr.append(torch.nan_to_num(r.nanmean(-1), nan=0.0).to(x.dtype))
        p = 1.0 / var.mean(-1)  # [B, C]
        skipped = a.mean((1, 3)) < MIN_MEAN_ACTIVATION
        prec.append(p.masked_fill(skipped, float("-inf")).to(x.dtype))
    return ResamplingScores(corr, prec)


def topk_sets(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per site, a boolean ``[B, C]`` of the ``k`` best finite scores."""
    out = []
    for s in scores:
        kk = min(k, s.shape[1])
        top = s.topk(kk, dim=1)
        keep = torch.zeros_like(s, dtype=torch.bool).scatter_(1, top.indices, torch.isfinite(top.values))
        out.append(keep)
    return out


def set_overlap(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the paper's overlap sum|A∩B| / sum(|A|+|B|) (max 0.5) and the Jaccard index."""
    inter = torch.stack([(x & y).sum(1) for x, y in zip(a, b, strict=True)]).sum(0)
    sizes = torch.stack([x.sum(1) + y.sum(1) for x, y in zip(a, b, strict=True)]).sum(0)
    union = sizes - inter
    paper = inter / sizes.clamp_min(1)
    jac = inter / union.clamp_min(1)
    return paper.float(), jac.float()


def resampling_batch(
    bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings, target: torch.Tensor | None = None,
    seeds: list[int] | None = None, shared: dict[str, object] | None = None,
) -> BatchPathways:
    """``correlation`` or ``precision`` pathways: the top-k channels per site by the method's score.

    Contributions (for the records and edges) are the usual ``a * dlogit/da``; ``shared`` (one dict
    per batch) holds the resampling scores, so both methods on one batch cost one set of copies.
    """
    contrib, attached = mct_contributions(bundle, x, target)
    del attached
    check_finite("contributions", contrib.element)
    key = f"resampling:{settings.resamples}:{settings.noise}"
    rs = shared.get(key) if shared is not None else None
    if not isinstance(rs, ResamplingScores):
        rs = resampling_scores(bundle, x, contrib.target, seeds or [0] * x.shape[0], settings.resamples,
                               settings.noise)
        if shared is not None:
            shared[key] = rs
    corr, prec = topk_sets(rs.correlation, settings.k), topk_sets(rs.precision, settings.k)
    paper, jac = set_overlap(corr, prec)
    extra: list[dict[str, object]] = [{"corr_prec_overlap": float(paper[b]), "corr_prec_jaccard": float(jac[b])}
                                      for b in range(x.shape[0])]
    kept = corr if settings.method == "correlation" else prec
    scores = rs.correlation if settings.method == "correlation" else rs.precision
    masks = [channel_mask(k, e) for k, e in zip(kept, contrib.element, strict=True)]
    return finish_batch(bundle, x, settings, contrib, Selection(masks, kept), scores, extra)
