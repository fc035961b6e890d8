"""Trained models that ship offline, and the demo that runs them.

EfficientNet-Lite0's packaged ImageNet weights with its preprocessing and class order (checked
together by its accuracy on foolbox's 20 labelled photos), the committed Fashion-MNIST CNN (its
hash and its accuracy on all 10,000 test images), the named image sources, and `pathx demo` as a
smoke run at a small size against the test run's Neo4j.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

from extractor.errors import ExtractionError
from extractor.launch import model_from_spec
from extractor.pipeline import load_images
from extractor.trained import TRAINED

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

FASHION_ACCURACY = 0.8945  # committed weights on the 10,000 test images (README); to 1 image in 1,000


@pytest.mark.slow
def test_efficientnet_lite0_is_imagenet_trained_offline(home: Path) -> None:
    bundle = model_from_spec("efficientnet_lite0", home)
    assert bundle.info.num_classes == 1000 and bundle.info.class_names[243] == "bull mastiff"
    assert bundle.info.title == "EfficientNet-Lite0 (ImageNet)" and len(bundle.sites) == 33
    src = load_images("samples:imagenet", bundle)
    labelled = [i for i in range(len(src)) if src.label(i) >= 0]
    assert len(src) == 28 and len(labelled) == 20
    x = torch.stack([src.load(i) for i in labelled])
    with torch.no_grad():
        pred = bundle.forward(x).argmax(1)
    right = int((pred == torch.tensor([src.label(i) for i in labelled])).sum())
    assert right >= 15, f"{right} of 20"  # weights, preprocessing and class order together (17 measured)


def test_the_committed_fashion_cnn() -> None:
    from extractor.demo import accuracy
    from extractor.fashion import WEIGHTS, file_sha256, split
    from extractor.trained import load_trained

    source = TRAINED["fashion_cnn"]
    assert file_sha256(WEIGHTS) == source.sha256
    model = load_trained(source)
    x, y = split("test")
    assert x.shape == (10_000, 1, 28, 28)
    assert abs(accuracy(model, x, y) - FASHION_ACCURACY) <= 0.001


def test_altered_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    altered = dataclasses.replace(TRAINED["fashion_cnn"], sha256="0" * 64)
    with pytest.raises(ExtractionError, match="not the committed fashion_cnn weights"):
        altered.weights_path()


def test_named_sources_carry_labels_and_names(home: Path) -> None:
    fashion = model_from_spec("fashion_cnn", home)
    test = load_images("fashion-mnist:test", fashion)
    names = test.label_names()
    assert len(test) == 10_000 and names is not None and names[9] == "Ankle boot"
    assert tuple(test.load(0).shape) == (1, 28, 28) and test.source(3) == "fashion-mnist:test/3"
    assert len(load_images("fashion-mnist:train", fashion)) == 60_000
    digits = load_images("mnist:5k", fashion)
    assert len(digits) == 5_000 and 0 <= digits.label(0) <= 9
    cifar = load_images("samples:cifar10", fashion)
    assert len(cifar) == 20 and tuple(cifar.load(0).shape) == (1, 28, 28)  # RGB fitted to a grey model
    with pytest.raises(ExtractionError, match="named sources: demo:test"):
        load_images("samples:nothing", fashion)


def test_a_missing_data_package_is_one_line(monkeypatch: pytest.MonkeyPatch, home: Path, tmp_path: Path) -> None:
    from extractor import datasets

    fashion = model_from_spec("fashion_cnn", home)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(ExtractionError, match=r"^fashion-mnist needs Debian's dataset-fashion-mnist: apt-get install"):
        load_images("fashion-mnist:test", fashion)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "foolbox" else real(name))
    with pytest.raises(ExtractionError, match=r"pip install foolbox"):
        load_images("samples:imagenet", fashion)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.store
@pytest.mark.slow
def test_demo_smoke_run(empty_store: Driver, neo4j_server: ServerConfig, tmp_path: Path) -> None:
    """`pathx demo` at a small size: both trained models extract and load into one store."""
    from graphstore.server import USER, read_password

    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server))
    pathx = str(Path(sys.executable).parent / "pathx")
    res = subprocess.run([pathx, "demo", "--limit", "4", "--photos", "2", "--no-serve", "--no-percentile", "--out",
                          str(tmp_path / "d")],
                         capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "set-up done in" in res.stdout and "[fashion]" in res.stdout and "[photos]" in res.stdout
    with empty_store.session(database="neo4j") as s:
        titles = sorted(r["t"] for r in s.run("MATCH (m:Model) RETURN m.title AS t"))
        assert titles == ["EfficientNet-Lite0 (ImageNet)", "Fashion CNN (Fashion-MNIST)"]
        kinds = {r["k"] for r in s.run("MATCH (i:Image) RETURN DISTINCT i.kind AS k")}
        assert {"original", "fgsm", "pgd", "occlude", "shift", "deform", "affine"} <= kinds
        names = {r["n"] for r in s.run("MATCH (:Image {kind: 'original'})-[:LABELED_AS]->(c:Class) "
                                       "RETURN c.name AS n")}
        assert "bull mastiff" in names and names & {"Ankle boot", "Pullover", "Trouser", "Shirt"}


class _PerCall(nn.Module):
    """A reused activation module split into one module per call (reset before every forward), so
    Captum can hook each call of EfficientNet-Lite0's shared ``_swish`` on its own."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = nn.ModuleList(nn.ReLU6() for _ in range(calls))
        self.n = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.calls[self.n](x)
        self.n += 1
        return out


@pytest.mark.slow
def test_efficientnet_lite0_contributions_equal_captum(home: Path) -> None:
    """Float64, one photo: contributions equal Captum's LayerGradientXActivation on that call, at every
    third site (both calls of the shared activation modules among them)."""
    import copy

    from captum.attr import LayerGradientXActivation

    from extractor.contributions import mct_contributions

    bundle = model_from_spec("efficientnet_lite0", home)
    bundle.model.double()
    try:
        x = load_images("samples:imagenet", bundle).load(0)[None].double()
        contrib = mct_contributions(bundle, x)
        twin = copy.deepcopy(bundle.model)
        calls: dict[str, int] = {}
        for s in bundle.sites:
            calls[s.module_path] = max(calls.get(s.module_path, 0), s.call_index + 1)
        split = {}
        for path, n in calls.items():
            parent, _, leaf = path.rpartition(".")
            owner = twin.get_submodule(parent) if parent else twin
            split[path] = _PerCall(n)
            setattr(owner, leaf, split[path])

        def forward(inp: torch.Tensor) -> torch.Tensor:
            for m in split.values():
                m.n = 0
            return twin(bundle.normalize(inp))

        checked = 0
        for site in bundle.sites[::3]:
            layer = split[site.module_path].calls[site.call_index]
            ref = LayerGradientXActivation(forward, layer).attribute(x, target=contrib.target)
            assert torch.allclose(ref, contrib.element[site.index], atol=1e-9, rtol=1e-6), site.site_id
            checked += 1
        assert checked == 11
    finally:
        bundle.model.float()
