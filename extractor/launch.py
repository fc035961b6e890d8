"""From an ``ExtractOptions`` to a run: the model and the images resolved, then streamed into a run folder.

Both entry points end here: ``pathx extract`` with the words it was given, ``pathx.extract`` with Python objects.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from extractor.errors import ExtractionError
from extractor.inputs import ImageSource
from extractor.models import ModelBundle, ModelOptions, make_bundle
from extractor.options import ExtractOptions, shard_device

if TYPE_CHECKING:
    from extractor.pipeline import ExtractSummary

log = logging.getLogger(__name__)


def model_from_spec(
    spec: str,
    home: Path,
    *,
    weights_file: Path | None = None,
    untrained: bool = False,
    opts: ModelOptions | None = None,
) -> ModelBundle:
    """``demo``, a trained model that ships offline (:data:`extractor.trained.TRAINED`), a torchvision
    classifier name, ``FILE.py:FACTORY``, ``package.module:FACTORY`` or a TorchScript file -> a
    ``ModelBundle``; ``opts.class_names`` replace the model's own names."""
    from extractor.demo import demo_bundle
    from extractor.models import is_user_model, load_torchvision, load_user_model
    from extractor.trained import TRAINED, load_trained

    opts = opts or ModelOptions()
    if spec == "demo":
        bundle, _ = demo_bundle(home)
    elif spec in TRAINED:
        source = TRAINED[spec]
        if weights_file is not None:
            raise ExtractionError(f"{spec} brings its own trained weights; --weights-file is for other models")
        model = load_trained(source, untrained=untrained)
        title = f"{source.title.split(' (')[0]} (untrained)" if untrained else source.title
        bundle = make_bundle(
            model=model,
            arch=spec,
            input_shape=(source.channels, source.input_size, source.input_size),
            class_names=source.class_names(),
            mean=source.mean,
            std=source.std,
            site_modules=opts.sites,
            title=title,
        )
    elif is_user_model(spec):
        return load_user_model(spec, weights_file, opts)
    else:
        bundle = load_torchvision(spec, weights_file, untrained, opts.input_size or 224, opts.sites)
    return with_class_names(bundle, opts.class_names) if opts.class_names is not None else bundle


def with_class_names(bundle: ModelBundle, names: Sequence[str]) -> ModelBundle:
    """The bundle with other class names (one per output); the module is shared, not copied."""
    if len(names) != bundle.info.num_classes:
        raise ExtractionError(f"{len(names)} class names given for a model with {bundle.info.num_classes} outputs")
    return dataclasses.replace(bundle, info=dataclasses.replace(bundle.info, class_names=tuple(names)))


def resolve_model(model: str | nn.Module | ModelBundle, options: ExtractOptions, home: Path) -> ModelBundle:
    """A model spec (as on the command line), an ``nn.Module`` or a ``ModelBundle`` -> the bundle to extract.
    An ``nn.Module`` takes ``channels`` x ``input_size`` x ``input_size`` input (default 3 x 224 x 224)."""
    if isinstance(model, ModelBundle):
        return with_class_names(model, options.class_names) if options.class_names is not None else model
    if isinstance(model, nn.Module):
        size = options.input_size or 224
        return make_bundle(
            model=model,
            arch=type(model).__name__.lower(),
            input_shape=(options.channels or 3, size, size),
            class_names=options.class_names,
            mean=options.mean,
            std=options.std,
            site_modules=options.sites,
        )
    if isinstance(model, str):
        return model_from_spec(model, home, weights_file=options.weights_file, untrained=options.untrained,
                               opts=options.model_options())
    raise ExtractionError(f"model must be an nn.Module or a model name; got {type(model).__name__}")


def resolve_images(images: Any, bundle: ModelBundle, home: Path) -> ImageSource:
    """An image spec (as on the command line), a tensor ``[N, C, H, W]`` in ``[0, 1]`` (or ``(x, labels)``),
    a map-style ``Dataset`` or a ``DataLoader`` -> the image source."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from extractor.inputs import DatasetImages, TensorImages
    from extractor.pipeline import load_images

    if isinstance(images, ImageSource):
        return images
    if isinstance(images, (str, Path)):
        return load_images(str(images), bundle, home)
    if isinstance(images, torch.Tensor):
        return TensorImages(images)
    if isinstance(images, tuple) and len(images) == 2 and isinstance(images[0], torch.Tensor):
        return TensorImages(images[0], torch.as_tensor(images[1], dtype=torch.long))
    if isinstance(images, DataLoader):
        return DatasetImages(images.dataset)
    if isinstance(images, Dataset):
        return DatasetImages(images)
    raise ExtractionError(f"images must be a path, a tensor, a Dataset or a DataLoader; got {type(images).__name__}")


def run_extraction(model: str | nn.Module | ModelBundle, images: Any, out: Path, options: ExtractOptions,
                   home: Path) -> ExtractSummary:
    """The extraction both entry points run: resolve the model and images, then stream them into ``out``."""
    from extractor.pipeline import extract_run

    bundle = resolve_model(model, options, home)
    return extract_run(bundle, resolve_images(images, bundle, home), options.settings(bundle.model),
                       options.variant_specs(),
                       out, batch_size=options.batch_size, limit=options.limit, device=shard_device(options.device),
                       progress=options.progress, workers=options.workers(), shard=options.part(),
                       strict=options.strict, exemplars=options.exemplars)
