"""Edge modes: how far ``direct`` and ``pattern`` edges are from ``exact`` ones, and what each costs
(``extractor/linear.py``).

Per model (224 px, batch 1, untrained, a child process each): contributions, the connected top-8 selection,
then every target's incoming weights from *all* kept source channels in the exact mode and in each linearised
mode that applies (``edges_per_target`` large enough to keep them all; ``pattern`` where the model has an
attention whose softmax it can hold). Reported per linearised mode, against the exact one:

* **Spearman** correlation of the edge weights of both modes over the (target, source) pairs both keep;
* **top-8 overlap**: per target, the share of its 8 strongest incoming edges (by |weight|) that both modes
  name, averaged (and its median) over targets;
* **completeness gaps** of both modes: per site, ``max_j |sum_i w(i->j) - C_j|`` over the site's largest
  kept |C_j|, as median and maximum over sites;
* **(c)/(a)** of both modes: contributions, selection and top-8 edges over a plain forward + backward, timed
  in interleaved rounds (medians) after a warm-up call each (which finds the routes).

``auto`` makes ``direct`` the default for a model with attention modules, and ``pattern`` where direct edges
disagree badly (``extractor.linear.DISAGREEING``); a mode whose median top-8 overlap is under 0.5 or whose
Spearman is under 0.8 is called a bad disagreement here. Run:
``python bench/edge_modes.py [--only a,b]``; results go to ``bench/results/edge_modes.json`` and into
``make bench``'s report.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "edge_modes.json"
MODELS = ("vit_b_16", "vit_b_32", "swin_t", "swin_v2_t", "maxvit_t", "convnext_tiny", "efficientnet_b0")
BAD_OVERLAP, BAD_SPEARMAN = 0.5, 0.8


def measure(name: str, rounds: int = 3) -> dict[str, Any]:
    """One model's row (runs in the child): the exact mode's figures, and per linearised mode that applies
    (``pattern`` needs an attention whose softmax it can hold: not on a model without attention, nor on
    ``nn.MultiheadAttention``) its agreement with the exact edges and its cost."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from timing import _interleaved, _ours_c, _plain

    from extractor.batch import edges_of
    from extractor.contributions import mct_contributions
    from extractor.errors import ExtractionError
    from extractor.linear import edge_mode, is_attention
    from extractor.models import load_torchvision
    from extractor.reach import bundle_reach
    from extractor.selection import select
    from extractor.settings import PathwaySettings

    torch.set_num_threads(2)
    torch.manual_seed(0)
    bundle = load_torchvision(name, untrained=True, input_size=224)
    x = torch.rand(1, 3, 224, 224)
    exact = PathwaySettings(k=8, edge_targets=8, edges_per_target=8)
    modes = ["direct"]
    if any(is_attention(m) for m in bundle.model.modules()):
        try:
            _ours_c(bundle, x, replace(exact, edges="pattern"))
            modes.append("pattern")
        except ExtractionError as exc:  # a fused attention kernel
            print(f"pattern edges on {name}: {exc}", file=sys.stderr)
    fns: list[Callable[[], Any]] = [lambda: _plain(bundle, x), lambda: _ours_c(bundle, x, exact)]
    fns += [functools.partial(_ours_c, bundle, x, replace(exact, edges=m)) for m in modes]
    times = _interleaved(fns, rounds)
    a = times[0]
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, exact, bundle_reach(bundle, x))
    every = 8 * max(len(s.preds) for s in bundle.sites)  # each target keeps all its kept sources
    scale = np.array([float(contrib.channel[s.index][0].abs().masked_fill(~sel.kept[s.index][0], 0).max())
                      for s in bundle.sites])
    by_mode, gaps = {}, {}
    for mode in ("exact", *modes):
        e = edges_of(bundle, x, slice(0, 1), settings=replace(exact, edges=mode, edges_per_target=every),
                     contrib=contrib, sel=sel)
        by_mode[mode] = {(int(i), int(c), int(j), int(t)): float(w) for i, c, j, t, w in
                         zip(e.src_site, e.src_channel, e.dst_site, e.dst_channel, e.weight, strict=True)}
        rel = e.gap[0] / np.maximum(scale, 1e-30)
        gaps[mode] = rel[~np.isnan(rel)]
    row: dict[str, Any] = {"model": name, "sites": len(bundle.sites), "default": edge_mode("auto", bundle.model),
                           "a_s": a, "ratio_c_exact_a": times[1] / a,
                           "gap_exact_median": float(np.median(gaps["exact"])),
                           "gap_exact_max": float(gaps["exact"].max()), "modes": {}}
    for mode, t in zip(modes, times[2:], strict=True):
        common = sorted(set(by_mode["exact"]) & set(by_mode[mode]))
        rho = float(spearmanr([by_mode["exact"][k] for k in common], [by_mode[mode][k] for k in common]).statistic)
        tops: dict[tuple[int, int], list[set[tuple[int, int]]]] = {}
        for m, which in enumerate(("exact", mode)):
            incoming: dict[tuple[int, int], list[tuple[float, tuple[int, int]]]] = {}
            for (i, c, j, tg), w in by_mode[which].items():
                incoming.setdefault((j, tg), []).append((abs(w), (i, c)))
            for target, ws in incoming.items():
                tops.setdefault(target, [set(), set()])[m] = {k for _, k in sorted(ws, reverse=True)[:8]}
        overlap = [len(ex & di) / max(len(ex), 1) for ex, di in tops.values()]
        row["modes"][mode] = {"targets": len(tops), "pairs": len(common), "spearman": rho,
                              "top8_overlap_mean": float(np.mean(overlap)),
                              "top8_overlap_median": float(np.median(overlap)),
                              "gap_median": float(np.median(gaps[mode])), "gap_max": float(gaps[mode].max()),
                              "ratio_c_a": t / a}
    return row


def run(only: list[str] | None = None, limit_s: float = 1800.0) -> dict[str, Any]:
    from children import Rows, child_json, commit  # bench/ is on the path wherever this runs

    rows = Rows(OUT)
    for name in only or MODELS:
        try:
            row = {**child_json(__file__, [name], "MODES", limit_s), "commit": commit()}
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            rows.leave_out(name, exc, limit_s, "edge modes")
            continue
        rows.keep(name, row, f"edge modes {name}: (c)/(a) exact {row['ratio_c_exact_a']:.2f}; " + "; ".join(
            f"{mode} spearman {m['spearman']:.3f}, top-8 overlap {m['top8_overlap_mean']:.2f}, (c)/(a) "
            f"{m['ratio_c_a']:.2f}" for mode, m in row["modes"].items()))
    return rows.finish()


def _bad(m: dict[str, Any]) -> bool:
    return bool(m["top8_overlap_median"] < BAD_OVERLAP or m["spearman"] < BAD_SPEARMAN)


def markdown(p: dict[str, Any]) -> list[str]:
    from zoo import provenance  # bench/ is on the path wherever this runs
    rows = sorted(p["rows"].values(), key=lambda r: r["model"])
    if not rows:
        return []
    bad = [f"{r['model']} {mode}" for r in rows for mode, m in r["modes"].items() if _bad(m)]
    lines = ["", "### Edge modes: direct and pattern against exact (224 px, batch 1, untrained)", "",
             f"{len(rows)} classifiers ({p.get('date', '')}). Per linearised mode: Spearman of the edge weights over "
             "the pairs it and the exact mode both keep; per target, the share of its 8 strongest incoming edges both "
             "name (mean / median); completeness gap per site over its largest kept |C_j| (median / max over sites); "
             "(c)/(a) in each mode. Pattern edges are measured where they apply (a model with attention whose "
             "softmax they can hold: not ViT's fused `nn.MultiheadAttention`). A bad disagreement (median overlap "
             f"< {BAD_OVERLAP} or Spearman < {BAD_SPEARMAN}): {', '.join(bad) if bad else 'none'}. Untrained "
             "weights: a trained network's attention may carry more, so its linearised edges may differ more.", "",
             "| model | default | mode | targets | Spearman | top-8 overlap | gap exact | gap of the mode | "
             "(c)/(a) exact | (c)/(a) of the mode |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode, m in r["modes"].items():
            lines.append(f"| {r['model']} | {r['default']} | {mode} | {m['targets']} | {m['spearman']:.3f} | "
                         f"{m['top8_overlap_mean']:.2f} / {m['top8_overlap_median']:.2f} | "
                         f"{r['gap_exact_median']:.2g} / {r['gap_exact_max']:.2g} | "
                         f"{m['gap_median']:.2g} / {m['gap_max']:.2g} | {r['ratio_c_exact_a']:.2f} | "
                         f"{m['ratio_c_a']:.2f} |")
    return lines + provenance(rows, p.get("left_out", {}))


if __name__ == "__main__":
    if "--child" in sys.argv:
        print("MODES " + json.dumps(measure(sys.argv[sys.argv.index("--child") + 1])), flush=True)
    else:
        run(sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None)
