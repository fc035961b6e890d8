"""Funnels (extractor/funnels.py): junction edges contracted after a shared downsampling layer, with the sources'
shares pushed forward to it, against the exact route (a batched VJP to the whole source) in float64."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from extractor.contributions import mct_contributions
from extractor.edges import compute_edges, edge_weights_vjp, incoming_weights
from extractor.funnels import funnel_tangents, graph_jvp, plan_funnels
from extractor.linear import Linearised
from extractor.mixing import RouteCache, find_route
from extractor.models import ModelBundle, make_bundle
from extractor.selection import select
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward


def _convnext() -> ModelBundle:
    """torchvision's ConvNeXt class, three stages: two downsampling layers (a layer norm and a 2x2 convolution) that
    the later stages' destinations reach the earlier sources through."""
    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, 32, 3), CNBlockConfig(32, None, 2)], num_classes=7)
    for m in model.modules():  # layer scales of one, so that later blocks matter
        if hasattr(m, "layer_scale"):
            nn.init.uniform_(m.layer_scale, 0.5, 1.5)
    return make_bundle(model.double().eval(), "convnext3", (3, 32, 32))


class _Staged(nn.Module):
    """Two stages of a residual stream of conv blocks (site: the ReLU after a 3x3 conv; junction: a 1x1 conv
    without groups, scaled by an inference batch norm), joined by a batch norm and a strided conv, then a linear."""

    def __init__(self, dim: int = 4, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.conv1 = nn.ModuleList(nn.Conv2d(dim * s, dim * s, 3, padding=1) for s in (1, 2) for _ in range(blocks))
        self.conv2 = nn.ModuleList(nn.Conv2d(dim * s, dim * s, 1) for s in (1, 2) for _ in range(blocks))
        self.bn = nn.ModuleList(nn.BatchNorm2d(dim * s) for s in (1, 2) for _ in range(blocks))
        self.down_bn = nn.BatchNorm2d(dim)
        self.down = nn.Conv2d(dim, 2 * dim, 2, stride=2)
        self.act = nn.ModuleList(nn.ReLU() for _ in range(2 * blocks))
        self.head = nn.Linear(2 * dim, 5)
        self.blocks = blocks
        for bn in [*self.bn, self.down_bn]:
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for k in range(2 * self.blocks):
            if k == self.blocks:
                x = self.down(self.down_bn(x))
            x = x + self.bn[k](self.conv2[k](self.act[k](self.conv1[k](x))))
        return self.head(x.mean((2, 3)))


def _check(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings) -> int:
    """Every site's incoming weights, funnels planned, against the exact route (in the settings' edge mode: its cut
    forward); returns the edges funnelled."""
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, settings)
    with Linearised(bundle.model, settings.edges):
        cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    sources = list(cut.sources.values())
    known = {(i, s.index): find_route(cut.sources[i], cut.acts[s.index], sources) for s in bundle.sites
             for i in s.preds if i in cut.sources}
    shared: dict = {}
    plan_funnels(bundle.sites, cut=cut, known=known, shared=shared, targets=5,
                 kept=[int(k.sum(1).max()) for k in sel.kept])
    funnelled = 0
    for site in bundle.sites:
        j = site.index
        preds = [i for i in site.preds if i in cut.sources]
        if not preds:
            continue
        targets = contrib.channel[j].abs().topk(min(5, site.channels), 1).indices
        targets[0, -1] = -1  # padding gives zero rows on every route
        inc = incoming_weights(j, preds, cut=cut, g_dst=contrib.grads[j], targets=targets, kept=sel.kept,
                               known=known, shared=shared)
        exact = edge_weights_vjp([cut.sources[i] for i in preds], cut.acts[j], contrib.grads[j], targets)
        funnelled += len(inc.funnelled)
        assert inc.funnelled == {i for i in preds if known[(i, j)].funnel is not None}
        for i, ref in zip(preds, exact, strict=True):
            want = ref * sel.kept[i][:, None, :] if inc.routes[i] == "junction" else ref
            scale = max(float(ref.abs().max()), 1e-30)
            assert float((inc.weights[i] - want).abs().max()) <= 1e-10 * scale, (j, i)
            total = ref.sum(-1)
            assert float((inc.totals[i] - total).abs().max()) <= 1e-10 * max(float(total.abs().max()), scale)
            assert torch.all(inc.weights[i][0, -1] == 0)
    return funnelled


@pytest.mark.parametrize(("make", "size", "funnelled", "many"), [
    # the 2 first-stage sources into the 5 later destinations; with most of their 32 channels kept, none
    (_convnext, 32, 10, 0),
    # the 3 first-stage sources into the 3 later destinations (4 channels: all kept take as many tangents as targets)
    (lambda: make_bundle(_Staged().double().eval(), "staged", (3, 8, 8)), 8, 9, 9),
])
def test_funnel_edges_equal_the_exact_route(make, size: int, funnelled: int, many: int) -> None:  # type: ignore[no-untyped-def]
    bundle = make()
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    assert _check(bundle, x, PathwaySettings(k=3, selection="topk")) == funnelled
    # with many channels kept a funnel makes more tangents than the targets it serves and is not taken
    assert _check(bundle, x, PathwaySettings(k=6, selection="percentile", sparsity=20.0)) == many


def test_funnels_push_a_few_tangents_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tangents pushed one at a time (a parts budget of one element) give the same edges as all at once."""
    monkeypatch.setattr("extractor.edges._PARTS_BUDGET", 1)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert _check(_convnext(), x, PathwaySettings(k=3, selection="topk")) == 10


def test_funnel_edges_in_direct_mode_on_swin() -> None:
    """torchvision's Swin class, three stages, direct edges: each patch merging (space to depth, a layer norm with
    its statistics held, a linear reduction) is a funnel, pushed through the rules for the held norm and the
    space-to-depth rewrite; the edges equal the VJP route's on the same linearised cut forward."""
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 3, 2], num_heads=[2, 2, 2], window_size=[2, 2],
                            num_classes=7)
    bundle = make_bundle(model.double().eval(), "swin3", (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert _check(bundle, x, PathwaySettings(k=3, selection="topk", edges="direct")) > 0


def test_funnel_edges_in_pattern_mode_on_swin_v2() -> None:
    """torchvision's Swin V2 class, three stages, pattern edges: the tangents of the earlier stages' sources are
    pushed through the attention blocks after them (the value rows, the held pattern's product, the shifted
    windows' rolls, window partition views) to each patch merging; the edges equal the VJP route's."""
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 2], window_size=[2, 2],
                            num_classes=7, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    bundle = make_bundle(model.double().eval(), "swinv2", (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    # one channel kept: the 2 first-stage sources into the 2 second-stage destinations across the first merging,
    # and the 4 sources of both stages into the 2 last across the second (the first block of each stage through
    # the second's shifted attention)
    assert _check(bundle, x, PathwaySettings(k=1, selection="topk", edges="pattern")) == 12


def test_funnel_edges_in_pattern_mode_on_maxvit() -> None:
    """torchvision's MaxViT class, two stages of two blocks, pattern edges: the tangents are pushed through the
    block and grid attention's value paths and the MBConv's pooled shortcut; the edges equal the VJP route's."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16], block_layers=[2, 2],
                   head_dim=4, stochastic_depth_prob=0.0, num_classes=7)
    for m in model.modules():  # patterns far from uniform
        if hasattr(m, "to_qkv"):
            nn.init.normal_(m.to_qkv.weight, std=1.0)
    bundle = make_bundle(model.double().eval(), "maxvit2", (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert _check(bundle, x, PathwaySettings(k=1, selection="topk", edges="pattern")) == 41


def test_funnels_are_kept_for_later_batches() -> None:
    """compute_edges plans the funnels on the first batch of an input shape and follows them on the next; the
    edges equal the exact route's on both."""
    bundle = _convnext()
    settings = PathwaySettings(k=3, selection="topk", edge_targets=5, edges_per_target=4)
    routes = RouteCache()
    for seed in (1, 2):
        torch.manual_seed(seed)
        x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
        contrib = mct_contributions(bundle, x)
        sel = select(contrib, settings)
        cut = cut_forward(bundle.model, bundle.sites, partial(bundle.forward, x))
        a = compute_edges(sites=bundle.sites, contrib=contrib, sel=sel, cut=cut, settings=settings, routes=routes)
        b = compute_edges(sites=bundle.sites, contrib=contrib, sel=sel, cut=cut, settings=settings, fast=False)
        for field in ("b", "src_site", "src_channel", "dst_site", "dst_channel"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-9, atol=1e-14 * float(np.abs(b.weight).max()))
        np.testing.assert_allclose(a.gap, b.gap, rtol=1e-9, atol=1e-14)
        assert len(a.weight) > 0
    ((key, known),) = routes.by_shape.items()
    assert routes.planned == {key}
    assert sum(r.funnel is not None for r in known.values()) == 10


def test_graph_jvp_equals_forward_mode() -> None:
    """Each forward rule against torch.func.jvp of the same function: a fixed factor, an inference batch norm, a
    permute, a layer norm, a linear layer per position, a convolution, a subtraction with both sides moving, a
    view and a matrix product; an attention's value path; an average pooling."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
    ln, lin = nn.LayerNorm(4).double(), nn.Linear(4, 6).double()
    conv = nn.Conv2d(6, 3, 2, stride=2).double()
    scale = torch.rand(4, 1, 1, dtype=torch.float64) + 0.5
    mat = torch.randn(12, 5, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = conv(lin(ln(bn(x * scale).permute(0, 2, 3, 1))).permute(0, 3, 1, 2))
        y = y - 2.0 * y * y
        return y.reshape(y.shape[0], -1) @ mat

    x0 = torch.rand(2, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    x = x0 + 0.0  # the node where the tangents are given
    out = f(x)
    tangents = torch.randn(3, *x.shape, dtype=torch.float64)
    with torch.no_grad():
        got = graph_jvp(out.grad_fn, {x.grad_fn: tangents})
    want = torch.stack([torch.func.jvp(f, (x.detach(),), (t,))[1] for t in tangents]).detach()
    assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    # an attention's value path with its pattern held: a cyclic shift, window views, a transpose, a slice, a
    # selection, an expansion and the held pattern's product
    pattern = torch.softmax(torch.randn(2, 3, 3, dtype=torch.float64), -1)

    def g(x: torch.Tensor) -> torch.Tensor:
        y = torch.roll(x, shifts=(-1, 2), dims=(2, -1))[:, -3:, :, 1::2]  # [2, 3, 4, 2]
        first = y.select(-1, -1)[..., :-3]  # [2, 3, 1]
        return torch.bmm(pattern, y.transpose(-1, -2).reshape(2, 3, 8)) + first.expand(2, 3, 8)

    def h(x: torch.Tensor) -> torch.Tensor:  # a pooled shortcut, a dim added and taken away, an expansion adding one
        y = nn.functional.avg_pool2d(x, 3, 2, 1).unsqueeze(-1).squeeze(-1)  # [2, 4, 2, 2]
        return y + y[0].expand(2, 4, 2, 2)

    for fn in (g, h):
        got = graph_jvp(fn(x).grad_fn, {x.grad_fn: tangents})
        want = torch.stack([torch.func.jvp(fn, (x.detach(),), (t,))[1] for t in tangents]).detach()
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())
    # an op without a forward rule: no funnel
    gelu = nn.functional.gelu(x).sum(1)
    assert funnel_tangents(gelu.grad_fn, {x.grad_fn: tangents}) is None
