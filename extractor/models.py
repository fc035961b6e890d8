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
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from extractor.errors import ExtractionError
from extractor.mixing import RouteCache
from extractor.sitegraph import discover_sites
from records import ModelInfo, SiteInfo

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


@dataclass(kw_only=True)
class ModelBundle:
    """A classifier with what extraction needs; ``info.sites`` are in call order."""

    model: nn.Module
    info: ModelInfo
    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]
    routes: RouteCache = field(default_factory=RouteCache)  # each site-graph edge's route, found once per shape
    # sites whose output the network writes into in place after the call (a skip added into a block's last
    # activation): found by the first forward that meets one, and read through a copy from then on
    written: set[int] = field(default_factory=set)
    # how many times the sites' segments meet a mixing layer, over the distinct ones (1.0: they share none), which
    # decides whether one cut forward serves the contributions as well as the edges
    # (:func:`extractor.batch.one_forward`): measured on the first batch, from its graph
    segment_overlap: float | None = None

    @property
    def sites(self) -> tuple[SiteInfo, ...]:
        return self.info.sites

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel-space ``[B, C, H, W]`` in ``[0, 1]`` -> model input."""
        shape = (1, -1, 1, 1)
        return (x - self.mean.to(x).view(shape)) / self.std.to(x).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` for pixel-space images ``[B, C, H, W]``."""
        logits: torch.Tensor = self.model(self.normalize(x))
        return logits

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
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    site_modules: Sequence[str] | None = None,
    title: str | None = None,
) -> ModelBundle:
    """Wrap a user's ``nn.Module`` classifier: checks its output, finds sites, computes its id.
    ``title`` is how pages name it (default: ``arch``).

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
        input_shape=tuple(int(v) for v in input_shape), sites=sites, title=title or arch,
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
    kwargs: dict[str, object] = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = input_size  # position embeddings are built for one input size
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # the original initialisation, without torchvision's warning
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if untrained and weights_file is None:
        _no_zero_layers(model)
    if weights_file is not None:
        load_weights(model, Path(weights_file), name)
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
    class_names = _bundled_categories(name, model)
    title = f"{name} (untrained)" if untrained and weights_file is None else \
        f"{name} (ImageNet)" if weights_file is None else name
    return make_bundle(
        model=model,
        arch=name,
        input_shape=(3, input_size, input_size),
        class_names=class_names,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        site_modules=site_modules,
        title=title,
    )


def _no_zero_layers(model: nn.Module) -> None:
    """Untrained models only: give linear layers that torchvision initialises to zero (ViT's head)
    small random weights (seeded), so contributions and pathways are not identically zero."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.02)
                log.info("untrained %s: a zero-initialised linear layer got random weights", type(model).__name__)


def _bundled_categories(name: str, model: nn.Module) -> tuple[str, ...] | None:
    """The category names torchvision ships in its code for ``name``'s weights (no download),
    when the model's head has that many outputs."""
    import torchvision

    try:
        categories = torchvision.models.get_model_weights(name).DEFAULT.meta.get("categories")
    except (ValueError, KeyError, AttributeError):
        return None
    heads = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]  # SqueezeNet's conv head
    if categories and len(categories) in heads[-1:] + convs[-1:]:
        return tuple(categories)
    return None


def load_weights(model: nn.Module, path: Path, what: str) -> None:
    """Load a ``state_dict`` (or a checkpoint holding one under ``state_dict``) into ``model``."""
    if not path.is_file():
        raise ExtractionError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractionError(f"cannot load weights from {path} into {what}: {first}") from exc


@dataclass(kw_only=True, frozen=True)
class ModelOptions:
    """What a user's model needs besides its module; ``None`` = take it from the module's own
    attributes (``input_shape`` or ``input_size``, ``mean``, ``std``, ``class_names``) or the default
    (3 x 224 x 224, no normalisation, names "0".."K-1")."""

    input_size: int | None = None
    channels: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    class_names: Sequence[str] | None = None
    sites: Sequence[str] | None = None


def is_user_model(spec: str) -> bool:
    """``file.py:factory``, ``package.module:factory`` or a TorchScript file (not a torchvision name)."""
    if ":" in spec and not spec.startswith("demo"):
        return True
    return Path(spec).suffix.lower() in (".py", ".pt", ".pth", ".ts", ".torchscript", ".jit")


def _factory(spec: str) -> tuple[nn.Module, str]:
    import importlib
    import importlib.util
    import sys

    target, _, func = spec.rpartition(":")
    if not target or not func.isidentifier():
        raise ExtractionError(f"--model {spec!r}: expected FILE.py:FUNCTION or package.module:FUNCTION")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ExtractionError(f"model file {path} does not exist")
        name = f"pathx_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ExtractionError(f"cannot import {path} as Python")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise ExtractionError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ExtractionError(f"cannot import module {target!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        raise ExtractionError(f"{target} has no function {func!r}")
    try:
        model = fn()
    except Exception as exc:
        raise ExtractionError(f"{func}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ExtractionError(f"{func}() returned {type(model).__name__}, not a torch nn.Module")
    return model, func


class CompiledLayer(nn.Module):
    """A Python module around one compiled TorchScript layer, so forward hooks can see its output
    (TorchScript modules take no Python hooks). ``original_name`` is the layer's class name."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.original_name = str(getattr(inner, "original_name", type(inner).__name__))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


def _unscript(module: nn.Module, path: Path) -> nn.Module:
    """A Python module over a TorchScript model built from ``nn.Sequential`` containers.

    Compiled code runs without Python's forward hooks, so activations inside it cannot be seen.
    Sequentials (at any depth) are rebuilt as Python ``nn.Sequential`` around the scripted
    layers, which then run one by one from Python; any other compiled container is refused.
    """
    kind = getattr(module, "original_name", type(module).__name__)
    children = list(module.named_children())
    if not children:
        return CompiledLayer(module)  # a leaf layer: its compiled forward is fine, hooks go on the wrapper
    if kind != "Sequential":
        raise ExtractionError(
            f"TorchScript model {path}: its {kind} runs compiled code that activation hooks cannot see; "
            "pass the Python model as --model FILE.py:FACTORY (and --weights-file) instead"
        )
    return nn.Sequential(OrderedDict((name, _unscript(child, path)) for name, child in children))


def _torchscript(path: Path) -> nn.Module:
    if not path.is_file():
        raise ExtractionError(f"model file {path} does not exist")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; users still bring such files
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ExtractionError(
            f"{path} is not a TorchScript file ({type(exc).__name__}); a state_dict needs "
            "--model ARCH_OR_FACTORY --weights-file FILE"
        ) from exc
    return _unscript(scripted, path)


def _attr_shape(model: nn.Module, opts: ModelOptions) -> tuple[int, int, int]:
    shape = getattr(model, "input_shape", None)
    size = getattr(model, "input_size", None)
    c, h, w = 3, 224, 224
    if isinstance(shape, (tuple, list)) and len(shape) == 3:
        c, h, w = (int(v) for v in shape)
    elif isinstance(size, int):
        h = w = size
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = (int(v) for v in size)
    if opts.input_size is not None:
        h = w = opts.input_size
    if opts.channels is not None:
        c = opts.channels
    return c, h, w


def load_user_model(spec: str, weights_file: Path | None = None, opts: ModelOptions | None = None) -> ModelBundle:
    """The user's own classifier from ``FILE.py:FACTORY``, ``package.module:FACTORY`` or a TorchScript file.

    Every way this can go wrong raises ``ExtractionError`` with one line; nothing is written.
    """
    opts = opts or ModelOptions()
    if ":" in spec or spec.endswith(".py"):
        model, arch = _factory(spec)
    else:
        model, arch = _torchscript(Path(spec)), Path(spec).stem
    if weights_file is not None:
        load_weights(model, Path(weights_file), spec)
    shape = _attr_shape(model, opts)
    mean = opts.mean if opts.mean is not None else getattr(model, "mean", None)
    std = opts.std if opts.std is not None else getattr(model, "std", None)
    names = opts.class_names if opts.class_names is not None else getattr(model, "class_names", None)
    for what, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != shape[0]:
            raise ExtractionError(f"{what} has {len(value)} values for {shape[0]} input channels")
    return make_bundle(model=model, arch=arch, input_shape=shape, class_names=names, mean=mean, std=std,
                       site_modules=opts.sites)
