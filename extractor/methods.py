"""The pathway methods behind one registry, all with one signature.

``METHOD_RUNNERS[settings.method](bundle, x, settings, inputs)`` returns a
:class:`~extractor.batch.BatchPathways` for images ``x`` ``[B, C, H, W]`` (``inputs``: the batch's
:class:`~extractor.batch.BatchInputs`, its targets, seeds and shared caches):

* ``mct``, ``intgrad``: contribution-based pathways (Khakzar et al., CVPR 2021), here;
* ``correlation``, ``precision``: resampling-based selection (Lengerich et al., 2017),
  :mod:`extractor.resampling`;
* ``pixel``: pixel diffusion pathways (Lyu et al., 2024), :mod:`extractor.pixelpaths`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from extractor.batch import BatchInputs, BatchPathways, finish_batch, one_forward, selected_with_edges
from extractor.contributions import check_finite, intgrad_contributions, mct_contributions
from extractor.models import ModelBundle
from extractor.pixelpaths import pixel_batch
from extractor.reach import bundle_reach
from extractor.resampling import resampling_batch
from extractor.selection import select
from extractor.settings import PathwaySettings

MethodRunner = Callable[[ModelBundle, torch.Tensor, PathwaySettings, BatchInputs], BatchPathways]


def contribution_batch(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings,
                       inputs: BatchInputs) -> BatchPathways:
    """``mct`` or ``intgrad`` contributions, the selection rule, edges and Pathway Gradient. Where it can (``mct``,
    exact edges, disjoint segments: :func:`extractor.batch.one_forward`), one cut forward serves the contributions
    and the edges."""
    reach = bundle_reach(bundle, x) if settings.selection == "topk" else None
    extra: list[dict[str, object]] = [{} for _ in range(x.shape[0])]
    if one_forward(bundle, x, settings):
        contrib, sel, edges = selected_with_edges(bundle, x, settings, target=inputs.target, reach=reach)
        return finish_batch(bundle, x, settings=settings, contrib=contrib, sel=sel, scores=[], extra=extra,
                            edges=edges, keep_maps=inputs.keep_maps)
    contrib = mct_contributions(bundle, x, inputs.target)
    if settings.method == "intgrad":
        contrib = intgrad_contributions(bundle, x, contrib.target, settings.intgrad_steps, contrib.acts)
    check_finite("contributions", contrib.channel)
    sel = select(contrib, settings, reach)
    # scores: |contribution within the mask|
    return finish_batch(bundle, x, settings=settings, contrib=contrib, sel=sel, scores=[], extra=extra,
                        keep_maps=inputs.keep_maps)


METHOD_RUNNERS: dict[str, MethodRunner] = {
    "mct": contribution_batch, "intgrad": contribution_batch, "correlation": resampling_batch,
    "precision": resampling_batch, "pixel": pixel_batch,
}


def extract_batch(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings,
                  inputs: BatchInputs | None = None) -> BatchPathways:
    """Pathways of images ``x`` ``[B, C, H, W]`` under ``settings``, by the method's runner. Pass the same
    ``inputs`` for every setting of one batch: the methods share its caches."""
    bundle.check_input(x)
    return METHOD_RUNNERS[settings.method](bundle, x, settings, inputs or BatchInputs())
