"""The demo: scikit-learn's shipped handwritten digits and a small VGG-style CNN trained here.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships 1,797 8x8 digits, upscaled
here to 32x32 in ``[0, 1]``; the split is stratified with a fixed seed (1,437 train / 360
test). The model trains deterministically (fixed seed, one thread) in well under a minute
on 2 CPU cores and is cached by a hash of its code settings and data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractor.errors import ExtractionError
from extractor.models import ModelBundle, make_bundle

log = logging.getLogger(__name__)

DIGIT_NAMES = tuple(f"digit {i}" for i in range(10))
SIZE = 32


class DemoCNN(nn.Module):
    """VGG-style: two conv blocks (conv-ReLU-conv-ReLU-maxpool), then two linear layers.

    Input ``[B, 1, size, size]`` (``size`` divisible by 4); output logits ``[B, 10]``. Sites: five ReLUs.
    """

    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10, size: int = SIZE) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * (size // 4) ** 2, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


@dataclass(kw_only=True, frozen=True)
class DemoData:
    """Images ``[N, 1, 32, 32]`` float32 in ``[0, 1]`` and labels ``[N]`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data() -> DemoData:
    """Deterministic split of scikit-learn's digits, upscaled to 32x32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=digits.target)
    tr, te = np.sort(tr), np.sort(te)
    return DemoData(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])


@dataclass(kw_only=True, frozen=True)
class TrainSettings:
    """Training recipe of the demo model (part of its cache key)."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    width: int = 16
    hidden: int = 64


def _cache_key(settings: TrainSettings, data: DemoData) -> str:
    digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    digest.update(data.x_train.numpy().tobytes())
    digest.update(data.y_train.numpy().tobytes())
    return digest.hexdigest()[:16]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    """Share of ``x`` ``[N, C, H, W]`` classified as ``y`` ``[N]`` (in batches of ``batch``)."""
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return right / len(y)


def train_demo_model(settings: TrainSettings, data: DemoData) -> DemoCNN:
    """Train deterministically: fixed seed, one thread, deterministic algorithms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(settings.seed)
    try:
        torch.manual_seed(settings.seed)
        model = DemoCNN(settings.width, settings.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
        n = len(data.y_train)
        for epoch in range(settings.epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, settings.batch_size):
                batch = perm[start:start + settings.batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
            log.info("demo epoch %d/%d loss %.4f", epoch + 1, settings.epochs, total / n)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


def demo_model(home: Path, settings: TrainSettings | None = None) -> tuple[DemoCNN, DemoData, Path]:
    """The trained demo model from the cache under ``home``, training it first if needed."""
    settings = settings or TrainSettings()
    data = load_digits_data()
    path = Path(home) / "models" / f"demo-cnn-{_cache_key(settings, data)}.pt"
    model = DemoCNN(settings.width, settings.hidden)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        model = train_demo_model(settings, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        log.info("demo model trained: test accuracy %.3f, cached at %s",
                 accuracy(model, data.x_test, data.y_test), path)
    model.eval()
    return model, data, path


def demo_bundle(home: Path) -> tuple[ModelBundle, DemoData]:
    """The demo model as a ``ModelBundle`` (inputs in ``[0, 1]``, no normalisation)."""
    model, data, _ = demo_model(home)
    return make_bundle(model=model, arch="demo-cnn", input_shape=(1, SIZE, SIZE), class_names=DIGIT_NAMES,
                       title="Digits CNN (scikit-learn digits)"), data


def demo_split(data: DemoData, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[N, 1, 32, 32]`` and ``y`` ``[N]`` of ``train`` or ``test``."""
    if split == "train":
        return data.x_train, data.y_train
    if split == "test":
        return data.x_test, data.y_test
    raise ExtractionError(f"unknown demo split {split!r}; use demo:train or demo:test")
