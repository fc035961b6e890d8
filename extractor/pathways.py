"""Contribution pathways and Pathway Gradient (Khakzar et al., CVPR 2021), with weighted edges.

Steps for a batch of images ``x`` ``[B, C, H, W]`` (pixel space):

1. *Contributions.* ``mct``: one forward and one backward of the unmasked network give, at
   every site, ``a * d(logit_t)/da`` (signed, element granularity ``[B, C, H, W]``), summed
   over space to channels ``[B, C]``. ``intgrad``: the layer-wise integrated variant: site
   ``l``'s output is scaled by ``alpha`` in ``[0, 1]`` (``m`` points, trapezoid rule; all
   ``alpha`` values run as one batch) and the averaged gradient multiplies the activation.
   (The authors' code accumulates alpha as 0, .1, .3, .6, ...; here it is linear.)
2. *Selection.* ``percentile``: one global percentile ``p`` over the |scores| of all
   neurons of all sites (elements or channels); the lowest ``floor(p% * N)`` are dropped,
   so ``p = 0`` keeps everything. ``topk``: the ``k`` channels of largest |contribution| per site.
3. *Pathway Gradient.* Site outputs are multiplied by the mask in the forward pass; the
   saliency is ``d(logit_t)/dx`` of that masked network (at ``p = 0`` the plain gradient).
4. *Edges* between kept channels of consecutive sites ``l -> l+1``:
   ``w(i -> j) = sum_p a_i(p) * dC_j/da_i(p)`` with ``C_j = sum_q a_j(q) g_j(q)`` and ``g_j``
   held fixed; one batched vector-Jacobian product (``is_grads_batched``) serves all
   targets ``j`` of all images at once. The completeness gap ``|sum_i w(i -> j) - C_j|``
   (over all ``i``) is ~0 for bias-free ReLU chains and measures skip paths and biases otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from extractor.errors import ExtractionError
from extractor.mixing import find_mixing, mixing_edge_weights
from extractor.models import ModelBundle
from extractor.sites import SiteHooks

log = logging.getLogger(__name__)

METHODS = ("mct", "intgrad", "correlation", "precision", "pixel")
RESAMPLING_METHODS = ("correlation", "precision")
SELECTIONS = ("topk", "percentile")
GRANULARITIES = ("element", "channel")
_EDGE_BUDGET = 48_000_000  # elements of cotangent per batched VJP chunk


@dataclass(frozen=True)
class PathwaySettings:
    """How a pathway is computed; ``params_json()`` is part of the pathway id."""

    method: str = "mct"
    selection: str = "topk"
    k: int = 8
    sparsity: float = 90.0
    granularity: str = "element"
    intgrad_steps: int = 11
    edge_targets: int = 16
    edges_per_target: int = 8
    resamples: int = 50
    noise: float = 0.1
    beam: int = 3
    top: int = 3
    stride: int = 2
    originals_only: bool = False
    variant_kinds: tuple[str, ...] = ()  # when given, variants of these kinds only (originals always)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ExtractionError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.selection not in SELECTIONS:
            raise ExtractionError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.granularity not in GRANULARITIES:
            raise ExtractionError(f"unknown granularity {self.granularity!r}; choose element or channel")
        if not (0.0 <= self.sparsity < 100.0) or math.isnan(self.sparsity):
            raise ExtractionError(f"sparsity must be in [0, 100); got {self.sparsity}")
        if self.k < 1:
            raise ExtractionError(f"k must be at least 1; got {self.k}")
        if self.intgrad_steps < 2:
            raise ExtractionError(f"intgrad steps must be at least 2; got {self.intgrad_steps}")
        if self.edge_targets < 1 or self.edges_per_target < 1:
            raise ExtractionError("edge targets and edges per target must be at least 1")
        if self.method in RESAMPLING_METHODS and self.selection != "topk":
            raise ExtractionError(f"method {self.method} selects the top-k channels per site; use --top-k")
        if self.method == "pixel" and not (1 <= self.top <= self.beam and self.stride >= 1):
            raise ExtractionError("pixel pathways need beam >= top >= 1 and stride >= 1")
        if self.resamples < 3 or not (0.0 < self.noise < 10.0):
            raise ExtractionError("resampling needs at least 3 copies and a noise std in (0, 10)")

    def params(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("method")
        data.pop("selection")
        scope: dict[str, object] = {"originals_only": True} if self.originals_only else {}
        if self.variant_kinds and not self.originals_only:
            scope["variant_kinds"] = sorted(self.variant_kinds)
        data.pop("originals_only")
        data.pop("variant_kinds")
        if self.method == "pixel":
            return {**{k: data[k] for k in ("beam", "top", "stride")}, **scope}
        if self.selection == "topk":
            data.pop("sparsity")
            data.pop("granularity")
        else:
            data.pop("k")
        for key in ("beam", "top", "stride"):
            data.pop(key)
        data.update(scope)
        if self.method != "intgrad":
            data.pop("intgrad_steps")
        if self.method not in RESAMPLING_METHODS:
            data.pop("resamples")
            data.pop("noise")
        return data

    def applies_to(self, kind: str) -> bool:
        """Whether this setting runs on images of ``kind`` ("original" or a variant kind)."""
        if kind == "original":
            return True
        return not self.originals_only and (not self.variant_kinds or kind in self.variant_kinds)

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)


@dataclass
class Contributions:
    """Per-site contributions of a batch.

    ``acts[l]`` and ``element[l]``: ``[B, C, H, W]`` or ``[B, C]`` (detached);
    ``grads[l]``: the gradient that multiplies the activation (plain or integrated);
    ``channel[l]``: ``[B, C]``; ``logits``: ``[B, K]``; ``target``: ``[B]``.
    """

    logits: torch.Tensor
    target: torch.Tensor
    acts: list[torch.Tensor]
    grads: list[torch.Tensor]
    element: list[torch.Tensor]
    channel: list[torch.Tensor]


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2).sum(-1) if t.dim() > 2 else t


def _pick_target(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    target = target.to(logits.device).long()
    if (target < 0).any() or (target >= logits.shape[1]).any():
        raise ExtractionError(f"target class out of range [0, {logits.shape[1]})")
    return target


def forward_with_sites(bundle: ModelBundle, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``[B, K]`` and site outputs (attached to the graph) of one unmasked forward."""
    with SiteHooks(bundle.model, bundle.sites) as hooks:
        rec = hooks.begin()
        logits = bundle.forward(x)
    missing = [s.site_id for s in bundle.sites if s.index not in rec.acts]
    if missing:
        raise ExtractionError(f"sites {missing[:3]} did not fire; the model's call graph depends on the input")
    return logits, [rec.acts[s.index] for s in bundle.sites]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (one min/max reduction: ~20x cheaper than ``isfinite(t).all()``)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _check_finite(name: str, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        if not all_finite(t):
            raise ExtractionError(f"{name} contain NaN or Inf; check the model and inputs")


def mct_contributions(
    bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[Contributions, list[torch.Tensor]]:
    """``a * dlogit/da`` at every site; also returns the attached site tensors (for edges)."""
    x = x.detach().requires_grad_(True)
    logits, acts = forward_with_sites(bundle, x)
    tgt = _pick_target(logits.detach(), target)
    selected = logits.gather(1, tgt[:, None]).sum()
    grads = torch.autograd.grad(selected, acts, retain_graph=True)
    det = [a.detach() for a in acts]
    _check_finite("activations", det)
    element = [a * g for a, g in zip(det, grads, strict=True)]
    contrib = Contributions(logits.detach(), tgt, det, [g.detach() for g in grads], element,
                            [_channel_sum(e) for e in element])
    return contrib, acts


def intgrad_contributions(
    bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor, steps: int, acts: list[torch.Tensor]
) -> Contributions:
    """Layer-wise integrated gradients (zero baseline) at every site, alpha on a trapezoid grid.

    ``acts`` are the clean site outputs (detached). For each site one forward/backward of a
    batch of ``steps * B`` images scales that site's output by ``alpha``.
    """
    B = x.shape[0]
    alphas = torch.linspace(0.0, 1.0, steps, dtype=x.dtype, device=x.device)
    weights = torch.full((steps,), 1.0 / (steps - 1), dtype=x.dtype, device=x.device)
    weights[0] = weights[-1] = 0.5 / (steps - 1)
    xs = x.detach().repeat(steps, 1, 1, 1)  # [steps * B, C, H, W], alpha-major
    tgt_rep = target.repeat(steps)
    grads: list[torch.Tensor] = []
    for site in bundle.sites:
        view = (-1,) + (1,) * (acts[site.index].dim() - 1)
        scale = alphas.repeat_interleave(B).view(view)

        def transform(idx: int, out: torch.Tensor, _s: int = site.index,
                      _scale: torch.Tensor = scale) -> torch.Tensor:
            return out * _scale if idx == _s else out

        with SiteHooks(bundle.model, bundle.sites, transform) as hooks:
            rec = hooks.begin()
            logits = bundle.forward(xs)
        scaled = rec.acts[site.index]
        g = torch.autograd.grad(logits.gather(1, tgt_rep[:, None]).sum(), scaled)[0]
        g = g.view(steps, B, *g.shape[1:])
        grads.append((g * weights.view((steps,) + (1,) * (g.dim() - 1))).sum(0).detach())
    element = [a * g for a, g in zip(acts, grads, strict=True)]
    with torch.no_grad():
        logits = bundle.forward(x)
    return Contributions(logits, target, acts, grads, element, [_channel_sum(e) for e in element])


@dataclass
class Selection:
    """Masks ``[B, C, H, W]``/``[B, C]`` per site (1 = in the pathway) and kept channels ``[B, C]``."""

    masks: list[torch.Tensor]
    kept: list[torch.Tensor]


def channel_mask(kept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Kept channels ``[B, C]`` (bool) as a mask shaped and typed like ``like`` ``[B, C, ...]``."""
    return kept.to(like.device).view(*kept.shape, *([1] * (like.dim() - 2))).expand_as(like).to(like.dtype)


def select(contrib: Contributions, settings: PathwaySettings) -> Selection:
    """Apply the selection rule to the contributions (scores are absolute values)."""
    element_scores = [e.abs() for e in contrib.element]
    if settings.selection == "topk":
        masks, kept = [], []
        for chan, e in zip(contrib.channel, contrib.element, strict=True):
            k = min(settings.k, chan.shape[1])
            idx = chan.abs().topk(k, dim=1).indices
            keep = torch.zeros_like(chan, dtype=torch.bool).scatter_(1, idx, True)
            kept.append(keep)
            masks.append(channel_mask(keep, e))
        return Selection(masks, kept)
    B = contrib.logits.shape[0]
    if settings.granularity == "element":
        flat = torch.cat([s.reshape(B, -1) for s in element_scores], dim=1)
    else:
        flat = torch.cat([c.abs() for c in contrib.channel], dim=1)
    n_drop = math.floor(settings.sparsity / 100.0 * flat.shape[1])
    if n_drop == 0:
        thr = torch.full((B, 1), -1.0, dtype=flat.dtype, device=flat.device)
    else:
        thr = flat.kthvalue(n_drop, dim=1, keepdim=True).values  # score <= thr is dropped
    masks, kept = [], []
    for scores, chan, e in zip(element_scores, contrib.channel, contrib.element, strict=True):
        view = (B,) + (1,) * (e.dim() - 1)
        if settings.granularity == "element":
            m = scores > thr.view(view)
            kept.append(m.flatten(2).any(-1) if m.dim() > 2 else m)
        else:
            keep = chan.abs() > thr.view(B, 1)
            kept.append(keep)
            m = channel_mask(keep, e)
        masks.append(m.to(e.dtype))
    return Selection(masks, kept)


def pathway_gradient(
    bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor, masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient ``[B, C, H, W]`` and target logits ``[B]`` of the masked network."""
    x = x.detach().requires_grad_(True)

    def transform(idx: int, out: torch.Tensor) -> torch.Tensor:
        return out * masks[idx]

    with SiteHooks(bundle.model, bundle.sites, transform) as hooks:
        hooks.begin()
        logits = bundle.forward(x)
    selected = logits.gather(1, target[:, None])
    grad = torch.autograd.grad(selected.sum(), x)[0]
    return grad.detach(), selected.detach().squeeze(1)


def saliency_map(grad: torch.Tensor) -> torch.Tensor:
    """Per pixel the channel value of largest magnitude (signed): ``[B, C, H, W] -> [B, H, W]``."""
    idx = grad.abs().argmax(1, keepdim=True)
    return grad.gather(1, idx).squeeze(1)


@dataclass
class Edges:
    """Edges of a batch, as flat arrays with the image index ``b`` of each edge, and gaps ``[B, S-1]``."""

    b: np.ndarray
    src_site: np.ndarray
    src_channel: np.ndarray
    dst_site: np.ndarray
    dst_channel: np.ndarray
    weight: np.ndarray
    gap: np.ndarray


def edge_weights_for_pair(
    a_src: torch.Tensor, a_dst: torch.Tensor, g_dst: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``w[b, m, i] = sum_p a_src[b, i, p] * dC_{targets[b, m]}/da_src[b, i, p]``.

    ``a_src`` ``[B, Ci, ...]`` and ``a_dst`` ``[B, Cj, ...]`` are attached site tensors,
    ``g_dst`` the fixed gradient at the destination, ``targets`` ``[B, M]`` channel indices
    (``-1`` = padding, weight 0). Batched VJPs over ``M``; returns ``[B, M, Ci]``.
    """
    B, M = targets.shape
    valid = targets >= 0
    onehot = torch.zeros((M, B, a_dst.shape[1]), dtype=a_dst.dtype, device=a_dst.device)
    onehot.scatter_(2, targets.clamp(min=0).T[..., None], valid.T[..., None].to(a_dst.dtype))
    spatial = (1,) * (a_dst.dim() - 2)
    chunk = max(1, _EDGE_BUDGET // max(1, a_dst.numel() + a_src.numel()))
    out: list[torch.Tensor] = []
    a_src_det = a_src.detach()
    for start in range(0, M, chunk):
        sel = onehot[start:start + chunk]
        cot = sel.view(*sel.shape, *spatial) * g_dst.unsqueeze(0)  # [m, B, Cj, ...]
        (grad,) = torch.autograd.grad(a_dst, a_src, grad_outputs=cot, is_grads_batched=True,
                                      retain_graph=True, allow_unused=True, materialize_grads=True)
        w = grad * a_src_det.unsqueeze(0)
        out.append(w.flatten(3).sum(-1) if w.dim() > 3 else w)
    return torch.cat(out, 0).permute(1, 0, 2)  # [B, M, Ci]


def _no_edges(gaps: torch.Tensor) -> Edges:
    z = [np.zeros(0, dtype=t) for t in (np.int64, np.int32, np.int32, np.int32, np.int32, np.float32)]
    return Edges(*z, gaps.numpy())


def compute_edges(
    contrib: Contributions, sel: Selection, attached: list[torch.Tensor], settings: PathwaySettings,
    fast: bool = True,
) -> Edges:
    """Weighted edges between kept channels of consecutive sites, and completeness gaps.

    With ``fast`` a segment whose only channel-mixing layer is one conv/linear gets its weights
    from that layer (:mod:`extractor.mixing`); other segments, or ``fast=False``, use batched VJPs.
    """
    B = contrib.logits.shape[0]
    n_pairs = max(0, len(attached) - 1)
    gaps = torch.zeros((B, n_pairs), dtype=torch.float32)
    if n_pairs == 0:
        return _no_edges(gaps)
    kept_counts = torch.stack([k.sum(1).max() for k in sel.kept[1:]]).tolist()  # one device sync
    parts: list[torch.Tensor] = []  # per pair [5, B * M * n_src]: b, src site, src ch, dst ch, ok
    weights: list[torch.Tensor] = []
    for l in range(n_pairs):
        kept_dst, kept_src = sel.kept[l + 1], sel.kept[l]
        chan_dst = contrib.channel[l + 1]
        score = chan_dst.abs().masked_fill(~kept_dst, -1.0)
        M = min(settings.edge_targets, int(kept_counts[l]) or 1)
        top = score.topk(M, dim=1)
        targets = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
        if not attached[l + 1].requires_grad or not attached[l].requires_grad:
            continue
        mix = find_mixing(attached[l], attached[l + 1], attached) if fast else None
        if mix is not None:
            W = mixing_edge_weights(mix, attached[l + 1], contrib.grads[l + 1], targets)  # [B, M, Ci]
        else:
            W = edge_weights_for_pair(attached[l], attached[l + 1], contrib.grads[l + 1], targets)
        W = W.detach()
        c_j = chan_dst.gather(1, targets.clamp(min=0))
        gaps[:, l] = (W.sum(-1) - c_j).abs().masked_fill(targets < 0, 0.0).max(1).values.cpu()
        Wk = W.masked_fill(~kept_src[:, None, :], 0.0)
        n_src = min(settings.edges_per_target, Wk.shape[2])
        top_src = Wk.abs().topk(n_src, dim=2)  # [B, M, n]
        ok = (top_src.values > 0) & (targets[..., None] >= 0)
        shape = top_src.indices.shape
        bb = torch.arange(B, device=W.device).view(B, 1, 1).expand(shape)
        parts.append(torch.stack([bb, torch.full_like(bb, l), top_src.indices,
                                  targets[..., None].expand(shape), ok.long()]).flatten(1))
        weights.append(Wk.gather(2, top_src.indices).flatten())
    if not parts:
        return _no_edges(gaps)
    rows = torch.cat(parts, 1).cpu().numpy()
    w = torch.cat(weights).cpu().numpy()
    keep = rows[4] == 1
    rows, w = rows[:, keep], w[keep]
    return Edges(rows[0].astype(np.int64), rows[1].astype(np.int32), rows[2].astype(np.int32),
                 (rows[1] + 1).astype(np.int32), rows[3].astype(np.int32), w.astype(np.float32), gaps.numpy())


@dataclass
class BatchPathways:
    """Everything the records need for a batch under one setting (tensors on CPU)."""

    settings: PathwaySettings
    contrib: Contributions
    sel: Selection
    edges: Edges
    saliency: torch.Tensor  # [B, H, W]
    logit_full: torch.Tensor  # [B]
    logit_masked: torch.Tensor  # [B]
    scores: list[torch.Tensor]  # resampling methods: per site [B, C] score of each channel; else empty
    extra: list[dict[str, object]]  # per image: method-specific figures


def extract_batch(
    bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings, target: torch.Tensor | None = None,
    seeds: list[int] | None = None, shared: dict[str, object] | None = None,
) -> BatchPathways:
    """Contributions, selection, edges and Pathway Gradient for images ``x`` ``[B, C, H, W]``.

    ``seeds`` (one per image) drive the resampling methods' noise; default 0. ``shared`` is a
    caller-owned dict for one batch ``x``: the correlation and precision methods put their
    common resampling scores there, so asking for both costs one set of 50 forward passes.
    """
    bundle.check_input(x)
    if settings.method == "pixel":
        from extractor.pixelpaths import pixel_batch

        return pixel_batch(bundle, x, settings, target)
    contrib, attached = mct_contributions(bundle, x, target)
    if settings.method == "intgrad":
        contrib = intgrad_contributions(bundle, x, contrib.target, settings.intgrad_steps, contrib.acts)
    _check_finite("contributions", contrib.element)
    extra: list[dict[str, object]] = [{} for _ in range(x.shape[0])]
    if settings.method in RESAMPLING_METHODS:
        from extractor.resampling import resampling_scores, set_overlap, topk_sets

        key = f"resampling:{settings.resamples}:{settings.noise}"
        rs = shared.get(key) if shared is not None else None
        if rs is None:
            rs = resampling_scores(bundle, x, contrib.target, seeds or [0] * x.shape[0], settings.resamples,
                                   settings.noise)
            if shared is not None:
                shared[key] = rs
        corr, prec = topk_sets(rs.correlation, settings.k), topk_sets(rs.precision, settings.k)
        paper, jac = set_overlap(corr, prec)
        for b in range(x.shape[0]):
            extra[b] = {"corr_prec_overlap": float(paper[b]), "corr_prec_jaccard": float(jac[b])}
        kept = corr if settings.method == "correlation" else prec
        scores = rs.correlation if settings.method == "correlation" else rs.precision
        masks = [channel_mask(k, e) for k, e in zip(kept, contrib.element, strict=True)]
        sel = Selection(masks, kept)
    else:
        sel = select(contrib, settings)
        scores = []  # the records score channels by |contribution within the mask|
    edges = compute_edges(contrib, sel, attached, settings)
    del attached
    grad, logit_masked = pathway_gradient(bundle, x, contrib.target, sel.masks)
    logit_full = contrib.logits.gather(1, contrib.target[:, None]).squeeze(1)
    return BatchPathways(settings, contrib, sel, edges, saliency_map(grad), logit_full, logit_masked, scores, extra)
