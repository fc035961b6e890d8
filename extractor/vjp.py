"""Batched vector-Jacobian products over a graph that already exists: many cotangents, one call.

The edges (:mod:`extractor.edges`) and the reach probes (:mod:`extractor.reach`) put many targets on a leading axis
and take one backward for all of them, with ``torch.autograd.grad(is_grads_batched=True)`` (PyTorch's legacy vmap).
Where an op has no batching rule, one backward per cotangent. :func:`torch.func.vmap` around a plain
``torch.autograd.grad`` was measured as the alternative and left out: on ConvNeXt-T (224 px, eight targets per site,
1 thread) it took the whole-source VJP of the last site from 2.03 s to 0.93 s, but the junction routes that edges
take there from 0.94 to 1.15 s (more copies between its batched layouts).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

log = logging.getLogger(__name__)


def batched_vjp(output: Any, inputs: list[Any], cot: torch.Tensor) -> list[torch.Tensor]:
    """``[m, *input.shape]`` per input (a tensor, or an autograd edge
    :class:`torch.autograd.graph.GradientEdge`): the VJP of ``output`` with each of the ``m`` cotangents
    ``cot`` ``[m, *output.shape]``; zeros for an input the output does not reach. The graph is retained."""

    def one(c: torch.Tensor, batched: bool = False) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(output, inputs, grad_outputs=c, retain_graph=True, allow_unused=True,
                                   materialize_grads=True, is_grads_batched=batched)

    try:
        grads = list(one(cot, batched=True))
    except RuntimeError as exc:  # an op without a batching rule (e.g. some attention kernels)
        log.debug("batched VJP not available (%s); one VJP per cotangent", exc)
        per = [one(c) for c in cot]
        grads = [torch.stack([p[k] for p in per]) for k in range(len(inputs))]
    return [g if g.shape[0] == cot.shape[0] and g.dim() == len(grad_shape(x)) + 1 else
            g.unsqueeze(0).expand(cot.shape[0], *g.shape) for g, x in zip(grads, inputs, strict=True)]


def grad_shape(x: Any) -> tuple[int, ...]:
    """The shape of a tensor, or of the gradient an autograd edge carries."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    return tuple(x.node._input_metadata[x.output_nr].shape)


def grad_numel(x: Any) -> int:
    """How many numbers a tensor or an autograd edge's gradient holds."""
    return math.prod(grad_shape(x))
