"""Neuron contributions at every site (Khakzar et al., CVPR 2021, step 1).

``mct``: one forward and one backward of the unmasked network give, at every site,
``a * d(logit_t)/da`` (signed, element granularity ``[B, C, ...]``, channels first), summed over
positions to channels ``[B, C]``. ``intgrad``: the layer-wise integrated variant: site ``l``'s
output is scaled by ``alpha`` in ``[0, 1]`` (``m`` points, trapezoid rule; all ``alpha`` values
run as one batch) and the averaged gradient multiplies the activation. (The authors' code
accumulates alpha as 0, .1, .3, .6, ...; here it is linear.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from extractor.errors import ExtractionError
from extractor.layouts import channel_dot
from extractor.models import ModelBundle
from extractor.sitegraph import cut_forward
from extractor.sites import Capture, SiteHooks, SiteRecorder

log = logging.getLogger(__name__)


class Products(Sequence[torch.Tensor]):
    """``acts[l] * grads[l]`` per site, made when read and not kept: a batch holds its activations and
    gradients once, not a third copy of the same size (the element contributions)."""

    def __init__(self, acts: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self._acts, self._grads = acts, grads

    def __len__(self) -> int:
        return len(self._acts)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]  # no slices: one site at a time
        return self._acts[i] * self._grads[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (a * g for a, g in zip(self._acts, self._grads, strict=True))


@dataclass(kw_only=True)
class Contributions:
    """Per-site contributions of a batch.

    ``acts[l]``: ``[B, C, H, W]`` or ``[B, C]`` (detached);
    ``grads[l]``: the gradient that multiplies the activation (plain or integrated), same shape;
    ``element[l]``: their product, the element contributions (made when read: see :class:`Products`);
    ``channel[l]``: ``[B, C]``; ``logits``: ``[B, K]``; ``target``: ``[B]``.
    """

    logits: torch.Tensor
    target: torch.Tensor
    acts: list[torch.Tensor]
    grads: list[torch.Tensor]
    channel: list[torch.Tensor]

    @property
    def element(self) -> Products:
        return Products(self.acts, self.grads)

    @staticmethod
    def concat(parts: Sequence[Contributions]) -> Contributions:
        """One batch's contributions from those of its parts, in order. The parts are used up: each site's maps
        are let go as soon as they are joined, so the batch never holds its maps twice (VGG16 at batch 16: 1.7 GB
        of activations and gradients)."""
        if len(parts) == 1:
            return parts[0]
        out = Contributions(logits=torch.cat([p.logits for p in parts]), target=torch.cat([p.target for p in parts]),
                            acts=[], grads=[], channel=[])
        for s in range(len(parts[0].acts)):
            for mine, theirs in ((out.acts, "acts"), (out.grads, "grads"), (out.channel, "channel")):
                mine.append(torch.cat([getattr(p, theirs)[s] for p in parts]))
                for p in parts:
                    getattr(p, theirs)[s] = mine[-1][:0]  # released
        return out

    def rows(self, part: slice) -> Contributions:
        """The contributions of the images ``part`` of the batch (views)."""
        return Contributions(logits=self.logits[part], target=self.target[part], acts=[a[part] for a in self.acts],
                             grads=[g[part] for g in self.grads], channel=[c[part] for c in self.channel])


def _channel_sums(acts: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[B, C]`` per site: the element contributions summed over positions (:func:`extractor.layouts.channel_dot`)."""
    return [channel_dot(a, g) for a, g in zip(acts, grads, strict=True)]


def _pick_target(logits: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    target = target.to(logits.device).long()
    if (target < 0).any() or (target >= logits.shape[1]).any():
        raise ExtractionError(f"target class out of range [0, {logits.shape[1]})")
    return target


def _all_fired(bundle: ModelBundle, rec: SiteRecorder, *more: dict[int, torch.Tensor]) -> None:
    """Every site was captured (in ``rec.acts`` and each of ``more``), or one line saying which were not."""
    missing = [s.site_id for s in bundle.sites if any(s.index not in d for d in (rec.acts, *more))]
    if missing:
        raise ExtractionError(f"sites {missing[:3]} did not fire; the model's call graph depends on the input")


def forward_with_sites(bundle: ModelBundle, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``[B, K]`` and site outputs (attached to the graph) of one unmasked forward. The network reads
    the captured outputs themselves, not copies, except at the sites it is known to write into in place
    (``bundle.written``); a forward that finds another such site runs again with that one copied too
    (:class:`extractor.sites.Capture`), once per model, not once per batch."""
    while True:
        with SiteHooks(bundle.model, Capture(bundle.sites, copy=frozenset(bundle.written))) as hooks:
            rec = hooks.begin()
            logits = bundle.forward(x)
        written = rec.written()
        if not written:
            break
        del rec, logits  # the first forward's graph goes before the second one is built (EfficientNet V2)
        log.debug("the model writes into site %s's output in place: it is copied", bundle.sites[written[0]].site_id)
        bundle.written.update(written)
    _all_fired(bundle, rec)
    return logits, [rec.acts[s.index] for s in bundle.sites]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (one min/max reduction: ~20x cheaper than ``isfinite(t).all()``)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_finite(name: str, tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        if not all_finite(t):
            raise ExtractionError(f"{name} contain NaN or Inf; check the model and inputs")


def mct_contributions(bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor | None = None) -> Contributions:
    """``a * dlogit/da`` at every site, for images ``x`` ``[B, C, H, W]`` and ``target`` ``[B]`` (default: the
    predicted class)."""
    x = x.detach().requires_grad_(True)
    logits, acts = forward_with_sites(bundle, x)
    tgt = _pick_target(logits.detach(), target)
    selected = logits.gather(1, tgt[:, None]).sum()
    grads = [g.detach() for g in torch.autograd.grad(selected, acts)]
    det = [a.detach() for a in acts]
    check_finite("activations", det)
    return Contributions(logits=logits.detach(), target=tgt, acts=det, grads=grads,
                         channel=_channel_sums(det, grads))


def cut_contributions(bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor | None = None, *,
                      also: Callable[[SiteRecorder, int], Sequence[Any]] | None = None,
                      ) -> tuple[Contributions, SiteRecorder, dict[int, list[torch.Tensor]]]:
    """:func:`mct_contributions` from a cut forward (:func:`extractor.sitegraph.cut_forward`), and that forward,
    whose graph the edges then read: one forward serves both.

    In a cut forward the logit reaches each site's source only directly, and each site's output only its
    predecessors' sources (``SiteInfo.preds``). The full gradient at a site is assembled by the chain rule,
    segment by segment: the logit's gradient at every source first, then, from the last site back, each site's
    full gradient is carried back through its own segment to its predecessors' sources. Every site's consumers
    come after it in call order, so its gradient is whole when its turn comes. The segments together are one
    backward pass; the results equal :func:`mct_contributions` up to float rounding (``tests``)."""
    box: list[torch.Tensor] = []
    cut = cut_forward(bundle.model, bundle.sites, lambda: box.append(bundle.forward(x.detach())), bundle.written)
    _all_fired(bundle, cut, cut.sources)
    logits = box[-1]
    tgt = _pick_target(logits.detach(), target)
    order = [s.index for s in bundle.sites]
    sources = [cut.sources[i] for i in order]
    found = torch.autograd.grad(logits.gather(1, tgt[:, None]).sum(), sources, retain_graph=True,
                                allow_unused=True)
    grads: dict[int, torch.Tensor | None] = dict(zip(order, found, strict=True))
    extra: dict[int, list[torch.Tensor]] = {}
    for site in reversed(bundle.sites):
        g, a = grads[site.index], cut.acts[site.index]
        preds = [i for i in site.preds if i in cut.sources]
        if g is None or not preds or not a.requires_grad:
            continue
        more = list(also(cut, site.index)) if also is not None else []
        back = torch.autograd.grad(a, [cut.sources[i] for i in preds] + more, grad_outputs=g, retain_graph=True,
                                   allow_unused=True)
        if more and all(t is not None for t in back[len(preds):]):
            extra[site.index] = [t for t in back[len(preds):] if t is not None]
        for i, gi in zip(preds, back[:len(preds)], strict=True):
            if gi is not None:
                prev = grads[i]
                grads[i] = gi if prev is None else prev + gi
    det = [cut.acts[i].detach() for i in order]
    full = [(g.detach() if (g := grads[i]) is not None else torch.zeros_like(d))
            for i, d in zip(order, det, strict=True)]
    check_finite("activations", det)
    return Contributions(logits=logits.detach(), target=tgt, acts=det, grads=full,
                         channel=_channel_sums(det, full)), cut, extra


def intgrad_contributions(
    bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor, steps: int, acts: list[torch.Tensor]
) -> Contributions:
    """Layer-wise integrated gradients (zero baseline) at every site, alpha on a trapezoid grid.

    ``acts`` are the clean site outputs (detached). For each site one forward/backward of a
    batch of ``steps * B`` images scales that site's output by ``alpha``.
    """
    B = x.shape[0]
    alphas = torch.linspace(0.0, 1.0, steps, dtype=x.dtype, device=x.device)
    weights = torch.full((steps,), 1.0 / (steps - 1), dtype=x.dtype, device=x.device)
    weights[0] = weights[-1] = 0.5 / (steps - 1)
    xs = x.detach().repeat(steps, 1, 1, 1)  # [steps * B, C, H, W], alpha-major
    tgt_rep = target.repeat(steps)
    grads: list[torch.Tensor] = []
    for site in bundle.sites:
        view = (-1,) + (1,) * (acts[site.index].dim() - 1)
        scale = alphas.repeat_interleave(B).view(view)

        def transform(idx: int, out: torch.Tensor, _s: int = site.index,
                      _scale: torch.Tensor = scale) -> torch.Tensor:
            return out * _scale if idx == _s else out

        with SiteHooks(bundle.model, Capture(bundle.sites, transform)) as hooks:
            rec = hooks.begin()
            logits = bundle.forward(xs)
        scaled = rec.acts[site.index]
        g = torch.autograd.grad(logits.gather(1, tgt_rep[:, None]).sum(), scaled)[0]
        g = g.view(steps, B, *g.shape[1:])
        grads.append((g * weights.view((steps,) + (1,) * (g.dim() - 1))).sum(0).detach())
    with torch.no_grad():
        logits = bundle.forward(x)
    return Contributions(logits=logits, target=target, acts=acts, grads=grads, channel=_channel_sums(acts, grads))
