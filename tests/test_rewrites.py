"""The cut forward's backward rewrites (:mod:`extractor.rewrites`) against autograd's own derivatives, in float64:
the forward's values the same bit for bit, every batched gradient equal, other concatenations left alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torchvision.models.swin_transformer import SwinTransformer, _patch_merging_pad

from extractor.models import make_bundle
from extractor.rewrites import Rewrites
from extractor.sitegraph import cut_forward
from extractor.sites import function_modes_active


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
    (grad,) = torch.autograd.grad(out, [x], cot, is_grads_batched=True)
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
