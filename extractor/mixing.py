"""Edge weights read off the channel-mixing layer between two sites (the fast path).

The general edge weight ``w(i -> j) = sum_p a_i(p) * dC_j/da_i(p)`` (``C_j = sum_q a_j(q) g_j(q)``,
``g_j`` fixed) costs one vector-Jacobian product of the whole segment per target ``j``.
Most segments between neighbouring sites of a CNN have a simple shape::

    a_src --[pre: clone / max- or average-pool / flatten / concatenation / a gate not from a_src]--> u
          --[conv2d or linear]--> z
          --[post: per-channel ops: batch norm, activations, pooling, adding a skip, concatenation]--> a_dst

If *every* path from ``a_dst`` back to ``a_src`` runs through that one mixing layer, then

* ``dC_j/dz`` is ``(dC/dz)`` restricted to channel ``j`` (post ops never mix channels; a
  concatenation only shifts them), so one plain VJP ``gbar = dC/dz`` serves every target; and
* the pre ops are positively homogeneous per channel (``P(a) = S a`` locally), so Euler's
  identity turns ``sum_p a_i(p) dC_j/da_i(p)`` into ``sum_f u_i(f) dC_j/du_i(f)``, which for a
  convolution is ``sum_tap W[j, i, tap] * dC_j/dW[j, i, tap]``: the per-image weight gradient of
  the target rows, computed for all images at once as one grouped weight-gradient convolution.

That is ``M / C_out`` of one convolution instead of ``M`` backward passes. A *linear bottleneck*
(conv -> batch norm, a skip added -> 1x1 conv, as in MobileNet, EfficientNet and MNASNet) is one
convolution too: the two layers compose to ``W2 diag(s) W1`` when ``s``, the derivative between
them, is one constant per channel (computed and checked on each batch). The shape is verified on
the autograd graph of each batch (node types, every path through the mixing layer(s), parameters
not depending on ``a_src``); anything else (transposed convs, attention, layer norm, a residual
taken from ``a_src`` itself, a gate computed from ``a_src``, frozen linear weights) falls back to
the batched VJP in :func:`extractor.edges.edge_weights_vjp`. The two paths are tested equal on
hand-made segments and on ResNet, VGG, MobileNet v2/v3, EfficientNet, SqueezeNet, GoogLeNet,
DenseNet and Inception-v3.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch.autograd.graph import GradientEdge

from extractor.layouts import channel_dot

MIXING = frozenset({"ConvolutionBackward0", "AddmmBackward0", "MmBackward0"})
_UNFOLD_BUDGET = 16_000_000  # elements of unfolded input per weight-gradient call (bounds peak memory)
# ops on a_src's side of the mixing layer: channel-preserving and positively homogeneous
PRE_OK = frozenset({
    "CloneBackward0", "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0",
})
FLATTEN = frozenset({"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"})
MOVEMENT = frozenset({"PermuteBackward0", "TransposeBackward0", "TransposeBackward1"})
SPLITS = frozenset({"SplitBackward0", "SplitWithSizesBackward0", "SliceBackward0"})  # parts of a tensor
# ops on a_dst's side: output channel c depends on input channel c only
POST_OK = frozenset({
    "CloneBackward0", "ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1",
    "LeakyReluBackward0", "LeakyReluBackward1", "HardtanhBackward0", "HardtanhBackward1", "EluBackward0",
    "EluBackward1", "GeluBackward0", "SiluBackward0", "HardswishBackward0", "HardsigmoidBackward0",
    "MishBackward0", "SigmoidBackward0", "TanhBackward0", "SoftplusBackward0", "PreluKernelBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0",
    "MaxPool2DWithIndicesBackward0", "AvgPool2DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveMaxPool2DBackward0", "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1",
    "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "NativeDropoutBackward0",
})


@dataclass(kw_only=True, frozen=True)
class Mixing:
    """The verified mixing layer of one segment: its autograd node and how ``u`` maps to channels.

    ``kind`` is ``"conv"`` (``u`` ``[B, Ci, H, W]``, weight ``[C_out, Ci / groups, kh, kw]``),
    ``"linear"`` (``u`` ``[B, Ci * r]``, feature ``f`` belongs to source channel ``f // r``) or
    ``"identity"`` (no mixing layer, per-channel ops only; ``node`` is ``None``).
    """

    node: Any
    kind: str
    group: int  # linear: features per source channel (r); conv: 1
    src_offset: int = 0  # source channel i is channel src_offset + i of u (a concatenation before the layer)
    # ... or, where splits and transposes move channels on the way (ShuffleNet's channel shuffle), channel
    # src_index[i] of u (-1: source channel i does not reach u); read numerically (_channel_map)
    src_index: tuple[int, ...] | None = None
    dst_offset: int = 0  # channel c of z is channel dst_offset + c of a_dst (a concatenation after it)
    first: Any = None  # two convs in a row: the first one (its input u and geometry); ``node`` is the second
    scale: torch.Tensor | None = None  # ... and the per-channel derivative between them [C_mid]
    chain: bool = False  # ... which is read off batch norms in one chain between them (is_chain)


def composite_rows(mix: Mixing, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (any shape ``[...]``) of the weight ``[C_out, Ci, kh, kw]`` that the segment's layer applies to
    ``u``: the layer's own (dense over its groups), or for two convs the composite ``W2 diag(s) W1``, computed for
    these rows only (a few targets need a few rows, not the whole ``C_out x C_mid x Ci`` product)."""
    with torch.no_grad():
        if mix.first is None:
            w: torch.Tensor = mix.node._saved_weight.detach()
            groups = int(mix.node._saved_groups)
            sel = w[rows]  # [..., Ci/g, kh, kw]
            if groups == 1:
                return sel
            per_out, per_in = w.shape[0] // groups, w.shape[1]
            dense = sel.new_zeros(*rows.shape, per_in * groups, *w.shape[2:])
            cols = (rows // per_out)[..., None] * per_in + torch.arange(per_in, device=w.device)  # [..., Ci/g]
            return dense.scatter_(rows.dim(), cols.view(*cols.shape, 1, 1).expand_as(sel), sel)
        assert mix.scale is not None
        w2 = mix.node._saved_weight.detach()[:, :, 0, 0]  # [C_out, C_mid]
        w1 = mix.first._saved_weight.detach()  # [C_mid, Ci/g, kh, kw]
        groups = int(mix.first._saved_groups)
        a = w2[rows] * mix.scale  # [..., C_mid]
        if groups == 1:
            return torch.einsum("...o,oikl->...ikl", a, w1)
        per_out = w1.shape[0] // groups  # block-diagonal: mid channel o reads its group's inputs only
        out = torch.einsum("...gp,gpikl->...gikl", a.view(*rows.shape, groups, per_out),
                           w1.view(groups, per_out, *w1.shape[1:]))
        return out.reshape(*rows.shape, groups * w1.shape[1], *w1.shape[2:])


_ADJACENCY: list[dict[Any, list[Any]]] = []  # the innermost graph_walks() scope's children per node


@contextmanager
def graph_walks() -> Iterator[None]:
    """Within this scope each autograd node's children are read once: the walks over one graph (every edge's
    segment, reachability, routes) meet the same nodes again and again, and ``next_functions`` builds new
    tuples on every read. The cache holds the nodes until the scope ends (autograd nodes take no weak refs)."""
    _ADJACENCY.append({})
    try:
        yield
    finally:
        _ADJACENCY.pop()


def _kids(node: Any) -> list[Any]:
    """The nodes a gradient flows to from ``node``: its inputs' nodes, less the value an in-place copy overwrote
    (it gets no gradient; ``torch::autograd::CopyBackwards``, as :func:`extractor.sitegraph.predecessors` reads it)."""
    edges = node.next_functions[1:] if node.name() == "torch::autograd::CopyBackwards" else node.next_functions
    return [n for n, _ in edges if n is not None]


def _next(node: Any) -> list[Any]:
    if not _ADJACENCY:
        return _kids(node)
    memo = _ADJACENCY[-1]
    kids = memo.get(node)
    if kids is None:
        kids = memo[node] = _kids(node)
    return kids


def _reaches(start: Any, goal: Any, stops: set[Any], memo: dict[Any, bool]) -> bool:
    """Whether ``goal`` is reachable from ``start`` without passing a node in ``stops`` (iterative DFS)."""
    return _leads_to(start, {goal}, memo, stops)


def _leads_to(start: Any, goals: set[Any], memo: dict[Any, bool], stops: set[Any] | frozenset[Any] = frozenset()) \
        -> bool:
    """Whether some node of ``goals`` is reachable from ``start`` without passing a node in ``stops`` (iterative
    DFS; ``memo`` belongs to these goals and stops only)."""
    stack: list[tuple[Any, bool]] = [(start, False)]
    while stack:
        node, expanded = stack.pop()
        if node in goals:
            memo[node] = True
            continue
        if node in memo and not expanded:
            continue
        if node in stops:
            memo[node] = False
            continue
        children = _next(node)
        if not expanded:
            memo[node] = False  # provisional (the graph is acyclic)
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in memo)
        else:
            memo[node] = any(memo.get(c, False) for c in children)
    return memo[start]


def _visited(start: Any, stops: set[Any]) -> Iterable[Any]:
    seen: set[Any] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node in seen or node in stops:
            continue
        seen.add(node)
        yield node
        stack.extend(_next(node))


# (src node, dst node, the other sites' nodes where paths stop, a reachability memo, the nodes on the paths)
Segment = tuple[Any, Any, set[Any], dict[Any, bool], list[Any]]


def _segment(a_src: torch.Tensor, a_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor]) -> Segment | None:
    """The autograd nodes of the segment ``a_src -> a_dst``: (src node, dst node, the other sites' nodes
    where paths stop, a reachability memo, the nodes on some path from ``a_dst`` back to ``a_src``)."""
    src, dst = a_src.grad_fn, a_dst.grad_fn
    if src is None or dst is None:
        return None
    stops = {t.grad_fn for t in site_tensors if t.grad_fn is not None} - {src, dst}
    memo: dict[Any, bool] = {}
    return src, dst, stops, memo, [n for n in _visited(dst, stops | {src}) if _reaches(n, src, stops, memo)]


def find_mixing(a_src: torch.Tensor, a_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor], *,
                seg: Segment | None = None) -> Mixing | None:
    """The one mixing layer all paths ``a_dst -> a_src`` run through, or ``None`` if the segment has another shape.

    ``a_src`` and ``a_dst`` are attached site outputs (``[B, C, ...]``); ``site_tensors`` all
    site outputs of the forward pass (paths stop at other sites). ``seg``: the segment's walk, if done.
    """
    seg = seg if seg is not None else _segment(a_src, a_dst, site_tensors)
    if seg is None:
        return None
    src, dst, stops, memo, on_path = seg
    mixers = [n for n in on_path if n.name() in MIXING]
    if not mixers:
        return _identity(on_path, src, dst, a_src, a_dst)
    if len(mixers) == 2 and (two := _two_convs(mixers=mixers, on_path=on_path, src=src, dst=dst, stops=stops,
                                                memo=memo, a_src=a_src, a_dst=a_dst)) is not None:
        return two
    if len(mixers) > 1:  # depthwise convs after the one other mixing layer are per-channel ops (checked below)
        mixers = [n for n in mixers if not depthwise(n)]
    if len(mixers) != 1:
        return None
    mx = mixers[0]
    if _reaches(dst, src, stops | {mx}, {}):
        return None  # a path that skips the mixing layer (e.g. a residual from a_src)
    kind, inp, params = _mixing_parts(mx)
    if kind == "" or any(_reaches(p, src, stops, memo) for p in params if p is not None):
        return None
    pre, flattened, src_offset = _pre_chain(inp, src, stops, memo, remap=kind == "conv")
    if pre is None or not _zero_padding(inp, mx._saved_input if kind == "conv" else None):
        return None
    src_index = _channel_map(mx._saved_input, a_src) if src_offset < 0 else None
    if src_offset < 0 and (src_index is None or int(mx._saved_groups) != 1):
        return None
    post = set(on_path) - {mx} - pre
    if any(n.name() not in POST_OK and n.name() != "CatBackward0" and not _fixed_depthwise(n, src, stops, memo)
           for n in post):
        return None
    dst_offset = _post_offset(dst, mx, post) if any(n.name() == "CatBackward0" for n in post) else 0
    if dst_offset is None:
        return None
    if src_index is not None:
        return Mixing(node=mx, kind="conv", group=1, dst_offset=dst_offset, src_index=src_index) \
            if not flattened and dst_offset + mx._saved_weight.shape[0] <= a_dst.shape[1] else None
    return _shape_check(mx=mx, kind=kind, flattened=flattened, a_src=a_src, a_dst=a_dst, src_offset=src_offset,
                        dst_offset=dst_offset)


def depthwise(node: Any) -> bool:
    """A convolution that maps channel ``c`` to channel ``c`` alone (one filter per channel, EfficientNet's and
    MobileNet's 3x3 and 5x5 layers): after a segment's mixing layer it is a per-channel op like batch norm, so
    channel ``c`` of the mixing layer's output still reaches channel ``c`` of the destination only."""
    if node.name() != "ConvolutionBackward0" or node._saved_transposed:
        return False
    w = node._saved_weight
    return w is not None and w.dim() >= 3 and w.shape[1] == 1 and int(node._saved_groups) == w.shape[0]


def _fixed_depthwise(node: Any, src: Any, stops: set[Any], memo: dict[Any, bool]) -> bool:
    """:func:`depthwise`, with weights that do not depend on the source."""
    return depthwise(node) and not any(_reaches(p, src, stops, memo) for p, _ in node.next_functions[1:]
                                       if p is not None)


# ops allowed between two convs: together a per-channel constant scale (checked numerically too)
MID_OK = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0", "AddBackward0",
                    "SubBackward0", "CloneBackward0", "MulBackward0", "DivBackward0"})


def _mid_walk(top: Any, on: set[Any]) -> tuple[list[Any], set[Any]] | None:
    """The walk down from ``top`` (the input of a conv ``m2``) over the nodes ``on`` the segment's paths, through
    :data:`MID_OK` ops only, to the convs where it stops: ``(those convs, every node seen)``, or ``None`` where
    another op lies on the way. One conv found is the ``m1`` of a two-conv route (:func:`_two_convs`,
    :func:`find_deep_entry`)."""
    convs: list[Any] = []
    seen: set[Any] = set()
    stack = [top] if top in on else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name() == "ConvolutionBackward0":
            convs.append(node)
        elif node.name() in MID_OK:
            stack.extend(n for n in _next(node) if n in on)
        else:
            return None
    return convs, seen


def _two_convs(mixers: list[Any], on_path: list[Any], *, src: Any, dst: Any, stops: set[Any], memo: dict[Any, bool],
               a_src: torch.Tensor, a_dst: torch.Tensor) -> Mixing | None:
    """``a_src -> pre -> conv1 -> per-channel scale -> conv2 (1x1) -> post -> a_dst`` (a linear
    bottleneck: MobileNet, EfficientNet, MNASNet). ``conv2 . diag(s) . conv1`` is one convolution
    with conv1's geometry and weight ``W2 diag(s) W1``, so the segment is read off that composite
    like a one-layer segment. ``s`` is the derivative of conv2's input by conv1's output, computed
    and required to be one constant per channel (batch norm in eval mode, a skip added)."""
    if any(m.name() != "ConvolutionBackward0" for m in mixers):
        return None
    m2, m1 = mixers if _reaches(mixers[0], mixers[1], stops | {src}, {}) else mixers[::-1]
    if not _reaches(m2, m1, stops | {src}, {}):
        return None
    w2 = m2._saved_weight
    if (m2._saved_transposed or m1._saved_transposed or len(m1._saved_stride) != 2 or tuple(w2.shape[2:]) != (1, 1)
            or tuple(m2._saved_stride) != (1, 1) or tuple(m2._saved_padding) != (0, 0) or int(m2._saved_groups) != 1):
        return None
    mid_in = m2.next_functions[0][0]
    if _reaches(dst, src, stops | {m2}, {}) or mid_in is None or _reaches(mid_in, src, stops | {m1}, {}):
        return None  # a path that skips a conv
    params = [n for n, _ in m2.next_functions[1:]] + [n for n, _ in m1.next_functions[1:]]
    if any(_reaches(p, src, stops, memo) for p in params if p is not None):
        return None
    pre, flattened, src_offset = _pre_chain(m1.next_functions[0][0], src, stops, memo, remap=True)
    if pre is None or flattened or not _zero_padding(m1.next_functions[0][0], m1._saved_input):
        return None
    src_index = _channel_map(m1._saved_input, a_src) if src_offset < 0 else None
    if src_offset < 0 and src_index is None:
        return None
    on = set(on_path)
    post = {n for n in _visited(dst, stops | {src, m2})} & on
    between = _mid_walk(mid_in, on)
    if any(n.name() not in POST_OK and n.name() != "CatBackward0" for n in post) or between is None \
            or between[0] != [m1]:
        return None
    mid = between[1] - {m1}
    dst_offset = _post_offset(dst, m2, post) if any(n.name() == "CatBackward0" for n in post) else 0
    u = m1._saved_input
    if dst_offset is None or u.dim() != 4 or (src_index is None and u.shape[1] < src_offset + a_src.shape[1]) \
            or dst_offset + w2.shape[0] > a_dst.shape[1]:
        return None
    scale = mid_scale(m2, m1)
    if scale is None:
        return None
    return Mixing(node=m2, kind="conv", group=1, src_offset=max(src_offset, 0), dst_offset=dst_offset, first=m1,
                  scale=scale, chain=is_chain(mid, m1), src_index=src_index)


_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})
_CHAIN_OK = _NORMS | {"AddBackward0", "CloneBackward0"}


def is_chain(mid: set[Any], m1: Any) -> bool:
    """Whether the nodes ``mid`` between two convs form one chain of batch norms, additions and copies (each
    node has one child on the way to ``m1``): the scale between the convs is then read off the norms."""
    return all(n.name() in _CHAIN_OK and sum(1 for k in _next(n) if k in mid or k is m1) == 1 for n in mid)


def mid_scale(m2: Any, m1: Any, path: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """``s`` ``[C_mid]``: the derivative of conv ``m2``'s input by conv ``m1``'s output, if it is one constant per
    channel on this batch (else ``None``). Numbers of the batch: checked on each one. With ``path`` (the chain
    from ``m2`` to ``m1``, :func:`is_chain`) the product of its eval-mode batch norms' scales, without a backward."""
    if path is not None and (scale := _chain_scale(m2, path)) is not None:
        return scale
    y = m2._saved_input
    (scale,) = torch.autograd.grad(y, GradientEdge(m1, 0), grad_outputs=torch.ones_like(y), retain_graph=True)
    per_channel = scale[:1, :, :1, :1]
    if not bool(((scale - per_channel).abs() <= 1e-5 * per_channel.abs()).all()):  # allclose(rtol=1e-5), faster
        return None
    return per_channel.detach().flatten()


def _chain_scale(m2: Any, path: tuple[int, ...]) -> torch.Tensor | None:
    """The scale along a chain (``path`` from ``m2`` through its input to ``m1``), or ``None`` where a norm is in
    training mode or an op is not one of the chain's."""
    w = m2._saved_weight
    scale = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
    node = m2
    for step, k in enumerate(path):
        if step:
            name = node.name()
            if name in _NORMS:
                if node._saved_training or node._saved_running_var is None:
                    return None
                inv = torch.rsqrt(node._saved_running_var + node._saved_eps)
                scale = scale * (inv if node._saved_weight is None else node._saved_weight.detach() * inv)
            elif name == "AddBackward0":
                scale = scale * (node._saved_alpha if k == 1 else 1)
            elif name != "CloneBackward0":
                return None
        node = node.next_functions[k][0]
    return scale


def _identity(on_path: list[Any], src: Any, dst: Any, a_src: torch.Tensor, a_dst: torch.Tensor) -> Mixing | None:
    """A segment of per-channel ops only (an identity skip into an addition, pooling, a per-channel
    scale, batch norm and an activation): channel ``i`` reaches channel ``i`` alone, so ``w(i -> j) = 0`` unless
    ``i = j``; or, with concatenations along one chain (a DenseNet stem read by every layer of the first dense
    block), channel ``dst_offset + i`` alone."""
    if not on_path:
        return None
    cat = False
    for n in on_path:
        cat |= n.name() == "CatBackward0"
        if (n.name() not in POST_OK and n.name() not in PRE_OK and n.name() != "CatBackward0") or n.name() in FLATTEN:
            return None
    offset = _post_offset(dst, src, set(on_path)) if cat else 0
    if offset is None or (not cat and a_src.shape[1] != a_dst.shape[1]) or offset + a_src.shape[1] > a_dst.shape[1]:
        return None
    return Mixing(node=None, kind="identity", group=1, dst_offset=offset)


def _mixing_parts(mx: Any) -> tuple[str, Any, list[Any]]:
    """(kind, node feeding ``u``, nodes feeding the parameters) or ("", None, []) if unsupported."""
    nxt = [n for n, _ in mx.next_functions]
    if mx.name() == "ConvolutionBackward0":
        if mx._saved_transposed or len(mx._saved_stride) != 2:
            return "", None, []
        return "conv", nxt[0], nxt[1:]
    if mx.name() == "AddmmBackward0":
        if mx._saved_alpha != 1 or mx._saved_mat1 is None:
            return "", None, []
        return "linear", nxt[1], [nxt[0], nxt[2]]
    if getattr(mx, "_saved_self", None) is None:  # MmBackward0: u @ W^T, u saved only if W needs grad
        return "", None, []
    return "linear", nxt[0], nxt[1:]


def _cat_offset(node: Any, k: int) -> int | None:
    """Channel offset of input ``k`` in the output of a concatenation node, or ``None`` if it
    does not concatenate channels (axis 1). Read by running the node's backward on a tensor
    holding each output channel's index: input ``k``'s share starts at its offset."""
    shape = list(node._input_metadata[0].shape)
    if len(shape) < 2 or int(node._saved_dim) % len(shape) != 1:
        return None
    meta = node._input_metadata[0]
    index = torch.arange(shape[1], dtype=meta.dtype, device=meta.device)
    index = index.view(1, -1, *([1] * (len(shape) - 2))).expand(shape).contiguous()
    with torch.no_grad():
        parts = node(index)
    part = parts[k] if isinstance(parts, tuple) else parts
    return None if part is None else int(part.select(1, 0).flatten()[0])


PAD = "ConstantPadNdBackward0"


def _zero_padding(start: Any, u: torch.Tensor | None) -> bool:
    """Whether the op feeding a mixing layer is no padding, or a padding of the last two axes whose
    border in the layer's input ``u`` is all zeros (a zero pad keeps the segment homogeneous; its
    value is not saved on the graph, so it is read off ``u``)."""
    if start is None or start.name() != PAD:
        return True
    pad = tuple(int(v) for v in start._saved_pad)
    if u is None or u.dim() != 4 or len(pad) != 4 or min(pad) < 0:
        return False
    left, right, top, bottom = pad
    h, w = u.shape[2], u.shape[3]
    borders = [u[..., :top, :], u[..., h - bottom:, :], u[..., :, :left], u[..., :, w - right:]]
    return all(not bool(b.any()) for b in borders if b.numel())


def _pre_chain(start: Any, src: Any, stops: set[Any], memo: dict[Any, bool], *, movement: bool = False,
               remap: bool = False) -> tuple[set[Any] | None, bool, int]:
    """Nodes of the chain ``u -> a_src`` if it holds only channel-preserving homogeneous ops, whether
    it flattens, and the channel offset of ``a_src`` in ``u``. Along the chain a concatenation over
    channels shifts the offset, and a product with a factor that does not depend on ``a_src`` (a
    squeeze-excite gate computed from another site) scales channels; both stay linear in ``a_src``.
    With ``movement`` permutes and transposes pass too (the caller checks where the channels went). With
    ``remap`` transposes and splits pass, and the offset is ``-1`` where one lies on the chain: the caller reads
    the channels' places numerically (:func:`_channel_map`)."""
    allowed = PRE_OK | MOVEMENT if movement else PRE_OK
    if remap:
        allowed = allowed | MOVEMENT | SPLITS
    remapped = False
    chain: set[Any] = set()
    flattened = False
    offset = 0
    node = start
    while node is not src:
        if node is not None and node.name() == "torch::autograd::CopyBackwards":  # in-place F.relu(x, inplace)
            chain.add(node)  # the overwritten value gets no gradient; follow the value copied in
            node = node.next_functions[1][0]
            continue
        if node is not None and node.name() in ("CatBackward0", "MulBackward0"):
            kids = [(k, n) for k, (n, _) in enumerate(node.next_functions)
                    if n is not None and (n is src or _reaches(n, src, stops, memo))]
            if len(kids) != 1:
                return None, False, 0
            k, child = kids[0]
            if node.name() == "CatBackward0":
                shift = _cat_offset(node, k)
                if shift is None:
                    return None, False, 0
                offset += shift
            chain.add(node)
            node = child
            continue
        if node is start and node is not None and node.name() == PAD and len(_next(node)) == 1:
            chain.add(node)  # padding right before the layer (TensorFlow's "same"): checked zero by the caller
            node = _next(node)[0]
            continue
        spatial_mean = node is not None and node.name() == "MeanBackward1" and all(
            d % len(node._saved_self_sym_sizes) >= 2 for d in node._saved_dim)
        if node is None or (node.name() not in allowed and not spatial_mean) or len(_next(node)) != 1:
            return None, False, 0
        flattened = flattened or node.name() in FLATTEN
        remapped = remapped or (remap and node.name() in MOVEMENT | SPLITS)
        chain.add(node)
        node = _next(node)[0]
    return chain, flattened and not remapped, -1 if remapped else offset


def _channel_map(u: torch.Tensor, a_src: torch.Tensor) -> tuple[int, ...] | None:
    """For each channel of the source, the channel of ``u`` (``[B, Cu, H, W]``, attached) that holds it, ``-1`` where
    it reaches ``u`` nowhere; ``None`` unless every source element is copied to ``u`` once or not at all and each
    channel of ``u`` that a source channel reaches holds exactly that channel's elements. Read by two backwards
    through the chain (pure data movement: splits, concatenations, views, transposes): one of ones counts the
    copies of each source element, one of each ``u`` channel's index tells where they went."""
    if u.dim() != 4 or a_src.dim() < 2:
        return None
    code = torch.arange(1, u.shape[1] + 1, dtype=u.dtype, device=u.device).view(1, -1, 1, 1).expand_as(u)
    mass, coded = (torch.autograd.grad(u, a_src, grad_outputs=g, retain_graph=True, allow_unused=True)[0]
                   for g in (torch.ones_like(u), code.contiguous()))
    if mass is None or coded is None:
        return None
    mass, coded = mass.transpose(0, 1).flatten(1), coded.transpose(0, 1).flatten(1)  # [Ci, B * P]
    hit = mass == 1
    if not bool((hit | (mass == 0)).all()):
        return None
    inf = torch.full_like(coded, float("inf"))
    low, high = torch.where(hit, coded, inf).min(1).values, torch.where(hit, coded, -inf).max(1).values
    counts = hit.sum(1)
    per_channel = u.shape[0] * u[0, 0].numel()
    reached = counts > 0
    if not bool(((counts == per_channel) | ~reached).all()) or not bool((low == high)[reached].all()):
        return None
    index = [int(v) - 1 if r else -1 for v, r in zip(low.tolist(), reached.tolist(), strict=True)]
    used = [k for k in index if k >= 0]
    return tuple(index) if used and len(set(used)) == len(used) else None


def source_block(mix: Mixing, t: torch.Tensor, c_src: int) -> torch.Tensor:
    """The source's channels of ``t`` ``[..., Cu]`` (the layer's input channels on the last axis): its block at
    ``src_offset``, or by ``src_index`` (zero or ``False`` where a source channel does not reach the layer)."""
    if mix.src_index is None:
        return t[..., mix.src_offset:mix.src_offset + c_src]
    index, present = _channel_index(mix.src_index, t.device)
    picked = t.index_select(-1, index)
    return picked & present if picked.dtype == torch.bool else picked * present.to(picked.dtype)


@lru_cache(maxsize=256)
def _channel_index(src_index: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``src_index`` as tensors on ``device``, made once per route (every batch reads them): where each source
    channel lies in the layer's input ``[C_src]`` (0 where it does not reach it) and whether it does ``[C_src]``."""
    index = torch.tensor(src_index, device=device)
    return index.clamp(min=0), index >= 0


def _post_offset(dst: Any, mx: Any, post: set[Any]) -> int | None:
    """Channel offset of the mixing layer's output ``z`` in ``a_dst`` when concatenations lie
    between them: only along a single chain of per-channel ops (else ``None``)."""
    offset = 0
    node = dst
    while node is not mx:
        kids = [(k, n) for k, (n, _) in enumerate(node.next_functions) if n is mx or n in post]
        if len(kids) != 1:
            return None
        k, child = kids[0]
        if node.name() == "CatBackward0":
            shift = _cat_offset(node, k)
            if shift is None:
                return None
            offset += shift
        node = child
    return offset


def _shape_check(mx: Any, kind: str, *, flattened: bool, a_src: torch.Tensor, a_dst: torch.Tensor,
                 src_offset: int = 0, dst_offset: int = 0) -> Mixing | None:
    c_src, c_dst = a_src.shape[1], a_dst.shape[1]
    if kind == "conv":
        u, w = mx._saved_input, mx._saved_weight
        if flattened or u.dim() != 4 or u.shape[1] < src_offset + c_src or dst_offset + w.shape[0] > c_dst:
            return None
        if u.shape[1] != c_src and int(mx._saved_groups) != 1:
            return None  # a grouped conv over a concatenation: source channels not one block
        return Mixing(node=mx, kind="conv", group=1, src_offset=src_offset, dst_offset=dst_offset)
    u = mx._saved_mat1 if mx.name() == "AddmmBackward0" else mx._saved_self
    w_t = mx._saved_mat2
    if src_offset or u is None or w_t is None or u.dim() != 2 or dst_offset + w_t.shape[1] > c_dst \
            or u.shape[1] % c_src:
        return None
    if (a_src.dim() == 2) == flattened:  # 4-D sources must be flattened; 2-D ones must not
        return None
    return Mixing(node=mx, kind="linear", group=u.shape[1] // c_src, src_offset=0, dst_offset=dst_offset)


def mixing_input(mix: Mixing, a_src: torch.Tensor) -> torch.Tensor | GradientEdge:
    """What the one plain VJP of :func:`mixing_edge_weights` differentiates: the layer's output (or the source)."""
    return a_src if mix.kind == "identity" else GradientEdge(mix.node, 0)


def mixing_edge_weights(mix: Mixing, a_src: torch.Tensor, a_dst: torch.Tensor, g_dst: torch.Tensor,
                        targets: torch.Tensor, *, grad: torch.Tensor | None = None,
                        whole: dict[Any, torch.Tensor] | None = None) -> torch.Tensor:
    """``w[b, m, i]`` as in :func:`extractor.edges.edge_weights_vjp`, through ``mix``.

    ``a_src`` ``[B, Ci, ...]`` and ``a_dst`` ``[B, Cj, ...]`` attached, ``g_dst`` the fixed gradient,
    ``targets`` ``[B, M]`` (``-1`` = padding, weight 0); ``grad`` the plain VJP at :func:`mixing_input`
    if the caller took it (one backward for several sources). With ``whole`` (several sources concatenated
    before one conv, as in DenseNet) the conv's weight products are made for all its input channels once, kept
    there, and each source reads its block. Returns ``[B, M, Ci]``.
    """
    B, M = targets.shape
    if grad is None:
        (grad,) = torch.autograd.grad(a_dst, mixing_input(mix, a_src), grad_outputs=g_dst, retain_graph=True)
    if mix.kind == "identity":  # channel dst_offset + i reaches channel i only
        per = channel_dot(grad, a_src.detach())  # [B, C]
        src_idx = targets - mix.dst_offset
        ok = (targets >= 0) & (src_idx >= 0) & (src_idx < per.shape[1])
        idx = src_idx.clamp(0, per.shape[1] - 1)
        vals = per.gather(1, idx) * ok.to(per.dtype)
        return per.new_zeros(B, M, per.shape[1]).scatter_(2, idx[..., None], vals[..., None])
    gbar = grad
    z_idx = targets - mix.dst_offset  # target channel of a_dst -> channel of z (outside z: weight 0)
    valid = (targets >= 0) & (z_idx >= 0) & (z_idx < gbar.shape[1])
    if not bool(valid.any()):  # no target in the layer's block of the destination (a dense block's other layers)
        return gbar.new_zeros(B, M, a_src.shape[1])
    idx = z_idx.clamp(0, gbar.shape[1] - 1)
    spatial = gbar.shape[2:]
    gsel = gbar.gather(1, idx.view(B, M, *([1] * len(spatial))).expand(B, M, *spatial))
    gsel = gsel * valid.view(B, M, *([1] * len(spatial))).to(gsel.dtype)  # [B, M, ...]
    node = mix.node
    with torch.no_grad():
        if mix.kind == "linear":
            u = node._saved_mat1 if node.name() == "AddmmBackward0" else node._saved_self  # [B, F]
            w_sel = node._saved_mat2.T[idx]  # [B, M, F]
            per_feature = u.detach()[:, None, :] * w_sel * gsel[..., None]
            summed: torch.Tensor = per_feature.view(B, M, -1, mix.group).sum(-1)
            return summed
        geo = mix.first if mix.first is not None else node  # the layer whose input and geometry are read
        u = geo._saved_input.detach()  # [B, Cu, H, W]
        c_src = a_src.shape[1]
        if mix.first is None and int(node._saved_groups) > 1:  # each target reads its own group's channels only
            w = node._saved_weight.detach()  # [Co, Ci/g, kh, kw]
            per_out, per_in = w.shape[0] // int(node._saved_groups), w.shape[1]
            cols = (idx // per_out)[..., None] * per_in + torch.arange(per_in, device=w.device)  # [B, M, Ci/g]
            u = u.gather(1, cols.view(B, M * per_in, 1, 1).expand(B, M * per_in, *u.shape[2:]))
            w_sel, rows = w[idx], M  # the weight gradient below: one group of rows per target
        else:
            w_sel = composite_rows(mix, idx)  # [B, M, Cu, kh, kw]
            if mix.src_index is not None or (u.shape[1] != c_src and whole is not None):
                key = (node, mix.first)  # the layer's products once, for all the sources it reads
                full = whole.get(key) if whole is not None else None
                if full is None:
                    full = _weight_products(geo, u, w_sel, gsel, 1)
                    if whole is not None:
                        whole[key] = full
                return source_block(mix, full, c_src)
            if u.shape[1] != c_src:  # a concatenation before the layer: the source's block of input channels
                u = u[:, mix.src_offset:mix.src_offset + c_src]
                w_sel = w_sel[:, :, mix.src_offset:mix.src_offset + c_src]
            rows, cols = 1, None
        w_in = _weight_products(geo, u, w_sel, gsel, rows)  # [B, M, per_in]
        if cols is None:
            return w_in
        return w_in.new_zeros(B, M, c_src).scatter_(2, cols, w_in)


def _weight_products(geo: Any, u: torch.Tensor, w_sel: torch.Tensor, gsel: torch.Tensor, rows: int) -> torch.Tensor:
    """``[B, M, Ci]``: ``sum_tap W[j, i, tap] * dC_j/dW[j, i, tap]`` per image and target, from conv ``geo``'s input
    ``u`` ``[B, M * Ci or Ci, H, W]`` (each target's own channels where ``rows == M``, one group each), the
    targets' weight rows ``w_sel`` ``[B, M, Ci, kh, kw]`` and their gradients at the output ``gsel`` ``[B, M, H', W']``;
    one grouped weight-gradient convolution per chunk of images."""
    B, M = gsel.shape[:2]
    ci, per_in, kernel, spatial = u.shape[1], w_sel.shape[2], w_sel.shape[3:], gsel.shape[2:]
    if tuple(kernel) == (1, 1) and tuple(geo._saved_stride) == (1, 1) and tuple(geo._saved_padding) == (0, 0) \
            and tuple(u.shape[2:]) == tuple(spatial):  # a 1x1 conv: one product of the maps, no unfolding
        # (as a weight-gradient convolution it took 10-30x longer: EfficientNet's and ResNet's bottlenecks)
        g, x = gsel.flatten(2), u.flatten(2)  # [B, M, P], [B, ci, P]
        grad_w = torch.einsum("bmp,bmcp->bmc", g, x.view(B, M, per_in, -1)) if rows == M else torch.bmm(
            g, x.transpose(1, 2))  # [B, M, per_in]
        return grad_w * w_sel[..., 0, 0]
    # images per call bounded so the unfolded input (Ci * kh * kw * output pixels per image) stays small
    chunk = max(1, _UNFOLD_BUDGET // (ci * kernel.numel() * max(1, gsel[0, 0].numel())))
    out = []
    for s in range(0, B, chunk):
        n = min(chunk, B - s)
        grad_w = torch.nn.grad.conv2d_weight(  # type: ignore[attr-defined] # torch.nn.grad is not re-exported
            u[s:s + n].reshape(1, n * ci, *u.shape[2:]), (n * M, per_in, *kernel),
            gsel[s:s + n].reshape(1, n * M, *spatial), stride=tuple(geo._saved_stride),
            padding=tuple(geo._saved_padding), dilation=tuple(geo._saved_dilation), groups=n * rows,
        )  # [n * M, Ci or Ci/g, kh, kw]: dC_j/dW[j] per image
        out.append((grad_w.view(n, M, per_in, -1) * w_sel[s:s + n].reshape(n, M, per_in, -1)).sum(-1))
    return torch.cat(out, 0)


def channel_reach(mix: Mixing, c_src: int, c_dst: int) -> torch.Tensor | None:
    """Which source channels each destination channel reads through ``mix``: bool ``[c_dst, c_src]``,
    or ``None`` when every destination channel reads every source channel (a dense layer).

    Read off the layer's weights: an identity segment joins channel ``i`` to ``i`` alone, a
    depthwise or grouped convolution joins a group's channels only, and weights that are exactly 0
    join nothing. Destination channels outside the layer's output block (a concatenation after it)
    read nothing from this source.
    """
    if mix.kind == "identity":
        eye = torch.zeros(c_dst, c_src, dtype=torch.bool)
        eye[mix.dst_offset:mix.dst_offset + c_src] = torch.eye(c_src, dtype=torch.bool)[:c_dst - mix.dst_offset]
        return eye
    node = mix.node
    with torch.no_grad():
        if mix.kind == "linear":
            w = node._saved_mat2.detach().T  # [C_out, F], feature f from source channel f // group
            nz = (w != 0).view(w.shape[0], c_src, mix.group).any(-1).cpu()
        else:
            w = composite_rows(mix, torch.arange(node._saved_weight.shape[0], device=node._saved_weight.device))
            # [C_out, Cu, kh, kw]
            nz = (w != 0).flatten(2).any(-1).cpu()
            nz = source_block(mix, nz, c_src)
    if mix.dst_offset == 0 and nz.shape[0] == c_dst and bool(nz.all()):
        return None
    out = torch.zeros(c_dst, c_src, dtype=torch.bool)
    out[mix.dst_offset:mix.dst_offset + nz.shape[0]] = nz
    return out


# ops that keep channels apart whatever else they do (zero or edge padding included): for the channel structure
# of a segment only; the fast edge path needs the stricter PRE_OK / POST_OK
_CHANNELWISE = (PRE_OK | POST_OK | {"ConstantPadNdBackward0", "ReflectionPad2DBackward0",
                                     "ReplicationPad2DBackward0", "HardtanhBackward0"}) - FLATTEN


def segment_reach(a_src: torch.Tensor, a_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor]) \
        -> torch.Tensor | None:
    """:func:`channel_reach` of the segment ``a_src -> a_dst`` (attached site outputs ``[B, C, ...]``).

    A segment the fast path reads (:func:`find_mixing`) gives its structure exactly. Otherwise a
    segment whose only channel-mixing layer is one convolution of matching channel counts, with only
    channel-wise ops (padding included) around it, gives that convolution's structure; a segment of
    channel-wise ops only is the identity; anything else counts as dense (``None``).
    """
    mix = find_mixing(a_src, a_dst, site_tensors)
    c_src, c_dst = a_src.shape[1], a_dst.shape[1]
    if mix is not None:
        return channel_reach(mix, c_src, c_dst)
    seg = _segment(a_src, a_dst, site_tensors)
    if seg is None:
        return None
    src, _, _, _, on_path = seg
    mixers = [n for n in on_path if n.name() in MIXING]
    others = [n for n in on_path if n.name() not in MIXING and n is not src]
    if any(n.name() not in _CHANNELWISE for n in others):
        return None
    if not mixers:
        return torch.eye(c_dst, c_src, dtype=torch.bool) if c_src == c_dst else None
    if len(mixers) != 1 or mixers[0].name() != "ConvolutionBackward0" or mixers[0]._saved_transposed:
        return None
    w = mixers[0]._saved_weight
    if w is None or w.shape[0] != c_dst or w.shape[1] * int(mixers[0]._saved_groups) != c_src:
        return None
    return channel_reach(Mixing(node=mixers[0], kind="conv", group=1), c_src, c_dst)


# --- junctions: the source's own mixing layer, whatever lies between it and the destination -------------------------
#
# Where a segment has more than one mixing layer, or ops after its mixing layer that mix channels (layer norm,
# attention, a residual stream that every later block reads), the gradient of each target must still travel
# back through the segment. It need not travel through the *source's* mixing layer: if every path from
# ``a_dst`` back to ``a_src`` passes the first mixing layer after ``a_src`` (output ``z``, input ``u`` reached from
# ``a_src`` by homogeneous per-channel ops only), then with ``g = dC_j/dz``
#
#     w(i -> j)[c] = sum_p a_i(c, p) dC_j/da_i(c, p) = <g, Z_c>,   Z_c = the part of z that channel c of u makes,
#
# exactly (Euler's identity through the pre ops, linearity of the layer). ``Z_c`` is needed for the *kept*
# source channels only, and ``sum_c <g, Z_c> = <g, z - bias>``: one contraction per target gives the whole
# source's share of the completeness gap. So the batched backward stops at ``z`` (the projection layers of a
# residual stream are never differentiated per target), and what remains grows with kept sources x targets.


@dataclass(kw_only=True, frozen=True)
class Junction:
    """The first mixing layer after a source, which every path to the destination passes.

    ``kind``: ``"conv"`` (``u`` ``[B, Cu, H, W]``, source channel ``c`` is ``u``'s channel
    ``src_offset + c``), ``"linear"`` (``u`` ``[B, F]``, feature ``f`` from source channel ``f // group``)
    or ``"pointwise"`` (a linear layer applied at every position: ``u`` ``[B * P, C]`` is the source
    moved channels-last, as in ConvNeXt's and the transformers' MLPs).
    """

    node: Any
    kind: str
    group: int = 1
    src_offset: int = 0
    # the backward may stop higher up, at ``top``: ``rise`` nodes above the layer along one chain of per-channel
    # linear ops (a layer scale, an inference batch norm, views and permutes) that ends where the source's share
    # joins a residual stream; there ``dC/dz = scale * relayout(dC/dtop)`` (:func:`_rise_map`), so the per-channel
    # op is never run per target and source (ConvNeXt's layer scale; a batch norm in inference mode)
    rise: int = 0
    top: Any = None
    scale: torch.Tensor | None = None  # [Co], per channel of z
    moved: bool = False  # top is [B, Co, *spatial] over a pointwise junction's rows [B * P, Co]


def find_junction(a_src: torch.Tensor, a_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor], *,
                  seg: Segment | None = None) -> Junction | None:
    """The source's first mixing layer, if every path ``a_dst -> a_src`` passes it and it reads ``a_src``
    through homogeneous per-channel ops only (else ``None``: the caller differentiates to ``a_src``)."""
    seg = seg if seg is not None else _segment(a_src, a_dst, site_tensors)
    if seg is None:
        return None
    src, dst, stops, memo, on_path = seg
    for mx in (n for n in on_path if n.name() in MIXING):
        kind, inp, params = _mixing_parts(mx)
        if kind == "":
            continue
        pre, flattened, src_offset = _pre_chain(inp, src, stops, memo, movement=True)
        if pre is None:
            continue
        if _reaches(dst, src, stops | {mx}, {}) or any(_reaches(p, src, stops, memo) for p in params if p is not None):
            return None  # a path around the layer, or its weights computed from a_src
        moved = any(n.name() in MOVEMENT for n in pre)
        jn = _junction_shape(mx=mx, kind=kind, inp=inp, flattened=flattened, moved=moved, a_src=a_src,
                             src_offset=src_offset)
        return _risen(jn, _rise_chain(mx, on_path, dst)) if jn is not None else None
    return None


# ops a junction's share may pass on its way to the residual stream, each a per-channel linear map checked
# numerically on each batch (_rise_map): layer scales, inference batch norms, and views, permutes and copies (a
# chain of these last ones alone saves nothing and is not taken)
LAYOUT = FLATTEN | {"PermuteBackward0", "CloneBackward0"}
RISE_OK = frozenset({"MulBackward0", "DivBackward0", "NativeBatchNormBackward0"}) | LAYOUT


def _rise_chain(mx: Any, on_path: list[Any], dst: Any) -> list[tuple[Any, int]]:
    """The nodes above junction ``mx`` that every path from ``dst`` to it passes, one after the other, each of
    :data:`RISE_OK` with one input on the segment: ``(node, index of that input)`` from the top down."""
    on = set(on_path)
    parents: dict[Any, list[Any]] = {}
    for n in on_path:
        for c in _next(n):
            if c in on:
                parents.setdefault(c, []).append(n)
    chain: list[tuple[Any, int]] = []
    node = mx
    while len(ps := parents.get(node, [])) == 1 and ps[0] is not dst and ps[0].name() in RISE_OK:
        kids = [k for k, (c, _) in enumerate(ps[0].next_functions) if c is not None and c in on]
        if len(kids) != 1:
            break
        chain.append((ps[0], kids[0]))
        node = ps[0]
    return chain[::-1]


def _risen(jn: Junction, chain: list[tuple[Any, int]]) -> Junction:
    """``jn`` stopping at the highest node of ``chain`` (:func:`_rise_chain`) from which down to the layer the map
    checks out as a per-channel scale (:func:`_rise_map`), else at the layer itself."""
    for cut in range(len(chain)):
        if all(node.name() in LAYOUT for node, _ in chain[cut:]):
            break  # views and permutes only: nothing to save
        found = _rise_map(jn, chain[cut:])
        if found is not None:
            return replace(jn, rise=len(chain) - cut, top=chain[cut][0], scale=found[0], moved=found[1])
    return replace(jn, rise=0, top=None, scale=None, moved=False)


def _rise_map(jn: Junction, chain: list[tuple[Any, int]], *, probe: bool = True) -> tuple[torch.Tensor, bool] | None:
    """``(scale [Co], moved)`` where running ``chain``'s backward (top down to the layer ``jn.node``) maps a
    gradient ``g`` at the top to ``scale * relayout(g)`` at the layer's output (``moved``: a pointwise junction's
    ``[B * P, Co]`` rows read from a channels-first top ``[B, Co, *spatial]``); else ``None``. The scale is read
    off the backward of ones (one number per channel, the same at every position and image); with ``probe`` the
    map is checked on a random gradient too (on the first batch of an input shape: the chain's ops are linear, so
    later batches read the scale alone)."""
    top = chain[0][0]
    shape = tuple(top._input_metadata[0].shape)
    z_meta = jn.node._input_metadata[0]
    z_shape, co = tuple(z_meta.shape), z_meta.shape[-1] if jn.kind == "pointwise" else z_meta.shape[1]
    if math.prod(shape) != math.prod(z_shape):
        return None
    moved = jn.kind == "pointwise" and len(shape) > 2 and shape[1] == co and shape != z_shape
    if not moved and shape != z_shape and not (jn.kind == "pointwise" and shape[-1] == co):
        return None

    def down(g: torch.Tensor) -> torch.Tensor | None:
        for node, k in chain:
            out = node(g)
            g = out[k] if isinstance(out, tuple) else out
            if g is None:
                return None
        return g

    with torch.no_grad():
        ones = down(torch.ones(shape, dtype=z_meta.dtype, device=z_meta.device))
        if ones is None or tuple(ones.shape) != z_shape:
            return None
        scale = (ones if jn.kind == "pointwise" else ones.movedim(1, -1)).reshape(-1, co)[0]
        view = (1, -1) + (1,) * (len(z_shape) - 2) if jn.kind != "pointwise" else (1, -1)
        if not torch.equal(ones, torch.ones_like(ones) * scale.view(view)):
            return None
        if probe:
            g = torch.rand(shape, dtype=z_meta.dtype, device=z_meta.device) + 0.5
            got = down(g)
            want = (g.movedim(1, -1) if moved else g).reshape(z_shape) * scale.view(view)
            if got is None or not torch.allclose(got, want, rtol=1e-5 if z_meta.dtype != torch.float64 else 1e-12,
                                                 atol=0):
                return None
    return scale, moved


def _chain_along(dst: Any, path: tuple[int, ...], rise: int) -> list[tuple[Any, int]] | None:
    """The ``rise`` nodes right above the end of ``path`` (from the destination's node), with their input indices
    on the path: a junction's chain (:func:`_rise_chain`) in another batch's graph."""
    nodes = [dst]
    for k in path:
        nxt = nodes[-1].next_functions
        if k >= len(nxt) or nxt[k][0] is None:
            return None
        nodes.append(nxt[k][0])
    if rise >= len(nodes):
        return None
    return list(zip(nodes[len(nodes) - 1 - rise:-1], path[len(path) - rise:], strict=True))


def _junction_shape(*, mx: Any, kind: str, inp: Any, flattened: bool, moved: bool, a_src: torch.Tensor,
                    src_offset: int) -> Junction | None:
    B, c_src = a_src.shape[0], a_src.shape[1]
    if kind == "conv":
        u = mx._saved_input
        if moved or flattened or u.dim() != 4 or u.shape[0] != B or u.shape[1] < src_offset + c_src:
            return None
        if u.shape[1] != c_src and int(mx._saved_groups) != 1:
            return None  # a grouped conv over a concatenation: source channels not one block
        if not _zero_padding(inp, u):
            return None
        return Junction(node=mx, kind="conv", src_offset=src_offset)
    u = mx._saved_mat1 if mx.name() == "AddmmBackward0" else mx._saved_self
    if u is None or mx._saved_mat2 is None or u.dim() != 2 or src_offset:
        return None
    if moved or (a_src.dim() > 2 and u.shape[0] != B):  # channels moved last, positions as rows
        if u.shape[1] != c_src or u.shape[0] != B * (a_src[0, 0].numel()):
            return None
        with torch.no_grad():
            if not torch.equal(u, a_src.detach().movedim(1, -1).reshape(u.shape)):
                return None  # the rows are not the source's positions in order
        return Junction(node=mx, kind="pointwise")
    if u.shape[0] != B or u.shape[1] % c_src or (a_src.dim() == 2) == flattened:
        return None
    return Junction(node=mx, kind="linear", group=u.shape[1] // c_src)


def junction_weights(jn: Junction, a_src: torch.Tensor, g_z: torch.Tensor, idx: torch.Tensor, *,
                     parts: torch.Tensor | None = None) -> torch.Tensor:
    """``w[b, m, k]``: the edge weight from source channel ``idx[b, k]`` into target ``m`` of image ``b``.

    ``a_src`` ``[B, Ci, ...]`` the source, ``g_z`` ``[M, *z.shape]`` the targets' gradients at the
    junction's output ``z`` (``z`` ``[B, Co, H', W']``, ``[B, Co]`` or ``[B * P, Co]``), ``idx`` ``[B, n]``
    source channels (the caller masks padding). Cost: ``n`` source channels' share of the layer, and one
    product per target and source channel; ``parts``: that share if made already (:func:`junction_parts`).
    """
    if jn.kind == "pointwise":
        return pointwise_weights([(jn, a_src, idx)], g_z)[0]
    M, (B, n) = g_z.shape[0], idx.shape
    node = jn.node
    if n == 0:
        return g_z.new_zeros(B, M, 0)
    with torch.no_grad():
        if jn.kind == "linear":
            u = (node._saved_mat1 if node.name() == "AddmmBackward0" else node._saved_self).detach()  # [B, F]
            wt = node._saved_mat2.detach()  # [F, Co]
            feats = idx[..., None] * jn.group + torch.arange(jn.group, device=idx.device)  # [B, n, r]
            h = torch.einsum("mbo,bnro->bmnr", g_z, _scaled(jn, wt[feats]))
            out: torch.Tensor = (h * u.gather(1, feats.flatten(1)).view(B, 1, n, jn.group)).sum(-1)
            return out
        return _conv_junction(jn, g_z, idx, parts)


def pointwise_weights(sources: Sequence[tuple[Junction, torch.Tensor, torch.Tensor]], g_z: torch.Tensor) \
        -> list[torch.Tensor]:
    """:func:`junction_weights` of several pointwise junctions whose targets' gradients are one tensor ``g_z``
    (the sources along one residual stream all receive the stream's gradient): per source ``(junction, a_src,
    idx)``, ``w[b, m, k]``. Their kept rows are laid side by side, so each image's gradient is read once for all of
    them (read once per source, it took half of ConvNeXt-T's edge time at 16 images)."""
    jn0 = sources[0][0]
    if any(jn.kind != "pointwise" or (jn.top is not None and jn.moved) != (jn0.top is not None and jn0.moved)
           for jn, _, _ in sources):
        raise ValueError("pointwise_weights: the junctions read the gradient in different layouts")
    M, B = g_z.shape[0], sources[0][2].shape[0]
    if jn0.top is not None and jn0.moved:
        g_z = g_z.movedim(2, -1)
    sizes = [idx.shape[1] for _, _, idx in sources]
    if sum(sizes) == 0:
        return [g_z.new_zeros(B, M, 0) for _ in sources]
    with torch.no_grad():
        g = g_z.reshape(M, B, -1, g_z.shape[-1])  # [M, B, P, Co] (a view, also of a moved top)
        P = g.shape[2]
        # [B, Co, sum n] and [B, sum n, P]: every source's kept weight rows and kept channels
        w_sel = torch.cat([_scaled(jn, jn.node._saved_mat2.detach()[idx]) for jn, _, idx in sources], 1).transpose(1, 2)
        usel = torch.cat([a.detach().flatten(2).gather(1, idx[..., None].expand(B, idx.shape[1], P))
                          for _, a, idx in sources], 1)
        # per image one product of all targets' gradients with the kept rows (over Co: many rows, short
        # reductions), then over positions; contracting positions first (one long reduction per target, as
        # before) took twice the time on ConvNeXt-T (bench timing, 2 threads). An einsum over the images would
        # first copy every target's gradient to put the image axis in front.
        w = torch.stack([(torch.matmul(g[:, b], w_sel[b]) * usel[b].T).sum(1) for b in range(B)], 0)
    return list(w.split(sizes, 2))


def _scaled(jn: Junction, wt: torch.Tensor) -> torch.Tensor:
    """A linear junction's weight rows ``[..., Co]`` times the scale of its chain up to the top, if it rises."""
    return wt * jn.scale if jn.scale is not None else wt


def _conv_junction(jn: Junction, g_z: torch.Tensor, idx: torch.Tensor, parts: torch.Tensor | None) -> torch.Tensor:
    """Each kept source channel's share of the convolution, ``Z_c`` ``[Co_group, H', W']`` (``parts``, or made here
    by one grouped convolution over all images' kept channels per chunk of images), contracted with every target's
    gradient."""
    B, n = idx.shape
    rows = _junction_rows(jn, idx)
    per_out = rows.shape[-1]
    spatial = g_z[0, 0, 0].numel()
    chunk = B if parts is not None else max(1, _UNFOLD_BUDGET // max(1, n * per_out * spatial))
    out = []
    for s in range(0, B, chunk):
        e = min(B, s + chunk)
        z_c = parts[s:e] if parts is not None else _parts_of(jn, idx[s:e])  # [nb, n, per_out, P]
        if jn.scale is not None:  # the chain's scale up to the top, per output row
            z_c = z_c * jn.scale[rows[s:e]][..., None]
        g = g_z[:, s:e].flatten(3)  # [M, nb, Co, P]
        if int(jn.node._saved_groups) == 1:
            out.append(torch.einsum("bnop,mbop->bmn", z_c, g))
        else:  # each source channel reaches its group's output rows only
            g_sel = g[:, torch.arange(e - s, device=g.device)[:, None, None], rows[s:e]]  # [M, nb, n, per_out, P]
            out.append(torch.einsum("bnop,mbnop->bmn", z_c, g_sel))
    return torch.cat(out, 0)


def _junction_rows(jn: Junction, idx: torch.Tensor) -> torch.Tensor:
    """``[B, n, per_out]``: the output channels each kept source channel reaches (its group's)."""
    node = jn.node
    groups = int(node._saved_groups)
    per_in: int = node._saved_input.shape[1] // groups
    per_out: int = node._saved_weight.shape[0] // groups
    return ((idx + jn.src_offset) // per_in)[..., None] * per_out + torch.arange(per_out, device=idx.device)


def _parts_of(jn: Junction, idx: torch.Tensor) -> torch.Tensor:
    """``[B, n, per_out, P]``: the part of the conv junction's output that each source channel ``idx[b, k]`` makes."""
    node = jn.node
    B, n = idx.shape
    u, w = node._saved_input.detach(), node._saved_weight.detach()  # [B, Cu, H, W], [Co, Cu/g, kh, kw]
    per_in = u.shape[1] // int(node._saved_groups)
    cu = idx + jn.src_offset
    rows = _junction_rows(jn, idx)
    w_sel = w[rows, (cu % per_in)[..., None]]  # [B, n, per_out, kh, kw]
    x = u.gather(1, cu[..., None, None].expand(B, n, *u.shape[2:]))  # [B, n, H, W]
    with torch.no_grad():
        z_c = torch.nn.functional.conv2d(
            x.reshape(1, B * n, *u.shape[2:]), w_sel.reshape(B * n * rows.shape[-1], 1, *w.shape[2:]),
            stride=tuple(node._saved_stride), padding=tuple(node._saved_padding),
            dilation=tuple(node._saved_dilation), groups=B * n)
    return z_c.view(B, n, rows.shape[-1], -1)


def junction_parts(jn: Junction, idx: torch.Tensor) -> torch.Tensor | None:
    """A conv junction's parts for every image (:func:`_parts_of`), to be kept for the destinations it serves;
    ``None`` for other junctions, or where they would exceed the unfold budget."""
    if jn.kind != "conv":
        return None
    node = jn.node
    per_out = node._saved_weight.shape[0] // int(node._saved_groups)
    w = node._saved_weight
    out_numel = math.prod((size + 2 * p - d * (k - 1) - 1) // st + 1 for size, p, d, k, st in zip(
        node._saved_input.shape[2:], node._saved_padding, node._saved_dilation, w.shape[2:], node._saved_stride,
        strict=True))
    if idx.numel() * per_out * max(out_numel, 1) > _UNFOLD_BUDGET:
        return None
    return _parts_of(jn, idx)


def junction_share(jn: Junction, a_src: torch.Tensor) -> torch.Tensor:
    """The source's whole share of the junction's output, ``z - bias`` restricted to the source's input
    channels (``sum_c Z_c``), shaped like ``z`` (or, where the junction rises, scaled and shaped like its top);
    contracted with a target's gradient it gives the sum of the source's edge weights over all its channels."""
    share = _share(jn, a_src)
    if jn.top is None or jn.scale is None:
        return share
    with torch.no_grad():
        if jn.kind != "pointwise":
            return share * jn.scale.view(1, -1, *([1] * (share.dim() - 2)))
        top = tuple(jn.top._input_metadata[0].shape)
        share = share * jn.scale
        if jn.moved:
            return share.view(top[0], *top[2:], top[1]).movedim(-1, 1).contiguous()
        return share.view(top)


def junction_kept_shares(jn: Junction, idx: torch.Tensor) -> torch.Tensor | None:
    """``[n, *share.shape]``: the part of :func:`junction_share` that each kept source channel ``idx[b, k]``
    (``[B, n]``) makes, ``Z_c`` in the share's layout (and scale, where the junction rises); summed over all channels
    they give the share. For pointwise junctions and convolutions without groups; ``None`` for others."""
    node = jn.node
    B, n = idx.shape
    with torch.no_grad():
        if jn.kind == "pointwise":
            u, wt = node._saved_mat1.detach(), node._saved_mat2.detach()  # [B * P, C], [C, Co]
            u = u.view(B, -1, u.shape[-1])
            h = u.gather(2, idx[:, None, :].expand(B, u.shape[1], n))  # [B, P, n]
            rows = _scaled(jn, wt[idx])  # [B, n, Co]
            parts: torch.Tensor = h.permute(2, 0, 1)[..., None] * rows.transpose(0, 1)[:, :, None, :]  # [n, B, P, Co]
            if jn.top is None:
                return parts.reshape(n, B * u.shape[1], -1)
            top = tuple(jn.top._input_metadata[0].shape)
            if jn.moved:
                return parts.reshape(n, top[0], *top[2:], top[1]).movedim(-1, 2)
            return parts.reshape(n, *top)
        if jn.kind != "conv" or jn.moved or node.name() != "ConvolutionBackward0" or int(node._saved_groups) != 1:
            return None
        z = _parts_of(jn, idx)  # [B, n, Co, P]
        if jn.scale is not None:
            z = z * jn.scale[:, None]
        out = (jn.top if jn.top is not None else node)._input_metadata[0].shape
        return z.transpose(0, 1).reshape(n, *out)


def _share(jn: Junction, a_src: torch.Tensor) -> torch.Tensor:
    node = jn.node
    with torch.no_grad():
        if jn.kind == "conv":
            u, w = node._saved_input.detach(), node._saved_weight.detach()
            c = a_src.shape[1]
            if u.shape[1] != c:  # groups == 1 here (see _junction_shape)
                u, w = u[:, jn.src_offset:jn.src_offset + c], w[:, jn.src_offset:jn.src_offset + c]
            return torch.nn.functional.conv2d(u, w, stride=tuple(node._saved_stride),
                                              padding=tuple(node._saved_padding),
                                              dilation=tuple(node._saved_dilation), groups=int(node._saved_groups))
        u = node._saved_mat1 if node.name() == "AddmmBackward0" else node._saved_self
        share: torch.Tensor = u.detach() @ node._saved_mat2.detach()
        return share


def graph_path(start: Any, goal: Any) -> tuple[int, ...] | None:
    """The ``next_functions`` indices of a shortest path from autograd node ``start`` to ``goal`` (BFS)."""
    parent: dict[Any, tuple[Any, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node is goal:
            steps: list[int] = []
            while (up := parent[node]) is not None:
                node, k = up
                steps.append(k)
            return tuple(reversed(steps))
        for k, (child, _) in enumerate(node.next_functions):
            if child is not None and child not in parent:
                parent[child] = (node, k)
                queue.append(child)
    return None


def follow(start: Any, path: tuple[int, ...]) -> Any:
    """The node ``path`` (from :func:`graph_path`) leads to from ``start``, or ``None``."""
    node = start
    for k in path:
        nxt = node.next_functions
        if k >= len(nxt) or nxt[k][0] is None:
            return None
        node = nxt[k][0]
    return node


class Route(NamedTuple):
    """How one edge of the site graph is computed: ``kind`` is ``"mixing"`` (:func:`find_mixing`),
    ``"junction"`` (:func:`find_junction`) or ``"vjp"`` (a batched VJP to the whole source). ``path`` leads
    from the destination's autograd node to the layer; ``mixing`` or ``junction`` holds the layer's fields
    (a mixing route without them is searched again on each batch: two convs, whose composite is numbers)."""

    kind: str
    path: tuple[int, ...] = ()
    junction: Junction | None = None
    mixing: Mixing | None = None
    layer: str = ""  # the layer's autograd node name
    entry: str = ""  # a destination's entry layer (key (j, j)): its kind
    # two convs: the path from the second conv's node to the first. A junction or VJP route: the path from the
    # destination's entry layer to the conv where the source's batched backward starts (find_deep_entry)
    first: tuple[int, ...] | None = None
    gate: int = -1  # ... and which input of the first conv's input product is a gate to start from (DeepEntry)
    over: tuple[int, ...] = ()  # an entry: the sources whose paths it was found for
    chain: bool = False  # a deep entry: the scale between its convs is read off batch norms (is_chain)
    # a junction route through a funnel (extractor.funnels): the path from the destination's node to the mixing
    # layer whose output the batched backward stops at, and that layer's autograd node name
    funnel: tuple[int, ...] | None = None
    funnel_layer: str = ""


@dataclass
class RouteCache:
    """Routes found on the first batch of each input shape, kept for the run: they depend on the architecture,
    not on the pixels. The layers' numbers (weights, saved inputs) are read from each batch's own graph."""

    by_shape: dict[tuple[object, ...], dict[tuple[int, int], Route]] = field(default_factory=dict)
    planned: set[tuple[object, ...]] = field(default_factory=set)  # the keys whose funnels are planned (funnels.py)


def find_route(a_src: torch.Tensor, a_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor]) -> Route:
    """Classify one segment (the discovery walk; later batches reuse the answer through :class:`RouteCache`).
    A junction or VJP route learns its deep entry later (:func:`with_deep_entry`), once the destination's entry
    for its slow sources is known."""
    seg = _segment(a_src, a_dst, site_tensors)
    if seg is None:
        return Route(kind="vjp")
    mix = find_mixing(a_src, a_dst, site_tensors, seg=seg)
    if mix is not None:
        if mix.kind == "identity":
            return Route(kind="mixing", mixing=mix)
        path = graph_path(a_dst.grad_fn, mix.node)
        first = graph_path(mix.node, mix.first) if mix.first is not None else None
        if path is None or (mix.first is not None and first is None):
            return Route(kind="mixing")
        return Route(kind="mixing", path=path, mixing=replace(mix, node=None, first=None, scale=None),
                     layer=mix.node.name(), first=first)
    jn = find_junction(a_src, a_dst, site_tensors, seg=seg)
    path = graph_path(a_dst.grad_fn, jn.node) if jn is not None and a_dst.grad_fn is not None else None
    if jn is None or path is None:
        return Route(kind="vjp")
    return Route(kind="junction", path=path, junction=replace(jn, node=None, top=None, scale=None),
                 layer=jn.node.name())


def with_deep_entry(route: Route, a_src: torch.Tensor, a_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor],
                    entry: Entry) -> Route:
    """A junction or VJP route with its deep entry below the destination's ``entry`` (:func:`find_deep_entry`), if
    one holds (the discovery walk, on the first batch)."""
    seg = _segment(a_src, a_dst, site_tensors)
    junction = follow(a_dst.grad_fn, route.path) if route.kind == "junction" and a_dst.grad_fn is not None else None
    found = find_deep_entry(seg, entry.node, junction) if seg is not None and entry.kind == "conv" else None
    if found is None:
        return route._replace(first=None, gate=-1, chain=False)
    return route._replace(first=found[0], gate=found[1], chain=found[2])


def mixing_at(route: Route, a_src: torch.Tensor, a_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor]) \
        -> Mixing | None:
    """The mixing layer of a cached mixing route in this batch's graph (searched where the route keeps none)."""
    if route.mixing is None:
        return find_mixing(a_src, a_dst, site_tensors)
    if route.mixing.kind == "identity":
        return route.mixing
    node = follow(a_dst.grad_fn, route.path) if a_dst.grad_fn is not None else None
    if node is None or node.name() != route.layer:
        return None
    if route.first is None:
        return replace(route.mixing, node=node)
    first = follow(node, route.first)
    if first is None or first.name() != "ConvolutionBackward0" \
            or (scale := mid_scale(node, first, route.first if route.mixing.chain else None)) is None:
        return None
    return replace(route.mixing, node=node, first=first, scale=scale)


def junction_at(route: Route, a_dst: torch.Tensor, memo: dict[Any, Any] | None = None) -> Junction | None:
    """The junction of a cached route in this batch's graph (``None`` if the graph differs there). ``memo`` keeps
    each junction's rise for this batch (one source's junction serves every destination it feeds)."""
    node = follow(a_dst.grad_fn, route.path) if a_dst.grad_fn is not None else None
    if node is None or route.junction is None or node.name() != route.layer:
        return None
    jn = replace(route.junction, node=node, top=None, scale=None)
    if not jn.rise:
        return jn
    key = ("rise", node, jn.rise)
    memo = {} if memo is None else memo
    if key not in memo:
        chain = _chain_along(a_dst.grad_fn, route.path, jn.rise)
        found = _rise_map(jn, chain, probe=False) if chain is not None else None
        memo[key] = None if chain is None or found is None else (chain[0][0], *found)
    if memo[key] is None:
        return replace(jn, rise=0)
    top, scale, moved = memo[key]
    return replace(jn, top=top, scale=scale, moved=moved)


# --- entries: the destination's own mixing layer ---------------------------------------------------------------------
#
# A target's cotangent ``g_dst`` restricted to channel ``c`` reaches the destination's own mixing layer (output ``z``,
# input ``u``) as ``gbar[c]`` alone when only per-channel ops lie between ``z`` and ``a_dst`` (``gbar = dC/dz``, one
# plain VJP for all targets), and reaches ``u`` as that channel's row of weights applied to ``gbar[c]``. So the
# batched backward can start at ``u``: the destination's activation and mixing layer are never run per target.


@dataclass(kw_only=True, frozen=True)
class Entry:
    """The destination's mixing layer: every path from the sources into ``a_dst`` enters through it, and
    channel ``c`` of its output ``z`` is channel ``c`` of ``a_dst``. ``kind`` as for :class:`Junction`."""

    node: Any
    kind: str


_ENTRY_CHAIN = POST_OK | MOVEMENT | FLATTEN


def entry_input(entry: Entry) -> GradientEdge:
    """Where the entry layer's input ``u`` enters the autograd graph (the batched backward starts there)."""
    k = {"ConvolutionBackward0": 0, "AddmmBackward0": 1}.get(entry.node.name(), 0)
    node, nr = entry.node.next_functions[k]
    return GradientEdge(node, nr)


def find_entry(a_dst: torch.Tensor, g_dst: torch.Tensor, site_tensors: Iterable[torch.Tensor]) -> Entry | None:
    """The destination's mixing layer (see :class:`Entry`), or ``None``. The chain from ``a_dst`` down to it must
    hold per-channel ops (depthwise convs included) and data-movement ops only, with nothing else from a site
    entering it and no site on it; that channel ``c``
    stays channel ``c`` is checked by a VJP with half the channels, drawn at random, masked."""
    node: Any = a_dst.grad_fn
    sites = {t.grad_fn for t in site_tensors if t.grad_fn is not None} - {node}
    memo: dict[Any, bool] = {}
    while node is not None and (node.name() not in MIXING or depthwise(node)):
        if node in sites or (node.name() not in _ENTRY_CHAIN and not depthwise(node)):
            return None
        kids = [n for n in _next(node) if _leads_to(n, sites, memo)]
        if len(kids) != 1:
            return None
        node = kids[0]
    if node is None:
        return None
    kind, inp, params = _mixing_parts(node)
    if kind == "" or inp is None or any(p is not None and _leads_to(p, sites, memo) for p in params):
        return None
    if kind == "conv":
        w, u = node._saved_weight, node._saved_input
        if int(node._saved_groups) != 1 or u.dim() != 4 or w.shape[0] != a_dst.shape[1]:
            return None
    else:
        u = node._saved_mat1 if node.name() == "AddmmBackward0" else node._saved_self
        if u is None or node._saved_mat2 is None or node._saved_mat2.shape[1] != a_dst.shape[1]:
            return None
        kind = "linear" if u.shape[0] == a_dst.shape[0] and a_dst.dim() == 2 else "pointwise"
    entry = Entry(node=node, kind=kind)
    gen = torch.Generator().manual_seed(0)
    half = (torch.rand(a_dst.shape[1], generator=gen) < 0.5).to(a_dst.device)
    view = (1, -1) + (1,) * (a_dst.dim() - 2)
    gbar, ghalf = (torch.autograd.grad(a_dst, GradientEdge(node, 0), grad_outputs=g, retain_graph=True)[0]
                   for g in (g_dst, g_dst * half.view(view).to(g_dst.dtype)))
    where = half.view(-1) if kind == "pointwise" else half.view(view)
    return entry if torch.equal(ghalf, gbar * where.to(gbar.dtype)) and bool(gbar.any()) else None


def entry_cotangents(entry: Entry, gbar: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[M, *u.shape]``: each target's gradient at the entry layer's input ``u``.

    ``gbar`` ``dC/dz`` (shaped like ``z``), ``targets`` ``[B, M]`` channels (``-1`` = none, zero).
    """
    node = entry.node
    B, M = targets.shape
    valid = (targets >= 0).to(gbar.dtype)
    idx = targets.clamp(min=0)
    with torch.no_grad():
        if entry.kind == "conv":
            return _transposed(node, node._saved_weight.detach()[idx], _target_maps(gbar, targets))
        w = node._saved_mat2.detach().T  # [Co, F]
        if entry.kind == "linear":  # u [B, F]
            g = gbar.gather(1, idx) * valid  # [B, M]
            rows: torch.Tensor = (g[..., None] * w[idx]).transpose(0, 1)
            return rows
        g = gbar.view(B, -1, gbar.shape[-1])  # [B, P, Co]
        g = g.gather(2, idx[:, None, :].expand(B, g.shape[1], M)) * valid[:, None, :]  # [B, P, M]
        return torch.einsum("bpm,bmf->mbpf", g, w[idx]).reshape(M, -1, w.shape[1])


def find_entry_route(a_dst: torch.Tensor, g_dst: torch.Tensor, sources: dict[int, torch.Tensor]) -> Route:
    """The destination's entry layer for the paths from ``sources`` (site index -> attached source) as a cacheable
    route (``kind`` ``"entry"``, or ``"none"``); ``over`` names the sources."""
    found = find_entry(a_dst, g_dst, sources.values())
    path = graph_path(a_dst.grad_fn, found.node) if found is not None else None
    if found is None or path is None:
        return Route(kind="none", over=tuple(sources))
    return Route(kind="entry", path=path, layer=found.node.name(), entry=found.kind, over=tuple(sources))


def entry_at(route: Route, a_dst: torch.Tensor) -> Entry | None:
    """The entry layer of a cached route in this batch's graph (``None`` if there is none or the graph differs)."""
    if route.kind != "entry" or a_dst.grad_fn is None:
        return None
    node = follow(a_dst.grad_fn, route.path)
    return Entry(node=node, kind=route.entry) if node is not None and node.name() == route.layer else None


# --- deep entries: a linear bottleneck at the destination ----------------------------------------------------------
#
# Where the destination's entry layer ``m2`` is a 1x1 convolution that reads another convolution ``m1`` through
# per-channel constant scales only (batch norm, residual additions: a linear bottleneck, as in EfficientNet and
# MobileNet), target ``j``'s gradient at ``m1``'s input is ``m1``'s transposed convolution of ``gbar_j`` with row ``j``
# of the composite ``W2 diag(s) W1`` (:func:`composite_rows`). A source whose every path to the destination passes
# ``m1`` (a squeeze-excite gate that multiplies ``m1``'s input, say) then starts its batched backward at ``m1``'s
# input: neither convolution is differentiated per target.


@dataclass(kw_only=True, frozen=True)
class DeepEntry:
    """Where a source's batched backward starts below the destination's two convs: ``mix`` holds them (``node``
    ``m2``, ``first`` ``m1``, ``scale``). With ``gate`` ``>= 0`` ``m1`` (1x1, stride 1) reads ``x * gate``, ``x``
    not computed from the source and ``gate`` ``[B, C, 1, 1]`` (a squeeze-excite gate); the start is then the
    gate, input ``gate`` of that product."""

    mix: Mixing
    gate: int = -1

    @property
    def layer(self) -> Any:
        """The conv whose input (or gated input) the backward starts from: ``m1``, or the entry layer itself."""
        return self.mix.first if self.mix.first is not None else self.mix.node

    def edge(self) -> GradientEdge:
        """The autograd edge the backward starts from."""
        m1 = self.layer
        if self.gate < 0:
            return GradientEdge(*m1.next_functions[0])
        return GradientEdge(*m1.next_functions[0][0].next_functions[self.gate])

    def cotangents(self, gbar: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[M, *shape]``: each target's gradient at :meth:`edge`, from ``gbar`` ``dC/dz2`` ``[B, Co, H, W]`` and
        ``targets`` ``[B, M]`` (``-1`` = none, zero)."""
        with torch.no_grad():
            rows = composite_rows(self.mix, targets.clamp(min=0))  # [B, M, Ci, kh, kw]
            g = _target_maps(gbar, targets)  # [B, M, H, W]
            if self.gate < 0:
                return _transposed(self.layer, rows, g)
            product = self.layer.next_functions[0][0]
            x = (product._saved_other if self.gate == 0 else product._saved_self).detach()  # [B, C, H, W]
            # the gradient at m1's input is rows (x) g, an outer product: summed against x over positions at once
            spread = torch.einsum("bmp,bcp->mbc", g.flatten(2), x.flatten(2))
            out: torch.Tensor = (spread * rows[..., 0, 0].transpose(0, 1))[..., None, None]
            return out


def find_deep_entry(seg: Segment, entry: Any, junction: Any = None) -> tuple[tuple[int, ...], int, bool] | None:
    """The path from the destination's entry node ``entry`` (``m2``) to ``m1``, if every path of the segment
    ``seg`` passes ``m1`` and only :data:`MID_OK` ops lie between the two (else ``None``), and the gate input of
    ``m1``'s input (:class:`DeepEntry`; ``-1`` if none), and whether the ops between form a chain (:func:`is_chain`).
    An entry that reads a gated product itself gives the path ``()``. ``junction``: the source's junction node, which
    must lie below ``m1``. The scale between the convs is checked on each batch (:func:`mid_scale`)."""
    src, dst, stops, memo, on_path = seg
    if entry.name() != "ConvolutionBackward0" or entry._saved_transposed or int(entry._saved_groups) != 1 \
            or tuple(entry._saved_weight.shape[2:]) != (1, 1) or tuple(entry._saved_stride) != (1, 1) \
            or tuple(entry._saved_padding) != (0, 0):
        return None
    if (gate := _gate(entry, src, stops, memo, junction)) >= 0:
        return (), gate, False  # the entry layer itself reads the gated product
    between = _mid_walk(_next(entry)[0], set(on_path)) if _next(entry) else None
    if between is None or len(between[0]) != 1:
        return None
    (m1,), seen = between
    if m1 is junction or m1._saved_transposed or len(m1._saved_stride) != 2 or m1._saved_input is None \
            or m1.next_functions[0][0] is None or _reaches(dst, src, stops | {m1}, {}) \
            or any(_reaches(p, src, stops, memo) for p, _ in m1.next_functions[1:] if p is not None):
        return None
    path = graph_path(entry, m1)
    return None if path is None else (path, _gate(m1, src, stops, memo, junction), is_chain(seen - {m1}, m1))


def _gate(m1: Any, src: Any, stops: set[Any], memo: dict[Any, bool], junction: Any) -> int:
    """Which input of ``m1``'s input product is a gate ``[B, C, 1, 1]`` that alone leads to the source
    (``-1``: none)."""
    product = m1.next_functions[0][0]
    u = m1._saved_input
    if product.name() != "MulBackward0" or tuple(m1._saved_weight.shape[2:]) != (1, 1) \
            or tuple(m1._saved_stride) != (1, 1) or tuple(m1._saved_padding) != (0, 0):
        return -1
    kids = [n for n, _ in product.next_functions]
    saved = (product._saved_self, product._saved_other)
    for k in (0, 1):
        gate, x, other = saved[k], saved[1 - k], kids[1 - k]
        if gate is None or x is None or kids[k] is None or kids[k] is junction:
            continue
        if tuple(gate.shape) == (u.shape[0], u.shape[1], 1, 1) and tuple(x.shape) == tuple(u.shape) \
                and (other is None or not _reaches(other, src, stops, memo)):
            return k
    return -1


def deep_at(route: Route, entry: Entry | None) -> DeepEntry | None:
    """A route's deep entry in this batch's graph (``None`` if the route has none, the graph differs, or the scale
    between the two convs is not per channel)."""
    if route.first is None or entry is None or entry.kind != "conv":
        return None
    if route.first == ():  # the entry layer itself reads the gated product
        ok = entry.node.next_functions[0][0] is not None and entry.node.next_functions[0][0].name() == "MulBackward0"
        return DeepEntry(mix=Mixing(node=entry.node, kind="conv", group=1), gate=route.gate) if ok else None
    m1 = follow(entry.node, route.first)
    if m1 is None or m1.name() != "ConvolutionBackward0" \
            or (scale := mid_scale(entry.node, m1, route.first if route.chain else None)) is None:
        return None
    if route.gate >= 0 and m1.next_functions[0][0].name() != "MulBackward0":
        return None
    return DeepEntry(mix=Mixing(node=entry.node, kind="conv", group=1, first=m1, scale=scale), gate=route.gate)


def _target_maps(gbar: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B, M, H, W]``: channel ``targets[b, m]`` of ``gbar`` ``[B, C, H, W]`` (zero where the target is ``-1``)."""
    B, M = targets.shape
    g = gbar.gather(1, targets.clamp(min=0)[..., None, None].expand(B, M, *gbar.shape[2:]))
    return g * (targets >= 0).to(gbar.dtype)[..., None, None]


def _transposed(node: Any, w_sel: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[M, B, *u.shape[1:]]``: conv ``node``'s input gradient for each of ``B x M`` output gradients ``g``
    ``[B, M, H', W']``, each with its own weight row ``w_sel`` ``[B, M, Ci, kh, kw]`` (an outer product for a 1x1
    convolution of stride 1, else one depthwise convolution, :func:`_spread`, or one grouped input-gradient call)."""
    u = node._saved_input
    B, M = g.shape[:2]
    if tuple(w_sel.shape[3:]) == (1, 1) and tuple(node._saved_stride) == (1, 1) \
            and tuple(node._saved_padding) == (0, 0) and tuple(g.shape[2:]) == tuple(u.shape[2:]):
        return torch.einsum("bmc,bmhw->mbchw", w_sel[..., 0, 0], g)
    spread = _spread(node, w_sel, g)
    if spread is not None:
        return spread
    grad_u: torch.Tensor = torch.nn.grad.conv2d_input(  # type: ignore[attr-defined] # not re-exported
        (1, B * M * u.shape[1], *u.shape[2:]), w_sel.reshape(B * M, u.shape[1], *w_sel.shape[3:]),
        g.reshape(1, B * M, *g.shape[2:]), stride=tuple(node._saved_stride), padding=tuple(node._saved_padding),
        dilation=tuple(node._saved_dilation), groups=B * M)
    return grad_u.view(B, M, *u.shape[1:]).transpose(0, 1).contiguous()


def _spread(node: Any, w_sel: torch.Tensor, g: torch.Tensor) -> torch.Tensor | None:
    """:func:`_transposed` as one depthwise convolution with multiplier ``Ci``: each target's output gradient
    ``g`` ``[B, M, H', W']``, its zeros put back between strided positions, convolved with its own flipped weight
    row. On CPU this is 4-40x faster than the grouped input-gradient call, which runs one channel per group
    (EfficientNet-V2-S's 3x3 entries: 7.6 -> 0.5 ms at stride 1, 10.2 -> 1.1 ms at stride 2). ``None`` where a
    padding exceeds the kernel's reach."""
    u = node._saved_input
    B, M = g.shape[:2]
    kernel, stride = tuple(w_sel.shape[3:]), tuple(node._saved_stride)
    dilation, padding = tuple(node._saved_dilation), tuple(node._saved_padding)
    before = [d * (k - 1) - p for k, d, p in zip(kernel, dilation, padding, strict=True)]
    dilated = [(n - 1) * st + 1 for n, st in zip(g.shape[2:], stride, strict=True)]
    # so that a valid convolution gives u's size (rows the forward never reached at the end get zeros)
    after = [size - dil - b + d * (k - 1) for size, dil, b, d, k in
             zip(u.shape[2:], dilated, before, dilation, kernel, strict=True)]
    if min(before) < 0 or min(after) < 0:
        return None
    maps = g.reshape(1, B * M, *g.shape[2:])
    if stride != (1, 1):
        maps = maps.new_zeros(1, B * M, *dilated)
        maps[..., ::stride[0], ::stride[1]] = g.reshape(1, B * M, *g.shape[2:])
    maps = torch.nn.functional.pad(maps, (before[1], after[1], before[0], after[0]))
    flipped = w_sel.flip(-1, -2).reshape(B * M * u.shape[1], 1, *kernel)
    out = torch.nn.functional.conv2d(maps, flipped, dilation=dilation, groups=B * M)
    if tuple(out.shape[2:]) != tuple(u.shape[2:]):
        return None
    return out.view(B, M, *u.shape[1:]).transpose(0, 1).contiguous()
