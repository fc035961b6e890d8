"""Pathway Gradient (Khakzar et al., step 3): the input gradient of the network masked to a pathway.

Site outputs are multiplied by the pathway's mask in the forward pass; the saliency is
``d(logit_t)/dx`` of that masked network (at ``p = 0`` the plain gradient).
"""

from __future__ import annotations

import torch

from extractor.models import ModelBundle
from extractor.sites import Capture, SiteHooks


def pathway_gradient(
    bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor, masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient ``[B, C, H, W]`` and target logits ``[B]`` of the masked network."""
    x = x.detach().requires_grad_(True)

    def transform(idx: int, out: torch.Tensor) -> torch.Tensor:
        return out * masks[idx]

    with SiteHooks(bundle.model, Capture(bundle.sites, transform, keep=False)) as hooks:
        hooks.begin()
        logits = bundle.forward(x)
    selected = logits.gather(1, target[:, None])
    grad = torch.autograd.grad(selected.sum(), x)[0]
    return grad.detach(), selected.detach().squeeze(1)


def saliency_map(grad: torch.Tensor) -> torch.Tensor:
    """Per pixel the channel value of largest magnitude (signed; the first channel at ties):
    ``[B, C, H, W] -> [B, H, W]``. A running choice over the few channels, not ``argmax(1)``, whose strided
    reduction on the CPU took 6 ms at one 224-px image and 143 ms at 16 (0.4 ms and 6 ms this way)."""
    best = grad[:, 0]
    for c in range(1, grad.shape[1]):
        best = torch.where(grad[:, c].abs() > best.abs(), grad[:, c], best)
    return best
