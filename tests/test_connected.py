"""Top-k pathways stay connected across depthwise and grouped segments (extractor/reach.py).

The reference walks the site graph on a cut forward with autograd, independently of the reach
structure read off the weights: kept channel ``c`` of site ``t`` is *fed* when the gradient of
``sum a_t[c]`` reaches a kept channel of some predecessor. A site is cut when no kept channel of it
is fed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn
from torch.autograd.graph import GradientEdge

from extractor.models import ModelBundle, load_torchvision
from extractor.reach import bundle_reach, connected_topk, cut_sites
from extractor.sitegraph import cut_forward

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

DEPTHWISE = ["mobilenet_v2", "efficientnet_b0", "mnasnet0_5", "shufflenet_v2_x0_5", "regnet_y_400mf"]


def reference_cut_sites(bundle: ModelBundle, x: torch.Tensor, kept: list[torch.Tensor]) -> list[set[int]]:
    """Per image, the sites with predecessors none of whose kept, live channels is fed (autograd walk)."""
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    B = x.shape[0]
    out: list[set[int]] = [set() for _ in range(B)]
    for s in bundle.sites:
        preds = [i for i in s.preds if i in cut.sources]
        a = cut.acts.get(s.index)
        if not preds or a is None:
            continue
        # differentiate the activation's input: a channel the activation happens to gate off (dead, or
        # saturated ReLU6) still reads what its segment joins it to
        assert a.grad_fn is not None
        node, slot = a.grad_fn.next_functions[0]
        assert node is not None
        for b in range(B):
            fed_any, live_any = False, False
            for c in torch.nonzero(kept[s.index][b]).flatten().tolist():
                onehot = torch.zeros_like(a)
                onehot[b, c] = 1.0
                grads = torch.autograd.grad(GradientEdge(node, slot), [cut.sources[i] for i in preds],
                                            grad_outputs=onehot, retain_graph=True, allow_unused=True,
                                            materialize_grads=True)
                mass = [g[b].abs().flatten(1).sum(1) if g.dim() > 2 else g[b].abs() for g in grads]
                if not any(bool(m.any()) for m in mass):
                    continue  # a dead channel reads nothing: it cannot tell
                live_any = True
                fed_any = fed_any or any(bool((m[kept[i][b]] > 0).any()) for i, m in zip(preds, mass, strict=True))
            if live_any and not fed_any:
                out[b].add(s.index)
    return out


@pytest.fixture(scope="module", params=DEPTHWISE)
def net(request: pytest.FixtureRequest) -> tuple[ModelBundle, torch.Tensor]:
    torch.manual_seed(0)
    bundle = load_torchvision(request.param, untrained=True, input_size=64)
    return bundle, torch.rand(2, 3, 64, 64)


def test_connected_topk_is_never_cut_and_independent_topk_is(net: tuple[ModelBundle, torch.Tensor]) -> None:
    """Random scores per site (untrained nets hide the cut: their contributions rank alike across a
    depthwise conv): the connected rule gives no cut site by the autograd reference, and independent
    top-k does on every net whose segments join some channels only."""
    bundle, x = net
    reach = bundle_reach(bundle, x)
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(2, s.channels, generator=gen) for s in bundle.sites]
    connected = connected_topk(scores, 4, reach)
    assert all(int(k.sum(1).min()) == min(4, s.channels) for k, s in zip(connected, bundle.sites, strict=True))
    assert reference_cut_sites(bundle, x, connected) == [set(), set()]
    assert cut_sites(connected, bundle.sites, reach) == [[], []]
    independent = connected_topk(scores, 4, None)
    ref = reference_cut_sites(bundle, x, independent)
    ours = cut_sites(independent, bundle.sites, reach)
    assert [set(c) for c in ours] == ref
    if bundle.info.arch in ("mobilenet_v2", "efficientnet_b0", "mnasnet0_5"):  # expand -> depthwise sites:
        # independent random choices at the two ends of a depthwise conv are nearly always disjoint
        assert any(ref), f"{bundle.info.arch}: random independent top-4 should cut a per-channel segment"


def test_mct_topk_pathway_gradient_is_nonzero_and_connected(net: tuple[ModelBundle, torch.Tensor]) -> None:
    """MCT top-8 through ``extract_batch``: no cut site (reference walk) and a non-zero Pathway Gradient."""
    from extractor.methods import extract_batch
    from extractor.settings import PathwaySettings

    bundle, x = net
    res = extract_batch(bundle, x, PathwaySettings(k=8))
    assert reference_cut_sites(bundle, x, res.sel.kept) == [set(), set()]
    assert all("cut_sites" not in e for e in res.extra)
    assert bool((res.saliency.abs().flatten(1).amax(1) > 0).all())


def test_dense_nets_select_as_before() -> None:
    """Where every segment is dense (VGG, ResNet) the rule is plain top-k per site."""
    torch.manual_seed(0)
    for name in ("vgg11", "resnet18"):
        bundle = load_torchvision(name, untrained=True, input_size=32)
        x = torch.rand(2, 3, 32, 32)
        reach = bundle_reach(bundle, x)
        scores = [torch.rand(2, s.channels) for s in bundle.sites]
        for a, b in zip(connected_topk(scores, 3, reach), connected_topk(scores, 3, None), strict=True):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_trained_efficientnet_lite0_top8_pathway_gradient_is_nonzero(tmp_path: Path) -> None:
    """On the trained net, every photo's MCT top-8 pathway is connected and its Pathway Gradient
    non-zero (independent top-8: 0 on 19 of the 20 photos)."""
    from extractor.launch import model_from_spec
    from extractor.methods import extract_batch
    from extractor.pipeline import load_images
    from extractor.settings import PathwaySettings

    bundle = model_from_spec("efficientnet_lite0", tmp_path)
    src = load_images("samples:imagenet", bundle)
    x = torch.stack([src.load(i) for i in range(20)])
    res = extract_batch(bundle, x, PathwaySettings(k=8))
    assert res.saliency.abs().flatten(1).amax(1).min() > 0
    assert all("cut_sites" not in e for e in res.extra)
    assert (res.logit_masked != 0).all()
    independent = connected_topk([c.abs() for c in res.contrib.channel], 8, None)
    assert sum(bool(c) for c in cut_sites(independent, bundle.sites, bundle_reach(bundle, x))) >= 15


class _Depthwise(nn.Module):
    """conv -> ReLU -> depthwise conv -> ReLU -> pool -> linear: one per-channel segment."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.store
def test_a_cut_selection_is_recorded_stored_and_said(empty_store: Driver, neo4j_server: ServerConfig,
                                                     tmp_path: Path) -> None:
    """Lengerich's resampling top-k chooses per site by definition, so across a depthwise conv it can be
    cut: the pathway records the cut sites, the store holds them, `pathx query pathway` says so."""
    import json
    import os
    import subprocess
    import sys

    from extractor.inputs import TensorImages
    from extractor.models import make_bundle
    from extractor.pipeline import extract_run
    from extractor.settings import PathwaySettings
    from graphstore.api import Store
    from graphstore.loader import load_run
    from graphstore.server import USER, read_password
    from records import read_run

    bundle = make_bundle(_Depthwise(), "dwnet", (1, 8, 8))
    gen = torch.Generator().manual_seed(3)
    images = TensorImages(torch.rand(8, 1, 8, 8, generator=gen))
    extract_run(
        bundle,
        images,
        [PathwaySettings(method="correlation", selection="topk", k=2, resamples=5)],
        [],
        tmp_path / "run",
        progress=False,
        exemplars=0,
    )
    _, _, pathways = read_run(tmp_path / "run")
    cut = {p.pathway_id: json.loads(p.extra["cut_sites"]) for p in pathways if "cut_sites" in p.extra}
    assert cut and all(v == ["body.3#0"] for v in cut.values())  # the depthwise site, nothing else
    reach = bundle_reach(bundle, images.x)
    for p in pathways:  # the records' flag equals the structural check of their own neurons
        kept = [torch.zeros(1, s.channels, dtype=torch.bool) for s in bundle.sites]
        for site, ch in zip(p.neuron_site, p.neuron_channel, strict=True):
            kept[int(site)][0, int(ch)] = True
        assert bool(cut_sites(kept, bundle.sites, reach)[0]) == (p.pathway_id in cut)
    load_run(empty_store, tmp_path / "run", progress=False)
    store = Store(empty_store)
    some = next(iter(cut))
    assert store.pathway_graph(some).graph["cut_sites"] == ["body.3#0"]
    assert store.pathway_of(pathways[0].image_id, pathways[0].config).cut_sites in ([], ["body.3#0"])
    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server))
    res = subprocess.run([str(Path(sys.executable).parent / "pathx"), "query", "pathway", "--pathway", some],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "this pathway is cut at 1 site(s): body.3#0" in res.stderr
    assert json.loads(res.stdout)["graph"]["cut_sites"] == ["body.3#0"]
