"""Models as the extractor sees them: the module, its input normalisation, classes and sites.

``ModelBundle`` takes images in pixel space ``[B, C, H, W]`` with values in ``[0, 1]``;
normalisation happens inside ``bundle.forward`` so attacks, occlusion and saliency all
live in pixel space. Models load by torchvision name with weights from a local file or the
local torch cache; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from extractor.errors import ExtractionError
from extractor.records import ModelInfo, SiteInfo
from extractor.sites import discover_sites

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weights_hash(model: nn.Module) -> str:
    """Short sha256 over the model's parameters and buffers, in ``state_dict`` order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


@dataclass
class ModelBundle:
    """A classifier with what extraction needs; ``info.sites`` are in call order."""

    model: nn.Module
    info: ModelInfo
    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]

    @property
    def sites(self) -> tuple[SiteInfo, ...]:
        return self.info.sites

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-space ``[B, C, H, W]`` in ``[0, 1]`` -> model input."""
        shape = (1, -1, 1, 1)
        return (x - self.mean.to(x).view(shape)) / self.std.to(x).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` for pixel-space images ``[B, C, H, W]``."""
        return self.model(self.normalize(x))

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ExtractionError`` for images the model cannot take."""
        expected = tuple(self.info.input_shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ExtractionError(
                f"images have shape {tuple(x.shape[1:])} but the model takes {expected} (channels, height, width)"
            )
        if x.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(x)):
            raise ExtractionError("images contain NaN or Inf values")


def make_bundle(
    model: nn.Module,
    arch: str,
    input_shape: Sequence[int],
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    site_modules: Sequence[str] | None = None,
) -> ModelBundle:
    """Wrap a user's ``nn.Module`` classifier: checks its output, finds sites, computes its id.

    The model is put in eval mode (its training flag is the only state we set; records
    describe eval-mode behaviour). Its parameters are not touched.
    """
    model.eval()
    channels = int(input_shape[0])
    mean_t = torch.tensor(mean if mean is not None else [0.0] * channels, dtype=torch.float32)
    std_t = torch.tensor(std if std is not None else [1.0] * channels, dtype=torch.float32)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    example = torch.zeros((1, *input_shape), dtype=dtype)
    with torch.no_grad():
        try:
            out = model((example - mean_t.to(example).view(1, -1, 1, 1)) / std_t.to(example).view(1, -1, 1, 1))
        except Exception as exc:
            raise ExtractionError(
                f"the model fails on input of shape {tuple(input_shape)}: {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExtractionError(f"the model's output must be class scores [batch, classes]; got {shape}")
    num_classes = int(out.shape[1])
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    if len(names) != num_classes:
        raise ExtractionError(f"{len(names)} class names given for a model with {num_classes} outputs")
    sites = discover_sites(model, example, site_modules)
    info = ModelInfo(
        model_id=f"{arch}-{weights_hash(model)}", arch=arch, num_classes=num_classes, class_names=names,
        input_shape=tuple(int(v) for v in input_shape), sites=sites,
    )
    return ModelBundle(model=model, info=info, mean=mean_t, std=std_t)


def load_torchvision(
    name: str,
    weights_file: Path | None = None,
    untrained: bool = False,
    input_size: int = 224,
    site_modules: Sequence[str] | None = None,
) -> ModelBundle:
    """A torchvision classifier by name, with weights from a local file or the torch cache.

    ``untrained=True`` gives random weights (structure, speed measurements). Without a
    weights file the default weights must already sit in ``torch.hub``'s checkpoint folder;
    nothing is ever downloaded.
    """
    import torchvision

    available = set(torchvision.models.list_models(module=torchvision.models))
    if name not in available:
        raise ExtractionError(
            f"unknown model {name!r}; torchvision classifiers: {', '.join(sorted(available)[:8])}, ..."
        )
    model = torchvision.models.get_model(name, weights=None)
    class_names: Sequence[str] | None = None
    if weights_file is not None:
        path = Path(weights_file)
        if not path.is_file():
            raise ExtractionError(f"weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except Exception as exc:
            raise ExtractionError(f"cannot load weights from {path} into {name}: {exc}") from exc
    elif not untrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        filename = Path(weights.url).name
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file():
            raise ExtractionError(
                f"weights for {name} are not in the local torch cache ({cached}); copy {filename} there from a "
                "machine with network access, pass --weights-file PATH, or use --untrained"
            )
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
        class_names = weights.meta.get("categories")
    return make_bundle(model, name, (3, input_size, input_size), class_names, IMAGENET_MEAN, IMAGENET_STD,
                       site_modules)
