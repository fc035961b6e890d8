"""The timed operations shared by the bench sections (no Captum: this module also runs on GPU machines).

(a) plain forward + backward to the input; (b) our channel contributions at every site; (c) (b)
plus top-8 edges along the site graph. On CUDA every sample ends with a synchronisation, so a
sample is the work itself and not the launch of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from extractor.batch import batch_edges, one_forward, selected_with_edges
from extractor.contributions import mct_contributions
from extractor.edges import ROUTES, segment_routes
from extractor.linear import Linearised
from extractor.models import ModelBundle
from extractor.selection import select
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        _sync()
        began = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def _interleaved(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median seconds of each function, timed in alternating rounds (a, b, c, a, b, c, ...) so the
    machine's drift over the run touches all of them alike; one warm-up call each first."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync()
            began = time.perf_counter()
            fn()
            _sync()
            samples[i].append(time.perf_counter() - began)
    return [statistics.median(s) for s in samples]


def _plain(bundle: ModelBundle, x: torch.Tensor) -> None:
    xr = x.detach().requires_grad_(True)
    logits = bundle.forward(xr)
    torch.autograd.grad(logits.max(1).values.sum(), xr)


def _ours_b(bundle: ModelBundle, x: torch.Tensor) -> Any:
    return mct_contributions(bundle, x)


def _ours_c(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings) -> Any:
    """Contributions, top-k selection and edges, as ``extract_batch`` makes them (one cut forward for all three in
    the exact edge mode, where the segments share no layer)."""
    if one_forward(bundle, x, settings):
        return selected_with_edges(bundle, x, settings)
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, settings)
    return contrib, sel, batch_edges(bundle, x, settings=settings, contrib=contrib, sel=sel)


def fast_routes(bundle: ModelBundle, x: torch.Tensor, edges: str = "exact") -> dict[str, int]:
    """How many edges of the site graph take each route (``extractor.edges.ROUTES``), on one image, in the
    edge mode ``edges``."""
    with Linearised(bundle.model, edges):
        cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x[:1]))
    routes = list(segment_routes(bundle.sites, cut).values())
    return {r: routes.count(r) for r in ROUTES}
