"""Direct edges (``--edges direct``, ``extractor/linear.py``) against a slow reference built from their definition.

The reference freezes the network by hand: one plain forward records every attention module's output, every
layer norm's mean and standard deviation and every squeeze-excite gate, then each of those modules' ``forward``
is replaced by the recorded constant (or the affine map with the recorded statistics), and every target's
edges come from a backward of its own. The fast route must give the same edges, weights and completeness gaps
in float64.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from extractor.batch import edges_of
from extractor.contributions import mct_contributions
from extractor.errors import ExtractionError
from extractor.linear import Linearised, edge_mode, is_attention, is_squeeze_excite
from extractor.models import ModelBundle, make_bundle
from extractor.options import ExtractOptions
from extractor.reach import bundle_reach
from extractor.selection import select
from extractor.settings import PathwaySettings
from extractor.sitegraph import cut_forward
from extractor.sites import function_modes_active, hook_count
from tests.test_junctions import _small

Key = tuple[int, int, int, int, int]  # image, source site, source channel, target site, target channel


@contextmanager
def _hand_frozen(model: nn.Module, forward: Any, mode: str = "direct") -> Iterator[None]:
    """Record the frozen quantities in one plain forward, then replace them by constants: each gate's (and in
    ``direct`` mode each attention module's) ``forward`` returns its recorded output, ``F.layer_norm`` (which
    ``nn.LayerNorm`` and ``LayerNorm2d`` call) the affine map with the recorded mean and standard deviation, and
    in ``pattern`` mode ``F.softmax`` (the attention patterns of torchvision's Swin V2 and MaxViT: their only
    softmaxes) its recorded output."""
    held = [m for m in model.modules() if is_attention(m)] if mode == "direct" else []
    held += [g for m in model.modules() if is_squeeze_excite(m) for g in m.modules()
             if isinstance(g, (nn.Sigmoid, nn.Hardsigmoid))]
    outputs: dict[nn.Module, list[Any]] = {m: [] for m in held}
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    layer_norm, softmax = F.layer_norm, F.softmax
    patterns: list[torch.Tensor] = []

    def recording_softmax(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        patterns.append(softmax(x, *args, **kwargs).detach())
        return patterns[-1]

    def replaying_softmax() -> Any:
        calls = iter(patterns)
        return lambda *args, **kwargs: next(calls)

    def recording(m: nn.Module, orig: Any) -> Any:
        def fwd(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            outputs[m].append(tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
                              if isinstance(out, tuple) else out.detach())
            return out
        return fwd

    def replaying(m: nn.Module) -> Any:
        calls = iter(outputs[m])
        return lambda *args, **kwargs: next(calls)

    def recording_norm(x: torch.Tensor, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
        dims = tuple(range(-len(shape), 0))
        stats.append((x.mean(dims, keepdim=True), (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt()))
        return layer_norm(x, shape, weight, bias, eps)

    def replaying_norm() -> Any:
        calls = iter(stats)

        def norm(x: torch.Tensor, shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
            mean, std = next(calls)
            return (x - mean) / std * weight + bias
        return norm

    try:
        for m in held:
            m.forward = recording(m, m.forward)
        setattr(F, "layer_norm", recording_norm)  # noqa: B010 (a module attribute: patched, then put back)
        if mode == "pattern":
            setattr(F, "softmax", recording_softmax)  # noqa: B010
        with torch.no_grad():
            forward()
        for m in held:
            m.forward = replaying(m)
        setattr(F, "layer_norm", replaying_norm())  # noqa: B010
        if mode == "pattern":
            assert patterns
            setattr(F, "softmax", replaying_softmax())  # noqa: B010
        yield
    finally:
        setattr(F, "layer_norm", layer_norm)  # noqa: B010
        setattr(F, "softmax", softmax)  # noqa: B010
        for m in held:
            m.__dict__.pop("forward", None)


def _reference(bundle: ModelBundle, x: torch.Tensor, settings: PathwaySettings) -> tuple[dict[Key, float], Any]:
    """Edges and gaps of the hand-frozen network, one target at a time (the targets and the ``edges_per_target``
    strongest incoming edges chosen as ``extractor.edges.compute_edges`` defines them)."""
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, settings, bundle_reach(bundle, x))
    with _hand_frozen(bundle.model, lambda: bundle.forward(x), settings.edges):
        cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    edges: dict[Key, float] = {}
    gaps = torch.full((x.shape[0], len(bundle.sites)), float("nan"), dtype=torch.float64)
    for site in bundle.sites:
        j = site.index
        preds = [i for i in site.preds if i in cut.sources]
        if not preds:
            continue
        M = min(settings.edge_targets, int(sel.kept[j].sum(1).max()) or 1)
        top = contrib.channel[j].abs().masked_fill(~sel.kept[j], -1.0).topk(M, dim=1)
        for b in range(x.shape[0]):
            worst = 0.0
            for value, t in zip(top.values[b].tolist(), top.indices[b].tolist(), strict=True):
                if value < 0:
                    continue
                c_t = (cut.acts[j][b, t] * contrib.grads[j][b, t]).sum()
                grads = torch.autograd.grad(c_t, [cut.sources[i] for i in preds], retain_graph=True,
                                            allow_unused=True, materialize_grads=True)
                w = {i: (cut.sources[i][b] * g[b]).detach().flatten(1).sum(1)
                     for i, g in zip(preds, grads, strict=True)}
                worst = max(worst, abs(float(sum(v.sum() for v in w.values())) - float(contrib.channel[j][b, t])))
                ranked = sorted(((abs(float(w[i][c])), i, c) for i in preds for c in range(len(w[i]))
                                 if sel.kept[i][b, c]), reverse=True)[:settings.edges_per_target]
                for size, i, c in ranked:
                    if size > 0:
                        edges[(b, i, c, j, t)] = float(w[i][c])
            gaps[b, j] = worst
    return edges, gaps


def _as_dict(e: Any) -> dict[Key, float]:
    return {(int(b), int(i), int(c), int(j), int(t)): float(w) for b, i, c, j, t, w in
            zip(e.b, e.src_site, e.src_channel, e.dst_site, e.dst_channel, e.weight, strict=True)}


@pytest.mark.parametrize(("name", "mode"), [("convnext", "direct"), ("swin", "direct"), ("vit", "direct"),
                                           ("swin_v2", "pattern"), ("maxvit", "pattern"), ("swin", "pattern")])
def test_linearised_edges_equal_a_hand_frozen_reference(name: str, mode: str) -> None:
    torch.manual_seed(0)
    bundle = make_bundle(_small(name).double().eval(), name, (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    settings = PathwaySettings(k=5, edge_targets=4, edges_per_target=3, edges=mode)
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, settings, bundle_reach(bundle, x))
    before = hook_count(bundle.model)
    got = edges_of(bundle, x, slice(0, 2), settings=settings, contrib=contrib, sel=sel)
    assert hook_count(bundle.model) == before
    want, want_gaps = _reference(bundle, x, settings)
    fast = _as_dict(got)
    assert len(want) >= 10 * len(bundle.sites) // 2 and set(fast) == set(want)
    scale = max(abs(v) for v in want.values())
    assert max(abs(fast[k] - want[k]) for k in want) <= 1e-6 * scale  # the records hold weights as float32
    assert torch.allclose(torch.from_numpy(got.gap).double(), want_gaps, rtol=1e-5, atol=1e-9 * scale,
                          equal_nan=True)
    # the modes differ here: the exact edges are another quantity
    exact = _as_dict(edges_of(bundle, x, slice(0, 2), settings=PathwaySettings(
        k=5, edge_targets=4, edges_per_target=3), contrib=contrib, sel=sel))
    common = set(exact) & set(want)
    assert max(abs(exact[k] - want[k]) for k in common) > 1e-3 * scale


def test_the_linearised_forward_keeps_every_value_and_leaves_nothing_behind() -> None:
    torch.manual_seed(1)
    bundle = make_bundle(_small("vit").double().eval(), "vit", (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    state = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    exact = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    with Linearised(bundle.model, "direct") as lin:
        assert len(lin.handles) == 3 and function_modes_active() == 1  # three attentions; the norms' mode
        direct = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    for j, a in exact.acts.items():
        assert torch.equal(a, direct.acts[j])
    with pytest.raises(RuntimeError, match="boom"), Linearised(bundle.model, "direct"):
        assert hook_count(bundle.model) > 0
        raise RuntimeError("boom")
    assert hook_count(bundle.model) == 0 and function_modes_active() == 0
    assert all(torch.equal(v, state[k]) for k, v in bundle.model.state_dict().items())


def test_the_edge_mode_is_chosen_per_model_and_named_in_the_pathway_id() -> None:
    vit, resnet = _small("vit"), torchvision.models.resnet18(weights=None)
    assert edge_mode("auto", vit) == "direct" and edge_mode("auto", resnet) == "exact"
    for name in ("swin_v2_t", "maxvit_t"):  # their direct edges disagree badly with the exact ones (bench)
        assert edge_mode("auto", torchvision.models.get_model(name, weights=None)) == "pattern"
    assert edge_mode("auto", torchvision.models.swin_t(weights=None)) == "direct"
    assert edge_mode("exact", vit) == "exact"
    with pytest.raises(ExtractionError, match="--edges pattern: the attention module MultiheadAttention"):
        ExtractOptions(edges="pattern").settings(vit)  # before any image is read
    assert edge_mode("pattern", torchvision.models.swin_t(weights=None)) == "pattern"
    with pytest.raises(ExtractionError, match="unknown edge mode"):
        edge_mode("fast", vit)
    with pytest.raises(ExtractionError, match="--edges 'fast'"):
        ExtractOptions(edges="fast")
    # exact pathways keep the ids they had before edge modes; direct ones say so
    assert PathwaySettings().params_json() == json.dumps(
        {"edge_targets": 16, "edges_per_target": 8, "k": 8}, sort_keys=True)
    assert json.loads(PathwaySettings(edges="direct").params_json())["edges"] == "direct"
    assert "edges" not in PathwaySettings(method="pixel", edges="direct").params()
    options = ExtractOptions(methods=("mct", "pixel"))
    assert [s.edges for s in options.settings(vit)] == ["direct", "direct"]
    assert [s.edges for s in options.settings(resnet)] == ["exact", "exact"]
    assert [s.edges for s in ExtractOptions(edges="exact").settings(vit)] == ["exact"]


def test_pattern_edges_refuse_a_fused_attention_and_leave_nothing_behind() -> None:
    """torchvision's ViT attends through ``nn.MultiheadAttention``, whose softmax this mode cannot hold: a clear
    error, and no hook or function mode left; Swin V2's and MaxViT's pattern mode keeps every forward value bit for
    bit."""
    torch.manual_seed(1)
    vit = make_bundle(_small("vit").double().eval(), "vit", (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(ExtractionError, match="MultiheadAttention calls multi_head_attention_forward, a fused"), \
            Linearised(vit.model, "pattern"):
        vit.forward(x)
    assert hook_count(vit.model) == 0 and function_modes_active() == 0
    for name, attentions, gates in (("swin_v2", 4, 0), ("maxvit", 4, 2)):  # MaxViT's MBConvs: squeeze-excite
        net = make_bundle(_small(name).double().eval(), name, (3, 32, 32))
        forward = functools.partial(net.forward, x)
        exact = cut_forward(net.model, net.sites, forward)
        with Linearised(net.model, "pattern") as lin:
            assert len(lin.handles) == 2 * attentions + gates and function_modes_active() == 1  # enter and leave
            held = cut_forward(net.model, net.sites, forward)
        # each attention's query, key and value differentiated apart (extractor.rewrites.LinearPieces)
        assert lin.patterns is not None and lin.patterns.pieces.count == 3 * attentions
        for j, a in exact.acts.items():
            assert torch.equal(a, held.acts[j])
        assert hook_count(net.model) == 0 and function_modes_active() == 0


class _InnerAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qk, self.v = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 4]
        q = self.qk(x)
        return F.softmax(q @ q.transpose(1, 2), dim=-1) @ self.v(x)


class _OuterAttention(nn.Module):
    """A user's attention block holding the attention proper: the softmax is the inner module's call."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = _InnerAttention(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x))


def test_pattern_mode_holds_a_nested_attentions_softmax_for_both() -> None:
    torch.manual_seed(2)
    model = _OuterAttention().double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    with Linearised(model, "pattern"):
        y = model(x)
    (g,) = torch.autograd.grad(y.sum(), [x])
    with torch.no_grad():  # the pattern, by hand
        q = model.inner.qk(x)
        pattern = F.softmax(q @ q.transpose(1, 2), dim=-1)
    (want,) = torch.autograd.grad(model.out(pattern @ model.inner.v(x)).sum(), [x])
    (live,) = torch.autograd.grad(model(x).sum(), [x])
    assert torch.allclose(g, want) and not torch.allclose(g, live, atol=1e-3)
    assert hook_count(model) == 0 and function_modes_active() == 0
    inner = model.inner = _InnerAttention().double()
    setattr(inner, "forward", lambda t: inner.v(t))  # noqa: B010 (an attention that computes no softmax: refused)
    with pytest.raises(ExtractionError, match="_InnerAttention computed no softmax"), Linearised(model, "pattern"):
        model(x)
    assert hook_count(model) == 0 and function_modes_active() == 0
