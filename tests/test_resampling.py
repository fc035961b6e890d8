"""Resampling selection (Lengerich et al. 2017) against a slow numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extractor.batch import BatchInputs
from extractor.contributions import forward_with_sites
from extractor.errors import ExtractionError
from extractor.methods import extract_batch
from extractor.reach import top_k_mask
from extractor.resampling import perturbed_copies, resampling_scores, set_overlap
from extractor.settings import PathwaySettings


def test_copies_grow_noise_linearly() -> None:
    x = torch.full((1, 1, 40, 40), 0.5, dtype=torch.float64)
    c = perturbed_copies(x, 50, 0.1, [7])[0]
    assert torch.equal(c[0], x[0])
    rel = (c / x[0] - 1).flatten(1).std(1)
    assert rel[10].item() == pytest.approx(1.0, rel=0.1)  # p * sigma = 10 * 0.1
    assert rel[40].item() == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize("chunk", [1 << 25, 3000])  # all copies in one chunk, or a few copies per chunk
def test_scores_equal_slow_reference(demo: tuple, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extractor.resampling.CHUNK_ELEMENTS", chunk)
    bundle, data = demo
    x = data.x_test[:2]
    target = torch.tensor([int(data.y_test[0]), int(data.y_test[1])])
    n, sigma, seeds = 12, 0.1, [3, 4]
    got = resampling_scores(bundle, x, target=target, seeds=seeds, n=n, sigma=sigma)
    copies = perturbed_copies(x, n, sigma, seeds)
    for b in range(2):
        with torch.no_grad():
            logits, acts = forward_with_sites(bundle, copies[b])
        y = logits.softmax(1)[:, target[b]].numpy().astype(np.float64)
        for site in bundle.sites:
            a = acts[site.index].detach().numpy().astype(np.float64).reshape(n, site.channels, -1)
            for c in range(0, site.channels, 5):
                rs = []
                for q in range(a.shape[2]):
                    col = a[:, c, q]
                    # a position that does not vary is left out; "does not vary" allows float32 noise (a
                    # relative std below 1e-5), which other CPUs' kernels leave on constant activations
                    if col.var() > max(1e-10 * col[0] ** 2, 1e-30):
                        rs.append(abs(np.corrcoef(col, y)[0, 1]))
                corr = float(np.mean(rs)) if rs else 0.0
                assert got.correlation[site.index][b, c].item() == pytest.approx(corr, rel=1e-3, abs=1e-5)
                if a[:, c].mean() < 0.1:
                    assert got.precision[site.index][b, c].item() == float("-inf")
                else:
                    prec = 1.0 / a[:, c].var(axis=0).mean()
                    assert got.precision[site.index][b, c].item() == pytest.approx(prec, rel=1e-3)


def test_overlap_measure_on_hand_sets() -> None:
    a = [torch.tensor([[True, True, False, False]]), torch.tensor([[True, False]])]
    b = [torch.tensor([[True, False, True, False]]), torch.tensor([[True, False]])]
    paper, jac = set_overlap(a, b)
    assert paper.item() == pytest.approx(2 / 6) and jac.item() == pytest.approx(2 / 4)
    same, _ = set_overlap(a, a)
    assert same.item() == pytest.approx(0.5)
    assert top_k_mask(torch.tensor([[1.0, float("-inf"), 3.0]]), 2).tolist() == [[True, False, True]]
    assert top_k_mask(torch.tensor([[1.0, float("-inf"), 3.0]]), 9).tolist() == [[True, False, True]]


def test_resampling_pathways(demo: tuple) -> None:
    bundle, data = demo
    x = data.x_test[:3]
    res = extract_batch(bundle, x, PathwaySettings(method="correlation", k=5, resamples=20),
                        BatchInputs(seeds=[1, 2, 3]))
    for kept in res.sel.kept:
        assert (kept.sum(1) <= 5).all() and (kept.sum(1) >= 1).all()
    overlap = res.extra[0]["corr_prec_overlap"]
    assert isinstance(overlap, float) and 0.0 <= overlap <= 0.5
    with pytest.raises(ExtractionError, match="top-k"):
        PathwaySettings(method="precision", selection="percentile")
