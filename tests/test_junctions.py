"""The junction and entry edge routes against the exact route (a batched VJP to the whole source), in float64.

A junction stops each target's backward at the source's own mixing layer and contracts there with the kept
channels only; an entry starts it at the destination's own mixing layer. Both claim exactness: the weights of
every kept source channel and each source's summed weight (the completeness gap) must equal the exact route's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torchvision
from torch import nn

from extractor import mixing
from extractor.contributions import mct_contributions
from extractor.edges import compute_edges, edge_weights_vjp, incoming_weights, segment_routes
from extractor.models import ModelBundle, make_bundle
from extractor.selection import select
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward


def _check(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings) -> Counter[str]:
    """Every site's incoming weights by the routes against the exact route; returns the routes taken."""
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, settings)
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    taken: Counter[str] = Counter()
    compared = 0
    for site in bundle.sites:
        j = site.index
        preds = [i for i in site.preds if i in cut.sources]
        if not preds or j not in cut.acts:
            continue
        targets = contrib.channel[j].abs().topk(min(5, site.channels), 1).indices
        targets[0, -1] = -1  # padding gives zero rows on every route
        inc = incoming_weights(j, preds, cut=cut, g_dst=contrib.grads[j], targets=targets, kept=sel.kept)
        exact = edge_weights_vjp([cut.sources[i] for i in preds], cut.acts[j], contrib.grads[j], targets)
        for i, ref in zip(preds, exact, strict=True):
            got, route = inc.weights[i], inc.routes[i]
            taken[route] += 1
            taken["deep"] += i in inc.deep
            taken["risen"] += i in inc.risen
            want = ref * sel.kept[i][:, None, :] if route == "junction" else ref  # junctions: kept channels only
            scale = max(float(ref.abs().max()), 1e-30)
            assert float((got - want).abs().max()) <= 1e-10 * scale, (site.site_id, i, route)
            total = ref.sum(-1)
            assert float((inc.totals[i] - total).abs().max()) <= 1e-10 * max(float(total.abs().max()), scale)
            assert torch.all(got[0, -1] == 0)
            compared += int(bool(want.abs().max() > 0))
    assert compared > 0  # some weights were not zero
    return taken


def _small(name: str) -> nn.Module:
    """Residual-stream classifiers built by torchvision's own classes at a small width and depth (the full
    ones differ only in size), with a random head (ViT's starts at zero, which would zero every gradient)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
    from torchvision.models.vision_transformer import VisionTransformer

    if name == "convnext":
        return ConvNeXt([CNBlockConfig(8, 16, 2), CNBlockConfig(16, None, 2)], num_classes=7)
    if name == "swin":
        return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                               num_classes=7)
    if name == "swin_v2":
        return SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                               num_classes=7, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    if name == "maxvit":
        maxvit = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=7)
        for m in maxvit.modules():  # patterns far from uniform, so that holding them matters
            if hasattr(m, "to_qkv"):
                nn.init.normal_(m.to_qkv.weight, std=1.0)
        return maxvit
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=7)
    nn.init.normal_(vit.heads.head.weight)
    return vit


@pytest.mark.parametrize(("name", "size", "routes"), [
    # a residual stream through layer norms: each block feeds every later one
    ("convnext", 32, {"junction": 6, "deep": 0, "risen": 6}),  # stopped at the layer-scaled share
    ("vit", 32, {"junction": 3, "deep": 0, "risen": 0}),  # tokens: the MLP's second linear is each source's junction
    ("swin", 32, {"junction": 6, "deep": 0, "risen": 0}),
    # squeeze-excite: the gate's site through its 1x1 conv, its backward started at the gate (a deep entry)
    ("efficientnet_b0", 32, {"mixing": 62, "junction": 30, "deep": 30, "risen": 0}),
    # ... and where the destination is a depthwise conv, its entry is the 1x1 projection below it
    ("efficientnet_b1", 32, {"mixing": 98, "junction": 53, "deep": 53, "risen": 0}),
    # the gate into the block's last conv
    ("regnet_y_400mf", 32, {"mixing": 80, "junction": 16, "deep": 16, "risen": 0}),
    # channel splits and shuffles before convs
    ("shufflenet_v2_x0_5", 32, {"mixing": 99, "vjp": 5, "deep": 1, "risen": 0}),
])
def test_routes_equal_the_exact_route_on_torchvision(name: str, size: int, routes: dict[str, int]) -> None:
    """(ResNet-18, GoogLeNet and DenseNet121 take the mixing route on all or all but 7 edges: ``tests/test_mixing.py``
    holds it exact; the hand-built nets below take the VJP route beside the others.)"""
    torch.manual_seed(0)
    small = name in ("convnext", "vit", "swin")
    model = _small(name) if small else torchvision.models.get_model(name, weights=None, num_classes=7)
    bundle = make_bundle(model.double().eval(), name, (3, size, size))
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    for selection in ("topk", "percentile") if small else ("percentile",):
        taken = _check(bundle, x, PathwaySettings(k=6, selection=selection, sparsity=80.0))
        assert taken == routes, taken


class _Stream(nn.Module):
    """A residual stream in the ConvNeXt style: each block reads the stream through a depthwise conv and a layer
    norm (channels last), mixes with two linears around a GELU (the site), and adds a layer-scaled output."""

    def __init__(self, dim: int = 6, blocks: int = 3, spatial: bool = False, norm: bool = False) -> None:
        super().__init__()
        # a batch norm (inference) on each block's share before it joins the stream, as well as the scale
        self.bn = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(blocks)) if norm else None
        for bn in (m for m in self.bn or () if isinstance(m, nn.BatchNorm2d)):
            assert bn.running_mean is not None and bn.running_var is not None
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        # a scale per position as well as channel (not a per-channel map: the backward stops at the layer itself)
        self.spatial = nn.Parameter(torch.rand(8, 8, dim) + 0.5) if spatial else None
        self.dw = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(blocks))
        self.norm = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks))
        self.up = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(blocks))
        self.act = nn.ModuleList(nn.GELU() for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(blocks))
        self.scale = nn.Parameter(torch.rand(blocks, dim) + 0.5)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        for k in range(len(self.dw)):
            h = self.norm[k](self.dw[k](s).permute(0, 2, 3, 1))
            h = self.down[k](self.act[k](self.up[k](h))) * (self.scale[k] if self.spatial is None else self.spatial)
            h = h.permute(0, 3, 1, 2)
            s = s + (self.bn[k](h) if self.bn is not None else h)
        return self.head(s.mean((2, 3)))


class _Concat(nn.Module):
    """Two ReLU branches concatenated before one conv, then a layer norm over channels before the next site:
    both sources share the conv as their junction (at two channel offsets), and no segment is per-channel."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.ra, self.rb = nn.ReLU(), nn.ReLU()
        self.mix = nn.Conv2d(9, 6, 3, padding=1)
        self.norm = nn.GroupNorm(1, 6)
        self.out = nn.ReLU()
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(torch.cat([self.ra(self.a(x)), self.rb(self.b(x))], 1))
        return self.fc(self.out(self.norm(y)).flatten(1))


class _Bottleneck(nn.Module):
    """A linear bottleneck at the destination: ``m1`` (project) -> batch norm -> + skip -> ``m2`` (1x1 expand) ->
    batch norm -> ReLU (the destination). What reaches ``m1`` from the sources (ReLU sites) differs by ``kind``:

    * ``"gate"``: ``a * gate``, the gate computed from a squeeze-excite site (a deep entry at the gate; ``a`` takes
      the two-conv mixing route);
    * ``"norm"``: a group norm of ``a``, gated, into a 3x3 ``m1`` (deep entries at ``m1``'s input, for ``a`` without a
      junction);
    * ``"scaled"``: as ``"gate"`` with ``m1``'s output multiplied by a factor that varies over positions: the scale
      between the convs is not per channel, so no deep entry holds and the backward starts at ``m2``'s input;
    * ``"single"``: no ``m1``: a 1x1 conv reads ``a * gate`` itself, and the skip joins after its batch norm
      (RegNet-Y's way): the destination has an entry for the gate's source only, and the backward starts at the
      gate."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.stem, self.r0 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()
        self.c1, self.r1 = nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()
        self.fc1, self.rs, self.fc2 = nn.Conv2d(8, 3, 1), nn.ReLU(), nn.Conv2d(3, 8, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.m1 = nn.Conv2d(8, 6, 3 if kind == "norm" else 1, padding=1 if kind == "norm" else 0)
        self.bn1, self.m2, self.bn2, self.out = nn.BatchNorm2d(6), nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU()
        self.single, self.bn3 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        for bn in (self.bn1, self.bn2, self.bn3):
            nn.init.uniform_(bn.running_mean, -0.5, 0.5)  # type: ignore[arg-type]
            nn.init.uniform_(bn.running_var, 0.5, 2.0)  # type: ignore[arg-type]
        self.fc = nn.Linear((6 if kind == "single" else 5) * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.r0(self.stem(x))
        a = self.r1(self.c1(s))
        gate = torch.sigmoid(self.fc2(self.rs(self.fc1(a.mean((2, 3), keepdim=True)))))
        u = (self.norm(a) if self.kind == "norm" else a) * gate
        if self.kind == "single":
            return self.fc(self.out(self.bn3(self.single(u)) + s).flatten(1))
        y = self.bn1(self.m1(u))
        y = y * (1 + x[:, :1]) + s if self.kind == "scaled" else y + s  # the image varies over positions
        return self.fc(self.out(self.bn2(self.m2(y))).flatten(1))


class _Shuffle(nn.Module):
    """Two ReLU sites concatenated, their channels shuffled ShuffleNet's way (views and a transpose), split in
    halves, and one half read by a conv before the destination: a mixing route through the moves, where each
    source channel lands read numerically. With ``fold`` a view folds pairs of channels into the rows instead, so
    no channel of the conv's input holds one source channel: the VJP route."""

    def __init__(self, *, fold: bool) -> None:
        super().__init__()
        self.fold = fold
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.ra, self.rb = nn.ReLU(), nn.ReLU()
        self.c = nn.Conv2d(2 if fold else 4, 5, 3, padding=1)
        self.out = nn.ReLU()
        self.fc = nn.Linear(5 * (16 if fold else 8) * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.ra(self.a(x)), self.rb(self.b(x))], 1)  # [B, 8, 8, 8]
        if self.fold:
            y = y.reshape(-1, 4, 16, 8)
        else:
            y = y.view(-1, 2, 4, 8, 8).transpose(1, 2).contiguous().view(-1, 8, 8, 8)
        _, half = y.chunk(2, dim=1)
        return self.fc(self.out(self.c(half)).flatten(1))


@pytest.mark.parametrize(("body", "routes"), [
    (_Stream, {"junction": 3, "vjp": 0, "risen": 3}),
    (partial(_Stream, spatial=True), {"junction": 3, "vjp": 0, "risen": 0}),
    (partial(_Stream, norm=True), {"junction": 3, "vjp": 0, "risen": 3}),
    (partial(_Shuffle, fold=False), {"mixing": 2, "vjp": 0}),
    (partial(_Shuffle, fold=True), {"mixing": 0, "vjp": 2}),
    (_Concat, {"junction": 2, "vjp": 0}),
    (partial(_Bottleneck, "gate"), {"mixing": 3, "junction": 1, "vjp": 1, "deep": 1}),
    (partial(_Bottleneck, "norm"), {"mixing": 2, "junction": 1, "vjp": 2, "deep": 2}),
    (partial(_Bottleneck, "scaled"), {"mixing": 2, "junction": 2, "vjp": 1, "deep": 0}),
    (partial(_Bottleneck, "single"), {"mixing": 4, "junction": 1, "vjp": 0, "deep": 1}),
], ids=["stream", "spatial", "norm", "shuffle", "fold", "concat", "gate", "norm", "scaled", "single"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_routes_equal_the_exact_route_on_hand_built_segments(
    body: Callable[[], nn.Module], routes: dict[str, int], seed: int
) -> None:
    torch.manual_seed(seed)  # the body is built here, so its weights do not depend on what ran before
    model = body().double().eval()
    bundle = make_bundle(model, "hand", (3, 8, 8))
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    taken = _check(bundle, x, PathwaySettings(k=4))
    assert {k: taken[k] for k in routes} == routes


class _Around(nn.Module):
    """A source that also reaches the destination around its first mixing layer (a skip from the site itself):
    no junction. With ``shuffle`` the destination's channels are shuffled after its own conv, ShuffleNet's way
    (views and a transpose): no entry either."""

    def __init__(self, *, skip: bool, shuffle: bool) -> None:
        super().__init__()
        self.skip, self.shuffle = skip, shuffle
        self.c1, self.r1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.r2 = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.r1(self.c1(x))
        y = self.c2(a) + a if self.skip else self.c2(a)
        if self.shuffle:
            y = y.view(-1, 2, 2, 8, 8).transpose(1, 2).reshape(-1, 4, 8, 8)
        return self.fc(self.r2(y).flatten(1))


def test_no_junction_around_the_layer_and_no_entry_through_a_shuffle() -> None:
    torch.manual_seed(2)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    bundle = make_bundle(_Around(skip=True, shuffle=False).double().eval(), "around", (3, 8, 8))
    assert _check(bundle, x, PathwaySettings(k=4)) == Counter({"vjp": 1})
    for shuffle, kind in ((False, "conv"), (True, None)):
        bundle = make_bundle(_Around(skip=False, shuffle=shuffle).double().eval(), "shuffle", (3, 8, 8))
        contrib = mct_contributions(bundle, x)
        cut = cut_forward(bundle.model, bundle.sites, partial(bundle.forward, x))
        entry = mixing.find_entry(cut.acts[1], contrib.grads[1], list(cut.sources.values()))
        assert (entry.kind if entry is not None else None) == kind


@pytest.mark.parametrize("name", ["stream", "mobilenet_v3_small"])
def test_routes_are_found_once_per_input_shape(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Later batches reuse the routes (mixing layers, junctions, entries, two-conv composites searched
    again) and give what a fresh search gives."""
    torch.manual_seed(3)
    model = _Stream() if name == "stream" else torchvision.models.get_model(name, weights=None, num_classes=7)
    size = 8 if name == "stream" else 32
    bundle = make_bundle(model.double().eval(), name, (3, size, size))
    settings = PathwaySettings(k=4)
    calls = Counter[str]()
    for fn in ("find_route", "find_entry_route"):
        real = getattr(mixing, fn)

        def counted(*args: object, _real: object = real, _name: str = fn, **kwargs: object) -> object:
            calls[_name] += 1
            return _real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(f"extractor.edges.{fn}", counted)

    def edges(x: torch.Tensor, routes: mixing.RouteCache | None) -> tuple:
        contrib = mct_contributions(bundle, x)
        sel = select(contrib, settings)
        cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
        e = compute_edges(sites=bundle.sites, contrib=contrib, sel=sel, cut=cut, settings=settings, routes=routes)
        return e.b.tolist(), e.src_site.tolist(), e.src_channel.tolist(), e.dst_channel.tolist(), e.weight.tolist()

    first, second = torch.rand(2, 3, 3, size, size, dtype=torch.float64)
    edges(first, bundle.routes)
    found = Counter(calls)
    pairs = sum(len(s.preds) for s in bundle.sites)
    assert found["find_route"] == pairs and found["find_entry_route"] > 0
    cached = edges(second, bundle.routes)
    assert calls == found  # the second batch walked no graph to find a route
    assert cached == edges(second, None)  # ... and gives what a fresh search gives
    edges(second[:2], bundle.routes)  # another batch size: found again
    assert calls["find_route"] == 3 * pairs
    assert len(cached[0]) > 0
    known = list(next(iter(bundle.routes.by_shape.values())).values())
    kinds = {"junction", "entry"} if name == "stream" else {"mixing", "junction", "entry"}
    assert {r.kind for r in known} - {"none"} == kinds  # "none": a destination without an entry layer
    if name == "stream":  # each source's backward stops at its layer-scaled share, on later batches too
        assert all(r.junction is not None and r.junction.rise == 3 for r in known if r.kind == "junction")
    if name != "stream":  # single layers and two-conv composites kept (the scale between two convs per batch)
        mixes = [r for r in known if r.kind == "mixing"]
        assert all(r.mixing is not None for r in mixes) and {r.first is None for r in mixes} == {True, False}


def test_segment_routes_name_the_route_each_edge_takes() -> None:
    bundle = make_bundle(_Stream().double().eval(), "stream", (3, 8, 8))
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    assert segment_routes(bundle.sites, cut) == {(0, 1): "junction", (0, 2): "junction", (1, 2): "junction"}
