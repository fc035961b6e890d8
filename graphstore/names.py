"""Settings and variants as a researcher would write them: "MCT · p = 90 (elements)", "PGD ε = 0.1, 10 steps".

Stored ids and JSON stay the truth (``config``, ``params``); these names are what pages,
legends and the CLI show. Every function takes the stored JSON (or its dict) and never fails
on keys it does not know: they are shown as ``name value``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

METHOD_NAMES = {"mct": "MCT", "intgrad": "IntGrad", "correlation": "Correlation", "precision": "Precision",
                "pixel": "Pixel pathways"}
VARIANT_NAMES = {"original": "original", "fgsm": "FGSM", "pgd": "PGD", "occlude": "occlude", "shift": "shift",
                 "deform": "deform", "affine": "affine"}
PER_IMAGE = frozenset({"target", "seed", "top", "left", "target_offset"})


def number(value: float | int | None, digits: int = 3) -> str:
    """A number for display: ``digits`` significant digits, never ``-0``."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    text = f"{float(value):.{digits}g}"
    return "0" if text in ("-0", "-0.0") or float(text) == 0 else text


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
    if p.get("originals_only"):
        parts.append("originals only")
    elif p.get("variant_kinds"):
        parts.append("originals + " + ", ".join(VARIANT_NAMES.get(k, k) for k in p["variant_kinds"]))
    return " · ".join(parts)


def variant_name(kind: str, params: str | Mapping[str, Any] | None) -> str:
    """E.g. "PGD ε = 0.1, 10 steps", "PGD ε = 0.2, 20 steps, targeted", "rotate 15°, scale 0.9"."""
    p = {k: v for k, v in _params(params).items() if k not in PER_IMAGE}
    if kind in ("fgsm", "pgd"):
        text = f"{VARIANT_NAMES[kind]} ε = {number(p.get('eps'))}"
        if kind == "pgd":
            text += f", {p.get('steps', '?')} steps"
        return text + (", targeted" if p.get("targeted") else "")
    if kind == "affine":
        return f"rotate {number(p.get('rotate'))}°, scale {number(p.get('scale'))}"
    if kind == "occlude":
        return f"occlude {number(100 * float(p.get('frac', 0)))} % patch"
    if kind == "shift":
        return f"shift {number(p.get('dy'))} px down, {number(p.get('dx'))} px right"
    if kind == "deform":
        return f"deform α = {number(p.get('alpha'))}, σ = {number(p.get('sigma'))}"
    if kind == "original" or not p:
        return VARIANT_NAMES.get(kind, kind)
    return f"{kind} " + ", ".join(f"{k} {number(v) if isinstance(v, (int, float)) else v}"
                                  for k, v in sorted(p.items()))
