"""What one batch yields under one setting: the type every method returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from extractor.contributions import Contributions
from extractor.edges import Edges, compute_edges
from extractor.linear import Linearised
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
    # On the CPU the two passes that hold a graph (the cut forward with its edges, then Pathway Gradient's
    # masked pass) take half the batch at a time: each then holds half a pass's graph beside the batch's
    # activations and gradients, and a batch's peak stays under twice a plain pass's (bench/peaks.py).
    # On a GPU the whole batch goes at once: fewer, larger kernels.
    halves = batch_halves(x)
    edges = Edges.concat([edges_of(bundle, x, part, settings=settings, contrib=contrib, sel=sel)
                          for part in halves], [part.start for part in halves])
    masked = [pathway_gradient(bundle, x[part], contrib.target[part], [m[part] for m in sel.masks])
              for part in halves]
    grad, logit_masked = torch.cat([g for g, _ in masked]), torch.cat([lm for _, lm in masked])
    logit_full = contrib.logits.gather(1, contrib.target[:, None]).squeeze(1)
    return BatchPathways(settings=settings, contrib=contrib, sel=sel, edges=edges, saliency=saliency_map(grad),
                         logit_full=logit_full, logit_masked=logit_masked, scores=scores, extra=extra)


def batch_halves(x: torch.Tensor) -> list[slice]:
    """The parts of a batch ``x`` ``[B, ...]`` that the graph-holding passes take at a time: two halves on
    the CPU (the first one image larger when ``B`` is odd), the whole batch on a GPU or at ``B = 1``."""
    B = x.shape[0]
    if B < 2 or x.device.type != "cpu":
        return [slice(0, B)]
    mid = (B + 1) // 2
    return [slice(0, mid), slice(mid, B)]


def edges_of(bundle: ModelBundle, x: torch.Tensor, part: slice, *, settings: PathwaySettings,
             contrib: Contributions, sel: Selection) -> Edges:
    """The edges of the images ``x[part]`` in the setting's edge mode (:mod:`extractor.linear`), from a cut
    forward of those images (freed on return)."""
    with Linearised(bundle.model, settings.edges):
        cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x[part].detach()), bundle.written)
    return compute_edges(sites=bundle.sites, contrib=contrib.rows(part), sel=sel.rows(part), cut=cut,
                         settings=settings, routes=bundle.routes)
