"""The site graph: which sites each site reads directly, found by a *cut* forward, and site discovery.

A cut forward hands the rest of the network a copy of a fresh leaf for every site's output. Site
``j``'s output then depends on the sites it reads directly, and no further: its predecessors are
the sites whose leaves its autograd graph reaches (the nearest sites upstream on every dataflow
path). The same cut forward gives the edges their segments (:mod:`extractor.edges`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from extractor.errors import ExtractionError
from extractor.mixing import MIXING
from extractor.rewrites import Rewrites
from extractor.sites import Cut, Discover, SiteHooks, SiteRecorder
from records import SiteInfo

log = logging.getLogger(__name__)


def _inputs(node: Any) -> list[Any]:
    """The autograd nodes a node's gradient flows to; an in-place copy (a cut site written into) gives the value it
    overwrote no gradient, so that one is left out."""
    if node.name() == "torch::autograd::CopyBackwards":
        return [n for n, _ in node.next_functions[1:] if n is not None]
    return [n for n, _ in node.next_functions if n is not None]


def predecessors(acts: dict[int, torch.Tensor], sources: dict[int, torch.Tensor]) -> dict[int, tuple[int, ...]]:
    """Per site of a cut forward, the sites whose sources its output's autograd graph reaches."""
    leaf_site: dict[Any, int] = {}
    for idx, src in sources.items():
        if src.grad_fn is not None:  # ViewBackward0 -> AccumulateGrad of the site's leaf
            leaf_site[src.grad_fn] = idx
    memo: dict[Any, frozenset[int]] = {}

    def reach(start: Any) -> frozenset[int]:
        stack: list[tuple[Any, bool]] = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            if node in leaf_site:
                memo[node] = frozenset({leaf_site[node]})
                continue
            children = _inputs(node)
            if expanded:
                found: set[int] = set()
                for c in children:
                    found |= memo.get(c, frozenset())
                memo[node] = frozenset(found)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in memo)
        return memo[start]

    return {j: (tuple(sorted(reach(a.grad_fn))) if a.grad_fn is not None else ()) for j, a in acts.items()}


def segment_overlap(cut: SiteRecorder) -> float:
    """How often a backward through every site's segment in turn (from each site's output back to its
    predecessors' sources) meets the same mixing layer: the layers met, counted per segment, over the distinct
    layers met. 1.0 when the segments are disjoint (chains, ResNets); about the number of later layers in a
    dense block, or of later blocks along a residual stream, where one layer's output reaches many sites."""
    leaves = {src.grad_fn for src in cut.sources.values() if src.grad_fn is not None}
    total = 0
    union: set[Any] = set()
    for a in cut.acts.values():
        seen: set[Any] = set()
        stack = [a.grad_fn] if a.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node in seen or node in leaves:
                continue
            seen.add(node)
            stack.extend(_inputs(node))
        mixing = {n for n in seen if n.name() in MIXING}
        total += len(mixing)
        union |= mixing
    return total / max(1, len(union))


def cut_forward(model: nn.Module, sites: Sequence[SiteInfo], forward: Callable[[], Any],
                written: Collection[int] = ()) -> SiteRecorder:
    """Run ``forward()`` once with every site cut (see :class:`SiteHooks`); returns what was captured.
    The network reads the cut sites' sources themselves, except copies of ``written``'s (the sites it is known
    to write into in place: :attr:`extractor.models.ModelBundle.written`); one that writes into another site's
    output runs again reading copies of all (:class:`extractor.sites.Cut`)."""
    try:
        with torch.enable_grad(), Rewrites(), SiteHooks(model, Cut(sites, copy=frozenset(written))) as hooks:
            rec = hooks.begin()
            forward()
        return rec
    except RuntimeError as exc:  # an in-place write into a source; any other error recurs below
        log.debug("cut forward again with copies: %s", str(exc).splitlines()[0])
    with torch.enable_grad(), Rewrites(), SiteHooks(model, Cut(sites)) as hooks:
        rec = hooks.begin()
        forward()
    return rec


def discover_sites(
    model: nn.Module, example: torch.Tensor, modules: Sequence[str] | None = None
) -> tuple[SiteInfo, ...]:
    """Find the sites of ``model`` by running ``example`` (shape ``[1, C, H, W]``, model space) twice.

    Keeps calls whose output is a feature map (4-D, channels first or last), a token sequence
    ``[B, N, C]`` or a unit vector ``[B, C]``, one per image: the example runs as a batch of two,
    and a call whose output does not have two rows is computed once for all images (Swin V2's
    position-bias MLP reads a fixed coordinate table), so it is no neuron of an image and no site.
    ``modules`` restricts the search to those module paths (any module type) and functional paths
    (``...relu()``). The second, cut forward gives each site its predecessors and depth.
    """
    x = example.detach()[:1].expand(2, *example.shape[1:]).clone().requires_grad_(True)
    with torch.enable_grad(), SiteHooks(model, Discover(modules)) as hooks:
        rec = hooks.begin()
        model(x)
    found = [f for f in rec.found if f.batch == 2]
    if len(found) < len(rec.found):
        log.info("left out %d activation calls that do not depend on the image (first: %s)",
                 len(rec.found) - len(found), next(f.path for f in rec.found if f.batch != 2))
    if not found:
        if modules:
            raise ExtractionError("no named module or function produced a feature map, token sequence or unit "
                                  "vector per image; name other modules")
        raise ExtractionError("the model has no activation sites (no ReLU-like modules or functional activations); "
                              "name modules to use with --sites")
    sites = []
    for i, f in enumerate(found):
        canon = f.shape if f.layout in ("channels_first", "vector") else (f.shape[-1], *f.shape[:-1])
        sites.append(SiteInfo(index=i, module_path=f.path, call_index=f.call, kind=f.kind,
                              shape=tuple(int(v) for v in canon), layout=f.layout))
    cut = cut_forward(model, sites, lambda: model(x))
    missing = [s.site_id for s in sites if s.index not in cut.acts]
    if missing:
        raise ExtractionError(f"site {missing[0]} did not fire twice the same way; the model's calls depend on the "
                              "input")
    preds = predecessors(cut.acts, cut.sources)
    depth: dict[int, int] = {}
    out = []
    for s in sites:
        p = preds.get(s.index, ())
        depth[s.index] = 1 + max((depth[i] for i in p), default=-1)
        out.append(replace(s, preds=p, depth=depth[s.index]))
    log.debug("found %d sites, depth %d", len(out), max(depth.values()))
    return tuple(out)
