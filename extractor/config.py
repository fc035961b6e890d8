"""What an extraction is asked to do, from the words a user types: settings, variant kinds, shards.

The CLI and the Python API both build their ``PathwaySettings`` here, so ``--method
mct,pixel --top-k 8`` and ``pathx.extract(methods=("mct", "pixel"), top_k=8)`` are the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from extractor.errors import ExtractionError
from extractor.models import ModelBundle, ModelOptions, make_bundle
from extractor.settings import RESAMPLING_METHODS, PathwaySettings
from extractor.variants import KINDS
from records import Shard

if TYPE_CHECKING:
    from extractor.pipeline import ExtractSummary

log = logging.getLogger(__name__)


def parse_variant_kinds(text: str) -> dict[str, tuple[str, ...]]:
    """``METHOD=KIND+KIND,...`` -> {method: kinds}."""
    only: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, sep, kinds = item.partition("=")
        if not sep or not kinds:
            raise ExtractionError(f"--variant-kinds item {item!r} must look like METHOD=KIND+KIND")
        unknown = [k for k in kinds.split("+") if k not in KINDS]
        if unknown:
            raise ExtractionError(f"unknown variant kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
        only[name.strip()] = tuple(kinds.split("+"))
    return only


def build_settings(
    methods: Sequence[str],
    top_k: int | None = None,
    sparsity: float | None = None,
    granularity: str = "element",
    pixel_beam: int = 3,
    pixel_top: int = 3,
    pixel_stride: int = 2,
    originals_only: Sequence[str] = (),
    resamples: int = 50,
    variant_kinds: Mapping[str, Sequence[str]] | None = None,
) -> list[PathwaySettings]:
    """One ``PathwaySettings`` per method: top-k per site (default 8) or the global percentile
    ``sparsity`` (Khakzar's rule; resampling and pixel methods always select top-k)."""
    if sparsity is not None and top_k is not None:
        raise ExtractionError("give either --sparsity or --top-k, not both")
    only = dict(variant_kinds or {})
    out = []
    for m in (m.strip() for m in methods):
        if not m:
            continue
        resampling = m in (*RESAMPLING_METHODS, "pixel")
        out.append(PathwaySettings(
            method=m, selection="percentile" if sparsity is not None and not resampling else "topk",
            k=top_k if top_k is not None else 8, sparsity=sparsity if sparsity is not None else 90.0,
            granularity=granularity, beam=pixel_beam, top=pixel_top, stride=pixel_stride,
            originals_only=m in originals_only, resamples=resamples, variant_kinds=tuple(only.get(m, ()))))
    if not out:
        raise ExtractionError("no method given; choose from mct, intgrad, correlation, precision, pixel")
    return out


def parse_floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    """``"0.485,0.456,0.406"`` -> floats (``None`` for no text); ``flag`` names the option in the error."""
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ExtractionError(f"{flag} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from exc


def model_options(input_size: int | None = None, channels: int | None = None, mean: str | None = None,
                  std: str | None = None, class_names: Path | None = None, sites: str | None = None) -> ModelOptions:
    """``ModelOptions`` from the command line's words: ``mean``/``std`` comma-separated, ``class_names`` a
    file (text, one per line, or JSON), ``sites`` comma-separated module paths."""
    from extractor.inputs import read_class_names

    return ModelOptions(input_size=input_size, channels=channels, mean=parse_floats(mean, "--mean"),
                        std=parse_floats(std, "--std"),
                        class_names=read_class_names(class_names) if class_names else None,
                        sites=[s for s in (sites or "").split(",") if s] or None)


def default_workers() -> int:
    """Image-decoding processes when none is asked for: cores - 2, at most 4 (0 = in this process)."""
    return min(4, max(0, (os.cpu_count() or 1) - 2))


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """``I/N`` (0-based) -> ``Shard``; without it, ``RANK``/``WORLD_SIZE`` as set by ``torchrun``."""
    env = os.environ if env is None else env
    if text:
        left, sep, right = text.partition("/")
        if not sep or not left.strip().isdigit() or not right.strip().isdigit():
            raise ExtractionError(f"--shard {text!r} must look like I/N, e.g. 0/4")
        i, n = int(left), int(right)
        if n < 1 or i >= n:
            raise ExtractionError(f"--shard {text}: need 0 <= I < N")
        return Shard(i, n)
    if "WORLD_SIZE" in env and "RANK" in env:
        try:
            return Shard(int(env["RANK"]), int(env["WORLD_SIZE"]))
        except ValueError as exc:
            raise ExtractionError(f"RANK={env['RANK']!r} / WORLD_SIZE={env['WORLD_SIZE']!r} are not a shard") \
                from exc
    return Shard()


def shard_device(device: str, env: Mapping[str, str] | None = None) -> str:
    """Under ``torchrun`` each process takes its own GPU: ``cuda`` -> ``cuda:LOCAL_RANK``."""
    env = os.environ if env is None else env
    if device == "cuda" and "LOCAL_RANK" in env:
        return f"cuda:{int(env['LOCAL_RANK'])}"
    return device


def model_from_spec(
    spec: str,
    home: Path,
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
        bundle = make_bundle(model, spec, (source.channels, source.input_size, source.input_size), source.class_names(),
                             source.mean, source.std, opts.sites, title)
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


# The demo's two runs. Sizes chosen for the set-up budget on 2 cores (README states the measured split).
DEMO_FASHION_IMAGES = 60
DEMO_PHOTOS = 8
# ImageNet attacks at strengths a 224-px photo model feels (1/255 .. 3/255); the full default sweeps are
# for 28-px images
DEMO_PHOTO_VARIANTS = "fgsm:eps=0.004,fgsm:eps=0.012,pgd:eps=0.008:steps=5,occlude,shift,affine"


def fashion_settings() -> list[PathwaySettings]:
    """The demo's settings for the Fashion CNN (also the report's): every method at top-8; the resampling
    methods on originals only, pixel pathways (stride 4) on originals and deformed images."""
    return build_settings(("mct", "intgrad", "correlation", "precision", "pixel"), top_k=8, pixel_stride=4,
                          originals_only=("correlation", "precision"), variant_kinds={"pixel": ("deform",)})


def extract_demo(out: Path, home: Path, limit: int = DEMO_FASHION_IMAGES, photos: int = DEMO_PHOTOS,
                 percentile: bool = True, progress: bool = True) -> dict[str, ExtractSummary]:
    """The demo's runs, two trained models on real images, into ``out/fashion`` and ``out/photos``:

    * the Fashion-MNIST CNN (committed weights) on the first ``limit`` test images: every method
      (top-k 8; resampling methods on originals, pixel pathways also on deformed images), every
      variant kind, and with ``percentile`` also Khakzar's own rule (MCT, global percentile p = 90);
    * EfficientNet-Lite0 (ImageNet weights) on the first ``photos`` labelled ImageNet photos: MCT top-8
      (and p = 90), FGSM and PGD at ImageNet strengths, occlusion, shift and affine variants, exemplars.

    A run folder of an older records format is extracted again.
    """
    import json
    import shutil

    from extractor.pipeline import extract_run, load_images
    from extractor.variants import VariantSpec
    from records import MANIFEST, SCHEMA_VERSION

    runs = {"fashion": out / "fashion", "photos": out / "photos"}
    for folder in runs.values():
        manifest = folder / MANIFEST
        if manifest.exists() and json.loads(manifest.read_text()).get("schema_version") != SCHEMA_VERSION:
            log.warning("%s holds demo records of an older format; extracting them again", folder)
            shutil.rmtree(folder)
    p90 = [PathwaySettings("mct", "percentile", sparsity=90.0, granularity="element")] if percentile else []
    fashion = model_from_spec("fashion_cnn", home)
    done = {"fashion": extract_run(fashion, load_images("fashion-mnist:test", fashion), fashion_settings() + p90,
                                   VariantSpec.parse("fgsm,pgd,occlude,shift,deform,affine"), runs["fashion"],
                                   limit=limit, progress=progress, workers=0)}
    lite = model_from_spec("efficientnet_lite0", home)
    done["photos"] = extract_run(lite, load_images("samples:imagenet", lite), build_settings(("mct",), top_k=8) + p90,
                                 VariantSpec.parse(DEMO_PHOTO_VARIANTS), runs["photos"], limit=photos,
                                 batch_size=photos, progress=progress, workers=0, exemplars=4)
    return done
