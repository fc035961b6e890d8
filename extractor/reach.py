"""Which channels of a site reach which channels of the next: what keeps a top-k pathway connected.

A depthwise convolution joins channel ``c`` to channel ``c`` only, a grouped one a group's channels
only. If the site before such a segment keeps its ``k`` channels independently of the site after it,
the two sets can be disjoint: the pathway is cut, its Pathway Gradient exactly 0 and its edges into
the later site empty (EfficientNet-Lite0, top-8: 19 of 20 photos). :class:`SiteReach` holds each
site-graph segment's channel structure, read once per model and input shape off the mixing layer's
weights (:func:`extractor.mixing.segment_reach`); segments whose every channel reads every channel,
or whose shape the fast edge path cannot read, count as dense.

The rule (:func:`connected_topk`), from the last site back to the first, picks a site's ``k`` channels
in three tiers: first, for each kept channel of a successor that reads the site through a per-channel
or grouped segment and has no dense input, the site's best channel among those it reads (a *cover*);
then, where every successor reads the site that way, its best channels that some kept successor
channel reads; then its best channels. A site with only dense successors keeps its ``k`` best.
:func:`cut_sites` names the sites where a selection is still cut (a user's ``--sites``, or rules that
choose per site by definition, such as Lengerich's resampling top-k).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from extractor.mixing import POST_OK, find_mixing, graph_walks, segment_reach
from extractor.models import ModelBundle
from extractor.sitegraph import cut_forward
from extractor.vjp import batched_vjp
from records import SiteInfo


@dataclass(frozen=True, kw_only=True)
class SiteReach:
    """``reach[(i, j)]``: bool ``[C_j, C_i]``, channel ``c`` of site ``j`` reads channel ``c'`` of its
    predecessor ``i``; only for segments that join some channels and not others (absent = dense).
    ``succ[i]``: the sites that read site ``i`` directly."""

    reach: dict[tuple[int, int], torch.Tensor]
    succ: dict[int, tuple[int, ...]]
    dense_fed: frozenset[int]  # sites with at least one dense input segment

    def structured(self, i: int) -> bool:
        """Whether site ``i`` has successors and every one reads it through a non-dense segment."""
        out = self.succ.get(i, ())
        return bool(out) and all((i, j) in self.reach for j in out)

    def needs_cover(self, i: int) -> tuple[int, ...]:
        """The successors that read site ``i`` through a non-dense segment and have no dense input:
        each of their kept channels must read a kept channel of ``i`` (or of another such input)."""
        return tuple(j for j in self.succ.get(i, ()) if (i, j) in self.reach and j not in self.dense_fed)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[object, ...], SiteReach]] = weakref.WeakKeyDictionary()


@graph_walks()
def site_reach(model: nn.Module, sites: Sequence[SiteInfo], forward: Callable[[torch.Tensor], torch.Tensor],
               example: torch.Tensor) -> SiteReach:
    """The channel structure of ``model``'s site graph, from one cut forward of ``example``
    (``[B, C, H, W]``; ``forward`` maps it to logits, e.g. the bundle's normalising forward).
    Cached per model, sites and input shape: it depends on the architecture, not the batch."""
    key = (tuple(s.site_id for s in sites), tuple(example.shape[1:]), example.dtype)
    per_model = _CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    cut = cut_forward(model, sites, lambda: forward(example.detach()))
    tensors = list(cut.sources.values())
    reach: dict[tuple[int, int], torch.Tensor] = {}
    succ: dict[int, list[int]] = {}
    dense_fed: set[int] = set()
    for s in sites:
        unknown = []
        for i in s.preds:
            succ.setdefault(i, []).append(s.index)
            ok = i in cut.sources and s.index in cut.acts
            r = segment_reach(cut.sources[i], cut.acts[s.index], tensors) if ok else None
            if r is None and ok and find_mixing(cut.sources[i], cut.acts[s.index], tensors) is None \
                    and {s.layout, sites[i].layout} <= {"channels_first", "vector"}:
                unknown.append(i)  # a shape the weights cannot tell: measured below
            elif r is not None:
                reach[(i, s.index)] = r
            else:
                dense_fed.add(s.index)
        if unknown:
            for i, r in zip(unknown, probe_reach([cut.sources[i] for i in unknown], cut.acts[s.index]),
                            strict=True):
                if r is not None:
                    reach[(i, s.index)] = r
                else:
                    dense_fed.add(s.index)
    del cut
    out = SiteReach(reach=reach, succ={i: tuple(v) for i, v in succ.items()}, dense_fed=frozenset(dense_fed))
    per_model[key] = out
    return out


ACTIVATIONS = frozenset(n for n in POST_OK if n.split("Backward")[0] in (
    "Relu", "Threshold", "LeakyRelu", "Hardtanh", "Elu", "Gelu", "Silu", "Hardswish", "Hardsigmoid", "Mish",
    "Sigmoid", "Tanh", "Softplus"))
_PROBE_BUDGET = 32_000_000  # elements of source gradient per batched probe


def _pre_activation(a: torch.Tensor) -> torch.Tensor | GradientEdge:
    """What to differentiate for ``a``'s channels: the activation's input where ``a`` is an activation's
    output (a channel the activation gates off still reads what its segment joins it to), else ``a``."""
    node = a.grad_fn
    if node is not None and node.name() in ACTIVATIONS and node.next_functions:
        fn, nr = node.next_functions[0]
        if fn is not None:
            return GradientEdge(fn, nr)
    return a


def probe_reach(sources: list[torch.Tensor], a_dst: torch.Tensor) -> list[torch.Tensor | None]:
    """The channel structure of segments whose shape the weights cannot tell (channel shuffles, splits),
    measured, for all of a site's such predecessors at once: per source a bool ``[C_dst, C_src]``, or
    ``None`` when every destination channel reads every source channel.

    One vector-Jacobian product with a random cotangent first: a source whose every channel
    receives gradient is dense, and if all are, that is all it costs. Otherwise batched VJPs, one
    cotangent per destination channel, give the rows. Both differentiate the destination's
    pre-activation.
    """
    out = _pre_activation(a_dst)
    shape = a_dst.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    cot = torch.randn(shape, generator=gen, dtype=a_dst.dtype).to(a_dst.device)
    grads = torch.autograd.grad(out, sources, grad_outputs=cot, retain_graph=True, allow_unused=True,
                                materialize_grads=True)
    open_ = [k for k, g in enumerate(grads) if not bool((_channel_mass(g, 0) > 0).all())]
    found: list[torch.Tensor | None] = [None] * len(sources)
    if not open_:
        return found
    probed = [sources[k] for k in open_]
    c_dst = shape[1]
    chunk = max(1, _PROBE_BUDGET // max(1, sum(s.numel() for s in probed)))
    rows: list[list[torch.Tensor]] = [[] for _ in probed]
    for start in range(0, c_dst, chunk):
        n = min(chunk, c_dst - start)
        onehot = torch.zeros((n, *shape), dtype=a_dst.dtype, device=a_dst.device)
        onehot[torch.arange(n), :, torch.arange(start, start + n)] = 1.0
        gb = batched_vjp(out, probed, onehot)
        for k, g in enumerate(gb):
            rows[k].append(_channel_mass(g, 1) > 0)
    for k, parts in zip(open_, rows, strict=True):
        reach = torch.cat(parts).cpu()
        found[k] = None if bool(reach.all()) else reach
    return found


def _channel_mass(g: torch.Tensor, axis: int) -> torch.Tensor:
    """|g| summed over every axis but the channel axis ``axis + 1`` (and the leading ``axis`` ones)."""
    moved = g.abs().movedim(axis + 1, axis)  # channel axis right after the leading ones
    return moved.flatten(axis + 1).sum(-1) if axis else moved.flatten(1).sum(-1)


def bundle_reach(bundle: ModelBundle, x: torch.Tensor) -> SiteReach:
    """:func:`site_reach` of a bundle, read on the first image of the batch ``x`` ``[B, C, H, W]``."""
    return site_reach(bundle.model, bundle.sites, bundle.forward, x[:1])


def kept_rows(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept channels ``[B, C]`` as padded indices ``[B, n]`` and their validity ``[B, n]``."""
    n = max(1, int(kept.sum(1).max()))
    top = kept.to(torch.int8).topk(n, dim=1)
    return top.indices, top.values.bool()


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[B, C]``: the ``k`` largest finite ``scores`` ``[B, C]`` of each row (-inf never kept)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top.indices, torch.isfinite(top.values))


def connected_topk(scores: Sequence[torch.Tensor], k: int, reach: SiteReach | None) -> list[torch.Tensor]:
    """Per site, bool ``[B, C]``: ``k`` channels by ``scores`` (``[B, C]``, larger is better, -inf never
    kept), connected through per-channel and grouped segments by the rule in the module docstring.
    Without ``reach`` (or where every segment is dense) this is the plain top-k of each site."""
    kept: list[torch.Tensor | None] = [None] * len(scores)
    rows_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # kept_rows of a site, once
    for j in reversed(range(len(scores))):
        s = scores[j]
        kk = min(k, s.shape[1])
        finite = torch.isfinite(s)
        cover_for = reach.needs_cover(j) if reach is not None else ()
        if reach is None or not (cover_for or reach.structured(j)):
            kept[j] = top_k_mask(s, k)
            continue
        scale = s.masked_fill(~finite, 0).abs().amax(1, keepdim=True).clamp_min(1e-30)
        base = (s / scale).masked_fill(~finite, -1.0).clamp(-1.0, 1.0)  # in [-1, 1]
        cover = torch.zeros(s.shape, dtype=torch.int32, device=s.device)
        all_structured = reach.structured(j)
        readable = torch.zeros_like(s, dtype=torch.bool) if all_structured else None
        for t in reach.succ[j]:
            if t not in cover_for and not all_structured:
                continue
            r = reach.reach[(j, t)].to(s.device)  # [C_t, C_j]
            kt = kept[t]
            assert kt is not None
            if t not in rows_of:
                rows_of[t] = kept_rows(kt)
            idx, valid = rows_of[t]  # [B, n]
            rows = r[idx]  # [B, n, C_j]
            if readable is not None:
                readable |= (rows & valid[..., None]).any(1)
            if t in cover_for:
                best = base[:, None, :].masked_fill(~rows, -3.0).argmax(2)  # [B, n]
                ok = valid & rows.gather(2, best[..., None]).squeeze(2)
                cover.scatter_add_(1, best, ok.to(torch.int32))
        # covers first, then channels a kept successor channel reads (every successor non-dense), then the rest
        tier = (cover > 0).to(s.dtype) * 4.0
        if readable is not None:
            tier += readable.to(s.dtype) * 2.0
        key = (tier + base).masked_fill(~finite, -10.0)
        top = key.topk(kk, dim=1)
        kept[j] = torch.zeros_like(s, dtype=torch.bool).scatter_(1, top.indices, top.values > -10.0)
    return [k_ for k_ in kept if k_ is not None]


def cut_sites(kept: Sequence[torch.Tensor], sites: Sequence[SiteInfo], reach: SiteReach | None) -> list[list[int]]:
    """Per image, the sites (with predecessors) none of whose kept channels reads a kept channel of any
    predecessor: where the pathway is cut. Dense segments read every channel. Read off the kept channels'
    indices (:func:`kept_rows`): per segment a ``[B, n_j, n_i]`` block of its reach, not a product over all
    channels (DenseNet-121: 594 structured segments)."""
    B = kept[0].shape[0] if kept else 0
    out: list[list[int]] = [[] for _ in range(B)]
    rows_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in rows_of:
            rows_of[i] = kept_rows(kept[i])
        return rows_of[i]

    for s in sites:
        if not s.preds:
            continue
        kj = kept[s.index]
        any_j = kj.any(1)
        fed = torch.zeros_like(any_j)
        for i in s.preds:
            r = reach.reach.get((i, s.index)) if reach is not None else None
            if r is None:
                fed |= kept[i].any(1) & any_j
            else:
                (idx_j, ok_j), (idx_i, ok_i) = rows(s.index), rows(i)
                hit = r.to(kj.device)[idx_j[:, :, None], idx_i[:, None, :]]  # [B, n_j, n_i]
                fed |= (hit & ok_j[:, :, None] & ok_i[:, None, :]).flatten(1).any(1)
        for b in torch.nonzero(~fed).flatten().tolist():
            out[b].append(s.index)
    return out
