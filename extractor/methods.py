"""The pathway methods behind one registry, all with one signature.

``METHOD_RUNNERS[settings.method](bundle, x, settings, target, seeds, shared)`` returns a
:class:`~extractor.batch.BatchPathways` for images ``x`` ``[B, C, H, W]``:

* ``mct``, ``intgrad``: contribution-based pathways (Khakzar et al., CVPR 2021), here;
* ``correlation``, ``precision``: resampling-based selection (Lengerich et al., 2017),
  :mod:`extractor.resampling`;
* ``pixel``: pixel diffusion pathways (Lyu et al., 2024), :mod:`extractor.pixelpaths`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from extractor.batch import BatchPathways, finish_batch
from extractor.contributions import check_finite, intgrad_contributions, mct_contributions
from extractor.models import ModelBundle
from extractor.pixelpaths import pixel_batch
from extractor.reach import bundle_reach
from extractor.resampling import resampling_batch
from extractor.selection import select
from extractor.settings import PathwaySettings

MethodRunner = Callable[
    [ModelBundle, torch.Tensor, PathwaySettings, "torch.Tensor | None", "list[int] | None", "dict[str, object] | None"],
    BatchPathways,
]


def contribution_batch(
    bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings, target: torch.Tensor | None = None,
    seeds: list[int] | None = None, shared: dict[str, object] | None = None,
) -> BatchPathways:
    """``mct`` or ``intgrad`` contributions, the selection rule, edges and Pathway Gradient."""
    contrib, attached = mct_contributions(bundle, x, target)
    del attached
    if settings.method == "intgrad":
        contrib = intgrad_contributions(bundle, x, contrib.target, settings.intgrad_steps, contrib.acts)
    check_finite("contributions", contrib.element)
    sel = select(contrib, settings, bundle_reach(bundle, x) if settings.selection == "topk" else None)
    extra: list[dict[str, object]] = [{} for _ in range(x.shape[0])]
    # scores: |contribution within the mask|
    return finish_batch(bundle, x, settings=settings, contrib=contrib, sel=sel, scores=[], extra=extra)


METHOD_RUNNERS: dict[str, MethodRunner] = {
    "mct": contribution_batch, "intgrad": contribution_batch, "correlation": resampling_batch,
    "precision": resampling_batch, "pixel": pixel_batch,
}


def extract_batch(
    bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings, target: torch.Tensor | None = None,
    seeds: list[int] | None = None, shared: dict[str, object] | None = None,
) -> BatchPathways:
    """Pathways of images ``x`` ``[B, C, H, W]`` under ``settings``, by the method's runner.

    ``target`` ``[B]``: the class each pathway explains (default: the predicted one). ``seeds``
    (one per image) drive the resampling methods' noise; default 0. ``shared`` is a caller-owned
    dict for one batch ``x``: the correlation and precision methods put their common resampling
    scores there, so asking for both costs one set of 50 forward passes.
    """
    bundle.check_input(x)
    return METHOD_RUNNERS[settings.method](bundle, x, settings, target, seeds, shared)
