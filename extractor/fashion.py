"""The demo's trained CNN: a VGG-style chain trained on Fashion-MNIST's 60,000 images, weights committed.

Lyu et al.'s pixel pathways need a chain of conv -> ReLU -> max-pool blocks, so the demo's own network
is one (:class:`extractor.demo.DemoCNN` at 28 px: five ReLU sites). It is trained here,
deterministically (fixed seed, one thread, fixed order), by :func:`train_fashion_cnn`
(``pathx train-demo``); the result is committed as ``extractor/weights/fashion-cnn.pt`` with its
sha256 in :data:`extractor.trained.TRAINED`, so every machine gets the same model id and report.
Retraining reproduces the accuracy within a point (``make bench`` checks it); the bytes may differ
across CPUs and library versions, which is why the weights are committed rather than retrained.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from extractor.demo import DemoCNN, TrainSettings

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fashion-cnn.pt"
SIZE = 28


# How the committed weights were trained: the small CNN's recipe, two epochs over 60,000 images.
RECIPE = TrainSettings(epochs=2)


def fashion_cnn(recipe: TrainSettings = RECIPE) -> DemoCNN:
    """The architecture, random weights (seeded)."""
    torch.manual_seed(recipe.seed)
    return DemoCNN(recipe.width, recipe.hidden, 10, size=SIZE)


def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``train`` or ``test`` as ``x`` ``[N, 1, 28, 28]`` float32 in ``[0, 1]`` and ``y`` ``[N]``."""
    from extractor.datasets import fashion_mnist_arrays

    pixels, labels = fashion_mnist_arrays(name)
    return torch.from_numpy(pixels.astype("float32") / 255.0)[:, None], torch.from_numpy(labels.astype("int64"))


def train_fashion_cnn(recipe: TrainSettings = RECIPE) -> DemoCNN:
    """Train on all 60,000 training images: Adam, fixed seed and order, one thread (deterministic)."""
    x, y = split("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = fashion_cnn(recipe)
        gen = torch.Generator().manual_seed(recipe.seed)
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        for epoch in range(recipe.epochs):
            model.train()
            began, total = time.perf_counter(), 0.0
            for batch in torch.randperm(len(y), generator=gen).split(recipe.batch_size):
                opt.zero_grad()
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
            log.info("fashion-cnn epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, recipe.epochs, total / len(y),
                     time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
