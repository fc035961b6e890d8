"""One typed description of an extraction: ``ExtractOptions`` (``extractor.launch`` turns it into a run).

Every option of ``pathx extract`` and every keyword of ``pathx.extract`` is a field here, declared once
with its name, type, default, help and validation. The command line is made from these fields (each
field is the option ``--field-name``; ``words`` parse its text), and the Python API passes its keywords
straight in, so ``--methods mct,pixel --top-k 8`` and ``pathx.extract(..., methods=("mct", "pixel"),
top_k=8)`` are the same run. Importing this module imports no torch (``pathx`` builds its commands from it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extractor.errors import ExtractionError
from extractor.settings import EDGE_CHOICES, RESAMPLING_METHODS, PathwaySettings

if TYPE_CHECKING:
    from torch import nn

    from extractor.models import ModelOptions
    from extractor.variants import VariantSpec
    from records import Shard

log = logging.getLogger(__name__)


def parse_variant_kinds(text: str) -> dict[str, tuple[str, ...]]:
    """``METHOD=KIND+KIND,...`` -> {method: kinds}."""
    only: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, sep, kinds = item.partition("=")
        if not sep or not kinds:
            raise ExtractionError(f"item {item!r} must look like METHOD=KIND+KIND")
        only[name.strip()] = tuple(kinds.split("+"))
    return only


def parse_floats(text: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> floats."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ExtractionError("must be comma-separated numbers, e.g. 0.485,0.456,0.406") from exc


def split_words(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _class_names_file(text: str) -> tuple[str, ...]:
    from extractor.inputs import read_class_names

    return read_class_names(Path(text))


def option(default: Any, help: str, *, words: Callable[[str], Any] | None = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A field of ``ExtractOptions``: its default, its help line and, where its command-line text is not
    the value itself, ``words`` that parse the text (the option then takes text)."""
    meta = {"help": help, "words": words}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """How to extract, besides the model, the images and the run folder."""

    methods: tuple[str, ...] = option(
        ("mct",), "Comma-separated: mct, intgrad (Khakzar), correlation, precision (Lengerich), pixel (Lyu).",
        words=split_words)
    top_k: int | None = option(None, "Top-k channels per site (default 8).")
    sparsity: float | None = option(None, "Global percentile selection p in [0, 100) (not with --top-k).")
    granularity: str = option("element", "element or channel (percentile rule).")
    edges: str = option(
        "auto", "Edge mode: exact (the network's partial derivatives), direct (attention outputs, layer-norm "
        "statistics and squeeze-excite gates held fixed; much faster on transformers), pattern (attention patterns "
        "held instead of outputs: edges through the values too) or auto (direct for a model with attention "
        "modules, pattern for Swin V2 and MaxViT, else exact). Part of the pathway id.")
    variants: str = option("", "e.g. fgsm,pgd,occlude,shift,deform,affine or pgd:eps=0.1:steps=5.")
    limit: int | None = option(None, "Only the first N images (files in sorted order); nothing past them is read.")
    batch_size: int = option(32, "Images per batch.")
    weights_file: Path | None = option(None, "Local weights (a state_dict) for the model.")
    untrained: bool = option(False, "Random weights (structure and speed only).")
    input_size: int | None = option(
        None, "Input side (default 224, or the model's input_size / input_shape attribute).")
    channels: int | None = option(None, "Input channels of your own model (default 3).")
    mean: tuple[float, ...] | None = option(None, "Your model's per-channel mean, e.g. 0.5,0.5,0.5.",
                                            words=parse_floats)
    std: tuple[float, ...] | None = option(None, "Your model's per-channel std.", words=parse_floats)
    class_names: tuple[str, ...] | None = option(
        None, "Class names: a text file (one per line) or JSON (list, or index -> name); in Python, the names.",
        words=_class_names_file)
    sites: tuple[str, ...] | None = option(None, "Comma-separated module paths to use as sites.", words=split_words)
    device: str = option("cpu", "cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK).")
    loader_workers: int | None = option(
        None, "Processes decoding images (0 = in this process; default: cores - 2, at most 4).")
    shard: str | None = option(
        None, "I/N: this process takes share I of N (0-based); under torchrun RANK/WORLD_SIZE.")
    strict: bool = option(False, "Stop at the first unreadable image instead of skipping it.")
    exemplars: int = option(9, "Top-N images kept per neuron (0 = none).")
    pixel_stride: int = option(2, "Pixel pathways: trace every n-th pixel.")
    pixel_beam: int = option(3, "Pixel pathways: beam width.")
    pixel_top: int = option(3, "Pixel pathways: chains kept per pixel.")
    originals_only: tuple[str, ...] = option(
        (), "Comma-separated methods to run on originals only (not on variants).", words=split_words)
    resamples: int = option(50, "Resampling methods: perturbed copies.")
    variant_kinds: Mapping[str, tuple[str, ...]] = option(
        None, "METHOD=KIND+KIND,...: run METHOD on variants of these kinds only, e.g. pixel=deform+occlude.",
        words=parse_variant_kinds, factory=dict)
    progress: bool = option(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        for name in ("methods", "originals_only", "sites", "mean", "std", "class_names"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "variant_kinds", {m: tuple(k) for m, k in dict(self.variant_kinds).items()})
        if self.sparsity is not None and self.top_k is not None:
            raise ExtractionError("give either --sparsity or --top-k, not both")
        if self.edges not in EDGE_CHOICES:
            raise ExtractionError(f"--edges {self.edges!r}: choose one of {', '.join(EDGE_CHOICES)}")
        from extractor.variants import KINDS

        unknown = [k for kinds in self.variant_kinds.values() for k in kinds if k not in KINDS]
        if unknown:
            raise ExtractionError(f"unknown variant kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
        for name, least in (("batch_size", 1), ("exemplars", 0), ("limit", 0), ("loader_workers", 0)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ExtractionError(f"--{name.replace('_', '-')} must be {least} or more; got {value}")
        self.settings()  # every pathway setting is valid
        self.variant_specs()
        self.part()

    @classmethod
    def from_words(cls, words: Mapping[str, Any]) -> ExtractOptions:
        """From the command line's values (``None`` = not given: the field's default)."""
        given: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = words.get(f.name)
            if value is None:
                continue
            parse = f.metadata["words"]
            try:
                given[f.name] = parse(value) if parse is not None and isinstance(value, str) else value
            except ExtractionError as exc:  # the parsers' messages leave the option's name to this place
                raise ExtractionError(f"--{f.name.replace('_', '-')} {exc}") from exc
        return cls(**given)

    def settings(self, model: nn.Module | None = None) -> list[PathwaySettings]:
        """One ``PathwaySettings`` per method: top-k per site (default 8) or the global percentile
        ``sparsity`` (Khakzar's rule; resampling and pixel methods always select top-k). ``--edges auto``
        is decided by ``model`` (without one, as exact: for checking the options only)."""
        edges = self.edges
        if model is not None:
            from extractor.linear import edge_mode

            edges = edge_mode(edges, model)
        elif edges == "auto":
            edges = "exact"
        return build_settings(edges=edges,
            methods=self.methods, top_k=self.top_k, sparsity=self.sparsity, granularity=self.granularity,
            pixel_beam=self.pixel_beam, pixel_top=self.pixel_top, pixel_stride=self.pixel_stride,
            originals_only=self.originals_only, resamples=self.resamples, variant_kinds=self.variant_kinds)

    def variant_specs(self) -> list[VariantSpec]:
        from extractor.variants import VariantSpec

        return VariantSpec.parse(self.variants)

    def part(self) -> Shard:
        return parse_shard(self.shard)

    def model_options(self) -> ModelOptions:
        from extractor.models import ModelOptions

        return ModelOptions(input_size=self.input_size, channels=self.channels, mean=self.mean, std=self.std,
                            class_names=self.class_names, sites=self.sites)

    def workers(self) -> int:
        return default_workers() if self.loader_workers is None else self.loader_workers


def build_settings(
    *,
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
    edges: str = "exact",
) -> list[PathwaySettings]:
    """One ``PathwaySettings`` per method (see ``ExtractOptions.settings``)."""
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
            originals_only=m in originals_only, resamples=resamples, variant_kinds=tuple(only.get(m, ())),
            edges=edges))
    if not out:
        raise ExtractionError("no method given; choose from mct, intgrad, correlation, precision, pixel")
    return out


def default_workers() -> int:
    """Image-decoding processes when none is asked for: cores - 2, at most 4 (0 = in this process)."""
    return min(4, max(0, (os.cpu_count() or 1) - 2))


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """``I/N`` (0-based) -> ``Shard``; without it, ``RANK``/``WORLD_SIZE`` as set by ``torchrun``."""
    from records import Shard

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
