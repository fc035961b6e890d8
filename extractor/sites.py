"""Activation sites: discovery in call order, and hooks that capture or mask them.

A *site* is one call of an activation module. torchvision ResNets call one in-place
``nn.ReLU`` two or three times per block; each call is its own site (``layer1.0.relu#0``,
``#1``, ``#2``). The capture hook hands the rest of the network a fresh tensor, so later
in-place operations can never overwrite what was captured, and it counts calls per module
so reuse is resolved exactly. Every hook is removed in ``__exit__`` (also on exceptions);
the model is never otherwise modified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from extractor.errors import ExtractionError
from extractor.records import SiteInfo

log = logging.getLogger(__name__)

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Hardswish, nn.Mish, nn.Hardtanh,
)

_ACTIVATION_NAMES = frozenset(t.__name__ for t in ACTIVATION_TYPES)

# Transform applied to a site's output inside the forward pass: (site index, output) -> output.
SiteTransform = Callable[[int, torch.Tensor], torch.Tensor]


def _resolve_modules(model: nn.Module, names: Sequence[str] | None) -> dict[nn.Module, str]:
    named = dict(model.named_modules())
    if names:
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ExtractionError(f"no module named {unknown[0]!r} in the model (see model.named_modules())")
        return {named[n]: n for n in names}
    return {m: n for n, m in named.items() if is_activation(m)}


def is_activation(module: nn.Module) -> bool:
    """A ReLU-like module, also a Python wrapper around one compiled by TorchScript (known by its
    ``original_name``; the compiled module itself takes no hooks)."""
    if isinstance(module, ACTIVATION_TYPES):
        return True
    compiled = isinstance(module, torch.jit.ScriptModule)
    return not compiled and getattr(module, "original_name", None) in _ACTIVATION_NAMES


class _CallCounter:
    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def next(self, module: nn.Module) -> int:
        key = id(module)
        idx = self.counts.get(key, 0)
        self.counts[key] = idx + 1
        return idx


def discover_sites(
    model: nn.Module, example: torch.Tensor, modules: Sequence[str] | None = None
) -> tuple[SiteInfo, ...]:
    """Find the sites of ``model`` by running ``example`` (shape ``[1, C, H, W]``) once.

    Keeps calls whose output is a feature map ``[1, C, H, W]`` or a unit vector ``[1, C]``.
    ``modules`` restricts the search to those module paths (any module type).
    """
    targets = _resolve_modules(model, modules)
    if not targets:
        raise ExtractionError("the model has no activation sites (no ReLU-like modules); name modules to use")
    found: list[tuple[str, int, str, tuple[int, ...]]] = []
    counter = _CallCounter()

    def hook(module: nn.Module, _inp: Any, out: Any) -> None:
        idx = counter.next(module)
        if isinstance(out, torch.Tensor) and out.dim() in (2, 4):
            found.append((targets[module], idx, type(module).__name__, tuple(out.shape[1:])))

    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    if not found:
        raise ExtractionError("no activation call produced a feature map or unit vector; name modules to use")
    return tuple(SiteInfo(i, path, call, kind, shape) for i, (path, call, kind, shape) in enumerate(found))


@dataclass
class SiteRecorder:
    """Captures site outputs during one forward pass.

    ``acts[i]`` is site ``i``'s output tensor ``[B, C, ...]`` as seen by the rest of the
    network (after ``transform``), still attached to the autograd graph.
    """

    acts: dict[int, torch.Tensor]


class SiteHooks:
    """Context manager: hooks on every site module for the duration of the ``with`` block.

    With ``transform`` the site's output becomes ``transform(index, output)`` (masking,
    scaling). The captured tensor is kept and the rest of the network gets a clone of it,
    so in-place operations downstream cannot corrupt what was captured (gradients flow
    through the clone). ``begin()`` must be called before each forward pass.
    """

    def __init__(self, model: nn.Module, sites: Sequence[SiteInfo],
                 transform: SiteTransform | None = None) -> None:
        self.model = model
        self.sites = tuple(sites)
        self.transform = transform
        self._by_call = {(s.module_path, s.call_index): s.index for s in self.sites}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._counter = _CallCounter()
        self.recorder = SiteRecorder({})

    def begin(self) -> SiteRecorder:
        self._counter = _CallCounter()
        self.recorder = SiteRecorder({})
        return self.recorder

    def _hook(self, path: str) -> Callable[[nn.Module, Any, Any], torch.Tensor | None]:
        def hook(module: nn.Module, _inp: Any, out: Any) -> torch.Tensor | None:
            idx = self._by_call.get((path, self._counter.next(module)))
            if idx is None or not isinstance(out, torch.Tensor):
                return None
            captured = self.transform(idx, out) if self.transform is not None else out
            self.recorder.acts[idx] = captured
            return captured.clone()  # downstream (possibly in-place) ops get their own tensor

        return hook

    def __enter__(self) -> SiteHooks:
        named = dict(self.model.named_modules())
        try:
            for path in dict.fromkeys(s.module_path for s in self.sites):
                if path not in named:
                    raise ExtractionError(f"site module {path!r} is not in the model")
                self._handles.append(named[path].register_forward_hook(self._hook(path)))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self._remove()


def hook_count(model: nn.Module) -> int:
    """Number of forward, forward-pre and backward hooks on all modules (0 after extraction)."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "_backward_pre_hooks", {}))
    return total
