"""Contributions, selection and Pathway Gradient against independent references."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import types
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerGradientXActivation
from torch import nn

from extractor.batch import BatchInputs, ChannelFigures, batch_halves
from extractor.contributions import cut_contributions, intgrad_contributions, mct_contributions
from extractor.edges import compute_edges
from extractor.errors import ExtractionError
from extractor.methods import extract_batch
from extractor.models import make_bundle
from extractor.pathway_gradient import pathway_gradient, saliency_map
from extractor.selection import select
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward
from extractor.sites import function_modes_active, hook_count


def _unshare_resnet(model: nn.Module) -> nn.Module:
    """A copy of a torchvision ResNet whose blocks use one ReLU module per call (for Captum)."""
    model = copy.deepcopy(model)
    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.BasicBlock | torchvision.models.resnet.Bottleneck):
            n = 3 if isinstance(block, torchvision.models.resnet.Bottleneck) else 2
            block.relus = nn.ModuleList([nn.ReLU() for _ in range(n)])

            def forward(self: Any, x: torch.Tensor, _n: int = n) -> torch.Tensor:  # a torchvision block
                identity = x if self.downsample is None else self.downsample(x)
                out = self.relus[0](self.bn1(self.conv1(x)))
                out = self.bn2(self.conv2(out))
                if _n == 3:
                    out = self.relus[1](out)
                    out = self.bn3(self.conv3(out))
                return self.relus[_n - 1](out + identity)

            block.forward = types.MethodType(forward, block)
    return model


def _captum_site_modules(model: nn.Module, bundle_sites: tuple, unshared: nn.Module | None) -> list[nn.Module | None]:
    """For every site, the module on which Captum sees exactly that call (``None``: no such module).

    A functional site ``X.relu()`` is the last call of module ``X`` (GoogLeNet's and Inception's
    ``BasicConv2d`` return ``F.relu(...)``), so Captum reads it at ``X``'s output.
    """
    named = dict((unshared if unshared is not None else model).named_modules())
    out: list[nn.Module | None] = []
    for s in bundle_sites:
        path = s.module_path
        if path.endswith("()"):
            parent = path.rpartition(".")[0] if "." in path else ""
            out.append(named[parent] if parent else None)
            continue
        parent, _, leaf = path.rpartition(".")
        if unshared is not None and leaf == "relu" and parent and hasattr(named[parent], "relus"):
            out.append(named[parent].relus[s.call_index])
        else:
            out.append(named[path])
    return out


# (arch, input size, constructor arguments, the layout every site must have, sites checked at most)
ARCHS = [
    ("vgg16", 32, {}, "channels_first", 99), ("resnet18", 32, {}, "channels_first", 99),
    ("resnet50", 32, {}, "channels_first", 99), ("densenet121", 32, {}, "channels_first", 24),
    ("mobilenet_v3_small", 32, {}, None, 99), ("squeezenet1_1", 48, {}, "channels_first", 99),
    ("shufflenet_v2_x0_5", 32, {}, "channels_first", 99),
    ("googlenet", 48, {"aux_logits": False, "init_weights": False}, "channels_first", 20),
    ("inception_v3", 75, {"aux_logits": False, "init_weights": False}, "channels_first", 16),
    ("convnext_tiny", 32, {}, "channels_last", 8), ("swin_t", 32, {}, "channels_last", 6),
    ("vit_b_16", 32, {"image_size": 32}, "tokens", 4),
]


@pytest.mark.parametrize(("arch", "size", "kwargs", "layout", "most"), ARCHS)
def test_contributions_equal_captum_on_torchvision(arch: str, size: int, kwargs: dict, layout: str | None,
                                                   most: int) -> None:
    """Captum's LayerGradientXActivation per site, in the site's own layout, moved channels first
    here by the layout the architecture is known to have; channel sums over the channel axis."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10, **kwargs).double().eval()
    bundle = make_bundle(model, arch, (3, size, size))
    if layout is not None:
        assert {s.layout for s in bundle.sites} - {"vector"} == {layout}
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    contrib = mct_contributions(bundle, x)
    unshared = _unshare_resnet(model) if arch.startswith("resnet") else None
    mods = _captum_site_modules(model, bundle.sites, unshared)
    reference_model = unshared if unshared is not None else model
    step = max(1, len(bundle.sites) // most)
    checked = 0
    for site, module in list(zip(bundle.sites, mods, strict=True))[::step]:
        reused = sum(1 for s in bundle.sites if s.module_path == site.module_path) > 1
        if module is None or (unshared is None and reused):
            continue  # a reused module without an unshared twin: covered by the resnet cases
        lga = LayerGradientXActivation(lambda inp, m=reference_model: m(bundle.normalize(inp)), module)
        ref = lga.attribute(x, target=contrib.target)
        if layout in ("channels_last", "tokens"):
            ref = ref.movedim(-1, 1)
        assert ref.shape[1:] == site.shape
        assert torch.allclose(ref, contrib.element[site.index], atol=1e-6, rtol=0), site.site_id
        assert torch.allclose(ref.flatten(2).sum(-1) if ref.dim() > 2 else ref, contrib.channel[site.index],
                              atol=1e-6, rtol=0)
        checked += 1
    assert checked >= min(most, len(bundle.sites)) // 2
    assert hook_count(model) == 0 and function_modes_active() == 0


def test_resnet_reused_relu_gives_one_site_per_call() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    bundle = make_bundle(model, "resnet18", (3, 32, 32))
    ids = [s.site_id for s in bundle.sites]
    assert "layer1.0.relu#0" in ids and "layer1.0.relu#1" in ids
    assert len(ids) == 17 == len(set(ids))


def test_contributions_on_demo_equal_captum(demo: tuple) -> None:
    bundle, data = demo
    model = bundle.model.double()
    try:
        x = data.x_test[:8].double()
        contrib = mct_contributions(bundle, x)
        named = dict(model.named_modules())
        for site in bundle.sites:
            lga = LayerGradientXActivation(lambda inp: model(inp), named[site.module_path])
            ref = lga.attribute(x, target=contrib.target)
            assert torch.allclose(ref, contrib.element[site.index], atol=1e-6, rtol=0)
    finally:
        model.float()


def test_given_target_and_out_of_range_target(demo: tuple) -> None:
    bundle, data = demo
    x = data.x_test[:3]
    contrib = mct_contributions(bundle, x, torch.tensor([4, 4, 4]))
    assert contrib.target.tolist() == [4, 4, 4]
    with pytest.raises(ExtractionError, match="out of range"):
        mct_contributions(bundle, x, torch.tensor([0, 10, 1]))


def test_intgrad_completeness_per_site() -> None:
    """sum of layer-IG contributions = logit(x) - logit(x with that site zeroed) (zero baseline)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).double().eval()
    bundle = make_bundle(model, "tiny", (1, 8, 8))
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    base = mct_contributions(bundle, x)
    ig = intgrad_contributions(bundle, x, base.target, 401, base.acts)
    named = dict(model.named_modules())
    for site in bundle.sites:
        h = named[site.module_path].register_forward_hook(lambda m, i, o: o * 0)
        try:
            with torch.no_grad():
                zeroed = model(x).gather(1, base.target[:, None]).squeeze(1)
        finally:
            h.remove()
        full = base.logits.gather(1, base.target[:, None]).squeeze(1)
        total = ig.channel[site.index].sum(1)
        assert torch.allclose(total, full - zeroed, atol=2e-3)


def test_intgrad_alpha_grid_is_linear(demo: tuple) -> None:
    """The authors' alpha accumulates (0, .1, .3, .6, ...); ours is 0..1 linear: 2 steps = mean of ends."""
    bundle, data = demo
    x = data.x_test[:2]
    base = mct_contributions(bundle, x)
    ig = intgrad_contributions(bundle, x, base.target, 2, base.acts)
    last = bundle.sites[-1].index
    # the final site feeds a linear layer: its gradient is constant in alpha, so IG equals plain grad x act
    assert torch.allclose(ig.element[last], base.element[last], atol=1e-5)


def test_pathway_gradient_at_zero_sparsity_is_input_gradient(demo: tuple) -> None:
    bundle, data = demo
    x = data.x_test[:4]
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, PathwaySettings(selection="percentile", sparsity=0.0))
    assert all(bool(m.all()) for m in sel.masks)
    grad, logit = pathway_gradient(bundle, x, contrib.target, sel.masks)
    xr = x.clone().requires_grad_(True)
    ref = torch.autograd.grad(bundle.forward(xr).gather(1, contrib.target[:, None]).sum(), xr)[0]
    assert torch.allclose(grad, ref, atol=1e-6)
    assert torch.allclose(logit, contrib.logits.gather(1, contrib.target[:, None]).squeeze(1))


def test_global_percentile_keeps_the_top_share(demo: tuple) -> None:
    bundle, data = demo
    x = data.x_test[:3]
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, PathwaySettings(selection="percentile", sparsity=90.0))
    total = sum(m[0].numel() for m in sel.masks)
    for b in range(3):
        kept = sum(int(m[b].sum()) for m in sel.masks)
        scores = torch.cat([e[b].abs().flatten() for e in contrib.element])
        thr = scores.kthvalue(int(0.9 * total)).values
        assert kept == int((scores > thr).sum())
        assert kept <= total - int(0.9 * total)


def test_topk_selects_k_largest_channels(demo: tuple) -> None:
    bundle, data = demo
    x = data.x_test[:3]
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, PathwaySettings(selection="topk", k=5))
    for s, kept in enumerate(sel.kept):
        assert kept.sum(1).tolist() == [5, 5, 5]
        for b in range(3):
            top = set(contrib.channel[s][b].abs().topk(5).indices.tolist())
            assert set(torch.nonzero(kept[b]).flatten().tolist()) == top


def test_channel_figures_are_read_off_the_maps_which_then_go(demo: tuple) -> None:
    """What the records and the exemplars read of a batch (:class:`extractor.batch.ChannelFigures`) equals a numpy
    recomputation from the maps, for channel and element masks; without ``keep_maps`` the maps are let go before
    Pathway Gradient's pass and every figure is the same."""
    bundle, data = demo
    x = data.x_test[:5]
    names = [f.name for f in dataclasses.fields(ChannelFigures)]
    for settings in (PathwaySettings(selection="topk", k=3), PathwaySettings(selection="percentile", sparsity=80)):
        kept = extract_batch(bundle, x, settings, BatchInputs(keep_maps=True))
        gone = extract_batch(bundle, x, settings)
        assert all(t.numel() == 0 for t in gone.contrib.acts + gone.contrib.grads)
        assert all(t.numel() > 0 for t in kept.contrib.acts + kept.contrib.grads)
        for s in bundle.sites:
            i, B, C = s.index, x.shape[0], s.channels
            a = kept.contrib.acts[i].numpy().reshape(B, C, -1)
            inside = (kept.contrib.element[i] * kept.sel.masks[i]).numpy().reshape(B, C, -1)
            mask = kept.sel.masks[i].numpy().reshape(B, C, -1)
            f = kept.figures
            np.testing.assert_allclose(f.inside[i].numpy(), inside.sum(-1), rtol=1e-5, atol=1e-7)
            assert np.array_equal(f.elements[i].numpy(), mask.sum(-1))
            dead = (a == 0).all(-1)
            if settings.selection == "topk" and len(s.shape) > 1:  # channel masks: the kept channels, the recorded
                dead &= kept.sel.kept[i].numpy()
            assert np.array_equal(f.dead[i].numpy(), dead)
            assert np.array_equal(f.peak[i].numpy(), a.max(-1))
            if len(s.shape) > 1:  # the positions hold the largest element
                at, inside_at = f.peak_at[i].numpy()[..., None], f.inside_at[i].numpy()[..., None]
                assert np.array_equal(np.take_along_axis(a, at, -1)[..., 0], a.max(-1))
                assert np.array_equal(np.take_along_axis(inside, inside_at, -1)[..., 0], inside.max(-1))
            else:
                assert (f.peak_at[i] == -1).all() and (f.inside_at[i] == -1).all()
            for name in names:
                assert torch.equal(getattr(kept.figures, name)[i], getattr(gone.figures, name)[i]), (name, i)
        assert any(bool(t.any()) for t in kept.figures.inside) and any(bool(t.any()) for t in kept.figures.peak)


def test_a_batch_keeps_one_copy_of_each_site_map(demo: tuple) -> None:
    """What ``extract_batch`` holds per site: the activations and gradients once (the element contributions
    are made when read) and channel masks as expanded views of ``[B, C]``. On the CPU its cut forward and
    Pathway Gradient take half the batch at a time, and give what one pass over the whole batch gives."""
    bundle, data = demo
    x = data.x_test[:5]
    settings = PathwaySettings(selection="topk", k=3)
    ref = mct_contributions(bundle, x)
    res = extract_batch(bundle, x, settings, BatchInputs(keep_maps=True))
    assert batch_halves(x) == [slice(0, 3), slice(3, 5)]
    spatial = [s.index for s in bundle.sites if len(s.shape) > 1]
    assert spatial
    for s in bundle.sites:
        torch.testing.assert_close(res.contrib.element[s.index], ref.acts[s.index] * ref.grads[s.index],
                                   rtol=1e-5, atol=1e-7)  # the cut forward sums in another order
        mask = res.sel.masks[s.index]
        assert mask.shape == ref.acts[s.index].shape
        assert mask.dtype == ref.acts[s.index].dtype
        if s.index in spatial:  # one number per image and channel, however large the map
            assert mask.stride()[2:] == (0,) * (mask.dim() - 2)
            assert mask.untyped_storage().nbytes() == x.shape[0] * s.shape[0] * mask.element_size()
    assert len(res.contrib.element) == len(bundle.sites)
    whole = compute_edges(sites=bundle.sites, contrib=res.contrib, sel=res.sel, settings=settings,
                          cut=cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x)))
    assert len(whole.b) > 0 and set(whole.b.tolist()) == set(range(5))
    ours, theirs = np.argsort(res.edges.b, kind="stable"), np.argsort(whole.b, kind="stable")  # image by image
    for name in ("b", "src_site", "src_channel", "dst_site", "dst_channel"):
        assert np.array_equal(getattr(res.edges, name)[ours], getattr(whole, name)[theirs]), name
    np.testing.assert_allclose(res.edges.weight[ours], whole.weight[theirs], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.edges.gap, whole.gap, rtol=1e-5, atol=1e-6)
    grad, logit_masked = pathway_gradient(bundle, x, res.contrib.target, res.sel.masks)
    torch.testing.assert_close(res.saliency, saliency_map(grad), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.logit_masked, logit_masked, rtol=1e-5, atol=1e-6)


class _WritesIntoSite(nn.Module):
    """conv -> GELU (a site) -> +1 -> conv -> GELU -> pool -> linear; ``in_place`` adds the 1 into the GELU's
    output tensor itself (GELU's backward reads its input, so autograd allows it)."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.c1, self.a1 = nn.Conv2d(3, 6, 3, padding=1), nn.GELU()
        self.c2, self.a2 = nn.Conv2d(6, 5, 3, padding=1), nn.GELU()
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a1(self.c1(x))
        h = h.add_(1.0) if self.in_place else h + 1.0
        return self.fc(self.a2(self.c2(h)).mean((2, 3)))


def test_a_network_that_writes_into_a_site_output_runs_again_with_copies(caplog: pytest.LogCaptureFixture) -> None:
    """The contributions forward lets the network read the captured site outputs themselves; one that writes
    into one in place is run again with that site copied, so its activations are the site's own outputs, and the
    bundle remembers the site, so later batches take one forward."""
    torch.manual_seed(0)
    writes = _WritesIntoSite(in_place=True)
    twin = _WritesIntoSite(in_place=False)
    twin.load_state_dict(writes.state_dict())
    x = torch.rand(3, 3, 8, 8)
    got_bundle, ref_bundle = make_bundle(writes, "writes", (3, 8, 8)), make_bundle(twin, "twin", (3, 8, 8))
    assert [s.site_id for s in got_bundle.sites] == ["a1#0", "a2#0"]
    with caplog.at_level("DEBUG", logger="extractor.contributions"):
        got = mct_contributions(got_bundle, x)
    assert "writes into site" in caplog.text
    with caplog.at_level("DEBUG", logger="extractor.contributions"):
        caplog.clear()
        ref = mct_contributions(ref_bundle, x)
    assert "writes into site" not in caplog.text
    assert float(ref.acts[0].min()) < 0.0  # the GELU's own output, before the +1
    for a, b in zip([*got.acts, *got.grads, *got.channel], [*ref.acts, *ref.grads, *ref.channel], strict=True):
        assert torch.equal(a, b)
    # the bundle remembers the site: later forwards copy it from the start, one forward each
    assert got_bundle.written == {0}
    with caplog.at_level("DEBUG", logger="extractor.contributions"):
        caplog.clear()
        again = mct_contributions(got_bundle, x)
    assert "writes into site" not in caplog.text
    for a, b in zip([*again.acts, *again.grads], [*ref.acts, *ref.grads], strict=True):
        assert torch.equal(a, b)
    # the cut forward too: the network reads the sources themselves, copies of the known site; where it is not
    # known yet, the in-place write sends it round again with copies of all
    fresh = make_bundle(writes, "writes", (3, 8, 8))
    with caplog.at_level("DEBUG", logger="extractor.sitegraph"):
        caplog.clear()
        cut_forward(fresh.model, fresh.sites, lambda: fresh.forward(x))
    assert "cut forward again with copies" in caplog.text
    with caplog.at_level("DEBUG", logger="extractor.sitegraph"):
        caplog.clear()
        cut_forward(got_bundle.model, got_bundle.sites, lambda: got_bundle.forward(x), got_bundle.written)
    assert "cut forward again with copies" not in caplog.text
    settings = PathwaySettings(k=3)
    got_pw = extract_batch(got_bundle, x, settings)  # edges_of passes the bundle's known sites
    with caplog.at_level("DEBUG", logger="extractor.sitegraph"):
        caplog.clear()
        ref_pw = extract_batch(ref_bundle, x, settings)
    assert "cut forward again with copies" not in caplog.text
    assert len(ref_pw.edges.b) == 3 * 3 * 3  # 3 images x 3 targets x 3 sources into the second site
    for name in ("b", "src_site", "src_channel", "dst_site", "dst_channel", "weight", "gap"):
        np.testing.assert_array_equal(getattr(got_pw.edges, name), getattr(ref_pw.edges, name), err_msg=name)
    torch.testing.assert_close(got_pw.saliency, ref_pw.saliency, rtol=0, atol=0)


def test_logit_preservation_at_paper_sparsity(demo: tuple) -> None:
    """At p=90 (Khakzar's VGG setting) the masked network keeps a measurable share of the logit."""
    bundle, data = demo
    res = extract_batch(bundle, data.x_test[:32], PathwaySettings(selection="percentile", sparsity=90.0))
    ratio = (res.logit_masked / res.logit_full).median().item()
    assert 0.0 < ratio < 1.5
    assert torch.isfinite(res.saliency).all()


@pytest.mark.parametrize("bad", [-1.0, 100.0, float("nan")])
def test_sparsity_out_of_range(bad: float) -> None:
    with pytest.raises(ExtractionError, match="sparsity"):
        PathwaySettings(selection="percentile", sparsity=bad)


def test_k_out_of_range() -> None:
    with pytest.raises(ExtractionError, match="k must be"):
        PathwaySettings(k=0)


@pytest.mark.parametrize(("arch", "size"), [("resnet18", 32), ("googlenet", 48), ("mnasnet0_5", 32),
                                            ("efficientnet_b0", 32), ("densenet121", 32), ("convnext_tiny", 32)])
def test_contributions_from_the_cut_forward_equal_the_plain_pass(arch: str, size: int) -> None:
    """The chain rule over the cut forward's segments (``cut_contributions``) gives every site the gradient of one
    plain forward and backward (``mct_contributions``, held to Captum above): branches, concatenations, residual
    streams, in-place activations."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=10, **kwargs).double().eval()
    bundle = make_bundle(model, arch, (3, size, size))
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    ref = mct_contributions(bundle, x)
    got, cut, _ = cut_contributions(bundle, x)
    assert torch.equal(got.target, ref.target) and torch.allclose(got.logits, ref.logits, rtol=0, atol=1e-12)
    assert set(cut.acts) == set(cut.sources) == {s.index for s in bundle.sites}
    for s in bundle.sites:
        scale = float(ref.grads[s.index].abs().max())
        assert scale > 0, s.site_id
        assert torch.allclose(got.grads[s.index], ref.grads[s.index], rtol=0, atol=1e-12 * scale), s.site_id
        assert torch.allclose(got.channel[s.index], ref.channel[s.index], rtol=1e-10,
                              atol=1e-12 * float(ref.channel[s.index].abs().max())), s.site_id
    assert hook_count(model) == 0 and function_modes_active() == 0


def test_saliency_map_is_the_channel_of_largest_magnitude():
    """Per pixel the signed value of the channel with the largest |gradient|, the first at ties (argmax's rule),
    against a per-pixel loop; ties and sign flips are planted."""
    g = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(3))
    g[0, :, 0, 0] = torch.tensor([0.5, -0.5, 0.5])  # a three-way tie of magnitudes: channel 0's value
    g[1, :, 1, 2] = torch.tensor([0.1, -2.0, 2.0])  # a tie between 1 and 2: channel 1's negative value
    g[1, :, 2, 3] = 0.0
    ours = saliency_map(g)
    assert ours.shape == (2, 5, 4)
    for b, y, x_ in itertools.product(range(2), range(5), range(4)):
        vals = g[b, :, y, x_].tolist()
        pick = max(range(3), key=lambda c: (abs(vals[c]), -c))
        assert ours[b, y, x_].item() == vals[pick]
    assert ours[0, 0, 0].item() == 0.5 and ours[1, 1, 2].item() == -2.0
