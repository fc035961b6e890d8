"""Settings and variants as a researcher would write them: "MCT · p = 90 (elements)", "PGD ε = 0.1, 10 steps".

Stored ids and JSON stay the truth (``config``, ``params``); these names are what pages,
legends and the CLI show. Every function takes the stored JSON (or its dict) and never fails
on keys it does not know: they are shown as ``name value``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from records import PER_IMAGE_KEYS, parse_neuron_id
from records.variants import VARIANT_KINDS, number

METHOD_NAMES = {"mct": "MCT", "intgrad": "IntGrad", "correlation": "Correlation", "precision": "Precision",
                "pixel": "Pixel pathways"}
VARIANT_NAMES = {"original": "original", **{kind: k.title for kind, k in VARIANT_KINDS.items()}}
# not shown: the per-image parameters, and how far a targeted attack's target class is from the label
HIDDEN = frozenset({*PER_IMAGE_KEYS, "target_offset"})

__all__ = ["METHOD_NAMES", "VARIANT_NAMES", "edge_mode", "edges_name", "neuron_name", "number", "setting_name",
           "variant_name"]


def neuron_name(neuron_id: str) -> str:
    """A neuron as a label: ``site/channel`` (its model id left out)."""
    ref = parse_neuron_id(neuron_id)
    return f"{ref.site_id}/{ref.channel}"


def _params(params: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None or params == "":
        return {}
    if isinstance(params, Mapping):
        return dict(params)
    try:
        data = json.loads(params)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def setting_name(method: str, selection: str, params: str | Mapping[str, Any] | None) -> str:
    """E.g. "IntGrad · top-8 per site", "MCT · p = 90 (elements)", "Pixel pathways · beam 3"."""
    p = _params(params)
    name = METHOD_NAMES.get(method, method)
    if method == "pixel":
        rule = f"beam {p.get('beam', '?')}, {p.get('top', '?')} chains per pixel, stride {p.get('stride', '?')}"
    elif selection == "percentile":
        rule = f"p = {number(p.get('sparsity'))} ({p.get('granularity', 'element')}s)"
    else:
        rule = f"top-{p.get('k', '?')} per site"
    parts = [name, rule]
    if method == "intgrad" and p.get("intgrad_steps") not in (None, 11):
        parts.append(f"{p['intgrad_steps']} steps")
    if method in ("correlation", "precision"):
        parts.append(f"{p.get('resamples', '?')} resamples")
    if p.get("edges", "exact") != "exact":
        parts.append(f"{p['edges']} edges")
    if p.get("originals_only"):
        parts.append("originals only")
    elif p.get("variant_kinds"):
        parts.append("originals + " + ", ".join(VARIANT_NAMES.get(k, k) for k in p["variant_kinds"]))
    return " · ".join(parts)


def edge_mode(params: str | Mapping[str, Any] | None) -> str:
    """Which edges a pathway holds: ``exact``, ``direct`` or ``pattern`` (``extractor/linear.py``; exact when
    unnamed)."""
    return str(_params(params).get("edges", "exact"))


def edges_name(method: str, params: str | Mapping[str, Any] | None) -> str:
    """E.g. "exact edges", "direct edges (attention outputs, layer-norm statistics and squeeze-excite gates
    held fixed)", "edges along pixel chains"."""
    if method == "pixel":
        return "edges along pixel chains"
    mode = edge_mode(params)
    if mode == "direct":
        return "direct edges (attention outputs, layer-norm statistics and squeeze-excite gates held fixed)"
    if mode == "pattern":
        return "pattern edges (attention patterns, layer-norm statistics and squeeze-excite gates held fixed)"
    return f"{mode} edges"


def variant_name(kind: str, params: str | Mapping[str, Any] | None) -> str:
    """E.g. "PGD ε = 0.1, 10 steps", "PGD ε = 0.2, 20 steps, targeted", "rotate 15°, scale 0.9"."""
    p = {k: v for k, v in _params(params).items() if k not in HIDDEN}
    if kind in VARIANT_KINDS:
        return VARIANT_KINDS[kind].describe(p)
    if kind == "original" or not p:
        return VARIANT_NAMES.get(kind, kind)
    return f"{kind} " + ", ".join(f"{k} {number(v) if isinstance(v, (int, float)) else v}"
                                  for k, v in sorted(p.items()))
