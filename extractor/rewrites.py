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
"""

from __future__ import annotations

import logging
from typing import Any

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
