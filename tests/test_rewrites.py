"""The cut forward's backward rewrites (:mod:`extractor.rewrites`) against autograd's own derivatives, in float64:
the forward's values the same bit for bit, every batched gradient equal, other concatenations left alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer, _patch_merging_pad

from extractor.linear import Linearised
from extractor.models import make_bundle
from extractor.rewrites import Rewrites
from extractor.sitegraph import cut_forward
from extractor.sites import function_modes_active, hook_count


def _columns_first(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 0::2, :], x[..., 1::2, 1::2, :]], -1)


def _batched_grad(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cot: torch.Tensor,
                  rewrite: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    mode = Rewrites()
    if rewrite:
        with mode:
            out = fn(x * 1.0)  # a view's base that requires grad, as in a network
    else:
        out = fn(x * 1.0)
    (grad,) = torch.autograd.grad(out, [x], cot, is_grads_batched=True, retain_graph=True)
    return out, grad, mode.count


@pytest.mark.parametrize(("fn", "shape"), [
    (_patch_merging_pad, (2, 6, 8, 3)),
    (_patch_merging_pad, (1, 3, 4, 5, 2)),  # two batch axes
    (_patch_merging_pad, (2, 5, 7, 4)),  # odd sizes: Swin pads first
    (_columns_first, (2, 6, 8, 3)),
    (_columns_first, (1, 3, 4, 6, 2)),
])
def test_space_to_depth_equals_autograds_slices(fn: Callable[[torch.Tensor], torch.Tensor],
                                                shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out_ref = fn(x * 1.0)
    cot = torch.randn(3, *out_ref.shape, dtype=torch.float64)
    want_out, want, none = _batched_grad(fn, x, cot, rewrite=False)
    got_out, got, count = _batched_grad(fn, x, cot, rewrite=True)
    assert count == 1 and none == 0
    assert torch.equal(got_out, want_out)  # the forward bit for bit
    assert got_out.grad_fn is not None and "SpaceToDepth" in type(got_out.grad_fn).__name__
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # a permutation: the same numbers


@pytest.mark.parametrize("pieces", [
    lambda x: [x[..., 0::2, 0::2, :], x[..., 1::2, 1::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 0::2, :]],  # order
    lambda x: [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 0::2, 0::2, :]],  # twice
    lambda x: [x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :]],  # three
    lambda x: [x[..., :2, :2, :], x[..., 2:, :2, :], x[..., :2, 2:, :], x[..., 2:, 2:, :]],  # blocks, not strides
    lambda x: [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]],  # other dims
])
def test_other_concatenations_are_left_alone(pieces: Callable[[torch.Tensor], list[torch.Tensor]]) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 4, 4, 3, dtype=torch.float64, requires_grad=True)

    def fn(y: torch.Tensor) -> torch.Tensor:
        return torch.cat(pieces(y), -1)

    cot = torch.randn(2, *fn(x).shape, dtype=torch.float64)
    want_out, want, _ = _batched_grad(fn, x, cot, rewrite=False)
    got_out, got, count = _batched_grad(fn, x, cot, rewrite=True)
    assert count == 0
    assert torch.equal(got_out, want_out) and torch.equal(got, want)


def test_the_mode_leaves_on_exceptions() -> None:
    with pytest.raises(RuntimeError, match="inside"), Rewrites():
        assert function_modes_active() == 1
        raise RuntimeError("inside")
    assert function_modes_active() == 0


def test_a_cut_forward_of_swin_differentiates_its_patch_merging_by_the_rewrite() -> None:
    """Torchvision's own Swin: the cut forward's graph holds the rewrite where the patch merging was, and no
    function mode remains."""
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
                            num_classes=7).double().eval()
    bundle = make_bundle(model, "swin-small", (3, 32, 32))
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    cut = cut_forward(bundle.model, bundle.sites, lambda: bundle.forward(x))
    assert function_modes_active() == 0
    names: set[str] = set()
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in cut.acts.values()]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert any("SpaceToDepth" in n for n in names)
    assert not any(n.startswith("SliceBackward") for n in names)  # the four slices' backward is gone


class _ToyAttention(nn.Module):
    """One projection for query, key and value, cut into the three as ``style`` says (torchvision's Swin: reshape,
    permute, index; timm: ``unbind``; MaxViT: ``torch.chunk``; ``split``: uneven sections, the value last)."""

    def __init__(self, style: str, dim: int = 6, heads: int = 2) -> None:
        super().__init__()
        self.style, self.heads = style, heads
        qkv = 2 * dim + (dim + 2 if style == "split" else dim)
        self.qkv, self.proj = nn.Linear(dim, qkv), nn.Linear(qkv - 2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, dim]
        B, T, C = x.shape
        out = self.qkv(x)
        if self.style in ("swin", "timm"):
            out = out.reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = (out[0], out[1], out[2]) if self.style == "swin" else out.unbind(0)
            pattern = F.softmax(q @ k.transpose(-2, -1), dim=-1)
            return self.proj((pattern @ v).transpose(1, 2).reshape(B, T, C))
        q, k, v = torch.chunk(out, 3, dim=-1) if self.style == "maxvit" else out.split([C, C, C + 2], -1)
        return self.proj(F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v)


def _held_by_hand(model: _ToyAttention, x: torch.Tensor) -> torch.Tensor:
    """The toy with its pattern held, written out: the reference for pattern edges through it."""
    B, T, C = x.shape
    out = model.qkv(x)
    if model.style in ("swin", "timm"):
        q, k, v = out.reshape(B, T, 3, model.heads, C // model.heads).permute(2, 0, 3, 1, 4)
        pattern = F.softmax(q @ k.transpose(-2, -1), dim=-1).detach()
        return model.proj((pattern @ v).transpose(1, 2).reshape(B, T, C))
    q, k, v = out.narrow(-1, 0, C), out.narrow(-1, C, C), out.narrow(-1, 2 * C, out.shape[-1] - 2 * C)
    return model.proj(F.softmax(q @ k.transpose(-2, -1), dim=-1).detach() @ v)


@pytest.mark.parametrize("style", ["swin", "timm", "maxvit", "split"])
def test_an_attentions_pieces_are_differentiated_each_as_its_own_layer(style: str) -> None:
    """Pattern mode takes the query, key and value of one projection apart (extractor.rewrites.LinearPieces): the
    same forward bit for bit, and batched gradients equal to those of the pattern held by hand."""
    torch.manual_seed(0)
    model = _ToyAttention(style).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    plain = model(h)
    with Linearised(model, "pattern") as lin:
        held = model(h)
    assert lin.patterns is not None and lin.patterns.pieces.count == 3
    assert torch.equal(held, plain)
    cot = torch.randn(5, *plain.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(held, [x], cot, is_grads_batched=True, retain_graph=True)
    (want,) = torch.autograd.grad(_held_by_hand(model, h), [x], cot, is_grads_batched=True, retain_graph=True)
    (live,) = torch.autograd.grad(plain, [x], cot, is_grads_batched=True, retain_graph=True)
    assert want.abs().max() > 0 and not torch.allclose(want, live, atol=1e-3)  # holding the pattern matters here
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert hook_count(model) == 0 and function_modes_active() == 0


def test_a_projections_other_uses_keep_autograds_backward() -> None:
    """A reshape that is no cut into blocks, the output read whole, a chunk on another dim or into uneven parts, an
    output written in place before it is cut: no piece is taken, and the gradients are autograd's."""
    torch.manual_seed(1)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 6]
            out = self.lin(x)
            merged = out.reshape(-1, 12)  # leading dims merged: not a cut of the rows
            halves = torch.chunk(out, 2, dim=1)  # along the tokens
            scores = F.softmax(out @ out.transpose(1, 2), dim=-1)
            scaled = self.lin(x)
            scaled.mul_(2.0)  # written in place: no longer the layer's output
            return (scores @ out).sum() + merged.pow(2).sum() + halves[0].sum() + self.lin(x).chunk(5, -1)[0].sum() \
                + scaled.chunk(2, -1)[1].sum()

    model = Attention().double()
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    with Linearised(model, "pattern") as lin:
        y = model(x)
    assert lin.patterns is not None and lin.patterns.pieces.count == 0  # 12 rows in 5 chunks: uneven, left alone
    (got,) = torch.autograd.grad(y, [x])
    out = model.lin(x)
    scores = F.softmax(out @ out.transpose(1, 2), dim=-1).detach()
    want = (scores @ out).sum() + out.pow(2).sum() + out[:, :2].sum() + out[..., :3].sum() + 2 * out[..., 6:].sum()
    (ref,) = torch.autograd.grad(want, [x])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
