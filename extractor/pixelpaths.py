"""Pixel diffusion pathways (Lyu, Pang, Wang 2024) — our reading of the paper.

The paper's formulas are not public in a form we could read; this follows the
reconstruction in ``shared/reference/seed-algorithms.md`` §1, with the ambiguous choices as
parameters (``PixelSettings``):

1. *Gating.* The clean pass's ReLU on/off pattern and max-pool switches are frozen (forward
   hooks replace every ReLU and MaxPool2d output by ``gate * input`` / a gather at the recorded
   indices; BatchNorm is in eval mode), so the network ``G`` is affine in its input and
   ``R(z) = G(z) - G(0)`` is linear. A pixel's signal is the response to its impulse
   ``x[c, i, j] * e_{c,i,j}``; the responses of all pixels plus the bias response ``G(0)`` add up
   to the clean activations (checked in the tests).
2. *Pathway* of a pixel = a chain of feature maps ``(k_1, ..., k_L)``, one per site. Its size
   at site ``l`` is the L1 mass (over space) of map ``k_l``'s response when only the chain's
   maps are open at sites ``1 .. l-1`` (all other channels of those sites multiplied by 0).
3. *Beam search* (width ``beam``) keeps each pixel's largest partial chains site by site; all
   pixels and beams of an image run as one batch per site (never one pixel per Python step).
   The ``top`` largest full chains of each pixel are its pathways.
4. *Summaries.* Pathway count per map = number of (pixel, top chain) pairs through it;
   per-layer "portion-hot" code of a pixel = the maps its top chains cross; transitions
   ``k_l -> k_{l+1}`` counted over chains become the edges.

Only ReLU and MaxPool2d *modules* are gated; ``ensure_linear`` raises for a model whose
gated network is still not linear (functional activations, other nonlinear modules).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractor.batch import BatchInputs, BatchPathways, figures_of
from extractor.contributions import mct_contributions
from extractor.edges import Edges
from extractor.errors import ExtractionError
from extractor.models import ModelBundle
from extractor.pathway_gradient import pathway_gradient
from extractor.selection import Selection, channel_mask
from extractor.settings import PathwaySettings, PixelSettings
from extractor.sites import Capture, Gate, SiteHooks, SiteRecorder, StopForward

GATED_TYPES = (nn.ReLU, nn.MaxPool2d)


def require_chain(bundle: ModelBundle) -> None:
    """Raise unless the site graph is one chain (each site reads exactly the site before it).

    A pixel pathway is one map per site, traced site by site; on a network whose sites branch
    or skip (ResNet, DenseNet, Inception) a chain through call order would not be a path of the
    network, so such models are refused.
    """
    for s in bundle.sites[1:]:
        if s.preds != (s.index - 1,):
            reads = ", ".join(bundle.sites[i].site_id for i in s.preds) or "no site"
            raise ExtractionError(f"pixel pathways need a chain of sites; {s.site_id} reads {reads}, so this "
                                  "model branches (use mct, intgrad, correlation or precision)")


@contextmanager
def gated_network(bundle: ModelBundle, x: torch.Tensor) -> Iterator[GatedNetwork]:
    """The model with the gates and switches of the clean image ``x`` ``[1, C, H, W]`` frozen, for the
    ``with`` block (the hooks are :class:`extractor.sites.SiteHooks`', gating every ReLU and max-pool
    module and masking sites)."""
    require_chain(bundle)
    named = dict(bundle.model.named_modules())
    missing = {s.module_path for s in bundle.sites} - {p for p, m in named.items() if isinstance(m, GATED_TYPES)}
    if missing:
        raise ExtractionError(f"pixel pathways need ReLU sites; {sorted(missing)[0]!r} is not an nn.ReLU")
    net = GatedNetwork(bundle)
    with SiteHooks(bundle.model, Capture(bundle.sites, net.mask), gate=Gate(GATED_TYPES, net.gate)) as hooks:
        net.record(hooks, x)
        yield net


class GatedNetwork:
    """The affine network of one clean image (made by :func:`gated_network`).

    ``forward(z, masks)`` runs it on a batch ``z`` ``[N, C, H, W]``; ``masks[l]`` ``[N, C_l]`` multiplies
    site ``l``'s output (1 = open). Returns the logits and the site outputs ``[N, C_l, ...]``.
    """

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self._state: dict[tuple[str, int], torch.Tensor] = {}
        self._recording = True
        self._masks: list[torch.Tensor] | None = None
        self._hooks: SiteHooks | None = None

    def record(self, hooks: SiteHooks, x: torch.Tensor) -> None:
        """Run the clean image ``x`` once: its gates and switches are frozen from then on."""
        self._hooks = hooks
        with torch.no_grad():
            hooks.begin()
            self.bundle.forward(x)
        self._recording = False

    def _begin(self, stop_after: int | None = None) -> SiteRecorder:
        if self._hooks is None:
            raise RuntimeError("use the network inside `with gated_network(bundle, x) as net:`")
        return self._hooks.begin(stop_after)

    def gate(self, path: str, call: int, module: nn.Module, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        key = (path, call)
        if isinstance(module, nn.MaxPool2d):
            if self._recording:
                _, idx = F.max_pool2d(x_in, module.kernel_size, module.stride, module.padding,
                                      module.dilation, module.ceil_mode, return_indices=True)
                self._state[key] = idx
            idx = self._state[key].expand(x_in.shape[0], *self._state[key].shape[1:])
            return x_in.flatten(2).gather(2, idx.flatten(2)).view(*idx.shape)
        if self._recording:
            self._state[key] = (out > 0).to(out.dtype)
        return x_in * self._state[key]

    def mask(self, site: int, a: torch.Tensor) -> torch.Tensor:
        if self._masks is None:
            return a
        m = self._masks[site]
        return a * m.view(*m.shape, *([1] * (a.dim() - 2)))

    def forward(
        self, z: torch.Tensor, masks: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and all site outputs of the gated network on ``z`` (model space)."""
        self._masks = masks
        rec = self._begin()
        with torch.no_grad():
            logits = self.bundle.model(z)
        return logits, [rec.acts[s.index] for s in self.bundle.sites]

    def site_output(self, z: torch.Tensor, site: int, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Output of one site only; the forward pass stops there."""
        self._masks = masks
        rec = self._begin(stop_after=site)
        try:
            with torch.no_grad():
                self.bundle.model(z)
        except StopForward:
            pass
        return rec.acts[site]


def pixel_impulses(
    bundle: ModelBundle, x: torch.Tensor, settings: PixelSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Impulses in model space ``[P, C, H, W]`` (pixel value x unit, normalised) and their (c, i, j)."""
    C, H, W = x.shape[1:]
    grid = torch.zeros((C, H, W), dtype=torch.bool)
    grid[:, :: settings.stride, :: settings.stride] = True
    where = torch.nonzero(grid & (x[0].abs().cpu() > settings.min_value)).to(x.device)
    std = bundle.std.to(x).view(-1)
    imp = torch.zeros((len(where), C, H, W), dtype=x.dtype, device=x.device)
    # the normalisation (x - m) / s is affine: the pixel's linear part is x_p / s_c at its position
    imp[torch.arange(len(where)), where[:, 0], where[:, 1], where[:, 2]] = (
        x[0, where[:, 0], where[:, 1], where[:, 2]] / std[where[:, 0]]
    )
    return imp, where


def ensure_linear(net: GatedNetwork, probe: torch.Tensor) -> None:
    """Raise when ``G(2z) - G(0) != 2 (G(z) - G(0))`` (the gated network is not linear)."""
    zero = torch.zeros_like(probe[:1])
    _, a0 = net.forward(zero)
    _, a1 = net.forward(probe[:1])
    _, a2 = net.forward(2 * probe[:1])
    for s0, s1, s2 in zip(a0, a1, a2, strict=True):
        if not torch.allclose(s2 - s0, 2 * (s1 - s0), atol=1e-4, rtol=1e-3):
            raise ExtractionError("the gated network is not linear: pixel pathways need ReLU/MaxPool2d modules")


@dataclass
class PixelPathways:
    """One image's pixel pathways: ``chains`` ``[P, top, S]`` map indices, ``sizes`` ``[P, top]``,
    ``pixels`` ``[P, 3]`` (c, i, j)."""

    chains: torch.Tensor
    sizes: torch.Tensor
    pixels: torch.Tensor


def _chain_masks(bundle: ModelBundle, chains: torch.Tensor, l: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per site a channel mask ``[N, C]``: only the chain's map open at sites before ``l``, all open after.

    ``chains`` ``[N, l]`` holds one map index per site ``0 .. l-1``.
    """
    n = chains.shape[0]
    masks = []
    for s2 in bundle.sites:
        if s2.index < l:
            m = torch.zeros((n, s2.channels), dtype=dtype, device=chains.device)
            m[torch.arange(n, device=chains.device), chains[:, s2.index]] = 1.0
        else:
            m = torch.ones((n, s2.channels), dtype=dtype, device=chains.device)
        masks.append(m)
    return masks


def trace_pixels(bundle: ModelBundle, x: torch.Tensor, settings: PixelSettings) -> PixelPathways:
    """Beam search of every traced pixel's largest chains through the gated network of ``x`` ``[1, C, H, W]``."""
    S = len(bundle.sites)
    with gated_network(bundle, x) as net:
        imp, where = pixel_impulses(bundle, x, settings)
        P = imp.shape[0]
        if P == 0:
            empty = torch.zeros((0, settings.top, S), dtype=torch.long)
            return PixelPathways(empty, torch.zeros((0, settings.top)), where)
        ensure_linear(net, imp)
        chains = torch.zeros((P, 1, 0), dtype=torch.long, device=x.device)
        scores = torch.zeros((P, 1), dtype=x.dtype, device=x.device)
        for l, site in enumerate(bundle.sites):
            Bm = chains.shape[1]
            z = imp.repeat_interleave(Bm, 0)  # [P * Bm, ...], pixel-major
            flat = chains.reshape(P * Bm, l)
            # R(z) = G_m(z) - G_m(0): the bias response depends only on the chain prefix (the masks),
            # and many pixels share prefixes, so it runs once per distinct prefix
            prefixes, inverse = torch.unique(flat, dim=0, return_inverse=True) if l else (flat[:1], None)
            bias = net.site_output(torch.zeros_like(z[: len(prefixes)]), site.index,
                                   _chain_masks(bundle, prefixes, l, x.dtype))
            resp = net.site_output(z, site.index, _chain_masks(bundle, flat, l, x.dtype))
            resp = resp - (bias[inverse] if inverse is not None else bias)
            size = resp.abs().flatten(2).sum(-1) if resp.dim() > 2 else resp.abs()  # [P * Bm, C_l]
            size = size.view(P, Bm, -1)
            cand = size.flatten(1)  # [P, Bm * C_l]
            keep = min(settings.beam, cand.shape[1])
            top = cand.topk(keep, dim=1)
            beam_idx = top.indices // size.shape[2]
            chan_idx = top.indices % size.shape[2]
            prev = chains.gather(1, beam_idx.unsqueeze(-1).expand(P, keep, l))
            chains = torch.cat([prev, chan_idx.unsqueeze(-1)], dim=2)
            scores = top.values
        k = min(settings.top, chains.shape[1])
        return PixelPathways(chains[:, :k].cpu(), scores[:, :k].cpu(), where)


def gated_decomposition(
    bundle: ModelBundle, x: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per site: the sum of all pixel responses, the bias response and the clean activations.

    With ``z = normalize(x) = x / s - m / s``: ``G(z) = G(normalize(0)) + sum_p R(x_p / s_c e_p)``,
    where ``G(normalize(0))`` is the response to a black image (the bias response).
    """
    with gated_network(bundle, x) as net:
        imp, _ = pixel_impulses(bundle, x, PixelSettings(stride=1, min_value=-1.0))
        _, zero = net.forward(torch.zeros_like(x))
        _, resp = net.forward(imp)
        total = [(r - z).sum(0, keepdim=True) for r, z in zip(resp, zero, strict=True)]
        _, bias = net.forward(bundle.normalize(torch.zeros_like(x)))
        _, clean = net.forward(bundle.normalize(x))
        return total, bias, clean


def pixel_batch(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings,
                inputs: BatchInputs) -> BatchPathways:
    """Pixel pathways of each image of ``x`` ``[B, C, H, W]`` as a ``BatchPathways``.

    Kept neurons = maps crossed by any pixel's top chains; their score is the pathway count
    (pixel, chain) through the map and their contribution the usual activation x gradient;
    edges = map transitions, weighted by the number of chains using them; saliency = per
    pixel the size of its largest chain. Per-pixel best chains go into ``extra``.
    """
    px = PixelSettings(beam=settings.beam, top=settings.top, stride=settings.stride)
    contrib = mct_contributions(bundle, x, inputs.target)
    B, S = x.shape[0], len(bundle.sites)
    counts = [torch.zeros((B, s.channels), dtype=x.dtype) for s in bundle.sites]
    sal = torch.zeros((B, *x.shape[2:]), dtype=x.dtype)
    cols: dict[str, list[int | float]] = {k: [] for k in ("b", "ss", "sc", "ds", "dc", "w")}
    extra: list[dict[str, object]] = []
    for b in range(B):
        res = trace_pixels(bundle, x[b:b + 1], px)
        transitions: dict[tuple[int, int, int], int] = {}
        for p in range(res.chains.shape[0]):
            for t in range(res.chains.shape[1]):
                chain = res.chains[p, t].tolist()
                for l, k in enumerate(chain):
                    counts[l][b, k] += 1
                for l in range(S - 1):
                    key = (l, chain[l], chain[l + 1])
                    transitions[key] = transitions.get(key, 0) + 1
            _, i, j = res.pixels[p].tolist()
            sal[b, i, j] = max(float(sal[b, i, j]), float(res.sizes[p, 0]))
        for (l, k0, k1), n in sorted(transitions.items()):
            cols["b"].append(b)
            cols["ss"].append(l)
            cols["sc"].append(k0)
            cols["ds"].append(l + 1)
            cols["dc"].append(k1)
            cols["w"].append(float(n))
        extra.append({
            "pixels": int(res.chains.shape[0]), "chains": int(res.chains.numel() // max(1, S)),
            "pixel_chains": json.dumps({"pixel": res.pixels.tolist(), "chain": res.chains[:, 0].tolist(),
                                        "size": [round(float(v), 6) for v in res.sizes[:, 0]]}),
        })
    kept = [c > 0 for c in counts]
    masks = [channel_mask(k, a) for k, a in zip(kept, contrib.acts, strict=True)]
    sel = Selection(masks, [k.to(x.device) for k in kept])
    figures = figures_of(contrib, sel, keep_maps=inputs.keep_maps)
    grad, logit_masked = pathway_gradient(bundle, x, contrib.target, masks)
    del grad
    def arr(key: str, dtype: type) -> np.ndarray:
        return np.asarray(cols[key], dtype=dtype)

    edges = Edges(
        b=arr("b", np.int64),
        src_site=arr("ss", np.int32),
        src_channel=arr("sc", np.int32),
        dst_site=arr("ds", np.int32),
        dst_channel=arr("dc", np.int32),
        weight=arr("w", np.float32),
        gap=np.full((B, S), np.nan, dtype=np.float32),
    )
    logit_full = contrib.logits.gather(1, contrib.target[:, None]).squeeze(1)
    return BatchPathways(
        settings=settings,
        contrib=contrib,
        sel=sel,
        edges=edges,
        figures=figures,
        saliency=sal,
        logit_full=logit_full,
        logit_masked=logit_masked,
        scores=counts,
        extra=extra,
    )
