"""Weighted edges along the site graph (Khakzar et al., step 4), and completeness gaps.

For a site ``j`` and each of its predecessor sites ``i`` (``SiteInfo.preds``: the sites ``j``
reads directly, see :mod:`extractor.sites`):
``w(i -> j) = sum_p a_i(p) * dC_j/da_i(p)`` with ``C_j = sum_q a_j(q) g_j(q)`` and ``g_j`` held
fixed. The derivative is partial: the other sites are held fixed. It is taken on a *cut*
forward, where every site's output reaches the rest of the network as a fresh leaf, so
``a_j`` depends on its predecessors' copies only, through the segments between them.

The completeness gap of site ``j`` is ``|sum over all predecessor channels w(i -> j) - C_j|``
(the largest over ``j``'s target channels). By Euler's identity it is exactly 0 on bias-free
ReLU networks, with branches, concatenations and dense blocks; it measures biases and inputs
that come from no site (the image) otherwise.

Routes: when every predecessor's segment into ``j`` has a shape :mod:`extractor.mixing` reads
off its mixing layer(s) (the fast path), each pair's weights come from there; otherwise all
predecessors of ``j`` share one batched vector-Jacobian product (``is_grads_batched``) for all
targets of all images (a fast pair beside a slow one would only add cost).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from extractor.contributions import Contributions
from extractor.mixing import find_mixing, mixing_edge_weights
from extractor.selection import Selection
from extractor.settings import PathwaySettings
from extractor.sites import SiteRecorder
from records import SiteInfo

log = logging.getLogger(__name__)

_EDGE_BUDGET = 48_000_000  # elements of cotangent per batched VJP chunk


@dataclass(kw_only=True)
class Edges:
    """Edges of a batch as flat arrays ``[E]`` with the image index ``b`` of each edge; ``gap``
    ``[B, S]``: per site the completeness gap of its incoming edges (NaN for a site without
    predecessors, or when the method has no such gap)."""

    b: np.ndarray
    src_site: np.ndarray
    src_channel: np.ndarray
    dst_site: np.ndarray
    dst_channel: np.ndarray
    weight: np.ndarray
    gap: np.ndarray


def edge_weights_vjp(
    sources: Sequence[torch.Tensor], a_dst: torch.Tensor, g_dst: torch.Tensor, targets: torch.Tensor
) -> list[torch.Tensor]:
    """``w[b, m, i] = sum_p src[b, i, p] * dC_{targets[b, m]}/dsrc[b, i, p]`` for every source.

    ``sources`` ``[B, Ci, ...]`` and ``a_dst`` ``[B, Cj, ...]`` are attached site tensors (``a_dst``
    reached from the sources), ``g_dst`` the fixed gradient at the destination, ``targets``
    ``[B, M]`` channel indices (``-1`` = padding, weight 0). Batched VJPs over ``M`` serve all
    sources at once; returns one ``[B, M, Ci]`` per source.
    """
    B, M = targets.shape
    valid = targets >= 0
    onehot = torch.zeros((M, B, a_dst.shape[1]), dtype=a_dst.dtype, device=a_dst.device)
    onehot.scatter_(2, targets.clamp(min=0).T[..., None], valid.T[..., None].to(a_dst.dtype))
    spatial = (1,) * (a_dst.dim() - 2)
    chunk = max(1, _EDGE_BUDGET // max(1, a_dst.numel() + sum(s.numel() for s in sources)))
    out: list[list[torch.Tensor]] = [[] for _ in sources]
    for start in range(0, M, chunk):
        sel = onehot[start:start + chunk]
        cot = sel.view(*sel.shape, *spatial) * g_dst.unsqueeze(0)  # [m, B, Cj, ...]
        grads = _batched_vjp(a_dst, list(sources), cot)
        for k, (grad, src) in enumerate(zip(grads, sources, strict=True)):
            w = grad * src.detach().unsqueeze(0)
            out[k].append(w.flatten(3).sum(-1) if w.dim() > 3 else w)
    return [torch.cat(parts, 0).permute(1, 0, 2) for parts in out]  # [B, M, Ci] each


def _batched_vjp(a_dst: torch.Tensor, sources: list[torch.Tensor], cot: torch.Tensor) -> list[torch.Tensor]:
    """``[m, *src.shape]`` per source; one VJP per cotangent where an op has no batching rule."""
    try:
        grads = torch.autograd.grad(a_dst, sources, grad_outputs=cot, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
    except RuntimeError as exc:  # e.g. an attention kernel without a vmap rule
        log.debug("batched VJP not available (%s); one VJP per target", exc)
        per = [torch.autograd.grad(a_dst, sources, grad_outputs=c, retain_graph=True, allow_unused=True,
                                   materialize_grads=True) for c in cot]
        return [torch.stack([p[k] for p in per]) for k in range(len(sources))]
    # an unreachable source comes back unbatched (zeros): give it the batch axis
    return [g if g.dim() == s.dim() + 1 else g.unsqueeze(0).expand(cot.shape[0], *g.shape)
            for g, s in zip(grads, sources, strict=True)]


def _no_edges(gaps: torch.Tensor) -> Edges:
    i32 = np.zeros(0, np.int32)
    return Edges(b=np.zeros(0, np.int64), src_site=i32, src_channel=i32, dst_site=i32, dst_channel=i32,
                 weight=np.zeros(0, np.float32), gap=gaps.numpy())


def compute_edges(
    sites: Sequence[SiteInfo], *, contrib: Contributions, sel: Selection, cut: SiteRecorder,
    settings: PathwaySettings, fast: bool = True,
) -> Edges:
    """Weighted edges into the kept channels of every site from its predecessors' kept channels.

    ``cut`` is a cut forward of the same batch (:func:`extractor.sitegraph.cut_forward`). For each
    site ``j``, the ``edge_targets`` kept channels of largest |contribution| are targets; each
    keeps its ``edges_per_target`` strongest incoming edges over all predecessors' kept channels.
    With ``fast`` a segment with one conv/linear as its only mixing layer is read off that layer.
    """
    B = contrib.logits.shape[0]
    gaps = torch.full((B, len(sites)), float("nan"), dtype=torch.float32)
    kept_counts = torch.stack([k.sum(1).max() for k in sel.kept]).tolist() if sites else []  # one device sync
    parts: list[torch.Tensor] = []  # per site [5, B * M * n]: b, src site, src ch, dst ch, ok
    weights: list[torch.Tensor] = []
    sources = list(cut.sources.values())
    for site in sites:
        j = site.index
        preds = [i for i in site.preds if i in cut.sources]
        a_dst = cut.acts.get(j)
        if not preds or a_dst is None or not a_dst.requires_grad:
            continue
        chan_dst = contrib.channel[j]
        score = chan_dst.abs().masked_fill(~sel.kept[j], -1.0)
        M = min(settings.edge_targets, int(kept_counts[j]) or 1)
        top = score.topk(M, dim=1)
        targets = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1))
        W: dict[int, torch.Tensor] = {}
        # one batched VJP serves every predecessor at once: the fast path pays only when it serves them all,
        # so the segments are checked until the first one it cannot read
        mixes = {}
        for i in preds if fast else ():
            mix = find_mixing(cut.sources[i], a_dst, sources)
            if mix is None:
                break
            mixes[i] = mix
        slow = [] if len(mixes) == len(preds) and fast else list(preds)
        if not slow:
            for i in preds:
                W[i] = mixing_edge_weights(mixes[i], cut.sources[i], a_dst, contrib.grads[j], targets)  # [B, M, Ci]
        if slow:
            for i, w in zip(slow, edge_weights_vjp([cut.sources[i] for i in slow], a_dst, contrib.grads[j], targets),
                            strict=True):
                W[i] = w
        order = list(preds)
        Wall = torch.cat([W[i].detach() for i in order], 2)  # [B, M, sum Ci]
        c_j = chan_dst.gather(1, targets.clamp(min=0))
        gaps[:, j] = (Wall.sum(-1) - c_j).abs().masked_fill(targets < 0, 0.0).max(1).values.cpu()
        kept_src = torch.cat([sel.kept[i] for i in order], 1)  # [B, sum Ci]
        Wk = Wall.masked_fill(~kept_src[:, None, :], 0.0)
        n_src = min(settings.edges_per_target, Wk.shape[2])
        top_src = Wk.abs().topk(n_src, dim=2)  # [B, M, n]
        ok = (top_src.values > 0) & (targets[..., None] >= 0)
        offsets = torch.tensor([0] + [sites[i].channels for i in order], device=Wk.device).cumsum(0)
        which = torch.searchsorted(offsets[1:], top_src.indices, right=True)  # position in order
        src_site = torch.tensor(order, device=Wk.device)[which]
        src_channel = top_src.indices - offsets[which]
        shape = top_src.indices.shape
        bb = torch.arange(B, device=Wk.device).view(B, 1, 1).expand(shape)
        parts.append(torch.stack([bb, src_site, src_channel, targets[..., None].expand(shape),
                                  torch.full_like(bb, j), ok.long()]).flatten(1))
        weights.append(Wk.gather(2, top_src.indices).flatten())
    if not parts:
        return _no_edges(gaps)
    rows = torch.cat(parts, 1).cpu().numpy()
    weight = torch.cat(weights).cpu().numpy()
    keep = rows[5] == 1
    rows, weight = rows[:, keep], weight[keep]
    return Edges(
        b=rows[0].astype(np.int64),
        src_site=rows[1].astype(np.int32),
        src_channel=rows[2].astype(np.int32),
        dst_site=rows[4].astype(np.int32),
        dst_channel=rows[3].astype(np.int32),
        weight=weight.astype(np.float32),
        gap=gaps.numpy(),
    )


def segment_routes(sites: Sequence[SiteInfo], cut: SiteRecorder) -> dict[tuple[int, int], bool]:
    """For every edge of the site graph ``(i, j)``, whether :func:`compute_edges` reads it off the
    mixing layer(s) (the fast path): only when every predecessor of ``j`` can be (else one
    batched VJP serves them all)."""
    sources = list(cut.sources.values())
    out: dict[tuple[int, int], bool] = {}
    for s in sites:
        preds = [i for i in s.preds if i in cut.sources and s.index in cut.acts]
        ok = all(find_mixing(cut.sources[i], cut.acts[s.index], sources) is not None for i in preds)
        out.update({(i, s.index): ok for i in preds})
    return out
