"""Funnels: junction edges across a shared mixing layer, by forward probes instead of one backward per target.

In a residual-stream network with stages (ConvNeXt: a layer norm and a 2x2 convolution between stages), every
destination of a later stage reaches an earlier stage's sources through the same downsampling layer ``F``. The
junction route (:mod:`extractor.edges`) takes each target's gradient back across ``F`` to the source's junction
top ``S``: one backward through ``F`` per target and destination, about one plain pass's FLOPs per eight targets
on ConvNeXt-T, and the larger part of its edge time. Where every path from the destination back to ``S`` passes
``F`` (``F`` *dominates* ``S``), the chain rule gives ``dC/dS = J^T dC/dF`` with ``J`` the Jacobian of ``F``'s output
with respect to ``S``'s, and so, for a kept source channel's share ``Z_c`` at ``S``:

``w = <dC/dS, Z_c> = <dC/dF, J Z_c>``.

The *tangents* ``J Z_c`` (and ``J share`` for the completeness gap) are made once per batch and source, and serve every
destination behind ``F``: the targets' backward stops at ``F``'s output. ``J v`` is pushed up the cut forward's own
graph, node by node, by each op's forward rule, with the factors the graph saved (:func:`graph_jvp`): nothing runs
again, and the segment's nonlinear ops (layer norms) are linearised where the graph stands, as the backward does;
exact, tested equal to the VJP route in float64. A segment with an op that has no rule keeps the backward. (The
derivative of ``u -> J^T u``, a double backward, gives the same numbers for any op, but took 70 ms per tangent at 8
images on ConvNeXt-T's first downsampling, against 7 ms for one target's backward across it: PyTorch's double
backward of a layer norm.)

A funnel pays where it serves more targets than it makes tangents: ``F`` is taken for its sources when the
destinations behind it times their targets are at least twice its sources' kept channels plus one each
(ConvNeXt-T, top-8: the first stage's 3 sources make 27 tangents for 15 destinations' 120 targets; the third
stage's 9 sources would make 81 for the last stage's 24, and keep the backward). Planned once per input shape, on
its first batch (:func:`plan_funnels`), and kept in the route cache as a graph path from the destination.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from extractor.mixing import (
    MIXING,
    Junction,
    Route,
    _leads_to,
    _reaches,
    follow,
    graph_path,
    junction_at,
)
from extractor.sites import SiteRecorder
from records import SiteInfo

log = logging.getLogger(__name__)

# a funnel is taken where the targets that would cross it are at least this many times the tangents that do
_MARGIN = 1.0


def junction_stop(jn: Junction) -> Any:
    """The autograd node at whose output a junction source's batched backward stops (its top, or its layer)."""
    return jn.top if jn.top is not None else jn.node


def dominators(start: Any, stop: Any) -> list[Any]:
    """The mixing layers that every path from ``start`` back to ``stop`` passes, nearest to ``start`` first."""
    memo: dict[Any, bool] = {}
    if not _leads_to(start, {stop}, memo):
        return []
    doms = [n for n, on in memo.items() if on and n is not stop and n.name() in MIXING
            and not _reaches(start, stop, {n}, {})]
    # dominators lie on every path, one after another: the nearest to start reaches all the others
    return sorted(doms, key=lambda d: -sum(_leads_to(d, {e}, {}) for e in doms if e is not d))


def _supported(jn: Junction) -> bool:
    return jn.kind == "pointwise" or (jn.kind == "conv" and not jn.moved and int(jn.node._saved_groups) == 1)


def plan_funnels(sites: Sequence[SiteInfo], *, cut: SiteRecorder, known: dict[tuple[int, int], Route],
                 shared: dict[tuple[Any, ...], Any], targets: int, kept: Sequence[int]) -> None:
    """Decide, on the first batch of an input shape, which junction edges ``(i, j)`` take a funnel, and write it into
    their cached routes (``known``, holding every edge's route). ``targets``: the targets per
    destination; ``kept[i]``: the kept channels of site ``i`` in this batch."""
    found: dict[tuple[int, int], list[Any]] = {}
    dests: dict[Any, set[int]] = {}
    feeds: dict[Any, set[int]] = {}
    for site in sites:
        j = site.index
        a_dst = cut.acts.get(j)
        if a_dst is None or a_dst.grad_fn is None or not a_dst.requires_grad:
            continue
        for i in (i for i in site.preds if i in cut.sources):
            route = known.get((i, j))
            jn = junction_at(route, a_dst, shared) if route is not None and route.kind == "junction" else None
            if jn is None or not _supported(jn):
                continue
            found[(i, j)] = dominators(a_dst.grad_fn, junction_stop(jn))
            for f in found[(i, j)]:
                dests.setdefault(f, set()).add(j)
                feeds.setdefault(f, set()).add(i)
    # a destination's own layers serve it alone: a funnel is shared
    taken = {f for f in dests if len(dests[f]) > 1
             and len(dests[f]) * targets >= _MARGIN * sum(kept[i] + 1 for i in feeds[f])}
    served = 0
    for (i, j), doms in found.items():
        f = next((f for f in doms if f in taken), None)  # the nearest to the destination
        if f is not None and (path := graph_path(cut.acts[j].grad_fn, f)) is not None:
            known[(i, j)] = known[(i, j)]._replace(funnel=path, funnel_layer=f.name())
            served += 1
    if taken:
        log.debug("funnels: %d layers serve %d junction edges", len(taken), served)


def funnel_passes(funnel: Any, stop: Any, known: set[Any]) -> bool:
    """Whether a path from ``funnel`` back to ``stop`` passes none of the ``known`` nodes (funnels whose tangents
    are made already: a push from ``funnel`` then needs the tangents at ``stop`` itself)."""
    return _reaches(funnel, stop, known, {})


def funnel_at(route: Route, a_dst: torch.Tensor) -> Any | None:
    """The funnel layer of a cached route in this batch's graph (``None`` without one, or where the graph differs)."""
    if route.funnel is None or a_dst.grad_fn is None:
        return None
    node = follow(a_dst.grad_fn, route.funnel)
    return node if node is not None and node.name() == route.funnel_layer else None


class _Unsupported(Exception):
    """A node on the funnel's segment that :func:`graph_jvp` has no forward rule for."""


def graph_jvp(top: Any, given: dict[Any, torch.Tensor]) -> torch.Tensor:
    """``[P, *shape]``: the tangent at the output of autograd node ``top`` of ``P`` tangents ``given`` ``[P, *shape]``
    at the outputs of other nodes below it (others held fixed), pushed up the graph by each node's forward rule
    (views, permutes, additions, products with a fixed factor, layer and inference batch norms, convolutions and
    linear layers, zero padding, average pooling, and the held layer norms and space-to-depth of
    :mod:`extractor.linear` and :mod:`extractor.rewrites`: the ops a stage's downsampling and a residual stream are
    made of; in ``pattern`` mode also an attention's value path: its value rows, the held pattern's product, window
    partitions, cyclic shifts, slices). Raises
    ``_Unsupported`` at any other node. The graph holds every factor it needs: nothing runs again."""
    memo: dict[Any, bool] = {}
    if not _leads_to(top, set(given), memo):
        raise _Unsupported("the funnel does not reach the source")
    on = {n for n, v in memo.items() if v and n not in given}
    # each node's tangent is let go once the last node reading it has its own (a stage's chain holds one at a time)
    readers = Counter(c for n in on for c in _read_inputs(n) if c in on)
    out: dict[Any, torch.Tensor] = {}

    def tangent(node: Any) -> torch.Tensor | None:
        if node in given:
            return given[node]
        if node not in on:
            return None
        if node not in out:
            kids = _read_inputs(node)
            out[node] = _forward_rule(node, [tangent(child) for child in kids])
            for child in (c for c in kids if c in on):
                readers[child] -= 1
                if readers[child] == 0:
                    del out[child]
        return out[node]

    found = tangent(top)
    assert found is not None  # top leads to a given node
    return found


def _read_inputs(node: Any) -> list[Any]:
    """The inputs of a node whose tangents its forward rule reads (``None`` for the others): a held layer norm's
    value comes from the layer norm beside it, but its tangent from the input alone."""
    kids = [child for child, _ in node.next_functions]
    return kids[:1] + [None] * (len(kids) - 1) if node.name() == "_ScaledBackward" else kids


def _signed(v: int) -> int:
    """A negative int that autograd saved as an unsigned 64-bit one (a roll's shifts, an unsqueeze's dim, a slice's
    start and end counted from the end)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _dim(d: int, rank: int) -> int:
    """Dim ``d`` of a tensor of ``rank`` dims, in its tangents ``[P, ...]``."""
    return (_signed(d) % rank) + 1


_VIEWS = frozenset({"ViewBackward0", "AliasBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0",
                    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2"})


def _forward_rule(node: Any, ts: list[torch.Tensor | None]) -> torch.Tensor:
    """One node's output tangent ``[P, *out]`` from its inputs' tangents ``ts`` (``None``: held fixed)."""
    name = node.name()
    shape = tuple(node._input_metadata[0].shape)
    t = next(x for x in ts if x is not None)
    P = t.shape[0]
    if name in _VIEWS and len(ts) == 1:
        return t.reshape(P, *shape)
    if name == "PermuteBackward0":
        return t.permute(0, *(_dim(d, len(shape)) for d in node._saved_dims))
    if name == "TransposeBackward0":
        return t.transpose(_dim(node._saved_dim0, len(shape)), _dim(node._saved_dim1, len(shape)))
    if name == "ExpandBackward0" and len(ts) == 1:  # (dims it adds come first: line the tangent's up behind P)
        return t.reshape(P, *(1,) * (len(shape) + 1 - t.dim()), *t.shape[1:]).expand(P, *shape)
    if name == "RollBackward0":  # a shifted window's cyclic shift
        dims = tuple(_dim(d, len(shape)) for d in node._saved_dims)
        return torch.roll(t, tuple(_signed(v) for v in node._saved_shifts), dims)
    if name == "SliceBackward0":
        cut = [slice(None)] * (t.dim())
        cut[_dim(node._saved_dim, t.dim() - 1)] = slice(_signed(node._saved_start), _signed(node._saved_end),
                                                        node._saved_step)
        return t[tuple(cut)]
    if name == "SelectBackward0":
        return t.select(_dim(node._saved_dim, t.dim() - 1), _signed(node._saved_index))
    if name in ("BmmBackward0", "MmBackward0") and ts[0] is None and ts[1] is not None:  # a held left factor
        return torch.matmul(node._saved_self, ts[1])  # (an attention's held pattern times its values)
    if name in ("AddBackward0", "SubBackward0") and len(ts) == 2:
        sign = node._saved_alpha * (1 if name == "AddBackward0" else -1)
        parts = [x for x in (ts[0], None if ts[1] is None else ts[1] if sign == 1 else sign * ts[1]) if x is not None]
        if any(tuple(x.shape[1:]) != shape for x in parts):
            raise _Unsupported(f"{name} broadcasts")
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]
    if name == "MulBackward0" and len(ts) == 2:
        terms: list[torch.Tensor] = []
        if ts[0] is not None:
            terms.append(ts[0] * node._saved_other)
        if ts[1] is not None:
            terms.append(node._saved_self * ts[1])
        if any(tuple(x.shape[1:]) != shape for x in terms):
            raise _Unsupported("MulBackward0 broadcasts")
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]
    if name == "AddmmBackward0":  # inputs: bias, rows, weight
        if ts[0] is not None or ts[2] is not None or ts[1] is None:
            raise _Unsupported("AddmmBackward0 off its rows")
        return torch.matmul(ts[1], node._saved_mat2)
    if name == "MmBackward0" and ts[0] is not None and ts[1] is None:
        return torch.matmul(ts[0], node._saved_mat2)
    if any(x is not None for x in ts[1:]):  # a weight on the path
        raise _Unsupported(f"{name} with a tangent in its parameters")
    if name == "_ScaledBackward":  # a layer norm with its statistics held (extractor.linear): a scale per element
        return torch.mul(t, node.saved_tensors[0])
    if name == "_RowsBackward":  # the value rows of an attention's input projection (extractor.rewrites)
        return torch.matmul(t, node.saved_tensors[0].T)
    if name == "ConstantPadNdBackward0":  # the pad, on the last dims, is zero in a tangent
        return torch.nn.functional.pad(t, tuple(node._saved_pad))
    if name == "_SpaceToDepthBackward":  # the four strided quarters, concatenated (extractor.rewrites)
        return torch.cat([t[..., r::2, c::2, :] for r, c in node.order], -1)
    if name == "NativeLayerNormBackward0":
        # y = w * xhat + b with xhat's Jacobian rstd * (I - 11^T / n - xhat xhat^T / n) symmetric: its product with
        # a tangent is the layer norm's own (fused) backward without weights, applied to the tangent
        # (one tangent at a time: the kernel reads the input as it stands, where all at once would copy it P times)
        x, norm = node._saved_input, list(node._saved_normalized_shape)
        dt = torch.empty(P, *shape, dtype=t.dtype, device=t.device)
        for p in range(P):
            dt[p] = torch.ops.aten.native_layer_norm_backward(t[p], x, norm, node._saved_result1,
                                                              node._saved_result2, None, None,
                                                              [True, False, False])[0]
        return dt.mul_(node._saved_weight) if node._saved_weight is not None else dt
    if name == "NativeBatchNormBackward0" and not node._saved_training:
        w = node._saved_weight
        scale = torch.rsqrt(node._saved_running_var + node._saved_eps) * (w if w is not None else 1.0)
        return t * scale.view(-1, *([1] * (t.dim() - 3)))
    if name == "AvgPool2DBackward0" and t.dim() == 5:  # (a downsampling shortcut)
        pooled = torch.nn.functional.avg_pool2d(
            t.reshape(-1, *t.shape[2:]), node._saved_kernel_size, node._saved_stride, node._saved_padding,
            node._saved_ceil_mode, node._saved_count_include_pad, node._saved_divisor_override)
        return pooled.view(P, *shape)
    if name == "ConvolutionBackward0" and not node._saved_transposed and t.dim() in (4, 5):
        conv = torch.nn.functional.conv2d if t.dim() == 5 else torch.nn.functional.conv1d
        y = conv(t.reshape(-1, *t.shape[2:]), node._saved_weight, None, stride=tuple(node._saved_stride),
                 padding=tuple(node._saved_padding), dilation=tuple(node._saved_dilation),
                 groups=int(node._saved_groups))
        return y.view(P, *shape)
    raise _Unsupported(name)


def funnel_tangents(funnel: Any, given: dict[Any, torch.Tensor]) -> torch.Tensor | None:
    """``[P, *F.shape]``: the ``P`` tangents ``given`` at nodes below ``funnel`` (a source's shares at its junction
    top, and its tangents at funnels below this one, which the push then starts from) at ``funnel``'s output
    (:func:`graph_jvp`); ``None`` where the segment between holds an op without a forward rule."""
    try:
        with torch.no_grad():
            return graph_jvp(funnel, given)
    except _Unsupported as exc:
        log.debug("funnel not taken: %s", exc)
        return None
