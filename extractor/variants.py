"""Adversarial and transformed variants of images, in pixel space ``[B, C, H, W]`` in ``[0, 1]``.

- ``fgsm``: one signed-gradient step of size ``eps`` (untargeted: up the loss of the label).
- ``pgd``: ``steps`` L-infinity projected steps of size ``2.5 * eps / steps`` from the clean
  image (no random start, so results are reproducible); targeted steps go down the loss of
  the target class.
- ``occlude``: a square patch (side = ``frac`` of the image side) set to 0, centred on the
  image's centre of mass: a part of the object is removed (object completion).
- ``shift``: translation by ``(dy, dx)`` pixels, zero fill (movement).
- ``deform``: elastic deformation: a smooth random displacement field (Gaussian-filtered
  noise, std ``sigma`` px, scaled to ``alpha`` px), seeded per image, applied by ``grid_sample``.
- ``affine``: rotation by ``rotate`` degrees and scaling by ``scale`` about the image centre.

Each variant carries its kind and parameters; ``VariantSpec.parse`` reads the CLI syntax.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from extractor.errors import ExtractionError
from records.variants import VARIANT_KINDS

ForwardFn = Callable[[torch.Tensor], torch.Tensor]
KINDS = tuple(VARIANT_KINDS)


@dataclass(frozen=True)
class VariantSpec:
    """One variant of a sweep: ``kind`` and its parameters (JSON-serialisable)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)

    @staticmethod
    def defaults(kind: str) -> list[VariantSpec]:
        """The sweep each kind runs when named without parameters (``records.variants.VARIANT_KINDS``)."""
        if kind not in VARIANT_KINDS:
            raise ExtractionError(f"unknown variant {kind!r}; choose from {', '.join(KINDS)}")
        return [VariantSpec(kind, dict(p)) for p in VARIANT_KINDS[kind].defaults]

    @staticmethod
    def parse(text: str) -> list[VariantSpec]:
        """``"fgsm,pgd:eps=0.1:steps=5,occlude"`` -> specs (a bare kind gives its default sweep)."""
        specs: list[VariantSpec] = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, *pairs = item.split(":")
            if kind not in KINDS:
                raise ExtractionError(f"unknown variant {kind!r}; choose from {', '.join(KINDS)}")
            if not pairs:
                specs.extend(VariantSpec.defaults(kind))
                continue
            params: dict[str, Any] = dict(VariantSpec.defaults(kind)[0].params)
            for pair in pairs:
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ExtractionError(f"variant parameter {pair!r} must look like name=value")
                try:
                    params[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
                except ValueError as exc:
                    raise ExtractionError(f"variant parameter {key}={value!r} is not a number or boolean") from exc
            specs.append(VariantSpec(kind, params))
        return specs


def _loss_grad(forward: ForwardFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(forward(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


def fgsm(forward: ForwardFn, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Untargeted FGSM: ``clip(x + eps * sign(dL/dx))``."""
    return (x + eps * _loss_grad(forward, x, y).sign()).clamp(0.0, 1.0).detach()


def pgd(forward: ForwardFn, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int,
        targeted: bool = False, step_size: float | None = None) -> torch.Tensor:
    """L-infinity PGD from ``x``; ``y`` is the label (untargeted) or the target (targeted)."""
    alpha = step_size if step_size is not None else 2.5 * eps / steps
    adv = x.detach().clone()
    for _ in range(steps):
        g = _loss_grad(forward, adv, y).sign()
        adv = adv - alpha * g if targeted else adv + alpha * g
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return adv


def occlude(x: torch.Tensor, frac: float) -> tuple[torch.Tensor, list[dict[str, int]]]:
    """Zero a square patch centred on each image's centre of mass; returns patch positions."""
    B, _, H, W = x.shape
    side = max(1, round(frac * min(H, W)))
    mass = x.abs().sum(1)  # [B, H, W]
    total = mass.flatten(1).sum(1).clamp_min(1e-12)
    ys = torch.arange(H, dtype=x.dtype, device=x.device)
    xs = torch.arange(W, dtype=x.dtype, device=x.device)
    cy = (mass.sum(2) * ys).sum(1) / total
    cx = (mass.sum(1) * xs).sum(1) / total
    out = x.clone()
    where: list[dict[str, int]] = []
    for b in range(B):
        top = int(min(max(round(float(cy[b]) - side / 2), 0), H - side))
        left = int(min(max(round(float(cx[b]) - side / 2), 0), W - side))
        out[b, :, top:top + side, left:left + side] = 0.0
        where.append({"top": top, "left": left, "side": side})
    return out, where


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by ``(dy, dx)`` pixels with zero fill."""
    out = torch.zeros_like(x)
    H, W = x.shape[-2:]
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


def _gaussian_blur(field_: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=field_.dtype, device=field_.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = field_.shape[1]
    field_ = F.conv2d(F.pad(field_, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                      groups=c)
    return F.conv2d(F.pad(field_, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def deform(x: torch.Tensor, alpha: float, sigma: float, seeds: list[int]) -> torch.Tensor:
    """Elastic deformation with a per-image seeded smooth displacement field (``alpha`` px)."""
    B, _, H, W = x.shape
    noise = torch.stack([
        torch.rand((2, H, W), generator=torch.Generator().manual_seed(s), dtype=torch.float64) * 2 - 1
        for s in seeds
    ]).to(x)
    disp = _gaussian_blur(noise, sigma)
    disp = disp / disp.flatten(1).abs().amax(1).clamp_min(1e-12).view(B, 1, 1, 1) * alpha
    ys, xs = torch.meshgrid(torch.arange(H, dtype=x.dtype, device=x.device),
                            torch.arange(W, dtype=x.dtype, device=x.device), indexing="ij")
    gx = (xs + disp[:, 0]) / (W - 1) * 2 - 1
    gy = (ys + disp[:, 1]) / (H - 1) * 2 - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0.0, 1.0)


def affine(x: torch.Tensor, rotate: float, scale: float) -> torch.Tensor:
    """Rotate by ``rotate`` degrees and scale by ``scale`` about the centre (zero fill)."""
    import math

    a = math.radians(rotate)
    theta = torch.tensor([[math.cos(a) / scale, -math.sin(a) / scale, 0.0],
                          [math.sin(a) / scale, math.cos(a) / scale, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0.0, 1.0)


@dataclass
class Variant:
    """A batch of variants of the same kind: images ``[B, C, H, W]`` and per-image params."""

    kind: str
    x: torch.Tensor
    params: list[dict[str, Any]]


# How each kind makes its images: (params, forward, originals, labels, classes, seeds) -> (images, per-image params).
ApplyFn = Callable[[dict[str, Any], ForwardFn, torch.Tensor, torch.Tensor, int, list[int]],
                   tuple[torch.Tensor, list[dict[str, Any]]]]


def _fgsm(p: dict[str, Any], forward: ForwardFn, x: torch.Tensor, labels: torch.Tensor, classes: int,
          seeds: list[int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    return fgsm(forward, x, labels, float(p["eps"])), [dict(p) for _ in range(len(x))]


def _pgd(p: dict[str, Any], forward: ForwardFn, x: torch.Tensor, labels: torch.Tensor, classes: int,
         seeds: list[int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    if bool(p.get("targeted", False)):
        tgt = (labels + int(p.get("target_offset", 1))) % classes
        adv = pgd(forward=forward, x=x, y=tgt, eps=float(p["eps"]), steps=int(p["steps"]), targeted=True)
        return adv, [{**p, "target": int(t)} for t in tgt]
    adv = pgd(forward=forward, x=x, y=labels, eps=float(p["eps"]), steps=int(p["steps"]))
    return adv, [dict(p) for _ in range(len(x))]


def _occlude(p: dict[str, Any], forward: ForwardFn, x: torch.Tensor, labels: torch.Tensor, classes: int,
             seeds: list[int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    out, where = occlude(x, float(p["frac"]))
    return out, [{**p, **w} for w in where]


def _shift(p: dict[str, Any], forward: ForwardFn, x: torch.Tensor, labels: torch.Tensor, classes: int,
           seeds: list[int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    return shift(x, int(p["dy"]), int(p["dx"])), [dict(p) for _ in range(len(x))]


def _deform(p: dict[str, Any], forward: ForwardFn, x: torch.Tensor, labels: torch.Tensor, classes: int,
            seeds: list[int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    return deform(x, float(p["alpha"]), float(p["sigma"]), seeds), [{**p, "seed": s} for s in seeds]


def _affine(p: dict[str, Any], forward: ForwardFn, x: torch.Tensor, labels: torch.Tensor, classes: int,
            seeds: list[int]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    return affine(x, float(p["rotate"]), float(p["scale"])), [dict(p) for _ in range(len(x))]


# one function per kind of records.variants.VARIANT_KINDS (tests/test_names.py holds the two to the same kinds)
APPLY: dict[str, ApplyFn] = {"fgsm": _fgsm, "pgd": _pgd, "occlude": _occlude, "shift": _shift, "deform": _deform,
                             "affine": _affine}


def make_variant(spec: VariantSpec, forward: ForwardFn, x: torch.Tensor, *, labels: torch.Tensor,
                 num_classes: int, seeds: list[int]) -> Variant:
    """Apply ``spec`` to originals ``x`` ``[B, C, H, W]`` whose labels (or predictions) are ``labels``; ``seeds``
    one per image."""
    if spec.kind not in APPLY:
        raise ExtractionError(f"unknown variant {spec.kind!r}")
    try:
        out, params = APPLY[spec.kind](spec.params, forward, x, labels, num_classes, seeds)
    except KeyError as exc:
        raise ExtractionError(f"variant {spec.kind} is missing parameter {exc.args[0]!r}") from exc
    return Variant(spec.kind, out, params)
