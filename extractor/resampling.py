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

import torch

from extractor.batch import BatchInputs, BatchPathways, ResamplingScores, finish_batch
from extractor.contributions import check_finite, mct_contributions
from extractor.models import ModelBundle
from extractor.reach import top_k_mask
from extractor.selection import Selection, channel_mask
from extractor.settings import PathwaySettings
from extractor.sites import Capture, SiteHooks

MIN_MEAN_ACTIVATION = 0.1
CHUNK_ELEMENTS = 1 << 25  # site activations of the copies held at once (float64: 256 MiB)


def perturbed_copies(x: torch.Tensor, n: int, sigma: float, seeds: list[int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, n, C, H, W]``: copy ``p`` is ``x * (1 + p * eps_p)``."""
    out = []
    for b, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn((n, *x.shape[1:]), generator=gen, dtype=torch.float64).to(x) * sigma
        scale = 1 + torch.arange(n, dtype=x.dtype, device=x.device).view(n, 1, 1, 1) * eps
        out.append(x[b].unsqueeze(0) * scale)
    return torch.stack(out)


def _image_scores(bundle: ModelBundle, copies: torch.Tensor, target: int) -> tuple[list[torch.Tensor], ...]:
    """Correlation and precision ``[C]`` per site for one image's copies ``[n, C, H, W]``.

    The copies run in chunks of at most ``CHUNK_ELEMENTS`` site activations, and only running sums stay
    (float64, shifted by the clean copy's values so that the one-pass variance does not cancel): a
    224-px network's 50 copies never sit in memory at once.
    """
    n = copies.shape[0]
    sums: list[list[torch.Tensor]] = []  # per site: sum d, sum d^2, sum d * dy, with d = a - a(copy 0)
    shift: list[torch.Tensor] = []
    sum_y = sum_yy = torch.zeros((), dtype=torch.float64)
    y0 = torch.zeros((), dtype=torch.float64)
    start, step = 0, 1  # copy 0 alone first: the shift, and the size of one copy's activations
    while start < n:
        chunk = copies[start:start + step]
        with torch.no_grad(), SiteHooks(bundle.model, Capture(bundle.sites)) as hooks:
            rec = hooks.begin()
            y = bundle.forward(chunk).softmax(1)[:, target].double()  # [m]
        acts = [rec.acts[site.index].detach().double().reshape(len(chunk), site.channels, -1)
                for site in bundle.sites]  # [m, C, P]
        if not shift:
            shift = [a[0] for a in acts]
            y0 = y[0]
            sums = [[torch.zeros_like(a[0]) for _ in range(3)] for a in acts]
            step = max(1, CHUNK_ELEMENTS // sum(a[0].numel() for a in acts))
        dy = y - y0
        sum_y, sum_yy = sum_y + dy.sum(), sum_yy + (dy * dy).sum()
        for a, a0, acc in zip(acts, shift, sums, strict=True):
            d = a - a0
            acc[0] += d.sum(0)
            acc[1] += (d * d).sum(0)
            acc[2] += (d * dy.view(-1, 1, 1)).sum(0)
        start += len(chunk)
    mean_y = sum_y / n
    std_y = (sum_yy / n - mean_y * mean_y).clamp_min(0).sqrt()
    corr, prec = [], []
    for a0, (s1, s2, sy) in zip(shift, sums, strict=True):
        mean_d = s1 / n
        var = (s2 / n - mean_d * mean_d).clamp_min(0)  # [C, P], population variance over the copies
        r = ((sy / n - mean_d * mean_y) / (var.sqrt() * std_y)).abs()
        # positions whose activation does not vary are left out; "does not vary" allows float32 noise, as
        # chunks of other batch sizes may take other kernels (a relative std below 1e-5)
        r = r.masked_fill(var <= (1e-10 * a0 * a0).clamp_min(1e-30), float("nan"))
        corr.append(torch.nan_to_num(r.nanmean(-1), nan=0.0))
        skipped = (a0 + mean_d).mean(-1) < MIN_MEAN_ACTIVATION
        prec.append((1.0 / var.mean(-1)).masked_fill(skipped, float("-inf")))
    return corr, prec


def resampling_scores(
    bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor, *, seeds: list[int], n: int = 50,
    sigma: float = 0.1,
) -> ResamplingScores:
    """Correlation and precision scores of every channel of every site, for each image (one at a time;
    statistics in float64: probabilities near 1 and tiny activation changes cancel badly in float32)."""
    per_image = [_image_scores(bundle, perturbed_copies(x[b:b + 1], n, sigma, [seed])[0], int(target[b]))
                 for b, seed in enumerate(seeds)]
    corr = [torch.stack([img[0][s] for img in per_image]).to(x.dtype) for s in range(len(bundle.sites))]
    prec = [torch.stack([img[1][s] for img in per_image]).to(x.dtype) for s in range(len(bundle.sites))]
    return ResamplingScores(corr, prec)


def set_overlap(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the paper's overlap sum|A∩B| / sum(|A|+|B|) (max 0.5) and the Jaccard index."""
    inter = torch.stack([(x & y).sum(1) for x, y in zip(a, b, strict=True)]).sum(0)
    sizes = torch.stack([x.sum(1) + y.sum(1) for x, y in zip(a, b, strict=True)]).sum(0)
    union = sizes - inter
    paper = inter / sizes.clamp_min(1)
    jac = inter / union.clamp_min(1)
    return paper.float(), jac.float()


def resampling_batch(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings,
                     inputs: BatchInputs) -> BatchPathways:
    """``correlation`` or ``precision`` pathways: the top-k channels per site by the method's score.

    Contributions (for the records and edges) are the usual ``a * dlogit/da``; ``inputs.resampling`` holds
    the resampling scores, so both methods on one batch cost one set of copies.
    """
    contrib = mct_contributions(bundle, x, inputs.target)
    check_finite("contributions", contrib.channel)
    key = (settings.resamples, settings.noise)
    rs = inputs.resampling.get(key)
    if rs is None:
        rs = resampling_scores(bundle, x, contrib.target, seeds=inputs.seeds or [0] * x.shape[0],
                               n=settings.resamples, sigma=settings.noise)
        inputs.resampling[key] = rs
    corr = [top_k_mask(s, settings.k) for s in rs.correlation]
    prec = [top_k_mask(s, settings.k) for s in rs.precision]
    paper, jac = set_overlap(corr, prec)
    extra: list[dict[str, object]] = [{"corr_prec_overlap": float(paper[b]), "corr_prec_jaccard": float(jac[b])}
                                      for b in range(x.shape[0])]
    kept = corr if settings.method == "correlation" else prec
    scores = rs.correlation if settings.method == "correlation" else rs.precision
    masks = [channel_mask(k, a) for k, a in zip(kept, contrib.acts, strict=True)]
    return finish_batch(bundle, x, settings=settings, contrib=contrib, sel=Selection(masks, kept),
                        scores=scores, extra=extra, keep_maps=inputs.keep_maps)
