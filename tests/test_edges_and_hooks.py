"""Edge weights against a slow one-neuron-at-a-time reference and a hand-set net; hook hygiene."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from extractor.errors import ExtractionError
from extractor.models import make_bundle
from extractor.pathways import (
    PathwaySettings,
    compute_edges,
    extract_batch,
    forward_with_sites,
    mct_contributions,
    select,
)
from extractor.sites import SiteHooks, hook_count


def _slow_edges(bundle, x, contrib, sel, l):
    """One autograd call per target neuron j: w(i->j) = sum_p a_i(p) dC_j/da_i(p), g_j fixed."""
    x = x.detach().requires_grad_(True)
    _, acts = forward_with_sites(bundle, x)
    g = contrib.grads[l + 1]
    out = {}
    for b in range(x.shape[0]):
        for j in torch.nonzero(sel.kept[l + 1][b]).flatten().tolist():
            c_j = (acts[l + 1][b, j] * g[b, j]).sum()
            (grad,) = torch.autograd.grad(c_j, acts[l], retain_graph=True)
            w = (grad[b] * acts[l][b].detach()).flatten(1).sum(-1) if grad.dim() > 2 else grad[b] * acts[l][b]
            out[(b, j)] = w.detach()
    return out


def test_edges_equal_slow_reference(demo: tuple) -> None:
    bundle, data = demo
    model = bundle.model.double()
    try:
        x = data.x_test[:3].double()
        settings = PathwaySettings(k=4, edge_targets=4, edges_per_target=16)
        contrib, attached = mct_contributions(bundle, x)
        sel = select(contrib, settings)
        edges = compute_edges(contrib, sel, attached, settings)
        for l in range(len(bundle.sites) - 1):
            ref = _slow_edges(bundle, x, contrib, sel, l)
            mask = edges.src_site == l
            assert mask.sum() > 0
            for b, sc, dc, w in zip(edges.b[mask], edges.src_channel[mask], edges.dst_channel[mask],
                                    edges.weight[mask], strict=True):
                assert abs(float(ref[(int(b), int(dc))][int(sc)]) - float(w)) < 1e-5
            # completeness gap over all i equals the reference's
            for (b, j), w_all in ref.items():
                gap = abs(float(w_all.sum()) - float(contrib.channel[l + 1][b, j]))
                assert gap <= float(edges.gap[b, l]) + 1e-6
    finally:
        model.float()


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
    assert res.edges.gap.shape == (4, 3)
    assert float(res.edges.gap.max()) < 1e-9


def test_hand_set_net_exact_edges() -> None:
    """y = relu(W2 relu(W1 x)); with g fixed, w(i->j) = h_i * W2[j, i] * g_j for active j."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False), nn.ReLU(),
                          nn.Linear(2, 2, bias=False)).double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 1.0], [3.0, -1.0]]))
        model[4].weight.copy_(torch.tensor([[1.0, 0.5], [0.0, 0.0]]))

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
    assert float(res.edges.gap.max()) < 1e-12


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
    with pytest.raises(ValueError), SiteHooks(model, bundle.sites):
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
    contrib, _ = mct_contributions(bundle, x)
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
