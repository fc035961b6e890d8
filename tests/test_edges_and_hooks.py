"""Edge weights against a slow one-neuron-at-a-time reference and a hand-set net; hook hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from extractor.batch import SEGMENT_OVERLAP_MAX, BatchInputs, one_forward
from extractor.contributions import forward_with_sites, mct_contributions
from extractor.errors import ExtractionError
from extractor.methods import extract_batch
from extractor.models import make_bundle
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward, segment_overlap
from extractor.sites import Capture, SiteHooks, hook_count


def _clamped_edges(bundle, x, contrib, j, targets):
    """Reference, one target neuron at a time: every site but ``i`` is clamped to its clean value,
    site ``i``'s output is ``a_i * (1 + t)`` with one ``t`` per channel; ``w(i_c -> j) = dC_j/dt_c``.

    Returns ``{i: [B, M, C_i]}`` for every predecessor ``i`` of site ``j`` (``g_j`` held fixed).
    """
    x = x.detach()
    with torch.no_grad():
        _, clean = forward_with_sites(bundle, x)
    clean = [a.detach() for a in clean]
    out = {}
    for i in bundle.sites[j].preds:
        t = torch.zeros(clean[i].shape[:2], dtype=x.dtype, requires_grad=True)
        scale = 1 + t.view(*t.shape, *([1] * (clean[i].dim() - 2)))

        def transform(idx, a, _i=i, _scale=scale):
            if idx == _i:
                return clean[_i] * _scale
            return a if idx == j else clean[idx]

        with SiteHooks(bundle.model, Capture(bundle.sites, transform)) as hooks:
            rec = hooks.begin()
            bundle.forward(x)
        a_j = rec.acts[j]
        w = torch.zeros((x.shape[0], targets.shape[1], clean[i].shape[1]), dtype=x.dtype)
        for b in range(x.shape[0]):
            for m, tgt in enumerate(targets[b].tolist()):
                c_j = (a_j[b, tgt] * contrib.grads[j][b, tgt]).sum()
                w[b, m] = torch.autograd.grad(c_j, t, retain_graph=True)[0][b]
        out[i] = w
    return out


def _check_edges_against_reference(bundle, x, settings, sites_to_check=None):
    res = extract_batch(bundle, x, settings, BatchInputs(keep_maps=True))  # the reference reads the gradients
    contrib, edges = res.contrib, res.edges
    checked = 0
    for site in bundle.sites:
        j = site.index
        if not site.preds or (sites_to_check is not None and j not in sites_to_check):
            continue
        score = contrib.channel[j].abs().masked_fill(~res.sel.kept[j], -1.0)
        targets = score.topk(min(settings.edge_targets, int(res.sel.kept[j].sum(1).min())), dim=1).indices
        ref = _clamped_edges(bundle, x, contrib, j, targets)
        for b in range(x.shape[0]):
            total = sum(ref[i][b].sum(-1) for i in site.preds)  # [M], over all predecessor channels
            gap = (total - contrib.channel[j][b, targets[b]]).abs().max()
            assert abs(float(gap) - float(edges.gap[b, j])) <= 1e-6 * (1 + float(gap))
            for m, tgt in enumerate(targets[b].tolist()):
                want = {(i, c): float(ref[i][b, m, c]) for i in site.preds
                        for c in torch.nonzero(res.sel.kept[i][b]).flatten().tolist() if ref[i][b, m, c] != 0}
                mask = (edges.b == b) & (edges.dst_site == j) & (edges.dst_channel == tgt)
                got = {(int(s), int(c)): float(w) for s, c, w in
                       zip(edges.src_site[mask], edges.src_channel[mask], edges.weight[mask], strict=True)}
                assert got.keys() == want.keys(), (site.site_id, tgt)
                for key, w in want.items():
                    assert abs(got[key] - w) <= 1e-5 * (1 + abs(w)), (site.site_id, key)
                checked += len(want)
    assert checked > 0
    return res


def test_edges_equal_slow_reference(demo: tuple) -> None:
    bundle, data = demo
    model = bundle.model.double()
    try:
        _check_edges_against_reference(bundle, data.x_test[:3].double(),
                                       PathwaySettings(k=4, edge_targets=4, edges_per_target=64))
    finally:
        model.float()


@pytest.mark.parametrize(("name", "size", "kwargs"), [
    ("squeezenet1_0", 48, {}), ("googlenet", 48, {"aux_logits": False, "init_weights": False}),
    ("densenet121", 32, {}), ("shufflenet_v2_x0_5", 32, {}),
])
def test_edges_along_the_site_graph_equal_reference(name: str, size: int, kwargs: dict) -> None:
    """Branches (SqueezeNet's fire modules, ShuffleNet's split), functional sites and parallel
    branches (GoogLeNet), dense concatenation (DenseNet): every edge along the site graph equals
    the clamped one-neuron reference; the gap is the reference's."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=7, **kwargs).double().eval()
    bundle = make_bundle(model, name, (3, size, size))
    assert any(len(s.preds) > 1 for s in bundle.sites)
    sites = {s.index for s in bundle.sites[: 12]} | {bundle.sites[-1].index}
    _check_edges_against_reference(bundle, torch.rand(1, 3, size, size, dtype=torch.float64),
                                   PathwaySettings(k=3, edge_targets=2, edges_per_target=512), sites)


def test_completeness_gap_zero_on_bias_free_relu_chain() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 12, bias=False), nn.ReLU(), nn.Linear(12, 3, bias=False),
    ).double().eval()
    bundle = make_bundle(model, "bias-free", (1, 8, 8))
    res = extract_batch(bundle, torch.rand(4, 1, 8, 8, dtype=torch.float64),
                        PathwaySettings(k=6, edge_targets=6))
    assert res.edges.gap.shape == (4, 4) and np.isnan(res.edges.gap[:, 0]).all()
    assert float(np.nanmax(res.edges.gap)) < 1e-9


def test_hand_set_net_exact_edges() -> None:
    """y = relu(W2 relu(W1 x)); with g fixed, w(i->j) = h_i * W2[j, i] * g_j for active j."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False), nn.ReLU(),
                          nn.Linear(2, 2, bias=False)).double().eval()
    with torch.no_grad():
        for i, w in ((0, [[1.0, 0.0], [0.0, 2.0]]), (2, [[1.0, 1.0], [3.0, -1.0]]), (4, [[1.0, 0.5], [0.0, 0.0]])):
            layer = model[i]
            assert isinstance(layer, nn.Linear)
            layer.weight.copy_(torch.tensor(w))

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.flatten(1))

    bundle = make_bundle(Flat(), "hand", (1, 1, 2))
    x = torch.tensor([[[[1.0, 1.0]]]], dtype=torch.float64)  # h = (1, 2); y2 = (3, 1); logits = (3.5, 0)
    res = extract_batch(bundle, x, PathwaySettings(k=2, edge_targets=2, edges_per_target=2))
    assert res.contrib.target.tolist() == [0]
    got = {(int(s), int(d)): float(w) for s, d, w in
           zip(res.edges.src_channel, res.edges.dst_channel, res.edges.weight, strict=True)}
    # g at site 1 = (1, 0.5): w(0->0)=1*1*1, w(1->0)=2*1*1, w(0->1)=1*3*.5, w(1->1)=2*(-1)*.5
    assert got == pytest.approx({(0, 0): 1.0, (1, 0): 2.0, (0, 1): 1.5, (1, 1): -1.0})
    assert res.contrib.channel[1].tolist() == [[3.0, 0.5]]
    assert float(np.nanmax(res.edges.gap)) < 1e-12


def test_no_hooks_remain_and_outputs_unchanged() -> None:
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bundle = make_bundle(model, "resnet18", (3, 32, 32))
    extract_batch(bundle, x, PathwaySettings(method="intgrad", intgrad_steps=3))
    extract_batch(bundle, x, PathwaySettings(selection="percentile", sparsity=80))
    assert hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))


def test_no_hooks_remain_after_an_exception_inside_extraction() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(2 * 6 * 6, 3)
            self.explode = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.relu(self.conv(x))
            if self.explode:
                raise RuntimeError("boom")
            return self.fc(h.flatten(1))

    model = Boom()
    bundle = make_bundle(model, "boom", (1, 8, 8))
    model.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        extract_batch(bundle, torch.rand(1, 1, 8, 8), PathwaySettings())
    assert hook_count(model) == 0
    with pytest.raises(ValueError), SiteHooks(model, Capture(bundle.sites)):
        assert hook_count(model) == 1
        raise ValueError("inside")
    assert hook_count(model) == 0


def test_inplace_downstream_op_cannot_corrupt_capture() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU(inplace=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.relu(x.flatten(1) - 0.5)
            h.mul_(3.0)  # in-place op on the site output
            return self.fc(h)

    model = Net()
    bundle = make_bundle(model, "net", (1, 2, 2))
    x = torch.rand(3, 1, 2, 2)
    contrib = mct_contributions(bundle, x)
    assert torch.allclose(contrib.acts[0], (x.flatten(1) - 0.5).clamp_min(0))


def test_model_errors() -> None:
    with pytest.raises(ExtractionError, match="no activation sites"):
        make_bundle(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), "lin", (1, 2, 2))
    with pytest.raises(ExtractionError, match="class scores"):
        make_bundle(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), "map", (1, 2, 2))
    with pytest.raises(ExtractionError, match="fails on input"):
        make_bundle(nn.Sequential(nn.Flatten(), nn.Linear(5, 3)), "bad", (1, 2, 2))


def test_bad_images(demo: tuple) -> None:
    bundle, _ = demo
    with pytest.raises(ExtractionError, match="shape"):
        extract_batch(bundle, torch.rand(1, 3, 32, 32), PathwaySettings())
    bad = torch.rand(1, 1, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExtractionError, match="NaN"):
        extract_batch(bundle, bad, PathwaySettings())


def test_nan_activations_are_refused() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.relu(torch.log(x.flatten(1) - 2.0))  # log of a negative number: NaN
            return self.fc(torch.nan_to_num(h))

    bundle = make_bundle(Bad(), "bad", (1, 2, 2))
    with pytest.raises(ExtractionError, match="NaN or Inf"):
        extract_batch(bundle, torch.rand(1, 1, 2, 2), PathwaySettings())


@pytest.mark.parametrize(("name", "one"), [("resnet18", True), ("mnasnet0_5", True), ("efficientnet_b1", True),
                                           ("densenet121", False), ("convnext_tiny", False)])
def test_one_forward_serves_contributions_and_edges_where_segments_are_disjoint(name: str, one: bool,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the sites' segments share few layers (none in ResNet; EfficientNet-B1's stages share their projections),
    one cut forward gives the contributions and the edges (``selected_with_edges``); where they share many (dense
    blocks, residual streams), a plain pass and a cut forward do. Both ways give the same pathways, to float64
    rounding."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=7).double().eval()
    bundle = make_bundle(model, name, (3, 32, 32))
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    settings = PathwaySettings(k=4, edge_targets=4, edges_per_target=8)
    assert one_forward(bundle, x, settings) is one
    overlap = segment_overlap_of(bundle, x)
    assert overlap == bundle.segment_overlap and (overlap <= SEGMENT_OVERLAP_MAX) is one
    assert overlap > 1.5 if name == "efficientnet_b1" else overlap <= 1.5 if one else overlap > 4
    assert not one_forward(bundle, x, PathwaySettings(method="intgrad"))
    results = []
    # the second fused batch knows its routes: the plain VJPs come along, all of them, then as many as fit a
    # small budget (the others taken per destination)
    for forced, budget in ((99.0, None), (1.0, None), (1.0, None), (1.0, 3000)):  # two passes, then one forward
        if budget is not None:
            monkeypatch.setattr("extractor.batch.PLAIN_BUDGET", budget)
        bundle.segment_overlap = forced
        results.append(extract_batch(bundle, x, settings))
    plain = results[0]
    assert len(plain.edges.weight) > 0
    for fused in results[1:]:
        for name_ in ("b", "src_site", "src_channel", "dst_site", "dst_channel"):
            assert np.array_equal(getattr(fused.edges, name_), getattr(plain.edges, name_)), name_
        assert np.allclose(fused.edges.weight, plain.edges.weight, rtol=1e-9, atol=1e-12)
        assert np.allclose(fused.edges.gap, plain.edges.gap, rtol=1e-9, atol=1e-12, equal_nan=True)
        for a, b in zip(fused.sel.kept, plain.sel.kept, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(fused.contrib.channel, plain.contrib.channel, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
        assert torch.allclose(fused.saliency, plain.saliency, rtol=1e-9, atol=1e-14)
    assert hook_count(model) == 0


def segment_overlap_of(bundle, x):
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x[:1]), bundle.written)
    return segment_overlap(cut)
