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

Routes (one per edge of the site graph; ``segment_routes`` lists them, ``ROUTES`` names them), all exact:

* ``mixing``: the segment's one mixing layer with per-channel ops after it; the weights are read off that
  layer after one plain VJP (:func:`extractor.mixing.find_mixing`).
* ``junction``: any other segment whose paths all pass the source's own first mixing layer. The
  targets' batched backward stops at that layer's output and is contracted there with the *kept*
  source channels' shares of it; the completeness gap takes one more contraction per target
  (:func:`extractor.mixing.find_junction`). Projection layers of a residual stream are never
  differentiated per target, and the cost grows with kept sources x targets. Where a mixing layer that several
  destinations share lies on every path back to the source (a stage's downsampling), the backward stops at that
  layer's output instead, and the source's shares are pushed forward to it once per batch (:mod:`extractor.funnels`).
* ``vjp``: a batched vector-Jacobian product (:func:`extractor.vjp.batched_vjp`) to the whole source tensor.

The junction and VJP edges of a destination share one batched backward, which starts at the input of the
destination's own mixing layer where only per-channel ops follow it (:class:`extractor.mixing.Entry`). Where that
layer is a 1x1 conv reading another conv through per-channel scales (a linear bottleneck), a source whose paths all
pass the other conv starts lower, at that conv's input, or at the squeeze-excite gate multiplying it
(:class:`extractor.mixing.DeepEntry`): the cotangents there come from the two convs' composite rows of the targets.
Routes depend on the architecture, not the pixels: a :class:`extractor.mixing.RouteCache` (one per model
bundle) keeps them from the first batch of each input shape, so later batches walk no autograd graph.
``compute_edges(fast=False)`` takes the ``vjp`` route everywhere: the reference the tests hold the others to.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.autograd.graph import GradientEdge

from extractor.contributions import Contributions
from extractor.funnels import funnel_at, funnel_passes, funnel_tangents, junction_stop, plan_funnels
from extractor.mixing import (
    DeepEntry,
    Entry,
    Junction,
    Mixing,
    Route,
    RouteCache,
    deep_at,
    entry_at,
    entry_cotangents,
    entry_input,
    find_entry_route,
    find_route,
    graph_walks,
    junction_at,
    junction_kept_shares,
    junction_parts,
    junction_share,
    junction_weights,
    mixing_at,
    mixing_edge_weights,
    mixing_input,
    pointwise_weights,
    with_deep_entry,
)
from extractor.reach import kept_rows
from extractor.selection import Selection
from extractor.settings import PathwaySettings
from extractor.sites import SiteRecorder
from extractor.vjp import batched_vjp, grad_numel
from records import SiteInfo

log = logging.getLogger(__name__)

_EDGE_BUDGET = 48_000_000  # elements of cotangent per batched VJP chunk
_PARTS_BUDGET = 8_000_000  # elements of junction parts kept across destinations (32 MB in float32)
# elements of the plain VJPs that a part's contributions backward takes along for its edges (64 MB in float32):
# beyond it a destination takes its own, so a batch of large maps (VGG) does not hold a second copy of them all
PLAIN_BUDGET = 16_000_000


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

    @staticmethod
    def concat(parts: Sequence[Edges], starts: Sequence[int]) -> Edges:
        """One batch's edges from the edges of its parts; ``starts[p]``: the first image of part ``p``."""
        return Edges(
            b=np.concatenate([e.b + start for e, start in zip(parts, starts, strict=True)]),
            src_site=np.concatenate([e.src_site for e in parts]),
            src_channel=np.concatenate([e.src_channel for e in parts]),
            dst_site=np.concatenate([e.dst_site for e in parts]),
            dst_channel=np.concatenate([e.dst_channel for e in parts]),
            weight=np.concatenate([e.weight for e in parts]),
            gap=np.concatenate([e.gap for e in parts]),
        )


def edge_weights_vjp(
    sources: Sequence[torch.Tensor], a_dst: torch.Tensor, g_dst: torch.Tensor, targets: torch.Tensor
) -> list[torch.Tensor]:
    """``w[b, m, i] = sum_p src[b, i, p] * dC_{targets[b, m]}/dsrc[b, i, p]`` for every source (the exact route).

    ``sources`` ``[B, Ci, ...]`` and ``a_dst`` ``[B, Cj, ...]`` are attached site tensors (``a_dst``
    reached from the sources), ``g_dst`` the fixed gradient at the destination, ``targets``
    ``[B, M]`` channel indices (``-1`` = padding, weight 0). Batched VJPs over ``M`` serve all
    sources at once; returns one ``[B, M, Ci]`` per source.
    """
    out: list[list[torch.Tensor]] = [[] for _ in sources]
    start = _dst_start(a_dst, g_dst, targets)
    for grads in _target_vjps(start, list(sources), targets.shape[1], sum(s.numel() for s in sources)):
        for k, (grad, src) in enumerate(zip(grads, sources, strict=True)):
            w = grad * src.detach().unsqueeze(0)
            out[k].append(w.flatten(3).sum(-1) if w.dim() > 3 else w)
    return [torch.cat(parts, 0).permute(1, 0, 2) for parts in out]  # [B, M, Ci] each


class _Start(NamedTuple):
    """Where a batched backward over targets starts (a tensor or an autograd edge), its size, and the
    cotangents there of targets ``start:end``: ``[end - start, *shape]``."""

    output: Any
    numel: int
    cotangents: Callable[[int, int], torch.Tensor]


def _dst_start(a_dst: torch.Tensor, g_dst: torch.Tensor, targets: torch.Tensor) -> _Start:
    """At the destination: target ``m``'s cotangent is ``g_dst`` restricted to channel ``targets[b, m]``."""
    B, M = targets.shape
    valid = targets >= 0
    onehot = torch.zeros((M, B, a_dst.shape[1]), dtype=a_dst.dtype, device=a_dst.device)
    onehot.scatter_(2, targets.clamp(min=0).T[..., None], valid.T[..., None].to(a_dst.dtype))
    spatial = (1,) * (a_dst.dim() - 2)
    return _Start(a_dst, a_dst.numel(),
                  lambda s, e: onehot[s:e].view(e - s, B, a_dst.shape[1], *spatial) * g_dst.unsqueeze(0))


def _entry_start(entry: Entry, gbar: torch.Tensor, targets: torch.Tensor) -> _Start:
    """At the input of the destination's own mixing layer (:class:`extractor.mixing.Entry`); ``gbar`` the gradient at
    its output."""
    edge = entry_input(entry)
    return _Start(edge, grad_numel(edge), lambda s, e: entry_cotangents(entry, gbar, targets[:, s:e]))


def _deep_start(deep: DeepEntry, gbar: torch.Tensor, targets: torch.Tensor) -> _Start:
    """Below the destination's two convs (:class:`extractor.mixing.DeepEntry`)."""
    edge = deep.edge()
    return _Start(edge, grad_numel(edge), lambda s, e: deep.cotangents(gbar, targets[:, s:e]))


def _target_vjps(start: _Start, inputs: list[Any], count: int, input_numel: int) -> Iterator[list[torch.Tensor]]:
    """Per chunk of the ``count`` targets, ``[m, *input.shape]`` per input (tensors or autograd edges): the
    gradient of each target's ``C_j``. Chunks hold ``_EDGE_BUDGET`` elements of cotangent and gradients; after the
    first, inputs whose gradients share storage count once (the junctions along one residual stream all receive the
    stream's gradient: counted apart, ConvNeXt-T at 16 images ran its later destinations one target at a time)."""
    chunk = max(1, _EDGE_BUDGET // max(1, start.numel + input_numel))
    s = 0
    while s < count:
        e = min(count, s + chunk)
        grads = batched_vjp(start.output, inputs, start.cotangents(s, e))
        if s == 0 and e < count:
            held = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() // g.element_size() for g in grads}
            chunk = max(chunk, _EDGE_BUDGET // max(1, start.numel + sum(held.values()) // (e - s)))
        yield grads
        s = e


def _vjp_route(preds: list[int], *, cut: SiteRecorder, a_dst: torch.Tensor, g_dst: torch.Tensor,
               targets: torch.Tensor, kept: Sequence[torch.Tensor], junctions: dict[int, Junction],
               shared: dict[tuple[Any, ...], torch.Tensor], entry: Entry | None, deep: dict[int, DeepEntry],
               funnels: dict[int, Any] | None = None) \
        -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], set[int]]:
    """Edge weights ``[B, M, Ci]`` (kept source channels only where a junction serves), each source's
    summed weight over all its channels ``[B, M]``, and the sources contracted at a funnel, from one batched VJP
    per chunk of targets: to the
    junction of every source that has one (:func:`extractor.mixing.find_junction`), else to the source.
    ``shared`` caches each junction's share of its layer's output, and its kept channels' parts of it, across the
    destinations it serves. With
    ``entry`` the backward starts at the destination's own mixing layer's input; a source in ``deep`` starts
    at the input of the first of its two convs there; a junction source in ``funnels`` (its funnel layer,
    :mod:`extractor.funnels`) is contracted at that layer's output with its tangents there."""
    gbar = None
    funnels = funnels or {}
    if entry is not None:
        (gbar,) = torch.autograd.grad(a_dst, GradientEdge(entry.node, 0), grad_outputs=g_dst, retain_graph=True)
    rows = {i: kept_rows(kept[i]) for i in junctions}  # [B, n] kept channels and their validity
    weights: dict[int, list[torch.Tensor]] = {i: [] for i in preds}
    totals: dict[int, list[torch.Tensor]] = {i: [] for i in preds}
    by_start: dict[Any, list[int]] = {}
    funnelled: set[int] = set()
    for i in preds:
        by_start.setdefault(deep[i].edge() if i in deep else None, []).append(i)
    for first, group in by_start.items():
        edges: list[Any] = []
        slot: dict[int, int] = {}  # pred -> index into the VJP's inputs
        by_node: dict[Any, int] = {}
        layers: set[Any] = set()
        shares: dict[int, torch.Tensor] = {}
        probed: dict[int, torch.Tensor] = {}  # funnel sources: their tangents at the funnel's output
        for i in group:
            jn = junctions.get(i)
            if jn is None:
                slot[i] = len(edges)
                edges.append(cut.sources[i])
                continue
            key = (jn.node, i, jn.rise)
            if key not in shared:
                shared[key] = junction_share(jn, cut.sources[i])
            shares[i] = shared[key]
            stop = junction_stop(jn)
            probe = _probe(funnels[i], jn, shares[i], rows[i][0], shared) if i in funnels else None
            if probe is not None:
                probed[i] = probe
                funnelled.add(i)
                stop = funnels[i]
            layers.add(jn.node)
            if stop not in by_node:  # sources concatenated before one layer share its output
                by_node[stop] = len(edges)
                edges.append(GradientEdge(stop, 0))
            slot[i] = by_node[stop]
        numel = sum(grad_numel(e) for e in edges)
        if first is not None and gbar is not None:
            start = _deep_start(deep[group[0]], gbar, targets)
        elif entry is not None and gbar is not None and entry.node not in layers:
            start = _entry_start(entry, gbar, targets)
        else:  # no entry, or a source's junction is the destination's own layer: start above it
            start = _dst_start(a_dst, g_dst, targets)
        stacked: dict[tuple[int, ...], torch.Tensor] = {}  # the shares of sources that receive one gradient
        for grads in _target_vjps(start, edges, targets.shape[1], numel):
            streams: dict[tuple[Any, ...], list[int]] = {}  # junction sources by the gradient they receive
            by_funnel: dict[Any, list[int]] = {}
            for i in group:
                g, src = grads[slot[i]], cut.sources[i]
                if i in probed:
                    by_funnel.setdefault(funnels[i], []).append(i)
                elif i in junctions:
                    if g.shape[1:] == shares[i].shape and g[0].stride() != shares[i].stride():
                        # the share takes the gradient's layout once (kept for the destinations after this one)
                        shares[i] = shared[(junctions[i].node, i, junctions[i].rise)] = \
                            torch.empty_like(g[0]).copy_(shares[i])
                    streams.setdefault((g.data_ptr(), tuple(g.shape), g.stride()), []).append(i)
                else:
                    B, C = src.shape[:2]  # one contraction, no [m, B, Ci, ...] product in memory
                    w = torch.einsum("mbcp,bcp->bmc", g.reshape(g.shape[0], B, C, -1),
                                     src.detach().reshape(B, C, -1))
                    weights[i].append(w)
                    totals[i].append(w.sum(-1))
            for f, members in by_funnel.items():
                g, images = grads[slot[members[0]]], cut.sources[members[0]].shape[0]
                together = ("stacked", f, *members, *_memory_order(g[0]))  # kept for the destinations after this
                if together not in shared:  # every tangent of these sources, in the gradient's memory order
                    shared[together] = _stacked_shares([t for i in members for t in probed[i]], g, images)
                    _keep_as_views(shared, shared[together], members, probed, junctions, f, _memory_order(g[0]))
                dots = _dot_stacked(g, shared[together], images)  # [B, M, sum (n + 1)]
                for i, d in zip(members, dots.split([probed[i].shape[0] for i in members], 2), strict=True):
                    weights[i].append(d[..., :-1])
                    totals[i].append(d[..., -1])
            for members in streams.values():
                g, images = grads[slot[members[0]]], cut.sources[members[0]].shape[0]
                _stream_weights(members, g, junctions=junctions, cut=cut, rows=rows, shared=shared, weights=weights)
                if len(members) == 1 or any(shares[i].shape != g.shape[1:] for i in members):
                    for i in members:
                        totals[i].append(_dot_rows(g, shares[i], images))
                    continue
                together = tuple(members)
                if together not in stacked:
                    stacked[together] = _stacked_shares([shares[i] for i in members], g, images)
                dots = _dot_stacked(g, stacked[together], images)  # [B, M, S]
                for k, i in enumerate(members):
                    totals[i].append(dots[..., k])
    W: dict[int, torch.Tensor] = {}
    for i in preds:
        w = torch.cat(weights[i], 1)
        if i in junctions:
            idx, ok = rows[i]
            full = w.new_zeros(w.shape[0], w.shape[1], cut.sources[i].shape[1])
            w = full.scatter_add_(2, idx[:, None, :].expand_as(w), w * ok[:, None, :].to(w.dtype))
        W[i] = w
    return W, {i: torch.cat(totals[i], 1) for i in preds}, funnelled


def _probe(funnel: Any, jn: Junction, share: torch.Tensor, idx: torch.Tensor,
           shared: dict[tuple[Any, ...], Any]) -> torch.Tensor | None:
    """``[n + 1, *F.shape]``: a junction source's kept channels' shares and its whole share (last) carried to the
    output of its funnel layer (:func:`extractor.funnels.funnel_tangents`), once per batch; ``None`` where the
    junction's parts cannot be made or the segment up to its funnel holds an op without a forward rule (the backward
    then goes on to the junction, as without a funnel)."""
    known: dict[Any, torch.Tensor | None] = shared.setdefault(("funnel", jn.node, jn.rise), {})
    if funnel in known:
        return known[funnel]
    below = {node: t for node, t in known.items() if t is not None}  # tangents at funnels below this one
    stop = junction_stop(jn)
    from_stop = not below or funnel_passes(funnel, stop, set(below))  # the push starts at the source's shares
    n = idx.shape[1]
    # a few tangents at a time: the push's intermediates (and the shares, made when needed and not kept) are the
    # size of a stage's maps per tangent
    chunk = max(1, _PARTS_BUDGET // max(1, share.numel()))
    out: list[torch.Tensor] = []
    for s in range(0, n + 1, chunk):
        e = min(n + 1, s + chunk)
        given = {node: t[s:e] for node, t in below.items()}
        if from_stop:
            rows = [share[None]] if e > n else []
            if min(e, n) > s:
                parts = junction_kept_shares(jn, idx[:, s:min(e, n)])
                if parts is None or parts.shape[1:] != share.shape:
                    known[funnel] = None
                    return None
                rows.insert(0, parts)
            given[stop] = rows[0] if len(rows) == 1 else torch.cat(rows)
        pushed = funnel_tangents(funnel, given)
        if pushed is None:
            known[funnel] = None
            return None
        out.append(pushed)
    known[funnel] = out[0] if len(out) == 1 else torch.cat(out)
    return known[funnel]


def _keep_as_views(shared: dict[tuple[Any, ...], Any], stacked: torch.Tensor, members: list[int],
                   probed: dict[int, torch.Tensor], junctions: dict[int, Junction], funnel: Any,
                   order: list[int]) -> None:
    """Keep each member's tangents at ``funnel`` (:func:`_probe`'s cache) as views into their ``stacked`` copy
    ``[B, sum P, N]`` (:func:`_stacked_shares`, in memory order ``order``), so that the tangents are held once."""
    B, at = stacked.shape[0], 0
    for i in members:
        t = probed[i]
        P, dims = t.shape[0], tuple(t.shape[2:])
        if t.shape[1] != B:  # rows of all images' positions (a linear layer's [B * P, C]): kept as they are
            at += P
            continue
        block = stacked[:, at:at + P].view(B, P, *(dims[d - 1] for d in order))  # [B, P, dims in memory order]
        back = [1, 0] + [2 + order.index(d) for d in range(1, len(dims) + 1)]
        view = block.permute(*back)
        if tuple(view.shape) == tuple(t.shape):
            jn = junctions[i]
            shared[("funnel", jn.node, jn.rise)][funnel] = probed[i] = view
        at += P


def _stream_weights(members: list[int], g: torch.Tensor, *, junctions: dict[int, Junction], cut: SiteRecorder,
                    rows: dict[int, tuple[torch.Tensor, torch.Tensor]], shared: dict[tuple[Any, ...], torch.Tensor],
                    weights: dict[int, list[torch.Tensor]]) -> None:
    """Append to ``weights`` the junction weights of ``members``, sources that receive one gradient ``g``: the
    pointwise junctions among them (the same layout of their top) in one product per image, the others each."""
    by_layout: dict[bool, list[int]] = {}
    for i in members:
        jn = junctions[i]
        if jn.kind == "pointwise":
            by_layout.setdefault(jn.top is not None and jn.moved, []).append(i)
        else:
            weights[i].append(junction_weights(jn, cut.sources[i], g, rows[i][0],
                                               parts=_parts(shared, jn, i, rows[i][0])))
    for same in by_layout.values():
        for i, w in zip(same, pointwise_weights([(junctions[i], cut.sources[i], rows[i][0]) for i in same], g),
                        strict=True):
            weights[i].append(w)


def _memory_order(share: torch.Tensor) -> list[int]:
    """The dimensions after the first (images) of ``share``, outermost in memory first."""
    strides = share.stride()
    return sorted(range(1, share.dim()), key=lambda d: -strides[d])


def _stacked_shares(shares: list[torch.Tensor], g: torch.Tensor, images: int) -> torch.Tensor:
    """``[B, S, N]``: the shares of ``S`` sources that receive one gradient ``g`` ``[M, *share.shape]`` (``images``
    first in each share), each image's flattened in ``g``'s memory order (:func:`_dot_stacked`)."""
    order = _memory_order(g[0])
    return torch.stack([s.permute(0, *order).reshape(images, -1) for s in shares], 1)


def _dot_stacked(g: torch.Tensor, stacked: torch.Tensor, images: int) -> torch.Tensor:
    """``[B, M, S]``: each image's ``<g[m], share_s>`` for the shares of :func:`_stacked_shares`, reading ``g`` once
    (a product per image); read once per source, the stream's gradient was the largest cost of the totals."""
    rows = g.permute(0, 1, *(d + 1 for d in _memory_order(g[0]))).reshape(g.shape[0], images, -1)  # a view if dense
    # against [S, N] transposed: 6x faster than against [N, S] rows (2 threads, ConvNeXt-T's first stage)
    return torch.stack([rows[:, b] @ stacked[b].T for b in range(images)], 0)


def _dot_rows(g: torch.Tensor, share: torch.Tensor, images: int) -> torch.Tensor:
    """``[images, M]``: each image's ``<g[m], share>`` for ``g`` ``[M, *share.shape]`` (``images`` first in ``share``),
    read in ``g``'s memory order where ``share`` has its strides (a stream's gradient often arrives channels-last:
    reshaping it would copy all ``M`` of them)."""
    M = g.shape[0]
    if g.shape[1] == images and g.dim() > 3 and not g.is_contiguous() and g[0].stride() == share.stride():
        order = _memory_order(share)
        g, share = g.permute(0, 1, *(d + 1 for d in order)), share.permute(0, *order)
    return torch.einsum("mbn,bn->bm", g.reshape(M, images, -1), share.reshape(images, -1))


def _parts(shared: dict[tuple[Any, ...], torch.Tensor], jn: Junction, i: int, idx: torch.Tensor) \
        -> torch.Tensor | None:
    """A conv junction's kept channels' parts of its output (:func:`extractor.mixing.junction_parts`), made once for
    all the destinations the junction serves; ``None`` where they would be large, or all the parts kept would
    exceed ``_PARTS_BUDGET`` elements (made per destination then)."""
    key = (jn.node, i, "parts")
    if key not in shared:
        made = junction_parts(jn, idx)
        kept = sum(t.numel() for k, t in shared.items() if k[-1] == "parts")
        if made is None or kept + made.numel() > _PARTS_BUDGET:
            return made
        shared[key] = made
    return shared[key]


def _no_edges(gaps: np.ndarray) -> Edges:
    i32 = np.zeros(0, np.int32)
    return Edges(b=np.zeros(0, np.int64), src_site=i32, src_channel=i32, dst_site=i32, dst_channel=i32,
                 weight=np.zeros(0, np.float32), gap=gaps)


@dataclass(kw_only=True)
class PlainVJP:
    """The mixing sources of one destination (``mixes``: source site -> its layer in this batch's graph) and the
    plain VJP of ``C_j`` at their layers' outputs (or at the sources), keyed as :func:`_plain_inputs` keys them."""

    mixes: dict[int, Mixing]
    grads: dict[Any, torch.Tensor]


def _plain_inputs(mixes: dict[int, Mixing], cut: SiteRecorder) -> dict[Any, Any]:
    """What the one plain VJP of a destination's mixing sources differentiates, once per layer."""
    ins: dict[Any, Any] = {}
    for i, mix in mixes.items():
        at = mixing_input(mix, cut.sources[i])
        ins.setdefault(at.node if isinstance(at, GradientEdge) else at, at)
    return ins


def plain_vjp_inputs(j: int, preds: Sequence[int], *, cut: SiteRecorder, known: dict[tuple[int, int], Route]
                     ) -> tuple[dict[int, Mixing], dict[Any, Any]] | None:
    """For destination ``j`` whose routes are known already (a later batch of an input shape): its mixing
    sources' layers in this batch's graph and the inputs of their one plain VJP, so that a caller's backward
    through ``j``'s segment can take them along (:func:`extractor.batch.selected_with_edges`); ``None`` before."""
    if any((i, j) not in known for i in preds):
        return None
    sources = list(cut.sources.values())
    mixes = {i: mix for i in preds if known[(i, j)].kind == "mixing"
             and (mix := mixing_at(known[(i, j)], cut.sources[i], cut.acts[j], sources)) is not None}
    return mixes, _plain_inputs(mixes, cut)


def known_routes(routes: RouteCache | None, settings: PathwaySettings, cut: SiteRecorder
                 ) -> dict[tuple[int, int], Route]:
    """The routes found so far for this edge mode and this batch's input shape (filled in as found)."""
    return routes.by_shape.setdefault(_route_key(settings, cut), {}) if routes is not None else {}


def _route(known: dict[tuple[int, int], Route], i: int, j: int, cut: SiteRecorder, sources: list[torch.Tensor]
           ) -> Route:
    """The route of edge ``(i, j)``: cached, or found now and cached."""
    route = known.get((i, j))
    if route is None:
        route = known[(i, j)] = find_route(cut.sources[i], cut.acts[j], sources)
    return route


def _route_key(settings: PathwaySettings, cut: SiteRecorder) -> tuple[object, ...]:
    """The route cache's key: the edge mode and the input shape, read off the first site's activation."""
    some = next(iter(cut.acts.values()), None)
    return (settings.edges, tuple(some.shape), some.dtype, some.device) if some is not None else (settings.edges,)


@dataclass(kw_only=True)
class IncomingWeights:
    """Edge weights into one site's targets, per predecessor ``i``: ``weights[i]`` ``[B, M, Ci]`` (zero outside
    the kept channels where a junction served), ``totals[i]`` ``[B, M]`` the sum over all of ``i``'s channels
    (for the completeness gap), ``routes[i]``, the route taken (one of ``ROUTES``), ``deep``, the sources
    whose batched backward started below the destination's two convs (:class:`extractor.mixing.DeepEntry`), and
    ``risen``, the junction sources whose backward stopped above their layer (``Junction.top``), and
    ``funnelled``, those whose backward stopped at a funnel layer after it (:mod:`extractor.funnels`)."""

    weights: dict[int, torch.Tensor]
    totals: dict[int, torch.Tensor]
    routes: dict[int, str]
    deep: frozenset[int] = frozenset()
    risen: frozenset[int] = frozenset()  # the junction sources whose backward stopped above their layer
    funnelled: frozenset[int] = frozenset()  # the junction sources contracted at a funnel (extractor.funnels)


def incoming_weights(
    j: int, preds: Sequence[int], *, cut: SiteRecorder, g_dst: torch.Tensor, targets: torch.Tensor,
    kept: Sequence[torch.Tensor], fast: bool = True, known: dict[tuple[int, int], Route] | None = None,
    shared: dict[tuple[Any, ...], torch.Tensor] | None = None, given: PlainVJP | None = None,
) -> IncomingWeights:
    """Weights of the edges into site ``j``'s ``targets`` ``[B, M]`` (``-1`` = none) from its ``preds``.

    A segment with one mixing layer and per-channel ops after it is read off that layer from one plain
    VJP; the others share one batched VJP over the targets, from the destination's entry layer down to each
    source's junction (or the source). Without ``fast`` every edge takes the exact reference route.
    ``known`` holds routes already found (filled in as found); ``shared`` caches junction shares and parts;
    ``given``: the mixing sources' plain VJP, taken by the caller (:func:`plain_vjp_inputs`).
    """
    known = {} if known is None else known
    shared = {} if shared is None else shared
    a_dst = cut.acts[j]
    sources = list(cut.sources.values())
    mixes: dict[int, Mixing] = {}
    junctions: dict[int, Junction] = {}
    deep: dict[int, DeepEntry] = {}
    for i in preds if fast else ():
        edge_route = _route(known, i, j, cut, sources)
        if edge_route.kind == "mixing" and given is not None:
            if i in given.mixes:
                mixes[i] = given.mixes[i]
        elif edge_route.kind == "mixing" and (mix := mixing_at(edge_route, cut.sources[i], a_dst, sources)) is not None:
            mixes[i] = mix
        elif edge_route.kind == "junction" and (jn := junction_at(edge_route, a_dst, shared)) is not None:
            junctions[i] = jn
    slow = [i for i in preds if i not in mixes]
    funnels = {i: f for i in junctions if (f := funnel_at(known[(i, j)], a_dst)) is not None}
    entry = None
    if fast and slow:  # the key (j, j) holds the destination's own entry layer for the slow sources' paths
        route = known.get((j, j))
        if route is None or route.over != tuple(slow):
            route = known[(j, j)] = find_entry_route(a_dst, g_dst, {i: cut.sources[i] for i in slow})
            found = entry_at(route, a_dst)
            for i in slow:
                if found is not None and known[(i, j)].kind != "mixing":  # (not a mixing route failed on this batch)
                    known[(i, j)] = with_deep_entry(known[(i, j)], cut.sources[i], a_dst, sources, found)
        entry = entry_at(route, a_dst)
        deep = {i: two for i in slow
                if known[(i, j)].kind != "mixing" and (two := deep_at(known[(i, j)], entry)) is not None}
    # one plain backward serves every mixing source (each its own layer's output, or itself)
    if given is not None:
        plain = given.grads
    else:
        ins = _plain_inputs(mixes, cut)
        plain = dict(zip(ins, torch.autograd.grad(a_dst, list(ins.values()), grad_outputs=g_dst, retain_graph=True,
                                                  allow_unused=True, materialize_grads=True),
                         strict=True)) if ins else {}
    layers = Counter(mix.node for mix in mixes.values() if mix.kind == "conv")
    whole: dict[Any, torch.Tensor] = {}  # a conv that reads several sources (a concatenation): its products once
    W = {i: mixing_edge_weights(mix, cut.sources[i], a_dst, g_dst, targets,
                                grad=plain[mix.node if mix.kind != "identity" else cut.sources[i]],
                                whole=whole if layers[mix.node] > 1 else None)
         for i, mix in mixes.items()}
    totals = {i: w.sum(-1) for i, w in W.items()}
    if slow:
        w_slow, t_slow, funnelled = _vjp_route(
            slow, cut=cut, a_dst=a_dst, g_dst=g_dst, targets=targets, kept=kept, junctions=junctions, shared=shared,
            entry=entry, deep=deep, funnels={i: f for i, f in funnels.items() if i not in deep})
        W.update(w_slow)
        totals.update(t_slow)
    else:
        funnelled = set()
    routes = {i: "mixing" if i in mixes else "junction" if i in junctions else "vjp" for i in preds}
    return IncomingWeights(weights=W, totals=totals, routes=routes, deep=frozenset(deep),
                           risen=frozenset(i for i, jn in junctions.items() if jn.top is not None),
                           funnelled=frozenset(funnelled))


@graph_walks()
def compute_edges(
    sites: Sequence[SiteInfo], *, contrib: Contributions, sel: Selection, cut: SiteRecorder,
    settings: PathwaySettings, fast: bool = True, routes: RouteCache | None = None,
    plain: dict[int, PlainVJP] | None = None,
) -> Edges:
    """Weighted edges into the kept channels of every site from its predecessors' kept channels.

    ``cut`` is a cut forward of the same batch (:func:`extractor.sitegraph.cut_forward`). For each
    site ``j``, the ``edge_targets`` kept channels of largest |contribution| are targets; each
    keeps its ``edges_per_target`` strongest incoming edges over all predecessors' kept channels.
    With ``fast`` a segment with one conv/linear as its only mixing layer is read off that layer, and
    the others' batched VJPs stop at the sources' junctions (:func:`extractor.mixing.find_junction`);
    without it every edge takes the exact reference route, a batched VJP to the whole source. ``routes``
    keeps each edge's route from the first batch of an input shape for the batches after it. ``plain``: per
    destination, its mixing sources' plain VJP where the caller took it along with the contributions.
    """
    B = contrib.logits.shape[0]
    kept_counts = torch.stack([k.sum(1).max() for k in sel.kept]).tolist() if sites else []  # one device sync
    blocks: list[_Block] = []
    picked: list[torch.Tensor] = []  # per site [3, B * M * n]: source column, target channel, ok
    weights: list[torch.Tensor] = []  # per site [B * M * n]
    site_gaps: list[torch.Tensor] = []  # per site [B]
    shared: dict[tuple[Any, ...], torch.Tensor] = {}
    known = known_routes(routes, settings, cut)
    key = _route_key(settings, cut)
    if fast and (routes is None or key not in routes.planned):  # every edge's route first: funnels are shared
        sources = list(cut.sources.values())
        for site in (s for s in sites if s.index in cut.acts):
            for i in (i for i in site.preds if i in cut.sources):
                _route(known, i, site.index, cut, sources)
        plan_funnels(sites, cut=cut, known=known, shared=shared, targets=settings.edge_targets, kept=kept_counts)
        if routes is not None:
            routes.planned.add(key)
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
        targets = top.indices.masked_fill(top.values < 0, -1)
        inc = incoming_weights(j, preds, cut=cut, g_dst=contrib.grads[j], targets=targets, kept=sel.kept,
                               fast=fast, known=known, shared=shared, given=(plain or {}).get(j) if fast else None)
        W, totals = inc.weights, inc.totals
        c_j = chan_dst.gather(1, targets.clamp(min=0))
        site_gaps.append((torch.stack([totals[i] for i in preds]).sum(0) - c_j).abs()
                         .masked_fill(targets < 0, 0.0).max(1).values)
        kept_src = torch.cat([sel.kept[i] for i in preds], 1)  # [B, sum Ci]
        Wk = torch.cat([W[i].detach() for i in preds], 2).masked_fill(~kept_src[:, None, :], 0.0)  # [B, M, sum Ci]
        n_src = min(settings.edges_per_target, Wk.shape[2])
        top_src = Wk.abs().topk(n_src, dim=2)  # [B, M, n]
        ok = (top_src.values > 0) & (targets[..., None] >= 0)
        picked.append(torch.stack([top_src.indices, targets[..., None].expand_as(ok), ok.long()]).flatten(1))
        weights.append(Wk.gather(2, top_src.indices).flatten())
        blocks.append(_Block(site=j, preds=tuple(preds), columns=M * n_src))
    gaps = np.full((B, len(sites)), np.nan, dtype=np.float32)
    if not blocks:
        return _no_edges(gaps)
    gaps[:, [blk.site for blk in blocks]] = torch.stack(site_gaps, 1).cpu().numpy()
    rows = torch.cat(picked, 1).cpu().numpy()  # one transfer for every site
    return _edge_rows(rows, torch.cat(weights).float().cpu().numpy(), blocks, sites, B, gaps)


@dataclass(frozen=True)
class _Block:
    """One destination's columns in :func:`compute_edges`' rows: ``columns`` (targets x edges each) per image."""

    site: int
    preds: tuple[int, ...]
    columns: int


@functools.lru_cache(maxsize=4096)
def _source_columns(preds: tuple[int, ...], channels: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For the predecessors' channels laid side by side: each column's source site and channel."""
    return (np.repeat(np.asarray(preds, np.int32), channels),
            np.concatenate([np.arange(c, dtype=np.int32) for c in channels]))


def _edge_rows(rows: np.ndarray, weight: np.ndarray, blocks: list[_Block], sites: Sequence[SiteInfo], images: int,
               gaps: np.ndarray) -> Edges:
    """:class:`Edges` from the picked rows (source column, target channel, ok: each destination's ``[B, M, n]``
    block flattened in turn) and their weights."""
    src_site, src_channel, dst_site, b = [], [], [], []
    at = 0
    for blk in blocks:
        n = images * blk.columns
        col = rows[0, at:at + n]
        site_of, channel_of = _source_columns(blk.preds, tuple(sites[i].channels for i in blk.preds))
        src_site.append(site_of[col])
        src_channel.append(channel_of[col])
        dst_site.append(np.full(n, blk.site, np.int32))
        b.append(np.repeat(np.arange(images, dtype=np.int64), blk.columns))
        at += n
    keep = rows[2] == 1
    return Edges(
        b=np.concatenate(b)[keep],
        src_site=np.concatenate(src_site)[keep],
        src_channel=np.concatenate(src_channel)[keep],
        dst_site=np.concatenate(dst_site)[keep],
        dst_channel=rows[1, keep].astype(np.int32),
        weight=weight[keep],
        gap=gaps,
    )


ROUTES = ("mixing", "junction", "vjp")


@graph_walks()
def segment_routes(sites: Sequence[SiteInfo], cut: SiteRecorder) -> dict[tuple[int, int], str]:
    """For every edge of the site graph ``(i, j)``, the route :func:`compute_edges` takes (one of
    ``ROUTES``): read off the segment's one mixing layer, contracted at the source's junction after
    a batched VJP, or a batched VJP to the whole source."""
    sources = list(cut.sources.values())
    out: dict[tuple[int, int], str] = {}
    for s in sites:
        for i in (i for i in s.preds if i in cut.sources and s.index in cut.acts):
            out[(i, s.index)] = find_route(cut.sources[i], cut.acts[s.index], sources).kind
    return out
