"""Settings and variants as words: the names the UI and CLI show, and numbers without "-0"."""

from __future__ import annotations

import json

import pytest

from extractor.settings import PathwaySettings
from extractor.variants import KINDS, VariantSpec
from graphstore.names import edges_name, number, setting_name, variant_name


@pytest.mark.parametrize(("settings", "name"), [
    (PathwaySettings(method="intgrad", selection="topk", k=8), "IntGrad · top-8 per site"),
    (PathwaySettings(method="mct", selection="percentile", sparsity=90.0), "MCT · p = 90 (elements)"),
    (PathwaySettings(method="mct", selection="percentile", sparsity=75.5, granularity="channel"),
     "MCT · p = 75.5 (channels)"),
    (PathwaySettings(method="pixel", stride=4, originals_only=True),
     "Pixel pathways · beam 3, 3 chains per pixel, stride 4 · originals only"),
    (PathwaySettings(method="correlation", k=5, resamples=20), "Correlation · top-5 per site · 20 resamples"),
    (PathwaySettings(method="mct", k=4, variant_kinds=("deform", "pgd")),
     "MCT · top-4 per site · originals + deform, PGD"),
    (PathwaySettings(method="mct", k=8, edges="direct"), "MCT · top-8 per site · direct edges"),
    (PathwaySettings(method="mct", k=8, edges="pattern"), "MCT · top-8 per site · pattern edges"),
    (PathwaySettings(method="pixel", edges="direct"), "Pixel pathways · beam 3, 3 chains per pixel, stride 2"),
])
def test_setting_names(settings: PathwaySettings, name: str) -> None:
    assert setting_name(settings.method, settings.selection, settings.params_json()) == name
    edges = edges_name(settings.method, settings.params_json())
    assert edges.startswith("direct edges (" if "direct" in name else "pattern edges (attention patterns"
                            if "pattern" in name else "edges along pixel" if "Pixel" in name else "exact edges")


def test_variant_names_cover_every_default_sweep() -> None:
    names = [variant_name(s.kind, s.params_json()) for k in KINDS for s in VariantSpec.defaults(k)]
    assert names == ["FGSM ε = 0.05", "FGSM ε = 0.1", "FGSM ε = 0.2", "PGD ε = 0.05, 10 steps", "PGD ε = 0.1, 10 steps",
                     "PGD ε = 0.2, 10 steps", "PGD ε = 0.2, 20 steps, targeted", "occlude 37.5 % patch",
                     "shift 4 px down, 4 px right", "deform α = 3, σ = 4", "rotate 15°, scale 0.9"]
    assert not any("{" in n or '"' in n for n in names)
    assert variant_name("original", "") == "original"
    assert variant_name("blur", json.dumps({"radius": 2, "seed": 7})) == "blur radius 2"  # per-image keys dropped


def test_numbers_never_show_minus_zero() -> None:
    assert [number(v) for v in (-0.0, 0.0, -1e-12, 0.12345, -2.5, 3, None, True)] == \
        ["0", "0", "-1e-12", "0.123", "-2.5", "3", "–", "true"]


def test_every_variant_kind_has_defaults_a_name_and_a_maker() -> None:
    """The kind registry (records.variants) and the makers (extractor.variants.APPLY) name the same kinds;
    each kind's default sweep parses, reads as words of its own and makes images of the originals' shape."""
    import torch

    from extractor.variants import APPLY, KINDS, VariantSpec, make_variant
    from records.variants import VARIANT_KINDS

    assert set(APPLY) == set(VARIANT_KINDS) == set(KINDS) and len(KINDS) == 6
    x = torch.rand(2, 1, 32, 32)
    forward = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3))
    names = set()
    for kind in KINDS:
        specs = VariantSpec.parse(kind)
        assert specs == VariantSpec.defaults(kind) and len(specs) == len(VARIANT_KINDS[kind].defaults)
        for spec in specs:
            names.add(variant_name(kind, spec.params))
            v = make_variant(spec, forward, x, labels=torch.tensor([0, 2]), num_classes=3, seeds=[1, 2])
            assert v.kind == kind and v.x.shape == x.shape and len(v.params) == 2
    assert len(names) == sum(len(k.defaults) for k in VARIANT_KINDS.values())  # every default reads differently
