"""Activation sites: what a site is, and the one hook manager that captures, changes and cuts them.

A *site* is one call of an activation, module or functional:

* a ReLU-like module (``nn.ReLU``, ``nn.GELU``, ...): site id ``module path#call index``.
  torchvision ResNets call one in-place ``nn.ReLU`` two or three times per block; each call
  is its own site (``layer1.0.relu#0``, ``#1``, ``#2``);
* a functional call (``F.relu``, ``torch.relu``, ``Tensor.relu_``, ``F.gelu``, ``F.silu``, ...)
  made directly in some module's ``forward`` (GoogLeNet's and Inception's ``BasicConv2d``,
  DenseNet's last ``F.relu``): site id ``enclosing module path.function()#call index``, e.g.
  ``inception3a.branch1.relu()#0``. Calls made inside an activation module are that module's
  site, never a second one.

*Layouts* (:mod:`extractor.layouts`): site tensors are handed to the methods channels-first and
moved back for the network. *The site graph* and discovery: :mod:`extractor.sitegraph`.

:class:`SiteHooks` serves capture, masking and scaling (``transform``), gating (pixel
pathways), cut forwards, forwards that stop at a site, and discovery. Everything it installs
(forward hooks, module-stack hooks, the torch function mode) is removed in ``__exit__``, also on
exceptions; the model is never otherwise modified.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from extractor.errors import ExtractionError
from extractor.layouts import detect_layout, from_channels_first, to_channels_first
from records import SiteInfo

log = logging.getLogger(__name__)

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Hardswish, nn.Mish, nn.Hardtanh,
)
_ACTIVATION_NAMES = frozenset(t.__name__ for t in ACTIVATION_TYPES)

# functional activations: the function -> (site name, out-of-place twin or None when already out of place)
_FUNCTIONS: dict[Any, tuple[str, Any]] = {}
for _name, _fns in {
    "relu": ((F.relu, None), (torch.relu, None), (torch.Tensor.relu, None), (F.relu_, torch.relu),
             (torch.relu_, torch.relu), (torch.Tensor.relu_, torch.Tensor.relu)),
    "relu6": ((F.relu6, None),), "gelu": ((F.gelu, None),), "silu": ((F.silu, None),),
    "hardswish": ((F.hardswish, None),), "mish": ((F.mish, None),), "selu": ((F.selu, None),),
    "celu": ((F.celu, None),), "elu": ((F.elu, None), (F.elu_, F.elu)),
    "leaky_relu": ((F.leaky_relu, None), (F.leaky_relu_, F.leaky_relu)),
    "hardtanh": ((F.hardtanh, None), (F.hardtanh_, F.hardtanh)),
}.items():
    for _fn, _twin in _fns:
        _FUNCTIONS[_fn] = (_name, _twin)

# Transform applied to a site's output (channels-first) inside the forward pass: (site index, output) -> output.
SiteTransform = Callable[[int, torch.Tensor], torch.Tensor]
# gating: (module path, call index, module, its input as it was before an in-place op, its output) -> new output
GateFn = Callable[[str, int, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised by the hooks once ``SiteHooks.stop_after``'s output is captured: the forward ends there."""


def is_activation(module: nn.Module) -> bool:
    """A ReLU-like module, also a Python wrapper around one compiled by TorchScript (known by its
    ``original_name``; the compiled module itself takes no hooks)."""
    if isinstance(module, ACTIVATION_TYPES):
        return True
    compiled = isinstance(module, torch.jit.ScriptModule)
    return not compiled and getattr(module, "original_name", None) in _ACTIVATION_NAMES


def is_functional_path(path: str) -> bool:
    """Whether a site path names a functional call (``...name()``), not a module."""
    return path.endswith("()")


@dataclass
class SiteRecorder:
    """What one forward pass captured, by site index, channels-first ``[B, C, ...]``.

    ``acts``: the site outputs as the rest of the network saw them (after ``transform``),
    attached to the autograd graph. In a cut forward also ``sources``: the copies the rest of
    the network read (each a fresh leaf's clone, so a segment ends there); ``acts[j]`` then
    depends on its predecessors' ``sources`` only.
    """

    acts: dict[int, torch.Tensor] = field(default_factory=dict)
    sources: dict[int, torch.Tensor] = field(default_factory=dict)
    found: list[tuple[str, int, str, tuple[int, ...], str, int]] = field(default_factory=list)  # ..., batch


class _Functional(TorchFunctionMode):
    """Sees functional activation calls and hands them to the hook manager."""

    def __init__(self, owner: SiteHooks) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            entry = _FUNCTIONS.get(func)
        except TypeError:  # unhashable callables
            entry = None
        if entry is None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        return self.owner._functional(func, entry, args, kwargs)


@functools.lru_cache(maxsize=64)
def _signature(func: Any) -> inspect.Signature:
    """The signature of an activation function (read once per function: it is on every call's path)."""
    return inspect.signature(func)


def _out_of_place(func: Any, twin: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any, bool]:
    """The out-of-place version of an activation call: (function, args, kwargs, was in place)."""
    if twin is not None:
        return twin, args, kwargs, True
    try:
        bound = _signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return func, args, kwargs, False
    if not bound.arguments.get("inplace", False):
        return func, args, kwargs, False
    bound.arguments["inplace"] = False
    return func, bound.args, bound.kwargs, True


class SiteHooks:
    """Context manager: the one hook manager for sites, for the duration of the ``with`` block.

    * ``sites`` given: captures those sites (``begin()`` before each forward returns the
      :class:`SiteRecorder`). With ``transform`` a site's output becomes ``transform(index,
      output)`` (masking, scaling, gating). With ``cut`` the rest of the network reads a leaf
      copy of every site (see the module docstring). The captured tensor is kept and the rest
      of the network gets a clone, so in-place operations downstream cannot corrupt it.
    * ``sites=None``: discovery; every activation call is listed in ``recorder.found`` as
      (path, call, kind, raw shape, layout). ``names`` restricts discovery to those module paths
      (any module type) and functional paths (``...relu()``).
    * ``gate=(types, fn)``: every module of those types (sites or not) has its output replaced
      by ``fn(path, call, module, input, output)`` (pixel pathways freeze ReLU and max-pool
      switches this way); a gated site's new output then goes through capture as above.
    * ``stop_after``: the forward ends (:class:`StopForward`) once that site is captured.

    Functional sites need the torch function mode and a module stack (pre/post hooks on every
    module); they are installed only when some site is functional (or on discovery).
    """

    def __init__(self, model: nn.Module, sites: Sequence[SiteInfo] | None,
                 transform: SiteTransform | None = None, cut: bool = False,
                 names: Sequence[str] | None = None,
                 gate: tuple[tuple[type[nn.Module], ...], GateFn] | None = None) -> None:
        self.model = model
        self.gate = gate
        self.stop_after: int | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self.sites = None if sites is None else tuple(sites)
        self.transform = transform
        self.cut = cut
        self.names = tuple(names) if names else None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mode: _Functional | None = None
        self._stack: list[str] = []
        self._counts: dict[str, int] = {}
        self._module_sites: set[str] = set()
        self.recorder = SiteRecorder()
        if self.sites is not None:
            self._by_call = {(s.module_path, s.call_index): s for s in self.sites}
            self._functional_paths = {s.module_path for s in self.sites if is_functional_path(s.module_path)}

    # --- per forward -------------------------------------------------------------------------
    def begin(self) -> SiteRecorder:
        self._counts = {}
        self._stack = []
        self._inputs.clear()
        self.recorder = SiteRecorder()
        return self.recorder

    def _count(self, path: str) -> int:
        idx = self._counts.get(path, 0)
        self._counts[path] = idx + 1
        return idx

    def _site(self, path: str, kind: str, out: Any) -> torch.Tensor | None:
        """Handle one call of ``path``; returns what the rest of the network reads, or ``None``."""
        call = self._count(path)
        if not isinstance(out, torch.Tensor):
            return None
        if self.sites is None:
            if out.dim() in (2, 3, 4):
                self.recorder.found.append((path, call, kind, tuple(out.shape[1:]), detect_layout(out),
                                            int(out.shape[0])))
            return None
        site = self._by_call.get((path, call))
        if site is None:
            return None
        return self._deliver(site, out)

    def _deliver(self, site: SiteInfo, out: torch.Tensor) -> torch.Tensor:
        """Capture one site's output; returns what the rest of the network reads."""
        canon = to_channels_first(out, site.layout)
        rec = self.recorder
        if self.cut:
            rec.acts[site.index] = canon
            source = canon.detach().requires_grad_(True).clone()
            rec.sources[site.index] = source
            return from_channels_first(source, site.layout).clone()
        captured = self.transform(site.index, canon) if self.transform is not None else canon
        rec.acts[site.index] = captured
        if site.index == self.stop_after:
            raise StopForward
        return from_channels_first(captured, site.layout).clone()

    # --- gated modules -----------------------------------------------------------------------
    def _keep_input(self, module: nn.Module, inp: Any) -> None:
        # an in-place op overwrites its input: keep a copy of the value it read
        self._inputs[id(module)] = inp[0].clone() if getattr(module, "inplace", False) else inp[0]

    def _gated(self, path: str, fn: GateFn) -> Callable[[nn.Module, Any, Any], torch.Tensor]:
        def hook(module: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            call = self._count(path)
            new = fn(path, call, module, self._inputs.pop(id(module)), out)
            site = self._by_call.get((path, call)) if self.sites is not None else None
            return new if site is None else self._deliver(site, new)

        return hook

    # --- module sites ------------------------------------------------------------------------
    def _hook(self, path: str) -> Callable[[nn.Module, Any, Any], torch.Tensor | None]:
        def hook(module: nn.Module, _inp: Any, out: Any) -> torch.Tensor | None:
            kind = str(getattr(module, "original_name", type(module).__name__))
            return self._site(path, kind, out)

        return hook

    # --- functional sites --------------------------------------------------------------------
    def _push(self, path: str) -> Callable[[nn.Module, Any], None]:
        def pre(_module: nn.Module, _inp: Any) -> None:
            self._stack.append(path)

        return pre

    def _pop(self, _module: nn.Module, _inp: Any, _out: Any) -> None:
        if self._stack:
            self._stack.pop()

    def _functional(self, func: Any, entry: tuple[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        enclosing = self._stack[-1] if self._stack else ""
        if enclosing in self._module_sites:  # the activation module's own call: already its site
            return func(*args, **kwargs)
        name, twin = entry
        path = f"{enclosing}.{name}()" if enclosing else f"{name}()"
        wanted = (self.names is None or path in self.names) if self.sites is None else path in self._functional_paths
        if not wanted:
            return func(*args, **kwargs)
        fn, a, kw, inplace = _out_of_place(func, twin, args, kwargs)
        out = fn(*a, **kw)
        new = self._site(path, f"{name}()", out)
        result = out if new is None else new
        if inplace:  # the caller may keep using its input tensor: it becomes the site's output
            args[0].copy_(result)  # (its old value gets zero gradient; the site graph ignores that link)
            return args[0]
        return result

    # --- install / remove --------------------------------------------------------------------
    def _targets(self, named: dict[str, nn.Module]) -> tuple[list[str], bool]:
        """Module paths to hook and whether functional calls are watched."""
        if self.sites is None:
            if self.names:
                unknown = [n for n in self.names if n not in named and not is_functional_path(n)]
                if unknown:
                    raise ExtractionError(f"no module named {unknown[0]!r} in the model (see model.named_modules())")
                return [n for n in self.names if n in named], any(is_functional_path(n) for n in self.names)
            return [n for n, m in named.items() if is_activation(m)], True
        paths = list(dict.fromkeys(s.module_path for s in self.sites))
        modules = [p for p in paths if not is_functional_path(p)]
        for p in modules:
            if p not in named:
                raise ExtractionError(f"site module {p!r} is not in the model")
        return modules, len(modules) < len(paths)

    def __enter__(self) -> SiteHooks:
        named = dict(self.model.named_modules())
        try:
            modules, functional = self._targets(named)
            self._module_sites = set(modules)
            gated: set[str] = set()
            if self.gate is not None:
                types, fn = self.gate
                for path, module in named.items():
                    if isinstance(module, types) and not isinstance(module, torch.jit.ScriptModule):
                        gated.add(path)
                        self._handles.append(module.register_forward_pre_hook(self._keep_input))
                        self._handles.append(module.register_forward_hook(self._gated(path, fn)))
            for path in modules:
                if path not in gated:  # a gated module's hook delivers its site itself
                    self._handles.append(named[path].register_forward_hook(self._hook(path)))
            if functional:
                for path, module in named.items():
                    if isinstance(module, torch.jit.ScriptModule):
                        continue  # compiled code takes no Python hooks (and calls no Python functions)
                    self._handles.append(module.register_forward_pre_hook(self._push(path)))
                    self._handles.append(module.register_forward_hook(self._pop, always_call=True))
                self._mode = _Functional(self)
                self._mode.__enter__()
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)

    def __exit__(self, *exc: object) -> None:
        self._remove()


def hook_count(model: nn.Module) -> int:
    """Number of forward, forward-pre and backward hooks on all modules (0 after extraction)."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        total += len(getattr(m, "_backward_pre_hooks", {}))
    return total


def function_modes_active() -> int:
    """Number of torch function modes on the stack (0 after extraction)."""
    return int(torch._C._len_torch_function_stack())
