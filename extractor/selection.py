"""Selecting a pathway's neurons from the contributions (Khakzar et al., step 2).

``percentile``: one global percentile ``p`` over the |scores| of all neurons of all sites
(elements or channels); the lowest ``floor(p% * N)`` are dropped, so ``p = 0`` keeps
everything. ``topk``: the ``k`` channels of largest |contribution| per site, connected across
depthwise and grouped segments (:mod:`extractor.reach`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from extractor.contributions import Contributions
from extractor.reach import SiteReach, connected_topk
from extractor.settings import PathwaySettings


@dataclass
class Selection:
    """Masks ``[B, C, H, W]``/``[B, C]`` per site (1 = in the pathway) and kept channels ``[B, C]``."""

    masks: list[torch.Tensor]
    kept: list[torch.Tensor]

    @staticmethod
    def concat(parts: list[Selection]) -> Selection:
        """One batch's selection from those of its parts, in order (the parts are used up)."""
        if len(parts) == 1:
            return parts[0]
        kept = [torch.cat(ks) for ks in zip(*(p.kept for p in parts), strict=True)]
        masks = []
        for s, k in enumerate(kept):
            ms = [p.masks[s] for p in parts]
            if ms[0].dim() > 2 and all(not any(m.stride()[2:]) for m in ms):  # channel masks stay views
                masks.append(channel_mask(k, ms[0].new_empty(()).expand(k.shape[0], *ms[0].shape[1:])))
            else:  # element masks: the parts' are let go as they are joined (see Contributions.concat)
                masks.append(torch.cat(ms))
                for p in parts:
                    p.masks[s] = masks[-1][:0]
        return Selection(masks, kept)

    def rows(self, part: slice) -> Selection:
        """The selection of the images ``part`` of the batch (views)."""
        return Selection([m[part] for m in self.masks], [k[part] for k in self.kept])


def channel_mask(kept: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Kept channels ``[B, C]`` (bool) as a mask shaped and typed like ``like`` ``[B, C, ...]``: an expanded
    view of ``[B, C, 1, ...]``, so a channel mask costs ``B * C`` numbers, not a map's worth."""
    return kept.to(like.device, like.dtype).view(*kept.shape, *([1] * (like.dim() - 2))).expand_as(like)


def select(contrib: Contributions, settings: PathwaySettings, reach: SiteReach | None = None) -> Selection:
    """Apply the selection rule to the contributions (scores are absolute values). Top-k keeps the
    pathway connected through per-channel and grouped segments given their ``reach``
    (:func:`extractor.reach.connected_topk`)."""
    if settings.selection == "topk":
        kept = connected_topk([c.abs() for c in contrib.channel], settings.k, reach)
        return Selection([channel_mask(k, a) for k, a in zip(kept, contrib.acts, strict=True)], kept)
    B = contrib.logits.shape[0]
    element = settings.granularity == "element"
    if element:
        flat = torch.cat([e.abs().reshape(B, -1) for e in contrib.element], dim=1)
    else:
        flat = torch.cat([c.abs() for c in contrib.channel], dim=1)
    n_drop = math.floor(settings.sparsity / 100.0 * flat.shape[1])
    if n_drop == 0:
        thr = torch.full((B, 1), -1.0, dtype=flat.dtype, device=flat.device)
    else:
        thr = flat.kthvalue(n_drop, dim=1, keepdim=True).values  # score <= thr is dropped
    masks, kept = [], []
    for s, (chan, a) in enumerate(zip(contrib.channel, contrib.acts, strict=True)):
        if element:
            m = contrib.element[s].abs() > thr.view((B,) + (1,) * (a.dim() - 1))
            kept.append(m.flatten(2).any(-1) if m.dim() > 2 else m)
            masks.append(m.to(a.dtype))
        else:
            keep = chan.abs() > thr.view(B, 1)
            kept.append(keep)
            masks.append(channel_mask(keep, a))
    return Selection(masks, kept)
