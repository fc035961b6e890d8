"""Edge modes: ``exact`` partial derivatives, or ``direct`` edges of the network linearised between sites.

``exact`` (:mod:`extractor.edges`) differentiates the network as it is. In a residual-stream network
(ViT, Swin, MaxViT) a target in a late block then reaches every earlier source through every attention
block in between, once per target: the cost grows with the square of the depth.

``direct`` takes the same partial derivatives in the network *linearised around this image*:

* every attention module's output is held fixed (a module whose class is ``nn.MultiheadAttention``
  or whose class name ends in ``Attention``/``AttentionV2``: torchvision's and timm's);
* every layer norm's statistics (mean and standard deviation) are held fixed, so it is a per-position
  affine map (every ``F.layer_norm`` call: ``nn.LayerNorm``, ``LayerNorm2d``, a functional call);
* every squeeze-excite gate is held fixed (the ``Sigmoid``/``Hardsigmoid`` modules inside a module
  whose class name contains ``SqueezeExcit`` or is ``SEModule``).

The forward values are unchanged, bit for bit: a held output is ``out.detach()``, and a frozen norm returns
a copy of its output whose backward multiplies by ``weight / std`` (the affine map's gradient with the
statistics as constants). Only the gradients differ: an edge then carries what
flows from source to target through the residual stream and the MLPs (circuit-tracer's "direct effect"),
and what flows through attention goes into the site's completeness gap instead. ``bench/edge_modes.py``
measures how far the two modes' edges are apart on the networks where they differ.

``auto`` (the default of ``pathx extract --edges``) picks ``direct`` for a model with attention modules
and ``exact`` for any other, and for the architectures where the bench measured the modes to disagree badly
(``DISAGREEING``); the mode chosen is part of every pathway's settings, and so of its id.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from extractor.errors import ExtractionError
from extractor.settings import EDGE_CHOICES, EDGE_MODES

log = logging.getLogger(__name__)

def is_attention(module: nn.Module) -> bool:
    """An attention module: ``nn.MultiheadAttention``, or a class named ``...Attention``/``...AttentionV2``."""
    name = type(module).__name__
    return isinstance(module, nn.MultiheadAttention) or name.endswith(("Attention", "AttentionV2"))


def is_squeeze_excite(module: nn.Module) -> bool:
    name = type(module).__name__
    return "SqueezeExcit" in name or name == "SEModule"


# attention modules of architectures whose direct edges disagree badly with their exact ones (bench section
# edge_modes, untrained: Spearman 0.42 and median top-8 overlap 0.38 on Swin V2, whose post-norm branches make
# the exact edges of a source sum to about zero; Spearman 0.30 on MaxViT): auto keeps them exact
DISAGREEING = frozenset({"ShiftedWindowAttentionV2", "RelativePositionalMultiHeadAttention"})


def edge_mode(choice: str, model: nn.Module) -> str:
    """``auto`` -> ``direct`` when ``model`` has an attention module (and none of ``DISAGREEING``), else
    ``exact``; the others as given."""
    if choice not in EDGE_CHOICES:
        raise ExtractionError(f"unknown edge mode {choice!r}; choose one of {', '.join(EDGE_CHOICES)}")
    if choice != "auto":
        return choice
    attention = [type(m).__name__ for m in model.modules() if is_attention(m)]
    return "direct" if attention and DISAGREEING.isdisjoint(attention) else "exact"


def _held(_module: nn.Module, _inp: Any, out: Any) -> Any:
    if isinstance(out, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
    return out.detach() if isinstance(out, torch.Tensor) else out


class _Scaled(torch.autograd.Function):
    """``out`` in value; in the backward, the incoming gradient times ``scale`` (broadcast to ``x``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return out.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None


def frozen_layer_norm(x: torch.Tensor, shape: Sequence[int], weight: torch.Tensor | None, eps: float,
                      out: torch.Tensor) -> torch.Tensor:
    """``out = layer_norm(x)`` with the statistics held fixed: the value of ``out`` and the gradient of the
    affine map ``(x - mean) / std * weight + bias`` with ``mean`` and ``std`` constants over the last
    ``len(shape)`` dims of ``x`` (as ``F.layer_norm`` takes them), which is ``weight / std`` elementwise."""
    dims = tuple(range(-len(shape), 0))
    scale = 1.0 / (x.detach().var(dims, unbiased=False, keepdim=True) + eps).sqrt()
    if weight is not None:
        scale = scale * weight.detach()
    return _Scaled.apply(x, out, scale)  # type: ignore[no-any-return]


_LAYER_NORM = inspect.signature(F.layer_norm)


class _FrozenNorms(TorchFunctionMode):
    """Every ``F.layer_norm`` call (``nn.LayerNorm``, torchvision's and timm's ``LayerNorm2d``, a user's
    functional call) with its statistics held fixed; the module's own code decides the layout."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not F.layer_norm:
            return out
        bound = _LAYER_NORM.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return frozen_layer_norm(a["input"], a["normalized_shape"], a["weight"], a["eps"], out)


class Linearised:
    """``with Linearised(model, mode):`` the model's forward runs linearised (see the module) when ``mode``
    is ``direct``, and as it is when ``exact``. Every hook it adds is removed on leaving, also on exceptions."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        if mode not in EDGE_MODES:
            raise ExtractionError(f"unknown edge mode {mode!r}; choose one of {', '.join(EDGE_MODES)}")
        self.model = model
        self.mode = mode
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.norms: ExitStack | None = None

    def __enter__(self) -> Linearised:
        if self.mode == "exact":
            return self
        try:
            for module in self.model.modules():
                if is_attention(module):
                    self.handles.append(module.register_forward_hook(_held))
                elif is_squeeze_excite(module):
                    self.handles.extend(m.register_forward_hook(_held) for m in module.modules()
                                        if isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)))
            self.norms = ExitStack()
            self.norms.enter_context(_FrozenNorms())
        except BaseException:
            self.__exit__()
            raise
        log.debug("linearised forward: %d hooks", len(self.handles))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.norms is not None:
            norms, self.norms = self.norms, None
            norms.close()
