"""The runs of ``make demo`` (and of the report's Fashion part): two trained models on real images.

Sizes are chosen for the set-up budget on 2 cores (README states the measured split).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from extractor.launch import model_from_spec
from extractor.options import build_settings
from extractor.pipeline import ExtractSummary, extract_run, load_images
from extractor.settings import PathwaySettings
from extractor.variants import VariantSpec
from records import MANIFEST, SCHEMA_VERSION

log = logging.getLogger(__name__)

DEMO_FASHION_IMAGES = 60
DEMO_PHOTOS = 8
# ImageNet attacks at strengths a 224-px photo model feels (1/255 .. 3/255); the full default sweeps are
# for 28-px images
DEMO_PHOTO_VARIANTS = "fgsm:eps=0.004,fgsm:eps=0.012,pgd:eps=0.008:steps=5,occlude,shift,affine"


def fashion_settings() -> list[PathwaySettings]:
    """The demo's settings for the Fashion CNN (also the report's): every method at top-8; the resampling
    methods on originals only, pixel pathways (stride 4) on originals and deformed images."""
    return build_settings(methods=("mct", "intgrad", "correlation", "precision", "pixel"), top_k=8, pixel_stride=4,
                          originals_only=("correlation", "precision"), variant_kinds={"pixel": ("deform",)})


def extract_demo(out: Path, home: Path, *, limit: int = DEMO_FASHION_IMAGES, photos: int = DEMO_PHOTOS,
                 percentile: bool = True, progress: bool = True) -> dict[str, ExtractSummary]:
    """The demo's runs, two trained models on real images, into ``out/fashion`` and ``out/photos``:

    * the Fashion-MNIST CNN (committed weights) on the first ``limit`` test images: every method
      (top-k 8; resampling methods on originals, pixel pathways also on deformed images), every
      variant kind, and with ``percentile`` also Khakzar's own rule (MCT, global percentile p = 90);
    * EfficientNet-Lite0 (ImageNet weights) on the first ``photos`` labelled ImageNet photos: MCT top-8
      (and p = 90), FGSM and PGD at ImageNet strengths, occlusion, shift and affine variants, exemplars.

    A run folder of an older records format is extracted again.
    """
    runs = {"fashion": out / "fashion", "photos": out / "photos"}
    for folder in runs.values():
        manifest = folder / MANIFEST
        if manifest.exists() and json.loads(manifest.read_text()).get("schema_version") != SCHEMA_VERSION:
            log.warning("%s holds demo records of an older format; extracting them again", folder)
            shutil.rmtree(folder)
    p90 = [PathwaySettings(method="mct", selection="percentile", sparsity=90.0)] if percentile else []
    fashion = model_from_spec("fashion_cnn", home)
    done = {"fashion": extract_run(fashion, load_images("fashion-mnist:test", fashion), fashion_settings() + p90,
                                   VariantSpec.parse("fgsm,pgd,occlude,shift,deform,affine"), runs["fashion"],
                                   limit=limit, progress=progress, workers=0)}
    lite = model_from_spec("efficientnet_lite0", home)
    lite_settings = build_settings(methods=("mct",), top_k=8) + p90
    done["photos"] = extract_run(lite, load_images("samples:imagenet", lite), lite_settings,
                                 VariantSpec.parse(DEMO_PHOTO_VARIANTS), runs["photos"], limit=photos,
                                 batch_size=photos, progress=progress, workers=0, exemplars=4)
    return done
