"""The fast edge path (one mixing layer per segment) against batched VJPs, and when it must not apply."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from extractor.contributions import mct_contributions
from extractor.edges import compute_edges, edge_weights_vjp, segment_routes
from extractor.mixing import find_mixing, mixing_edge_weights
from extractor.models import ModelBundle, make_bundle
from extractor.selection import select
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward


def _pairs(bundle: ModelBundle, x: torch.Tensor) -> tuple[int, int, float]:
    """(site-graph edges, fast ones, worst |fast - VJP| relative to the pair's largest weight)."""
    contrib = mct_contributions(bundle, x)
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    sources = list(cut.sources.values())
    pairs, fast, worst = 0, 0, 0.0
    for site in bundle.sites:
        j = site.index
        for i in site.preds:
            pairs += 1
            mix = find_mixing(cut.sources[i], cut.acts[j], sources)
            if mix is None:
                continue
            fast += 1
            m = min(6, cut.acts[j].shape[1])
            targets = contrib.channel[j].abs().topk(m, 1).indices
            targets[0, -1] = -1  # padding must give zero rows on both paths
            got = mixing_edge_weights(mix, cut.sources[i], cut.acts[j], contrib.grads[j], targets)
            ref = edge_weights_vjp([cut.sources[i]], cut.acts[j], contrib.grads[j], targets)[0]
            assert got.shape == ref.shape
            assert torch.all(got[0, -1] == 0)
            worst = max(worst, float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-30))
    routes = segment_routes(bundle.sites, cut)  # the mixing route wherever the segment has the shape
    for site in bundle.sites:
        for i in site.preds:
            fast_pair = find_mixing(cut.sources[i], cut.acts[site.index], sources) is not None
            assert (routes[(i, site.index)] == "mixing") == fast_pair
    return pairs, fast, worst


@pytest.mark.parametrize(("name", "size", "expected"), [
    ("resnet18", 32, (24, 24)), ("vgg11", 32, (9, 9)),
    ("mobilenet_v2", 32, (50, 50)),  # linear bottlenecks: project 1x1 -> batch norm (+ skip) -> expand 1x1
    ("mobilenet_v3_small", 32, (56, 40)),  # squeeze-excite: the gate's own site feeds three layers (VJP)
    ("efficientnet_b0", 32, (92, 62)),
    # stage 1's second block: the first block's output through the gate, the 1x1 projection, batch norm and the
    # next block's depthwise conv (a per-channel op after the mixing layer)
    ("efficientnet_b1", 32, (151, 98)),
    ("squeezenet1_1", 48, (33, 33)),  # concatenations before the next fire's squeeze conv
    ("googlenet", 48, (152, 152)),  # branches concatenated, max-pooled, read by the next module's convs
    ("densenet121", 32, (655, 655)),  # a layer's conv output concatenated into every later layer's input; the stem
    ("inception_v3", 75, (225, 225)),  # in-place ReLUs: the overwritten value gets no gradient, no path
])
def test_fast_path_equals_vjp_on_torchvision(name: str, size: int, expected: tuple[int, int]) -> None:
    torch.manual_seed(0)
    extra = {"init_weights": True, "aux_logits": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=7, **extra).double().eval()
    bundle = make_bundle(model, name, (3, size, size))
    pairs, fast, worst = _pairs(bundle, torch.rand(2, 3, size, size, dtype=torch.float64))
    assert worst < 1e-10
    assert (pairs, fast) == expected


def test_fast_path_on_the_demo_cnn(demo: tuple) -> None:
    bundle, data = demo
    pairs, fast, worst = _pairs(bundle, data.x_test[:4])
    assert (pairs, fast) == (4, 4)  # conv, pool+conv, conv, pool+flatten+linear
    assert worst < 1e-5


class _Net(nn.Module):
    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.body = body
        self.head = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class _Residual(nn.Module):  # relu(conv(a) + a): a path skips the mixing layer
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(a) + a)


class _ChannelMix(nn.Module):  # a per-pixel channel mean multiplies every channel after the conv
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.conv(a)
        return self.act(z * z.mean(1, keepdim=True))


class _CatBefore(nn.Module):  # the source is the second block of a concatenation read by the conv
    out_channels = 5

    def __init__(self) -> None:
        super().__init__()
        self.fill = nn.Parameter(torch.rand(1, 3, 1, 1))
        self.conv, self.act = nn.Conv2d(7, 5, 3, padding=1), nn.ReLU()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([self.fill.expand(a.shape[0], 3, *a.shape[2:]), a], 1)))


class _CatAfter(nn.Module):  # the conv's output is the second block of the concatenation the site reads
    out_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.fill = nn.Parameter(torch.rand(1, 3, 1, 1))
        self.conv, self.norm, self.act = nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = self.conv(a)
        return self.act(self.norm(torch.cat([self.fill.expand(z.shape[0], 3, *z.shape[2:]), z], 1)))


class _PoolCat(nn.Module):  # no mixing layer: pooled, concatenated after another block, normalised (a DenseNet stem)
    out_channels = 7

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.twice = twice
        self.fill = nn.Parameter(torch.rand(1, 3, 1, 1))
        self.out_channels = 11 if twice else 7
        self.pool, self.norm, self.act = nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(self.out_channels), nn.ReLU()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        parts = [self.fill.expand(a.shape[0], 3, *a.shape[2:]), self.pool(a)] + ([a] if self.twice else [])
        return self.act(self.norm(torch.cat(parts, 1)))


class _Gate(nn.Module):  # a per-channel gate that does not depend on the source (fast), or that does
    out_channels = 5

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.own = own
        self.gate = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.conv, self.act = nn.Conv2d(4, 5, 3, padding=1), nn.ReLU()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(a.mean((2, 3), keepdim=True)) if self.own else torch.sigmoid(self.gate)
        return self.act(self.conv(a * g))


class _Bottleneck(nn.Module):  # conv -> batch norm (+ a skip not from the source) -> 1x1 conv: one composite conv
    out_channels = 6

    def __init__(self, first: nn.Conv2d, skip: bool = True) -> None:
        super().__init__()
        mid = first.out_channels
        self.first, self.norm, self.skip = first, nn.BatchNorm2d(mid), skip
        self.bias = nn.Parameter(torch.rand(1, mid, 1, 1))
        self.second, self.act = nn.Conv2d(mid, 6, 1), nn.ReLU()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.first(a))
        return self.act(self.second(y + self.bias if self.skip else y * y))


class _Padded(nn.Module):  # TensorFlow's "same" padding: F.pad right before the conv (EfficientNet-Lite, timm)
    def __init__(self, value: float, groups: int = 1, bottleneck: bool = False) -> None:
        super().__init__()
        self.value, self.bottleneck = value, bottleneck
        self.conv = nn.Conv2d(4, 4, 3, stride=2, groups=groups)
        self.norm, self.second, self.act = nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.ReLU()
        self.out_channels = 6 if bottleneck else 4

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(F.pad(a, [0, 1, 0, 1], value=self.value)))
        return self.act(self.second(y) if self.bottleneck else y)


@pytest.mark.parametrize(("build", "fast"), [
    (lambda: _Padded(0.0), True),
    (lambda: _Padded(0.0, groups=4), True),  # depthwise after a zero pad
    (lambda: _Padded(0.0, groups=4, bottleneck=True), True),
    (lambda: _Padded(0.5), False),  # a non-zero pad is not homogeneous
    (lambda: _Padded(0.5, bottleneck=True), False),
    (lambda: _Bottleneck(nn.Conv2d(4, 5, 1)), True),
    (lambda: _Bottleneck(nn.Conv2d(4, 5, 3, stride=2, padding=1)), True),
    (lambda: _Bottleneck(nn.Conv2d(4, 8, 3, padding=1, groups=4)), True),  # depthwise-like first conv
    (lambda: _Bottleneck(nn.Conv2d(4, 5, 1), skip=False), False),  # y * y between: not a per-channel scale
    # a 3x3 second conv
    (lambda: nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(5, 6, 3, padding=1), nn.ReLU()), False),
    (_CatBefore, True),
    (_CatAfter, True),
    (_PoolCat, True),  # channel i reaches channel 3 + i alone
    (lambda: _PoolCat(twice=True), False),  # channel i reaches channels 3 + i and 7 + i
    (lambda: _Gate(own=False), True),
    (lambda: _Gate(own=True), False),
    (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6), nn.ReLU()), True),
    (lambda: nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2), nn.ReLU()), True),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU()), True),
    (_Residual, False),
    (_ChannelMix, False),
    (lambda: nn.Sequential(nn.ConvTranspose2d(4, 4, 3, padding=1), nn.ReLU()), False),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.ReLU()), False),  # three
])
def test_fast_path_applies_exactly_where_it_is_exact(build: Callable[[], nn.Module], fast: bool) -> None:
    torch.manual_seed(1)
    body = build()  # built after seeding, so its weights do not depend on what ran before
    channels = getattr(body, "out_channels", None) or [
        m for m in body.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1].out_channels
    net = _Net(body, channels).double().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    bundle = make_bundle(net, "segment", (1, 12, 12))
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    pairs, n_fast, worst = _pairs(bundle, x)
    assert (pairs, n_fast) == (1, 1 if fast else 0)
    assert worst < 1e-10
    # whichever path runs, compute_edges gives the VJP's edges
    settings = PathwaySettings(k=4, edge_targets=4, edges_per_target=4)
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, settings)
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    a = compute_edges(sites=bundle.sites, contrib=contrib, sel=sel, cut=cut, settings=settings)
    b = compute_edges(sites=bundle.sites, contrib=contrib, sel=sel, cut=cut, settings=settings, fast=False)
    for key in ("b", "src_site", "src_channel", "dst_site", "dst_channel"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    np.testing.assert_allclose(a.weight, b.weight, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.gap, b.gap, rtol=1e-9, atol=1e-12)


def test_frozen_linear_falls_back() -> None:
    """A linear layer whose weight needs no gradient does not keep its input: the VJP path is used."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                          nn.Linear(6, 3)).double().eval()
    model[3].requires_grad_(False)
    bundle = make_bundle(model, "frozen", (1, 4, 4))
    pairs, fast, worst = _pairs(bundle, torch.rand(2, 1, 4, 4, dtype=torch.float64))
    assert (pairs, fast) == (1, 0)
    model[3].requires_grad_(True)
    pairs, fast, worst = _pairs(bundle, torch.rand(2, 1, 4, 4, dtype=torch.float64))
    assert (pairs, fast) == (1, 1)
    assert worst < 1e-10


def test_fast_path_in_image_chunks_equals_one_call(demo: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big inputs split the weight-gradient call over images (memory bound); the weights do not change."""
    import extractor.mixing as mixing

    bundle, data = demo
    x = data.x_test[:5]
    _, _, whole = _pairs(bundle, x)
    monkeypatch.setattr(mixing, "_UNFOLD_BUDGET", 1)  # one image per call
    pairs, fast, chunked = _pairs(bundle, x)
    assert (pairs, fast) == (4, 4)
    assert chunked < 1e-5 and whole < 1e-5


@pytest.mark.slow
def test_fast_path_on_efficientnet_lite0() -> None:
    """The trained EfficientNet-Lite0 (zero "same" padding before every strided and depthwise conv):
    the fast path reads its segments, equal to the VJP in float64."""
    from extractor.launch import model_from_spec

    bundle = model_from_spec("efficientnet_lite0", Path("."))
    bundle.model.double()
    try:
        pairs, fast, worst = _pairs(bundle, torch.rand(2, 3, 224, 224, dtype=torch.float64))
    finally:
        bundle.model.float()
    assert worst < 1e-10
    assert (pairs, fast) == (46, 46)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "size"), [
    (3, 1, 1, 1, 9), (3, 2, 1, 1, 9), (3, 2, 1, 1, 10), (5, 2, 2, 1, 11), (3, 1, 2, 2, 9), ((1, 3), 1, (0, 1), 1, 8),
    (3, 1, 0, 1, 9), (2, 2, 0, 1, 8), (3, 1, 3, 1, 7),  # the last: padding beyond the kernel's reach (fallback)
])
def test_target_input_gradients_equal_autograd(kernel: object, stride: int, padding: object, dilation: int,
                                               size: int) -> None:
    """Each target's gradient at a conv's input, as the entries' backward starts from it, equals autograd's for
    that target alone (float64)."""
    from extractor.mixing import _spread, _target_maps, _transposed

    torch.manual_seed(3)
    conv = nn.Conv2d(4, 5, kernel, stride=stride, padding=padding, dilation=dilation).double()  # type: ignore[arg-type]
    u = torch.rand(2, 4, size, size, dtype=torch.float64, requires_grad=True)
    z = conv(u)
    gbar = torch.rand_like(z)
    targets = torch.tensor([[4, 0, 2], [1, -1, 4]])
    got = _transposed(z.grad_fn, conv.weight.detach()[targets.clamp(min=0)], _target_maps(gbar, targets))
    assert got.shape == (3, *u.shape)
    spread = _spread(z.grad_fn, conv.weight.detach()[targets.clamp(min=0)], _target_maps(gbar, targets))
    assert (spread is None) == (padding == 3)  # the depthwise route wherever the padding lies in the kernel's reach
    for m in range(3):
        cot = torch.zeros_like(z)
        for b in range(2):
            if targets[b, m] >= 0:
                cot[b, targets[b, m]] = gbar[b, targets[b, m]]
        (ref,) = torch.autograd.grad(z, u, cot, retain_graph=True)
        assert float(ref.abs().max()) > 0 or bool((targets[:, m] < 0).all())
        torch.testing.assert_close(got[m], ref, rtol=1e-12, atol=1e-12)
