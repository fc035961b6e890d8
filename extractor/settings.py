"""How a pathway is computed: the method, the selection rule and their parameters.

``PathwaySettings.params_json()`` is part of every pathway id, so two runs with the same
settings produce the same ids.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from extractor.errors import ExtractionError

METHODS = ("mct", "intgrad", "correlation", "precision", "pixel")
RESAMPLING_METHODS = ("correlation", "precision")
SELECTIONS = ("topk", "percentile")
GRANULARITIES = ("element", "channel")
EDGE_MODES = ("exact", "direct", "pattern")  # extractor.linear: how edges are differentiated
EDGE_CHOICES = ("auto", *EDGE_MODES)  # auto: direct or pattern for a model with attention modules, else exact


@dataclass(kw_only=True, frozen=True)
class PixelSettings:
    """Beam width, pathways kept per pixel, pixel stride, and the smallest |pixel| traced."""

    beam: int = 3
    top: int = 3
    stride: int = 2
    min_value: float = 1e-3

    def __post_init__(self) -> None:
        if self.beam < 1 or self.top < 1 or self.top > self.beam or self.stride < 1:
            raise ExtractionError("pixel pathways need beam >= top >= 1 and stride >= 1")

    def params_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(kw_only=True, frozen=True)
class PathwaySettings:
    """How a pathway is computed; ``params_json()`` is part of the pathway id."""

    method: str = "mct"
    selection: str = "topk"
    k: int = 8
    sparsity: float = 90.0
    granularity: str = "element"
    intgrad_steps: int = 11
    edge_targets: int = 16
    edges_per_target: int = 8
    resamples: int = 50
    noise: float = 0.1
    beam: int = 3
    top: int = 3
    stride: int = 2
    edges: str = "exact"
    originals_only: bool = False
    variant_kinds: tuple[str, ...] = ()  # when given, variants of these kinds only (originals always)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ExtractionError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.selection not in SELECTIONS:
            raise ExtractionError(f"unknown selection {self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if self.granularity not in GRANULARITIES:
            raise ExtractionError(f"unknown granularity {self.granularity!r}; choose element or channel")
        if not (0.0 <= self.sparsity < 100.0) or math.isnan(self.sparsity):
            raise ExtractionError(f"sparsity must be in [0, 100); got {self.sparsity}")
        if self.k < 1:
            raise ExtractionError(f"k must be at least 1; got {self.k}")
        if self.intgrad_steps < 2:
            raise ExtractionError(f"intgrad steps must be at least 2; got {self.intgrad_steps}")
        if self.edge_targets < 1 or self.edges_per_target < 1:
            raise ExtractionError("edge targets and edges per target must be at least 1")
        if self.method in RESAMPLING_METHODS and self.selection != "topk":
            raise ExtractionError(f"method {self.method} selects the top-k channels per site; use --top-k")
        if self.method == "pixel":
            PixelSettings(beam=self.beam, top=self.top, stride=self.stride)  # validates them
        if self.edges not in EDGE_MODES:
            raise ExtractionError(f"unknown edge mode {self.edges!r}; choose one of {', '.join(EDGE_MODES)}")
        if self.resamples < 3 or not (0.0 < self.noise < 10.0):
            raise ExtractionError("resampling needs at least 3 copies and a noise std in (0, 10)")

    def params(self) -> dict[str, object]:
        data = asdict(self)
        data.pop("method")
        data.pop("selection")
        scope: dict[str, object] = {"originals_only": True} if self.originals_only else {}
        if self.variant_kinds and not self.originals_only:
            scope["variant_kinds"] = sorted(self.variant_kinds)
        data.pop("originals_only")
        data.pop("variant_kinds")
        if self.edges == "exact":  # exact edges add nothing to the id, so ids from before edge modes still hold
            data.pop("edges")
        if self.method == "pixel":
            return {**{k: data[k] for k in ("beam", "top", "stride")}, **scope}
        if self.selection == "topk":
            data.pop("sparsity")
            data.pop("granularity")
        else:
            data.pop("k")
        for key in ("beam", "top", "stride"):
            data.pop(key)
        data.update(scope)
        if self.method != "intgrad":
            data.pop("intgrad_steps")
        if self.method not in RESAMPLING_METHODS:
            data.pop("resamples")
            data.pop("noise")
        return data

    def applies_to(self, kind: str) -> bool:
        """Whether this setting runs on images of ``kind`` ("original" or a variant kind)."""
        if kind == "original":
            return True
        return not self.originals_only and (not self.variant_kinds or kind in self.variant_kinds)

    def params_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True)
