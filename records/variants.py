"""The variant kinds, one entry each: the sweep a bare kind runs, its title and how one of its variants reads.

Torch-free, so that both sides read it: ``extractor.variants`` makes the images (its ``APPLY`` holds one
function per kind here, and a test holds the two to the same kinds), ``graphstore.names`` shows them.
Numbers read as :func:`number` writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True, kw_only=True)
class VariantKind:
    """``title``: the kind as a word; ``defaults``: the sweep a bare ``--variants KIND`` runs (one parameter dict
    per variant); ``describe``: one variant's parameters (per-image ones left out) as words."""

    title: str
    defaults: tuple[Mapping[str, Any], ...]
    describe: Callable[[Mapping[str, Any]], str]


def _attack(title: str, *, steps: bool) -> Callable[[Mapping[str, Any]], str]:
    def describe(p: Mapping[str, Any]) -> str:
        text = f"{title} ε = {number(p.get('eps'))}" + (f", {p.get('steps', '?')} steps" if steps else "")
        return text + (", targeted" if p.get("targeted") else "")

    return describe


VARIANT_KINDS: dict[str, VariantKind] = {
    "fgsm": VariantKind(title="FGSM", defaults=tuple({"eps": e} for e in (0.05, 0.1, 0.2)),
                        describe=_attack("FGSM", steps=False)),
    "pgd": VariantKind(
        title="PGD",
        defaults=(*({"eps": e, "steps": 10, "targeted": False} for e in (0.05, 0.1, 0.2)),
                  {"eps": 0.2, "steps": 20, "targeted": True, "target_offset": 1}),
        describe=_attack("PGD", steps=True)),
    "occlude": VariantKind(title="occlude", defaults=({"frac": 0.375},),
                           describe=lambda p: f"occlude {number(100 * float(p.get('frac', 0)))} % patch"),
    "shift": VariantKind(title="shift", defaults=({"dy": 4, "dx": 4},),
                         describe=lambda p: f"shift {number(p.get('dy'))} px down, {number(p.get('dx'))} px right"),
    "deform": VariantKind(title="deform", defaults=({"alpha": 3.0, "sigma": 4.0},),
                          describe=lambda p: f"deform α = {number(p.get('alpha'))}, σ = {number(p.get('sigma'))}"),
    "affine": VariantKind(title="affine", defaults=({"rotate": 15.0, "scale": 0.9},),
                          describe=lambda p: f"rotate {number(p.get('rotate'))}°, scale {number(p.get('scale'))}"),
}
