"""Every torchvision family as the graph it really is: sites (module and functional), layouts,
the site graph, edges along it; hand-built nets where the completeness gap must be exactly 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from extractor.batch import BatchInputs
from extractor.errors import ExtractionError
from extractor.methods import extract_batch
from extractor.models import load_torchvision, make_bundle
from extractor.settings import PathwaySettings
from extractor.sites import Capture, SiteHooks, function_modes_active, hook_count

# (name, input size, layouts its sites must have, a site id that must be found)
ZOO = [
    ("alexnet", 64, {"channels_first", "vector"}, "features.1#0"),
    ("vgg11", 32, {"channels_first", "vector"}, "classifier.1#0"),
    ("resnet18", 32, {"channels_first"}, "layer1.0.relu#1"),
    ("resnext50_32x4d", 32, {"channels_first"}, "layer1.0.relu#2"),
    ("densenet121", 32, {"channels_first"}, "relu()#0"),
    ("squeezenet1_1", 48, {"channels_first"}, "features.3.expand3x3_activation#0"),
    ("shufflenet_v2_x0_5", 32, {"channels_first"}, "stage2.0.branch2.2#0"),
    ("mobilenet_v2", 32, {"channels_first"}, "features.1.conv.0.2#0"),
    ("mobilenet_v3_small", 32, {"channels_first", "vector"}, "features.1.block.1.activation#0"),
    ("mnasnet0_5", 32, {"channels_first"}, "layers.2#0"),
    ("efficientnet_b0", 32, {"channels_first"}, "features.1.0.block.0.2#0"),
    ("efficientnet_v2_s", 32, {"channels_first"}, "features.0.2#0"),
    ("regnet_y_400mf", 32, {"channels_first"}, "stem.2#0"),
    ("googlenet", 48, {"channels_first"}, "inception3a.branch2.1.relu()#0"),
    ("inception_v3", 75, {"channels_first"}, "Mixed_5b.branch_pool.relu()#0"),
    ("convnext_tiny", 32, {"channels_last"}, "features.1.0.block.4#0"),
    ("swin_t", 32, {"channels_last"}, "features.1.0.mlp.1#0"),
    ("swin_v2_t", 32, {"channels_last"}, "features.1.0.mlp.1#0"),
    ("maxvit_t", 224, {"channels_first", "channels_last"}, "blocks.0.layers.0.layers.MBconv.layers.conv_a.2#0"),
    ("vit_b_16", 32, {"tokens"}, "encoder.layers.encoder_layer_0.mlp.1#0"),
]


@pytest.mark.parametrize(("name", "size", "layouts", "site"), ZOO, ids=[z[0] for z in ZOO])
def test_torchvision_family_extracts_with_edges_along_the_site_graph(name: str, size: int, layouts: set[str],
                                                                     site: str) -> None:
    torch.manual_seed(0)
    bundle = load_torchvision(name, untrained=True, input_size=size)
    model = bundle.model
    ids = [s.site_id for s in bundle.sites]
    assert site in ids and len(ids) == len(set(ids))
    assert {s.layout for s in bundle.sites} == layouts
    assert all(i < s.index for s in bundle.sites for i in s.preds)  # a DAG in call order
    assert all(s.depth == 1 + max((bundle.sites[i].depth for i in s.preds), default=-1) for s in bundle.sites)
    # no site is computed once for all images (Swin V2's position-bias MLP is left out)
    assert not any("cpb_mlp" in i for i in ids)
    x = torch.rand(2, 3, size, size)  # a batch: per-image sites keep their images apart
    with torch.no_grad():
        before = bundle.forward(x)
    res = extract_batch(bundle, x, PathwaySettings(k=3, edge_targets=3, edges_per_target=4),
                        BatchInputs(keep_maps=True))
    edges = res.edges
    assert len(edges.weight) > 0 and np.isfinite(edges.weight).all()
    preds = {s.index: set(s.preds) for s in bundle.sites}
    assert all(int(a) in preds[int(b)] for a, b in zip(edges.src_site, edges.dst_site, strict=True))
    has_preds = np.array([bool(s.preds) for s in bundle.sites])
    assert np.isfinite(edges.gap[0, has_preds]).all() and np.isnan(edges.gap[0, ~has_preds]).all()
    for s in bundle.sites:  # contributions are channel sums over the channel axis of the layout
        assert tuple(res.contrib.element[s.index].shape[1:]) == s.shape
        assert res.contrib.channel[s.index].shape == (2, s.channels)
    assert hook_count(model) == 0 and function_modes_active() == 0
    with torch.no_grad():
        assert torch.equal(bundle.forward(x), before)


def test_a_model_that_cannot_take_the_input_size_gets_one_line() -> None:
    with pytest.raises(ExtractionError) as err:
        load_torchvision("maxvit_t", untrained=True, input_size=64)
    assert "fails on input of shape (3, 64, 64)" in str(err.value) and "\n" not in str(err.value)


class _Branchy(nn.Module):
    """Bias-free ReLU net with a branch (two parallel convs), their concatenation, a dense block
    (each layer reads the concatenation of all before it) and a residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.left = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.right = nn.Conv2d(4, 5, 1, bias=False)
        self.dense = nn.ModuleList([nn.Conv2d(8 + 3 * k, 3, 3, padding=1, bias=False) for k in range(3)])
        self.skip = nn.Conv2d(17, 17, 1, bias=False)
        self.fc = nn.Linear(17, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        cat = torch.cat([F.relu(self.left(h)), torch.relu(self.right(h))], 1)  # branch + concatenation
        feats = [cat]
        for conv in self.dense:
            feats.append(F.relu(conv(torch.cat(feats, 1)), inplace=True))
        block = torch.cat(feats, 1)
        out = F.max_pool2d(F.relu(self.skip(block) + block), 2)  # residual
        return self.fc(out.mean((2, 3)))


def test_completeness_gap_is_zero_on_bias_free_branches_concatenations_and_dense_blocks() -> None:
    torch.manual_seed(4)
    model = _Branchy().double().eval()
    bundle = make_bundle(model, "branchy", (1, 8, 8))
    # functional calls in the root module's forward: relu()#0 stem, #1 left, #2 right, #3-#5 dense, #6 residual
    assert [s.site_id for s in bundle.sites] == [f"relu()#{k}" for k in range(7)]
    preds = [set(s.preds) for s in bundle.sites]
    assert preds[:4] == [set(), {0}, {0}, {1, 2}]  # the branch, then the concatenation
    assert preds[4] == {1, 2, 3} and preds[5] == {1, 2, 3, 4}  # the dense block reads everything before
    assert preds[6] == {1, 2, 3, 4, 5}  # the residual reads the whole block
    assert [s.depth for s in bundle.sites] == [0, 1, 1, 2, 3, 4, 5]
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    for settings in (PathwaySettings(k=4, edge_targets=4), PathwaySettings(selection="percentile", sparsity=50)):
        res = extract_batch(bundle, x, settings)
        gaps = res.edges.gap[:, 1:]
        assert np.isfinite(gaps).all() and float(gaps.max()) < 1e-9
        assert set(res.edges.dst_site.tolist()) == set(range(1, len(bundle.sites)))
    assert hook_count(model) == 0 and function_modes_active() == 0


def test_functional_sites_leave_nothing_behind_after_an_exception() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 6 * 6, 3)
            self.explode = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            h.relu_()  # an in-place method used as a statement
            if self.explode:
                raise RuntimeError("boom")
            return self.fc(h.flatten(1))

    model = Boom()
    bundle = make_bundle(model, "boom", (1, 8, 8))
    assert [s.site_id for s in bundle.sites] == ["relu()#0"]
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        before = bundle.forward(x)
    res = extract_batch(bundle, x, PathwaySettings(k=2))
    assert torch.allclose(res.contrib.logits, before)
    assert float(res.contrib.channel[0].abs().sum()) > 0  # the statement's result carries the gradient
    model.explode = True
    with pytest.raises(RuntimeError, match="boom"):
        extract_batch(bundle, x, PathwaySettings())
    assert hook_count(model) == 0 and function_modes_active() == 0
    model.explode = False
    with torch.no_grad():
        assert torch.equal(bundle.forward(x), before)


def test_pixel_pathways_refuse_a_branching_site_graph_in_one_line() -> None:
    torch.manual_seed(0)
    bundle = load_torchvision("resnet18", untrained=True, input_size=32)
    with pytest.raises(ExtractionError) as err:
        extract_batch(bundle, torch.rand(1, 3, 32, 32), PathwaySettings(method="pixel", stride=8))
    assert "pixel pathways need a chain of sites; layer1.0.relu#1 reads relu#0, layer1.0.relu#0" in str(err.value)
    assert "\n" not in str(err.value) and hook_count(bundle.model) == 0


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x)) * 2.0


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Inner()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(self.act(self.inner(x)) - 0.5)) + 1.0


class _Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.outer = _Outer()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.outer(x) - 1.5)
        return self.fc(F.relu(h - 0.1).mean((2, 3)))


def test_functional_sites_are_told_apart_by_the_module_whose_own_code_calls_them() -> None:
    """The module stack is kept on the modules that call a site's function themselves and on their children
    only; a call inside a child (or deeper) is never its parent's, also when the sites are a subset."""
    torch.manual_seed(0)
    model = _Root().eval()
    bundle = make_bundle(model, "nested", (3, 4, 4))
    assert [s.site_id for s in bundle.sites] == ["outer.inner.relu()#0", "outer.act#0", "outer.relu()#0",
                                                 "relu()#0", "relu()#1"]
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        a0 = F.relu(model.outer.inner.body(x))
        a1 = F.relu(a0 * 2.0)
        a2 = torch.relu(model.outer.conv(a1 - 0.5))
        a3 = F.relu(a2 + 1.0 - 1.5)
        a4 = F.relu(a3 - 0.1)
    for keep in (bundle.sites, [bundle.sites[2], bundle.sites[4]]):  # every site, or two of them
        with SiteHooks(model, Capture(keep)) as hooks:
            rec = hooks.begin()
            with torch.no_grad():
                bundle.forward(x)
            stacked = hook_count(model)
        for s in keep:
            assert torch.allclose(rec.acts[s.index], [a0, a1, a2, a3, a4][s.index]), s.site_id
        # a pre and a post hook on the root, outer and their children (fc, inner, act, conv), and on inner.body
        # where inner's call is a site; never on inner.body's own children. (And outer.act's site hook.)
        assert stacked == (2 * 7 + 1 if len(keep) == 5 else 2 * 6)
    assert hook_count(model) == 0 and function_modes_active() == 0
