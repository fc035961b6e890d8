"""The record contract: ids made and parsed in one place, the sweep stored in the record,
per-layer overlap against a brute-force count."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from records import (
    ImageRecord,
    class_id,
    jaccard,
    layer_overlaps,
    neuron_id,
    parse_class_id,
    parse_neuron_id,
    variant_sweep,
)
from records.overlap import jaccard_per_layer


@pytest.mark.parametrize(("model", "site", "channel"), [
    ("demo-1a2b3c4d", "features.1#0", 7), ("resnet50-untrained", "layer1.0.relu#2", 0),
    ("googlenet", "inception3a.branch2.1.relu()#0", 63),
])
def test_neuron_ids_parse_back(model: str, site: str, channel: int) -> None:
    ref = parse_neuron_id(neuron_id(model, site, channel))
    assert (ref.model_id, ref.site_id, ref.channel) == (model, site, channel)
    assert ref.layer_id == f"{model}/{site}"
    assert parse_class_id(class_id(model, 12)) == (model, 12)


@pytest.mark.parametrize("text", ["demo/7", "demo/features.1/7", "features.1#0/7", "demo/features.1#0/x", ""])
def test_text_that_is_no_neuron_id_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a neuron id"):
        parse_neuron_id(text)


def test_the_sweep_setting_is_computed_once_when_the_record_is_made() -> None:
    def image(kind: str, params: dict[str, object]) -> ImageRecord:
        return ImageRecord(
            image_id="i",
            model_id="m",
            source="s",
            label=1,
            variant_of=None if kind == "original" else "o",
            kind=kind,
            params=json.dumps(params),
            predicted=1,
            probs=np.zeros(2, np.float32),
            logits=np.zeros(2, np.float32),
            png=b"",
        )

    a = image("pgd", {"eps": 0.1, "steps": 10, "targeted": True, "target": 3})
    b = image("pgd", {"eps": 0.1, "steps": 10, "targeted": True, "target": 5})
    c = image("pgd", {"eps": 0.2, "steps": 10, "targeted": True, "target": 3})
    assert a.sweep == b.sweep == json.dumps({"eps": 0.1, "steps": 10, "targeted": True}, sort_keys=True)
    assert c.sweep != a.sweep
    assert image("occlude", {"frac": 0.25, "top": 3, "left": 9}).sweep == '{"frac": 0.25}'
    assert image("original", {}).sweep == "" == variant_sweep("original", "{}")


def test_layer_overlaps_equal_a_brute_force_count() -> None:
    rng = np.random.default_rng(0)
    layers = {i: (f"site{i}#0", i // 2) for i in range(5)}
    for _ in range(20):
        a = {f"n{k}": int(rng.integers(0, 5)) for k in rng.choice(40, 15, replace=False)}
        b = {f"n{k}": a.get(f"n{k}", int(rng.integers(0, 5))) for k in rng.choice(40, 12, replace=False)}
        got = layer_overlaps(a, b, layers)
        assert [o.layer_index for o in got] == list(range(5)) and sum(o.a for o in got) == len(a)
        for o in got:
            sa = {n for n, li in a.items() if li == o.layer_index}
            sb = {n for n, li in b.items() if li == o.layer_index}
            assert (o.a, o.b, o.shared) == (len(sa), len(sb), len(sa & sb))
            assert o.jaccard == jaccard(sa, sb) and o.depth == o.layer_index // 2
    sites_a, ch_a = np.array([0, 0, 1, 2]), np.array([1, 2, 0, 5])
    sites_b, ch_b = np.array([0, 1, 1]), np.array([2, 0, 3])
    np.testing.assert_allclose(jaccard_per_layer(sites_a, ch_a, sites_b, ch_b, 4), [0.5, 0.5, 0.0, 1.0])
    for _ in range(50):  # the vectorised form against the set definition, repeats included
        na, nb = rng.integers(0, 25, 2)
        sa, sb, ca, cb = rng.integers(0, 4, na), rng.integers(0, 4, nb), rng.integers(0, 5, na), rng.integers(0, 5, nb)
        want = [jaccard(set(ca[sa == li].tolist()), set(cb[sb == li].tolist())) for li in range(4)]
        np.testing.assert_allclose(jaccard_per_layer(sa, ca, sb, cb, 4), want)
    pairs = itertools.permutations([[1], [1, 2], []], 2)
    assert all(jaccard(set(x), set(y)) == jaccard(set(y), set(x)) for x, y in pairs)
