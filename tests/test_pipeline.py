"""Extraction runs: records round trip, resume, variants, demo model, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from extractor.demo import accuracy, demo_model
from extractor.errors import ExtractionError
from extractor.pipeline import extract_run, load_images
from extractor.settings import PathwaySettings
from extractor.variants import VariantSpec, affine, fgsm, pgd, shift
from records import (
    SCHEMA_VERSION,
    RecordsFormatError,
    iter_parts,
    pathway_to_networkx,
    read_manifest,
    read_run,
)


def test_demo_model_accuracy_and_determinism(home: Path, demo: tuple) -> None:
    model, data, path = demo_model(home)
    assert accuracy(model, data.x_test, data.y_test) >= 0.95
    assert path.name.startswith("demo-cnn-")
    bundle, _ = demo
    assert bundle.info.model_id.startswith("demo-cnn-")
    assert [s.site_id for s in bundle.sites] == ["features.1#0", "features.3#0", "features.6#0", "features.8#0",
                                                 "classifier.2#0"]


def test_attacks_reduce_accuracy(demo: tuple) -> None:
    bundle, data = demo
    x, y = data.x_test[:120], data.y_test[:120]
    clean = accuracy(bundle.model, x, y)
    weak = accuracy(bundle.model, fgsm(bundle.forward, x, y, 0.05), y)
    strong = accuracy(bundle.model, fgsm(bundle.forward, x, y, 0.2), y)
    pgd_acc = accuracy(bundle.model, pgd(forward=bundle.forward, x=x, y=y, eps=0.1, steps=10), y)
    assert clean > weak > strong and pgd_acc < 0.5 and strong < 0.3
    target = (y + 1) % 10
    adv = pgd(forward=bundle.forward, x=x, y=target, eps=0.2, steps=20, targeted=True)
    with torch.no_grad():
        hit = float((bundle.forward(adv).argmax(1) == target).float().mean())
    assert hit > 0.8
    assert float((adv - x).abs().max()) <= 0.2 + 1e-6


def test_transforms() -> None:
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 1, 1] = 1.0
    assert shift(x, 2, 3)[0, 0, 3, 4] == 1.0
    specs = VariantSpec.parse("occlude:frac=0.5,deform,shift:dy=-1:dx=1,affine:rotate=90:scale=1")
    assert [s.kind for s in specs] == ["occlude", "deform", "shift", "affine"]
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 4, 6] = 1.0  # right of centre; rotated by 90 degrees it lands above or below the centre
    rot = affine(img, 90.0, 1.0)
    assert rot[0, 0, 4, 6] < 0.5 and max(float(rot[0, 0, 2, 4]), float(rot[0, 0, 6, 4])) > 0.5
    assert specs[0].params["frac"] == 0.5
    with pytest.raises(ExtractionError, match="unknown variant"):
        VariantSpec.parse("blur")
    with pytest.raises(ExtractionError, match="name=value"):
        VariantSpec.parse("fgsm:eps")


def test_extract_records_round_trip_and_resume(demo: tuple, home: Path, tmp_path: Path) -> None:
    bundle, _ = demo
    images = load_images("demo:test", bundle, home)
    out = tmp_path / "run"
    specs = VariantSpec.parse("fgsm:eps=0.1,occlude,deform")
    settings = [PathwaySettings(k=4)]
    first = extract_run(bundle, images, settings, specs, out, batch_size=4, limit=8, progress=False)
    assert first.images == 32 and first.pathways == 32 and first.skipped_originals == 0
    manifest, imgs, pws = read_run(out)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.model.model_id == bundle.info.model_id
    kinds = sorted({i.kind for i in imgs})
    assert kinds == ["deform", "fgsm", "occlude", "original"]
    originals = {i.image_id for i in imgs if i.kind == "original"}
    assert all(i.variant_of in originals for i in imgs if i.kind != "original")
    pw = pws[0]
    g = pathway_to_networkx(pw, manifest.model)
    assert g.number_of_nodes() == 4 * len(bundle.sites) and g.number_of_edges() == len(pw.edge_weight)
    assert sorted(pw.neuron_rank.tolist()) == list(range(1, len(pw.neuron_rank) + 1))
    # interrupted after two parts: resume skips them and finishes the rest
    parts = sorted(out.glob("part-*"))
    for p in parts[1:]:
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    again = extract_run(bundle, images, settings, specs, out, batch_size=4, limit=8, progress=False)
    assert again.skipped_originals == 4 and again.images == 16
    assert len(read_run(out)[1]) == 32
    with pytest.raises(RecordsFormatError, match="other settings"):
        extract_run(bundle, images, [PathwaySettings(k=5)], specs, out, limit=8, progress=False)


def test_incompatible_record_version(tmp_path: Path, demo: tuple, home: Path) -> None:
    bundle, _ = demo
    out = tmp_path / "run"
    extract_run(bundle, load_images("demo:test", bundle, home), [PathwaySettings(k=2)], [], out, limit=2,
                progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecordsFormatError, match="schema version 999"):
        read_manifest(out)
    with pytest.raises(RecordsFormatError, match="not a run folder"):
        list(iter_parts(tmp_path))


def test_settings_limited_to_some_variant_kinds(demo: tuple, home: Path, tmp_path: Path) -> None:
    bundle, _ = demo
    images = load_images("demo:test", bundle, home)
    settings = [PathwaySettings(k=4), PathwaySettings(k=3, variant_kinds=("occlude",)),
                PathwaySettings(k=2, originals_only=True)]
    extract_run(bundle, images, settings, VariantSpec.parse("fgsm:eps=0.1,occlude"), tmp_path / "run", limit=3,
                progress=False)
    _, imgs, pws = read_run(tmp_path / "run")
    kind = {i.image_id: i.kind for i in imgs}
    by_config: dict[str, set[str]] = {}
    for p in pws:
        by_config.setdefault(p.config, set()).add(kind[p.image_id])
    assert sorted(map(sorted, by_config.values())) == [["fgsm", "occlude", "original"], ["occlude", "original"],
                                                       ["original"]]
    assert {len(s) for s in by_config.values()} == {1, 2, 3} and len(by_config) == 3
