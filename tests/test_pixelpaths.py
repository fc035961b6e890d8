"""Pixel diffusion pathways: linearity of the gated network, beam search, no hooks left."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from extractor.errors import ExtractionError
from extractor.models import make_bundle
from extractor.pixelpaths import gated_decomposition, gated_network, trace_pixels
from extractor.settings import PixelSettings
from extractor.sites import hook_count


def test_pixel_responses_plus_bias_equal_activations(demo: tuple) -> None:
    bundle, data = demo
    model = bundle.model.double()
    try:
        x = data.x_test[:1].double()
        total, bias, clean = gated_decomposition(bundle, x)
        for t, b, c in zip(total, bias, clean, strict=True):
            assert torch.allclose(t + b, c, atol=1e-9)
        assert hook_count(model) == 0
    finally:
        model.float()


def test_decomposition_with_normalisation_and_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4),
    ).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    bundle = make_bundle(model, "small_bn", (3, 12, 12), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    total, bias, clean = gated_decomposition(bundle, x)
    for t, b, c in zip(total, bias, clean, strict=True):
        assert torch.allclose(t + b, c, atol=1e-7)


def test_beam_search_finds_the_largest_chain_by_brute_force() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).double().eval()
    bundle = make_bundle(model, "tiny", (1, 5, 5))
    x = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    got = trace_pixels(bundle, x, PixelSettings(beam=9, top=1, stride=2))
    with gated_network(bundle, x) as net:
        for p, (c, i, j) in enumerate(got.pixels.tolist()):
            imp = torch.zeros_like(x)
            imp[0, c, i, j] = x[0, c, i, j]
            best, best_chain = -1.0, None
            for k0 in range(3):
                masks = [torch.zeros(1, 3, dtype=x.dtype), torch.ones(1, 3, dtype=x.dtype)]
                masks[0][0, k0] = 1.0
                _, a = net.forward(imp, masks)
                _, a0 = net.forward(torch.zeros_like(imp), masks)
                size = (a[1] - a0[1]).abs().flatten(2).sum(-1)[0]
                k1 = int(size.argmax())
                if float(size[k1]) > best:
                    best, best_chain = float(size[k1]), [k0, k1]
            assert got.chains[p, 0].tolist() == best_chain
            assert got.sizes[p, 0].item() == pytest.approx(best)


def test_non_relu_model_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.SiLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).eval()
    bundle = make_bundle(model, "silu", (1, 6, 6))
    with pytest.raises(ExtractionError, match="ReLU"):
        trace_pixels(bundle, torch.rand(1, 1, 6, 6), PixelSettings())
    assert hook_count(model) == 0
