"""What each neuron sees: its top-N original images, with the receptive-field box of the peak.

Two lists per channel of every site: ``activation`` (the images whose maximum activation in
the channel is largest) and ``contribution`` (the images whose pathway the channel contributes
most to, under the run's first pathway setting). Only positive values count: a channel that
never fires has no exemplars. Ties are broken by image id, so the lists do not depend on the
order images arrive in.

Memory is O(channels x N): the tracker keeps the running top-N and, per batch, hands back
only the rows that entered it (the *delta*). Each part stores its delta; since every entry of
a final top-N entered some running top-N, the top-N over all deltas of all parts (shards and
resumed runs included) is exactly the top-N over all images (``records.merge_exemplar_rows``).

The box of a position is its receptive field in input pixels, clipped to the image: the
bounding box of the support of d activation(position) / d input, measured once per site on
random inputs at a central position and translated by the site's stride. A site whose central
field already reaches an image border gets the whole image (a superset, never too small).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from extractor.models import ModelBundle
from records import EXEMPLAR_KINDS, ExemplarRows, merge_exemplar_rows

if TYPE_CHECKING:
    from extractor.batch import ChannelFigures

log = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class SiteField:
    """Receptive field of a site's positions: ``box0`` (y0, x0, y1, x1; half-open) at position
    ``p0``, moved by ``stride`` per position; ``whole`` = every position sees the whole image."""

    box0: tuple[int, int, int, int]
    p0: tuple[int, int]
    stride: tuple[int, int]
    whole: bool


class ReceptiveFields:
    """Boxes in input pixels for positions of every site of a model."""

    def __init__(self, bundle: ModelBundle, probes: int = 2, seed: int = 0) -> None:
        from extractor.contributions import forward_with_sites

        self.height, self.width = bundle.info.input_shape[1:]
        gen = torch.Generator().manual_seed(seed)
        dtype = next(bundle.model.parameters()).dtype
        x = torch.rand((probes, *bundle.info.input_shape), generator=gen, dtype=dtype).requires_grad_(True)
        _, acts = forward_with_sites(bundle, x)  # one forward; one backward per site and probed position
        self.fields: list[SiteField | None] = [self._probe(x, acts[s.index]) if len(s.shape) == 3 else None
                                               for s in bundle.sites]

    def _support_box(self, x: torch.Tensor, act: torch.Tensor, pos: tuple[int, int]) -> tuple[int, int, int, int]:
        """Bounding box of the pixels that reach position ``pos`` of ``act`` ``[P, C, h, w]`` in any probe."""
        g = torch.autograd.grad(act[:, :, pos[0], pos[1]].sum(), x, retain_graph=True)[0]
        support = (g.abs().sum((0, 1)) > 0).nonzero()
        if len(support) == 0:
            return 0, 0, self.height, self.width
        (y0, x0), (y1, x1) = support.min(0).values.tolist(), support.max(0).values.tolist()
        return y0, x0, y1 + 1, x1 + 1

    def _probe(self, x: torch.Tensor, act: torch.Tensor) -> SiteField:
        hs, ws = act.shape[-2:]
        p0 = (hs // 2, ws // 2)
        box0 = self._support_box(x, act, p0)
        touches = box0[0] == 0 or box0[1] == 0 or box0[2] == self.height or box0[3] == self.width
        if touches or hs * ws == 1:
            return SiteField(box0=box0, p0=p0, stride=(0, 0), whole=touches)
        p1 = (min(hs - 1, p0[0] + 1), min(ws - 1, p0[1] + 1))
        box1 = self._support_box(x, act, p1)
        sy = (box1[0] - box0[0]) // max(1, p1[0] - p0[0])
        sx = (box1[1] - box0[1]) // max(1, p1[1] - p0[1])
        return SiteField(box0=box0, p0=p0, stride=(sy, sx), whole=False)

    def boxes(self, site: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Boxes ``[n, 4]`` (y0, x0, y1, x1; half-open, clipped) of positions ``ys``, ``xs`` ``[n]``."""
        f = self.fields[site]
        n = len(ys)
        if f is None or f.whole:
            return np.tile(np.array([0, 0, self.height, self.width], np.int32), (n, 1))
        dy = (ys - f.p0[0]) * f.stride[0]
        dx = (xs - f.p0[1]) * f.stride[1]
        out = np.stack([f.box0[0] + dy, f.box0[1] + dx, f.box0[2] + dy, f.box0[3] + dx], 1)
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.height)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.width)
        return out.astype(np.int32)


class ExemplarTracker:
    """Running top-``n`` images per (site, channel, kind) over the batches of one extraction."""

    def __init__(self, bundle: ModelBundle, n: int) -> None:
        self.n = n
        self.fields = ReceptiveFields(bundle)
        self.shapes = [s.shape for s in bundle.sites]
        self.top = ExemplarRows.empty()
        # per (kind, site): the n-th best value so far per channel (-inf until n are kept); a candidate
        # below it can never enter, so it is dropped before the merge (which then sorts few rows)
        self.floor = {(k, s.index): np.full(s.channels, -np.inf, np.float32) for k in EXEMPLAR_KINDS
                      for s in bundle.sites}

    def update(self, ids: Sequence[str], figures: ChannelFigures) -> ExemplarRows:
        """Add one batch of originals; returns the rows that entered the running top-N (the delta).

        ``figures``: the batch's channel figures (:class:`extractor.batch.ChannelFigures`): per site the largest
        activation and the summed element contributions inside the pathway's mask, with their positions;
        ``ids`` ``[B]`` are the images' ids.
        """
        found = {"activation": (figures.peak, figures.peak_at), "contribution": (figures.inside, figures.inside_at)}
        batch = [self._rows(ids, kind, s, values, flat) for kind in EXEMPLAR_KINDS
                 for s, (values, flat) in enumerate(zip(*found[kind], strict=True))]
        candidates = ExemplarRows.concat([self.top, *batch])
        self.top = merge_exemplar_rows(candidates, self.n)
        assert self.top.rank is not None
        full = self.top.rank == self.n
        for kind in EXEMPLAR_KINDS:
            of_kind = full & (self.top.kind == kind)
            for site in np.unique(self.top.site[of_kind]):
                m = of_kind & (self.top.site == site)
                self.floor[(kind, int(site))][self.top.channel[m]] = self.top.value[m]
        fresh = np.isin(self.top.image_id.astype(str), np.asarray(list(ids), dtype=str))
        return self.top.take(np.nonzero(fresh)[0])

    def _rows(self, ids: Sequence[str], kind: str, site: int, values: torch.Tensor, flat: torch.Tensor
              ) -> ExemplarRows:
        """The rows of one site and kind that can enter: ``values`` ``[B, C]`` and their flat positions ``flat``
        ``[B, C]`` (``-1`` at a vector site)."""
        values = values.float()
        # on the model's device, only the candidates that can enter: positive, not below the running
        # n-th best (ties may still enter: the smaller image id wins), and not below this batch's own
        # n-th best (all ties kept), so a batch sends at most ~n rows per channel to the CPU
        floor = torch.as_tensor(self.floor[(kind, site)], device=values.device)
        nth = values.topk(min(self.n, values.shape[0]), dim=0).values[-1]  # [C]
        b, c = torch.nonzero((values > 0) & (values >= torch.maximum(floor, nth)), as_tuple=True)
        vals, pos = values[b, c].cpu().numpy(), flat[b, c].cpu().numpy()
        b_np, c_np = b.cpu().numpy(), c.cpu().numpy()
        shape = self.shapes[site]
        width = shape[-1] if len(shape) > 1 else 1
        y = np.where(pos < 0, -1, pos // width).astype(np.int32)
        x = np.where(pos < 0, -1, pos % width).astype(np.int32)
        return ExemplarRows(site=np.full(len(b_np), site, np.int32), channel=c_np.astype(np.int32),
                            kind=np.full(len(b_np), kind, dtype=object), image_id=np.asarray(ids, dtype=object)[b_np],
                            value=vals.astype(np.float32), y=y, x=x, box=self.fields.boxes(site, y, x))
