"""What one batch yields under one setting: the type every method returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from extractor.contributions import Contributions
from extractor.edges import Edges, compute_edges
from extractor.models import ModelBundle
from extractor.pathway_gradient import pathway_gradient, saliency_map
from extractor.reach import bundle_reach, cut_sites
from extractor.selection import Selection
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward


@dataclass
class ResamplingScores:
    """Per site: correlation and precision ``[B, C]`` (precision is -inf for skipped channels)."""

    correlation: list[torch.Tensor]
    precision: list[torch.Tensor]


@dataclass(kw_only=True)
class BatchInputs:
    """What one batch of images brings besides its pixels, for every method of it: ``target`` ``[B]`` (the
    class each pathway explains; ``None`` = the predicted one), ``seeds`` (one per image: the resampling
    methods' noise; ``None`` = 0) and ``resampling``, the scores the correlation and precision methods
    share within the batch (by number of copies and noise), so asking for both costs one set of copies."""

    target: torch.Tensor | None = None
    seeds: list[int] | None = None
    resampling: dict[tuple[int, float], ResamplingScores] = field(default_factory=dict)


@dataclass(kw_only=True)
class BatchPathways:
    """Everything the records need for a batch under one setting (tensors on CPU)."""

    settings: PathwaySettings
    contrib: Contributions
    sel: Selection
    edges: Edges
    saliency: torch.Tensor  # [B, H, W]
    logit_full: torch.Tensor  # [B]
    logit_masked: torch.Tensor  # [B]
    scores: list[torch.Tensor]  # resampling methods: per site [B, C] score of each channel; else empty
    extra: list[dict[str, object]]  # per image: method-specific figures


def finish_batch(
    bundle: ModelBundle, x: torch.Tensor, *, settings: PathwaySettings, contrib: Contributions, sel: Selection,
    scores: list[torch.Tensor], extra: list[dict[str, object]],
) -> BatchPathways:
    """Edges along the site graph (one cut forward) and Pathway Gradient for a selected batch."""
    for b, where in enumerate(cut_sites(sel.kept, bundle.sites, bundle_reach(bundle, x))):
        if where:  # the selection is cut there: the records, the UI and `pathx query pathway` say so
            extra[b]["cut_sites"] = json.dumps([bundle.sites[i].site_id for i in where])
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x.detach()))
    # The cut forward computes every site's output again, the same numbers: keep one copy of each, not two
    # (the list is shared by every holder of ``contrib``, so the first forward's copies are freed here).
    contrib.acts[:] = [cut.acts[s.index].detach() for s in bundle.sites]
    edges = compute_edges(sites=bundle.sites, contrib=contrib, sel=sel, cut=cut, settings=settings,
                          routes=bundle.routes)
    del cut
    grad, logit_masked = pathway_gradient(bundle, x, contrib.target, sel.masks)
    logit_full = contrib.logits.gather(1, contrib.target[:, None]).squeeze(1)
    return BatchPathways(settings=settings, contrib=contrib, sel=sel, edges=edges, saliency=saliency_map(grad),
                         logit_full=logit_full, logit_masked=logit_masked, scores=scores, extra=extra)
