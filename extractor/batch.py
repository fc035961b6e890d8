"""What one batch yields under one setting: the type every method returns."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from extractor.contributions import Contributions, check_finite, cut_contributions
from extractor.edges import (
    PLAIN_BUDGET,
    Edges,
    PlainVJP,
    compute_edges,
    known_routes,
    plain_vjp_inputs,
)
from extractor.errors import ExtractionError
from extractor.linear import Linearised
from extractor.mixing import Mixing
from extractor.models import ModelBundle
from extractor.pathway_gradient import pathway_gradient, saliency_map
from extractor.reach import SiteReach, bundle_reach, cut_sites, kept_rows
from extractor.selection import Selection, select
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward, segment_overlap
from extractor.sites import SiteRecorder
from extractor.vjp import grad_numel

log = logging.getLogger(__name__)


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
    keep_maps: bool = False


@dataclass(kw_only=True)
class ChannelFigures:
    """Per site ``[B, C]``, what the records and the exemplars read off a batch's maps: ``inside``, the element
    contributions inside the pathway's mask summed over positions; ``elements``, the mask's elements per channel;
    ``dead``, no activation anywhere (kept channels); ``peak`` and ``peak_at``, the largest activation and its flat
    position; ``inside_at``, the flat position of the largest element contribution inside the mask (positions ``-1``
    at a vector site). Made before Pathway Gradient's pass, so that the maps can go first (:func:`figures_of`)."""

    inside: list[torch.Tensor]
    elements: list[torch.Tensor]
    dead: list[torch.Tensor]
    peak: list[torch.Tensor]
    peak_at: list[torch.Tensor]
    inside_at: list[torch.Tensor]


def figures_of(contrib: Contributions, sel: Selection, *, keep_maps: bool) -> ChannelFigures:
    """The batch's :class:`ChannelFigures`, one site at a time; without ``keep_maps`` each site's activations and
    gradients are let go once read (``contrib`` keeps its channel sums, logits and targets only): Pathway
    Gradient's masked pass then does not hold them beside its graph (VGG16 at batch 16: 1.7 GB of maps beside a
    0.6 GB half-batch graph; ``bench/peaks.py``). Under a channel mask (an expanded ``[B, C]``) the contribution
    inside it is the channel's own sum (``contrib.channel``), and only the kept channels' maps are read past the
    largest activation (positions and ``dead``: ``False`` outside them, where no record reads it)."""
    out = ChannelFigures(inside=[], elements=[], dead=[], peak=[], peak_at=[], inside_at=[])
    for s, m in enumerate(sel.masks):
        a = contrib.acts[s].detach()
        if a.dim() == 2:  # a vector site: one element per channel
            inside = a * contrib.grads[s].detach() * m
            out.inside.append(inside)
            out.elements.append(m.detach())
            out.dead.append(a == 0)
            out.peak.append(a.float())
            out.peak_at.append(torch.full(a.shape, -1, dtype=torch.long, device=a.device))
            out.inside_at.append(torch.full(a.shape, -1, dtype=torch.long, device=a.device))
        else:
            flat = a.flatten(2)
            top = flat.float().max(-1)  # every channel's: the exemplars rank them all
            out.peak.append(top.values)
            out.peak_at.append(top.indices)
            if not any(m.stride()[2:]):  # a channel mask: the kept channels' maps alone are read again
                k = m.flatten(2)[..., 0]
                idx, ok = kept_rows(sel.kept[s])  # [B, n]
                rows = idx[..., None].expand(*idx.shape, flat.shape[2])
                a_k = flat.gather(1, rows)
                e_k = a_k * contrib.grads[s].detach().flatten(2).gather(1, rows)  # [B, n, P]
                out.inside.append(contrib.channel[s] * k)
                out.elements.append(k * flat.shape[2])
                at = torch.zeros(k.shape, dtype=torch.long, device=a.device)
                out.inside_at.append(at.scatter_(1, idx, e_k.float().max(-1).indices * ok))
                dead = torch.zeros(k.shape, dtype=torch.bool, device=a.device)
                out.dead.append(dead.scatter_(1, idx, (a_k == 0).all(-1) & ok))
            else:
                inside = (a * contrib.grads[s].detach() * m).flatten(2)
                out.inside.append(inside.sum(-1))
                out.elements.append(m.flatten(2).sum(-1))
                out.inside_at.append(inside.float().max(-1).indices)
                out.dead.append((top.values == 0) & (flat.amin(-1) == 0))
        if not keep_maps:
            contrib.acts[s] = contrib.grads[s] = a[:0]  # released
        del a
    return out


@dataclass(kw_only=True)
class BatchPathways:
    """Everything the records need for a batch under one setting (tensors on CPU)."""

    settings: PathwaySettings
    contrib: Contributions
    sel: Selection
    edges: Edges
    figures: ChannelFigures
    saliency: torch.Tensor  # [B, H, W]
    logit_full: torch.Tensor  # [B]
    logit_masked: torch.Tensor  # [B]
    scores: list[torch.Tensor]  # resampling methods: per site [B, C] score of each channel; else empty
    extra: list[dict[str, object]]  # per image: method-specific figures


def finish_batch(
    bundle: ModelBundle, x: torch.Tensor, *, settings: PathwaySettings, contrib: Contributions, sel: Selection,
    scores: list[torch.Tensor], extra: list[dict[str, object]], edges: Edges | None = None, keep_maps: bool = False,
) -> BatchPathways:
    """Edges along the site graph (one cut forward; ``edges`` if the caller made them), the channel figures
    (:func:`figures_of`: the maps go there unless ``keep_maps``) and Pathway Gradient for a selected batch."""
    for b, where in enumerate(cut_sites(sel.kept, bundle.sites, bundle_reach(bundle, x))):
        if where:  # the selection is cut there: the records, the UI and `pathx query pathway` say so
            extra[b]["cut_sites"] = json.dumps([bundle.sites[i].site_id for i in where])
    # On the CPU the two passes that hold a graph (the cut forward with its edges, then Pathway Gradient's
    # masked pass) take half the batch at a time: each then holds half a pass's graph beside the batch's
    # activations and gradients, and a batch's peak stays under twice a plain pass's (bench/peaks.py).
    # On a GPU the whole batch goes at once: fewer, larger kernels.
    halves = batch_halves(x)
    if edges is None:
        edges = batch_edges(bundle, x, settings=settings, contrib=contrib, sel=sel)
    figures = figures_of(contrib, sel, keep_maps=keep_maps)
    masked = [pathway_gradient(bundle, x[part], contrib.target[part], [m[part] for m in sel.masks])
              for part in halves]
    grad, logit_masked = torch.cat([g for g, _ in masked]), torch.cat([lm for _, lm in masked])
    logit_full = contrib.logits.gather(1, contrib.target[:, None]).squeeze(1)
    return BatchPathways(settings=settings, contrib=contrib, sel=sel, edges=edges, figures=figures,
                         saliency=saliency_map(grad),
                         logit_full=logit_full, logit_masked=logit_masked, scores=scores, extra=extra)


def batch_halves(x: torch.Tensor) -> list[slice]:
    """The parts of a batch ``x`` ``[B, ...]`` that the graph-holding passes take at a time: two halves on
    the CPU (the first one image larger when ``B`` is odd), the whole batch on a GPU or at ``B = 1``."""
    B = x.shape[0]
    if B < 2 or x.device.type != "cpu":
        return [slice(0, B)]
    mid = (B + 1) // 2
    return [slice(0, mid), slice(mid, B)]


# below it the segment-by-segment backward repeats few layers, and one cut forward costs less than a plain pass and
# a cut forward (EfficientNet-B1 to B7, 1.5-2.6: (c)/(a) at one image 3.45 against 3.90 on B1, 3.55 against 3.80 on
# B5, 4.16 against 4.01 on B7; (e)/(a) at 16 images 5.83 against 6.63 on B7); above it the two passes cost less at one
# image (EfficientNet V2-S 2.9: 4.84 against 5.46, DenseNet-121 5.4: 4.77 against 5.43, ConvNeXt-T 4.2: 8.81 against
# 9.46) and on ConvNeXt-T at 16 images (11.51 against 13.22), though not on DenseNet-121 there (8.74 against 6.93)
SEGMENT_OVERLAP_MAX = 2.7


def one_forward(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings) -> bool:
    """Whether :func:`selected_with_edges` serves this setting on this model: ``mct`` contributions, exact edges,
    and segments that share few layers (:func:`extractor.sitegraph.segment_overlap`, measured once per model on
    one image). Where they share many (DenseNet's concatenations, ConvNeXt's residual stream) the backward
    segment by segment would repeat them, and a plain forward and backward cost less."""
    if settings.method != "mct" or settings.edges != "exact":
        return False
    if bundle.segment_overlap is None:
        cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x[:1].detach()), bundle.written)
        bundle.segment_overlap = segment_overlap(cut)
        log.debug("segment overlap %.2f", bundle.segment_overlap)
    return bundle.segment_overlap <= SEGMENT_OVERLAP_MAX


def selected_with_edges(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings, *,
                        target: torch.Tensor | None = None, reach: SiteReach | None = None,
                        ) -> tuple[Contributions, Selection, Edges]:
    """``mct`` contributions, the selection and exact edges of a batch from one cut forward per part
    (:func:`extractor.contributions.cut_contributions`): the forward that the contributions take serves the edges
    too. The parts are :func:`batch_halves`, as in :func:`finish_batch`; ``reach`` is the top-k selection's."""
    if settings.edges != "exact":
        raise ExtractionError("one forward serves contributions and edges in the exact edge mode only")
    halves = batch_halves(x)
    done: list[tuple[Contributions, Selection, Edges]] = []
    for part in halves:
        mixes: dict[int, tuple[dict[int, Mixing], dict[Any, Any]]] = {}
        left = [PLAIN_BUDGET]

        def also(cut: SiteRecorder, j: int, mixes: dict[int, tuple[dict[int, Mixing], dict[Any, Any]]] = mixes,
                 left: list[int] = left) -> list[Any]:
            """The inputs of ``j``'s mixing sources' plain VJP (:func:`extractor.edges.compute_edges`), taken
            along by ``j``'s segment backward once its routes are known, while they fit ``PLAIN_BUDGET``."""
            preds = [i for i in bundle.sites[j].preds if i in cut.sources]
            found = plain_vjp_inputs(j, preds, cut=cut, known=known_routes(bundle.routes, settings, cut))
            size = sum(grad_numel(t) for t in found[1].values()) if found is not None else 0
            if found is None or not found[1] or size > left[0]:
                return []
            left[0] -= size
            mixes[j] = found
            return list(found[1].values())

        contrib, cut, extra = cut_contributions(bundle, x[part], None if target is None else target[part],
                                                also=also)
        check_finite("contributions", contrib.channel)
        sel = select(contrib, settings, reach)
        plain = {j: PlainVJP(mixes=mixes[j][0], grads=dict(zip(mixes[j][1], grads, strict=True)))
                 for j, grads in extra.items()}
        done.append((contrib, sel, compute_edges(sites=bundle.sites, contrib=contrib, sel=sel, cut=cut,
                                                 settings=settings, routes=bundle.routes, plain=plain)))
        del cut, extra, plain  # the part's graph goes before the next part's forward
    return (Contributions.concat([c for c, _, _ in done]), Selection.concat([s for _, s, _ in done]),
            Edges.concat([e for _, _, e in done], [part.start for part in halves]))


def batch_edges(bundle: ModelBundle, x: torch.Tensor, *, settings: PathwaySettings, contrib: Contributions,
                sel: Selection) -> Edges:
    """The edges of a batch ``x`` ``[B, ...]`` in the setting's edge mode, one cut forward per part of
    :func:`batch_halves` (on the CPU also the faster way: ConvNeXt-T at 16 images, edges 13.3-13.9 s in one part,
    10.0-13.3 s in two)."""
    halves = batch_halves(x)
    return Edges.concat([edges_of(bundle, x, part, settings=settings, contrib=contrib, sel=sel) for part in halves],
                        [part.start for part in halves])


def edges_of(bundle: ModelBundle, x: torch.Tensor, part: slice, *, settings: PathwaySettings,
             contrib: Contributions, sel: Selection) -> Edges:
    """The edges of the images ``x[part]`` in the setting's edge mode (:mod:`extractor.linear`), from a cut
    forward of those images (freed on return)."""
    with Linearised(bundle.model, settings.edges):
        cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x[part].detach()), bundle.written)
    return compute_edges(sites=bundle.sites, contrib=contrib.rows(part), sel=sel.rows(part), cut=cut,
                         settings=settings, routes=bundle.routes)
