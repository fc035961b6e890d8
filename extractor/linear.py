"""Edge modes: ``exact`` partial derivatives, or ``direct`` and ``pattern`` edges of the network linearised
between sites.

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

``pattern`` holds less: each attention module's *pattern* (every softmax it computes: its queries' and keys'
weights over the values) instead of its output, so an attention is a linear map of its values and an edge also
carries what flows through them, as in circuit-tracer's frozen attention patterns; layer norms and gates are
held as in ``direct``. An attention whose softmax this mode cannot see (a fused kernel:
``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) is refused with a clear error. The query, key and
value that an attention cuts from one projection are differentiated each as its own layer
(:class:`extractor.rewrites.LinearPieces`): only the value's backward runs.

The forward values are unchanged, bit for bit: a held output or pattern is ``out.detach()``, and a frozen norm
returns a copy of its output whose backward multiplies by ``weight / std`` (the affine map's gradient with the
statistics as constants). Only the gradients differ: an edge then carries what
flows from source to target through the residual stream and the MLPs (circuit-tracer's "direct effect"; with
``pattern``, through the attention values too), and what flows through the held parts goes into the site's
completeness gap instead. ``bench/edge_modes.py`` measures how far the modes' edges are from the exact ones on
the networks where they differ.

``auto`` (the default of ``pathx extract --edges``) picks ``direct`` for a model with attention modules
and ``exact`` for any other; for the architectures whose direct edges the bench measured to disagree badly
with the exact ones (``DISAGREEING``: Swin V2, MaxViT) it picks ``pattern``, which agrees with them and costs
a quarter to a third of ``exact`` (bench section ``zoo``). The mode chosen is part of every pathway's settings,
and so of its id.
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
from extractor.rewrites import LinearPieces
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
# edge_modes, untrained: Spearman 0.42 and median top-8 overlap 0.38 on Swin V2-T, Spearman 0.30 on MaxViT-T;
# their pattern edges agree: 0.92 / 0.75 and 0.88 / 1.0): auto takes pattern edges there
DISAGREEING = frozenset({"ShiftedWindowAttentionV2", "RelativePositionalMultiHeadAttention"})


def fused_attention(module: str, func: str) -> ExtractionError:
    """The error of ``--edges pattern`` on an attention whose softmax runs inside a fused kernel."""
    return ExtractionError(f"--edges pattern: the attention module {module} calls {func}, a fused kernel whose "
                           "pattern cannot be held; use --edges direct or exact")


def edge_mode(choice: str, model: nn.Module) -> str:
    """``auto`` -> ``direct`` when ``model`` has an attention module and none of ``DISAGREEING``, ``pattern``
    when it has one of those, else ``exact``; the others as given (``pattern`` refused on a model with an
    ``nn.MultiheadAttention``, whose softmax it cannot hold)."""
    if choice not in EDGE_CHOICES:
        raise ExtractionError(f"unknown edge mode {choice!r}; choose one of {', '.join(EDGE_CHOICES)}")
    if choice == "pattern" and any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        raise fused_attention("MultiheadAttention", "multi_head_attention_forward")  # before any image is read
    if choice != "auto":
        return choice
    attention = [type(m).__name__ for m in model.modules() if is_attention(m)]
    if not attention:
        return "exact"
    return "direct" if DISAGREEING.isdisjoint(attention) else "pattern"


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
_LINEAR = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("input", "weight")]
                            + [inspect.Parameter("bias", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])


SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
FUSED_ATTENTION = frozenset({F.scaled_dot_product_attention, F.multi_head_attention_forward})


class _Patterns:
    """Where the forward is inside an attention module (``pattern`` mode), and how many softmaxes each of the
    open calls held: forward hooks on the attention modules keep it."""

    def __init__(self) -> None:
        self.open: list[tuple[nn.Module, list[int]]] = []
        self.pieces = LinearPieces()  # an attention's query, key and value: each differentiated on its own

    def enter(self, module: nn.Module, _inp: Any) -> None:
        self.open.append((module, [0]))

    def leave(self, module: nn.Module, _inp: Any, _out: Any) -> None:
        _, held = self.open.pop()
        if not held[0]:
            raise ExtractionError(f"--edges pattern: the attention module {type(module).__name__} computed no "
                                  "softmax that could be held; use --edges direct or exact")
        if self.open:  # an attention inside another: its softmaxes are the outer one's too
            self.open[-1][1][0] += held[0]
        else:
            self.pieces.clear()


class _FrozenNorms(TorchFunctionMode):
    """Every ``F.layer_norm`` call (``nn.LayerNorm``, torchvision's and timm's ``LayerNorm2d``, a user's
    functional call) with its statistics held fixed; the module's own code decides the layout. With
    ``patterns``, every softmax inside an attention module is held too (its output detached), and a fused
    attention function there is refused."""

    def __init__(self, patterns: _Patterns | None = None) -> None:
        super().__init__()
        self.patterns = patterns

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inside = self.patterns.open[-1] if self.patterns is not None and self.patterns.open else None
        if inside is not None and func in FUSED_ATTENTION:
            raise fused_attention(type(inside[0]).__name__, func.__name__)
        if inside is not None and self.patterns is not None:
            piece = self.patterns.pieces.take(func, args, kwargs)
            if piece is not None:
                return piece
        out = func(*args, **kwargs)
        if inside is not None and self.patterns is not None and func is F.linear:
            given = _LINEAR.bind(*args, **kwargs).arguments
            self.patterns.pieces.track(given["input"], given["weight"], out)
        if inside is not None and func in SOFTMAX:
            inside[1][0] += 1
            return out.detach()
        if func is not F.layer_norm:
            return out
        bound = _LAYER_NORM.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return frozen_layer_norm(a["input"], a["normalized_shape"], a["weight"], a["eps"], out)


class Linearised:
    """``with Linearised(model, mode):`` the model's forward runs linearised (see the module) when ``mode``
    is ``direct`` or ``pattern``, and as it is when ``exact``. Every hook it adds is removed on leaving, also on
    exceptions."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        if mode not in EDGE_MODES:
            raise ExtractionError(f"unknown edge mode {mode!r}; choose one of {', '.join(EDGE_MODES)}")
        self.model = model
        self.mode = mode
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.norms: ExitStack | None = None
        self.patterns: _Patterns | None = None  # pattern mode: where the forward is, the pieces it took

    def __enter__(self) -> Linearised:
        if self.mode == "exact":
            return self
        patterns = self.patterns = _Patterns() if self.mode == "pattern" else None
        try:
            for module in self.model.modules():
                if is_attention(module) and patterns is not None:
                    self.handles.append(module.register_forward_pre_hook(patterns.enter))
                    self.handles.append(module.register_forward_hook(patterns.leave))
                elif is_attention(module):
                    self.handles.append(module.register_forward_hook(_held))
                elif is_squeeze_excite(module):
                    self.handles.extend(m.register_forward_hook(_held) for m in module.modules()
                                        if isinstance(m, (nn.Sigmoid, nn.Hardsigmoid)))
            self.norms = ExitStack()
            self.norms.enter_context(_FrozenNorms(patterns))
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
