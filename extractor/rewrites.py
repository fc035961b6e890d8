"""Backward rewrites for the edges' batched VJPs: the forward's values unchanged bit for bit, its backward cheaper.

The edges (:mod:`extractor.edges`) take one backward per chunk of targets through the graph of a cut forward
(:func:`extractor.sitegraph.cut_forward`), with the targets on a leading batch axis. Some ops have a backward that
is cheap for one cotangent and dear for a batch of them. :class:`Rewrites` is the function mode the cut forward runs
under; it changes how such an op is *differentiated*, never what it computes.

* **Space to depth by strided slices** (torchvision's Swin patch merging: ``torch.cat([x[..., 0::2, 0::2, :],
  x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)``). Autograd differentiates each slice
  by zero-filling a gradient the size of ``x`` and copying its quarter into it, then adds the four: per target
  four fills of the whole map. The rewrite computes the same concatenation from ``x`` in one function whose
  backward is one reshape and permutation of the gradient (depth to space). Swin-T's edges at 16 images spent most
  of their backward there (bench timing).
* **An attention's query, key and value cut from one projection** (:class:`LinearPieces`, taken by ``pattern``
  edges, :mod:`extractor.linear`, inside attention modules). With the pattern held only the value carries a
  gradient, but autograd zero-fills the query's and key's, copies the three back together and multiplies the whole
  weight, per target. Each piece is instead a view of the projection's output whose backward multiplies its own
  rows of the weight: Swin V2-T's (c) 2.6 -> 2.0 s, MaxViT-T's 8.3 -> 5.5 s (one image, 2 threads).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

# the two orders of the four slices that a reshape of the gradient undoes: (row offset, column offset) per slice
_ROWS_FIRST = ((0, 0), (1, 0), (0, 1), (1, 1))  # slice k = row + 2 * column (torchvision's Swin)
_COLUMNS_FIRST = ((0, 0), (0, 1), (1, 0), (1, 1))  # slice k = 2 * row + column


class _SpaceToDepth(torch.autograd.Function):
    """``x`` ``[..., H, W, C]`` -> ``[..., H/2, W/2, 4C]``: the four strided quarters of ``x`` concatenated on the
    last dim, in ``order``; the backward puts each quarter of the gradient back in place with one copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, order: tuple[tuple[int, int], ...]) -> torch.Tensor:
        ctx.order = order
        return torch.cat([x[..., r::2, c::2, :] for r, c in order], -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        *lead, h, w, c4 = grad.shape
        n = len(lead)
        # the gradient as [..., h, w, 2, 2, C], the two axes of size 2 being (column, row) or (row, column)
        g = grad.reshape(*lead, h, w, 2, 2, c4 // 4)
        inner = (0, 3, 1, 2, 4) if ctx.order == _ROWS_FIRST else (0, 2, 1, 3, 4)  # -> [..., h, row, w, column, C]
        g = g.permute(*range(n), *(n + d for d in inner))
        return g.reshape(*lead, 2 * h, 2 * w, c4 // 4), None


def space_to_depth_order(pieces: Any, dim: Any) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]] | None:
    """``(x, order)`` where ``torch.cat(pieces, dim)`` concatenates on the last dim the four strided quarters
    ``x[..., r::2, c::2, :]`` of one tensor ``x`` that requires grad, in one of the two orders the backward
    undoes; ``None`` for any other concatenation."""
    if not isinstance(pieces, (list, tuple)) or len(pieces) != 4 or not all(isinstance(p, torch.Tensor)
                                                                            for p in pieces):
        return None
    base = pieces[0]._base
    if base is None or base.dim() < 3 or not base.requires_grad or dim not in (-1, base.dim() - 1):
        return None
    *lead, height, width, channels = base.shape
    if height % 2 or width % 2:
        return None
    shape = (*lead, height // 2, width // 2, channels)
    *lead_strides, s_h, s_w, s_c = base.stride()
    strides = (*lead_strides, 2 * s_h, 2 * s_w, s_c)
    offsets = {r * s_h + c * s_w: (r, c) for r in (0, 1) for c in (0, 1)}
    if len(offsets) != 4:
        return None
    order = []
    for p in pieces:
        if p._base is not base or tuple(p.shape) != shape or p.stride() != strides:
            return None
        place = offsets.get(p.storage_offset() - base.storage_offset())
        if place is None:
            return None
        order.append(place)
    found = tuple(order)
    return (base, found) if found in (_ROWS_FIRST, _COLUMNS_FIRST) else None


class Rewrites(TorchFunctionMode):
    """``with Rewrites():`` the forward runs with the rewrites of this module; ``count``: how many calls were
    rewritten. Leaving the block removes the mode (a context manager, also on exceptions)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.cat and torch.is_grad_enabled():
            pieces = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            found = space_to_depth_order(pieces, dim)
            if found is not None:
                self.count += 1
                return _SpaceToDepth.apply(*found)
        return func(*args, **kwargs)


class _Rows(torch.autograd.Function):
    """Rows of a linear layer's output: in value the layer's own output there (``held``, a view of it, so the forward
    is unchanged bit for bit); in the backward, those rows' layer alone, ``grad @ rows`` to the input. The weight's
    ``rows`` are a constant here: the edges never differentiate a parameter, and a custom backward cannot tell
    whether a gradient that it could compute is asked for (one to the weight cost as much as the input's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rows: torch.Tensor, held: _Held) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return held.value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (rows,) = ctx.saved_tensors
        return grad @ rows, None, None


class _Held:
    """A tensor handed to :class:`_Rows` outside autograd's view of its inputs."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class _Split(NamedTuple):
    """A linear layer's output ``[*lead, out]`` (``x`` its input, ``weight`` ``[out, in]``), or a view of it whose
    dim ``order.index(len(lead))`` holds ``blocks`` consecutive blocks of its rows, each ``inner`` shaped, with the
    dims in ``order`` (indices into ``(*lead, blocks, *inner)``)."""

    x: torch.Tensor
    weight: torch.Tensor
    raw: torch.Tensor  # the layer's output
    output: torch.Tensor  # this view of it (held, so that its id is not reused while tracked)
    version: int  # the output's version when made: written in place since, it is no longer the layer's output
    lead: tuple[int, ...]
    blocks: int = 0  # 0: the output itself
    inner: tuple[int, ...] = ()
    order: tuple[int, ...] = ()


_VIEWS = frozenset({torch.Tensor.reshape, torch.Tensor.view})
_PERMUTES = frozenset({torch.Tensor.permute, torch.permute})
_SELECTS = frozenset({torch.Tensor.select, torch.select, torch.Tensor.__getitem__})
_UNBINDS = frozenset({torch.Tensor.unbind, torch.unbind})
_CHUNKS = frozenset({torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split})


class LinearPieces:
    """Pieces of a linear layer's output differentiated each as its own layer (``pattern`` edges,
    :mod:`extractor.linear`): an attention's query, key and value projections are one layer whose output is cut
    into the three (``torch.chunk(qkv, 3, -1)``: MaxViT; ``qkv.reshape(..., 3, heads, d).permute(2, ...)`` then an
    index or ``unbind``: Swin, timm). With the pattern held, the query and key receive no gradient, yet autograd
    zero-fills them and multiplies the whole weight per target: three times the value's backward. Each piece taken
    here is a view of the layer's output whose backward multiplies its own rows of the weight only. ``track``
    each linear call's output, ``take`` every call on a tensor: the piece, or ``None`` to run the call as it is;
    ``clear`` when the attention returns. Other uses of the output keep autograd's own backward."""

    def __init__(self) -> None:
        self.splits: dict[int, _Split] = {}
        self.count = 0  # pieces taken

    def clear(self) -> None:
        self.splits.clear()

    def track(self, x: Any, weight: Any, out: Any) -> None:
        if isinstance(x, torch.Tensor) and x.requires_grad and isinstance(weight, torch.Tensor) \
                and weight.dim() == 2 and isinstance(out, torch.Tensor) and out.shape[-1] == weight.shape[0]:
            self.splits[id(out)] = _Split(x=x, weight=weight, raw=out, output=out, version=out._version,
                                          lead=tuple(out.shape[:-1]))

    def take(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        split = self.splits.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
        if split is None or not torch.is_grad_enabled() or split.raw._version != split.version:
            return None
        if func in _VIEWS or func in _PERMUTES:
            out = func(*args, **kwargs)
            found = _viewed(split, func, args[1:], out)
            if found is not None:
                self.splits[id(out)] = found
            return out
        pieces = _pieces(split, func, args[1:], kwargs)
        if pieces is None:
            return None
        self.count += len(pieces) if isinstance(pieces, tuple) else 1
        return pieces


def _viewed(split: _Split, func: Any, rest: Any, out: torch.Tensor) -> _Split | None:
    """The split that ``out = func(split.output, *rest)`` (a reshape or a permutation) still is, or ``None``: a
    reshape of the output that cuts its rows into blocks (``[*lead, blocks, *inner]``), a permutation of that."""
    n = len(split.lead)
    if func in _VIEWS and not split.blocks:
        if out.dim() < n + 2 or tuple(out.shape[:n]) != split.lead or out.shape[n] < 2:
            return None
        return split._replace(output=out, blocks=out.shape[n], inner=tuple(out.shape[n + 1:]),
                              order=tuple(range(out.dim())))
    if func in _PERMUTES and split.blocks:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return split._replace(output=out, order=tuple(split.order[d % out.dim()] for d in dims))
    return None


def _piece(split: _Split, index: int) -> torch.Tensor:
    """Block ``index`` of a blocked ``split``, laid out as the index or ``unbind`` that took it lays it out."""
    size = split.weight.shape[0] // split.blocks
    piece = _rows(split, index * size, size).reshape(*split.lead, *split.inner)
    block = len(split.lead)
    order = [o if o < block else o - 1 for o in split.order if o != block]
    return piece if order == sorted(order) else piece.permute(order)


def _rows(split: _Split, start: int, size: int) -> torch.Tensor:
    """Rows ``[start, start + size)`` of the layer's output, ``[*lead, size]``, differentiated as their own layer."""
    held = _Held(split.raw.detach().narrow(-1, start, size))
    return _Rows.apply(split.x, split.weight.detach()[start:start + size], held)  # type: ignore[no-any-return]


def _pieces(split: _Split, func: Any, rest: Any, kwargs: dict[str, Any]) -> Any:
    """What ``func(split.output, *rest, **kwargs)`` returns, as pieces differentiated each as its own layer;
    ``None`` where the call takes no whole blocks of rows."""
    out_dim = len(split.lead) + (1 + len(split.inner) if split.blocks else 0)
    if split.blocks:
        at = split.order.index(len(split.lead))
        if func in _UNBINDS:
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return tuple(_piece(split, i) for i in range(split.blocks)) if dim % out_dim == at else None
        if func is torch.Tensor.__getitem__:
            index = rest[0]
            ok = at == 0 and isinstance(index, int) and not isinstance(index, bool) and -split.blocks <= index
            return _piece(split, index % split.blocks) if ok and index < split.blocks else None
        if func in _SELECTS:
            dim, index = [*rest, kwargs.get("dim"), kwargs.get("index")][:2]
            if isinstance(dim, int) and isinstance(index, int) and dim % out_dim == at \
                    and -split.blocks <= index < split.blocks:
                return _piece(split, index % split.blocks)
        return None
    if func not in _CHUNKS:
        return None
    rows = split.weight.shape[0]
    first = rest[0] if rest else kwargs.get("chunks", kwargs.get("split_size_or_sections", kwargs.get("split_size")))
    dim = rest[1] if len(rest) > 1 else kwargs.get("dim", 0)
    if not isinstance(dim, int) or dim % (len(split.lead) + 1) != len(split.lead):
        return None
    if func in (torch.Tensor.chunk, torch.chunk):
        sizes = [rows // first] * first if isinstance(first, int) and first > 0 and rows % first == 0 else None
    elif isinstance(first, int):
        sizes = [first] * (rows // first) if first > 0 and rows % first == 0 else None
    else:
        sizes = list(first) if isinstance(first, (list, tuple)) and sum(first) == rows else None
    if sizes is None:
        return None
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return tuple(_rows(split, s, n) for s, n in zip(starts, sizes, strict=True))
