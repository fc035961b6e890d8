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

:class:`SiteHooks` owns the hooks' lifecycle; small strategies say what happens at a site: capture,
masking and scaling (:class:`Capture` with a ``transform``), cut forwards (:class:`Cut`), discovery
(:class:`Discover`), and gating (:class:`Gate`, pixel pathways). Everything it installs (forward hooks,
module-stack hooks, the torch function mode) is removed on leaving the ``with`` block, also on exceptions;
the model is never otherwise modified.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
    """Raised by the hooks once the ``stop_after`` site of ``SiteHooks.begin`` is captured: the forward ends there."""


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


def enclosing_path(path: str) -> str:
    """The module whose own code makes a functional call (``features.relu()`` -> ``features``; ``relu()`` -> the
    root, ``""``)."""
    return path.rpartition(".")[0]


class FoundSite(NamedTuple):
    """One activation call seen by discovery: raw (not channels-first) shape without the batch axis."""

    path: str
    call: int
    kind: str
    shape: tuple[int, ...]
    layout: str
    batch: int


@dataclass
class SiteRecorder:
    """What one forward pass captured, by site index, channels-first ``[B, C, ...]``.

    ``acts``: the site outputs as the rest of the network saw them (after ``transform``),
    attached to the autograd graph. In a cut forward also ``sources``: what the rest of the network
    reads from (each a view of a fresh leaf sharing the site's output, so a segment ends there; the
    network reads a copy of it); ``acts[j]`` then depends on its predecessors' ``sources`` only.
    Discovery lists every call in ``found``.
    """

    acts: dict[int, torch.Tensor] = field(default_factory=dict)
    sources: dict[int, torch.Tensor] = field(default_factory=dict)
    found: list[FoundSite] = field(default_factory=list)
    stop_after: int | None = None
    versions: dict[int, int] = field(default_factory=dict)  # copy=False captures: version counter when taken

    def written(self) -> list[int]:
        """Sites whose captured output the network wrote into in place after the capture (``copy=False``)."""
        return [i for i, v in self.versions.items() if self.acts[i]._version != v]


class Capture:
    """Strategy: capture ``sites``; with ``transform`` a site's output becomes ``transform(index, output)``
    (masking, scaling). The captured tensor is kept and the rest of the network reads a clone, so
    in-place operations downstream cannot corrupt it. With ``copy=False`` the network reads the captured
    tensor itself, and ``SiteRecorder.written`` tells afterwards whether it wrote into one (the caller then
    runs again with copies); ``copy`` as a set of site indices copies those sites only. With ``keep=False``
    nothing is kept and the network reads the transformed output itself (Pathway Gradient's masked pass).
    Either saves one copy of every site map."""

    def __init__(self, sites: Sequence[SiteInfo], transform: SiteTransform | None = None, *,
                 keep: bool = True, copy: bool | frozenset[int] = True) -> None:
        self.sites = tuple(sites)
        self.transform = transform
        self.keep = keep
        self.copy = copy
        self._by_call = {(s.module_path, s.call_index): s for s in self.sites}
        self._functional_paths = {s.module_path for s in self.sites if is_functional_path(s.module_path)}

    def targets(self, named: dict[str, nn.Module]) -> tuple[list[str], bool]:
        """Module paths to hook and whether functional calls are watched."""
        paths = list(dict.fromkeys(s.module_path for s in self.sites))
        modules = [p for p in paths if not is_functional_path(p)]
        for p in modules:
            if p not in named:
                raise ExtractionError(f"site module {p!r} is not in the model")
        return modules, len(modules) < len(paths)

    def watches(self, path: str) -> bool:
        return path in self._functional_paths

    def enclosing(self) -> set[str] | None:
        """The modules whose own code makes a watched functional call (``None``: any module may)."""
        return {enclosing_path(p) for p in self._functional_paths}

    def copies(self, index: int) -> bool:
        """Whether the network reads a copy of site ``index``'s capture."""
        return self.copy if isinstance(self.copy, bool) else index in self.copy

    def site(self, path: str, call: int) -> SiteInfo | None:
        return self._by_call.get((path, call))

    def take(self, rec: SiteRecorder, site: SiteInfo, out: torch.Tensor) -> torch.Tensor:
        """Capture one site's output; returns what the rest of the network reads."""
        canon = to_channels_first(out, site.layout)
        captured = self.transform(site.index, canon) if self.transform is not None else canon
        if not self.keep:
            return from_channels_first(captured, site.layout)
        rec.acts[site.index] = captured
        if site.index == rec.stop_after:
            raise StopForward
        if not self.copies(site.index):
            rec.versions[site.index] = captured._version
            return from_channels_first(captured, site.layout)
        return from_channels_first(captured, site.layout).clone()


class Cut(Capture):
    """Strategy: capture ``sites`` and let the rest of the network read a fresh leaf for each (see the module
    docstring), so that ``acts[j]`` depends on its predecessors' ``sources`` only. The source is a view of
    that leaf: its own autograd node (ViewBackward0 -> AccumulateGrad), which the graph walks stop at, and
    no copy of the activation. With ``copy=False`` the network reads the source itself; a network that
    writes into it in place then fails at once (autograd refuses in-place writes into a leaf's view), and
    :func:`extractor.sitegraph.cut_forward` runs it again with ``copy=True``, where it reads a copy."""

    def __init__(self, sites: Sequence[SiteInfo], *, copy: bool | frozenset[int] = True) -> None:
        super().__init__(sites, copy=copy)

    def take(self, rec: SiteRecorder, site: SiteInfo, out: torch.Tensor) -> torch.Tensor:
        canon = to_channels_first(out, site.layout)
        rec.acts[site.index] = canon
        source = canon.detach().requires_grad_(True).view(canon.shape)
        rec.sources[site.index] = source
        read = from_channels_first(source, site.layout)
        return read.clone() if self.copies(site.index) else read


class Discover:
    """Strategy: list every activation call (2-4 dimensional outputs) in ``recorder.found``; ``names``
    restricts it to those module paths (any module type) and functional paths (``...relu()``)."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = tuple(names) if names else None

    def targets(self, named: dict[str, nn.Module]) -> tuple[list[str], bool]:
        if self.names:
            unknown = [n for n in self.names if n not in named and not is_functional_path(n)]
            if unknown:
                raise ExtractionError(f"no module named {unknown[0]!r} in the model (see model.named_modules())")
            return [n for n in self.names if n in named], any(is_functional_path(n) for n in self.names)
        return [n for n, m in named.items() if is_activation(m)], True

    def watches(self, path: str) -> bool:
        return self.names is None or path in self.names

    def enclosing(self) -> set[str] | None:
        """As :meth:`Capture.enclosing`."""
        return None if self.names is None else {enclosing_path(n) for n in self.names if is_functional_path(n)}

    def site(self, path: str, call: int) -> SiteInfo | None:
        return None

    def found(self, rec: SiteRecorder, path: str, call: int, kind: str, out: torch.Tensor) -> None:
        if out.dim() in (2, 3, 4):
            rec.found.append(FoundSite(path=path, call=call, kind=kind, shape=tuple(out.shape[1:]),
                                       layout=detect_layout(out), batch=int(out.shape[0])))


@dataclass(frozen=True)
class Gate:
    """Every module of ``types`` (sites or not) has its output replaced by ``fn(path, call, module, input,
    output)`` (pixel pathways freeze ReLU and max-pool switches this way); a gated site's new output then
    goes through capture."""

    types: tuple[type[nn.Module], ...]
    fn: GateFn


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

    It owns registration and removal and counts calls; what happens at a site is its strategy's:
    :class:`Capture` (with an optional transform), :class:`Cut` or :class:`Discover`, plus an optional
    :class:`Gate`. ``begin(stop_after=j)`` before a forward returns the :class:`SiteRecorder`; with
    ``stop_after`` the forward ends (:class:`StopForward`) once site ``j`` is captured.

    Functional sites need the torch function mode and a module stack: pre/post hooks on each module whose own
    code makes a watched functional call, and on its children (a call inside a child is not its parent's). They
    are installed only when some site is functional; discovery of every call hooks every module. (Hooking every
    module cost DenseNet-121, whose one functional site is its root's last ReLU, 6 ms of a 56 ms forward.)
    """

    def __init__(self, model: nn.Module, strategy: Capture | Discover, *, gate: Gate | None = None) -> None:
        self.model = model
        self.strategy = strategy
        self.gate = gate
        self._inputs: dict[int, torch.Tensor] = {}
        self._installed = ExitStack()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stack: list[str] = []
        self._counts: dict[str, int] = {}
        self._module_sites: set[str] = set()
        self.recorder = SiteRecorder()

    # --- per forward -------------------------------------------------------------------------
    def begin(self, stop_after: int | None = None) -> SiteRecorder:
        self._counts = {}
        self._stack = []
        self._inputs.clear()
        self.recorder = SiteRecorder(stop_after=stop_after)
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
        strategy = self.strategy
        if isinstance(strategy, Discover):
            strategy.found(self.recorder, path, call, kind, out)
            return None
        site = strategy.site(path, call)
        return None if site is None else strategy.take(self.recorder, site, out)

    # --- gated modules -----------------------------------------------------------------------
    def _keep_input(self, module: nn.Module, inp: Any) -> None:
        # an in-place op overwrites its input: keep a copy of the value it read
        self._inputs[id(module)] = inp[0].clone() if getattr(module, "inplace", False) else inp[0]

    def _gated(self, path: str, fn: GateFn) -> Callable[[nn.Module, Any, Any], torch.Tensor]:
        def hook(module: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            call = self._count(path)
            new = fn(path, call, module, self._inputs.pop(id(module)), out)
            strategy = self.strategy
            site = strategy.site(path, call)
            return new if site is None or isinstance(strategy, Discover) else strategy.take(self.recorder, site, new)

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
        if not self.strategy.watches(path):
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
    def _register(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._handles.append(handle)

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _stacked(self, named: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
        """The modules whose calls the module stack records (see the class docstring)."""
        enclosing = self.strategy.enclosing()
        if enclosing is None:
            return [(p, m) for p, m in named.items() if not isinstance(m, torch.jit.ScriptModule)]
        owners = [named[p] for p in enclosing if p in named]
        hooked = {id(m) for m in owners} | {id(c) for m in owners for c in m.children()}  # (a shared module: once)
        # compiled code takes no Python hooks (and calls no Python functions)
        return [(p, m) for p, m in named.items() if id(m) in hooked and not isinstance(m, torch.jit.ScriptModule)]

    def __enter__(self) -> SiteHooks:
        self._installed = ExitStack()
        self._installed.callback(self._remove)
        named = dict(self.model.named_modules())
        try:
            modules, functional = self.strategy.targets(named)
            self._module_sites = set(modules)
            gated: set[str] = set()
            if self.gate is not None:
                for path, module in named.items():
                    if isinstance(module, self.gate.types) and not isinstance(module, torch.jit.ScriptModule):
                        gated.add(path)
                        self._register(module.register_forward_pre_hook(self._keep_input))
                        self._register(module.register_forward_hook(self._gated(path, self.gate.fn)))
            for path in modules:
                if path not in gated:  # a gated module's hook delivers its site itself
                    self._register(named[path].register_forward_hook(self._hook(path)))
            if functional:
                for path, module in self._stacked(named):
                    self._register(module.register_forward_pre_hook(self._push(path)))
                    self._register(module.register_forward_hook(self._pop, always_call=True))
                self._installed.enter_context(_Functional(self))
        except BaseException:
            self._installed.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._installed.close()


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
