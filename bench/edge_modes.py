"""Edge modes: how far ``direct`` edges are from ``exact`` ones, and what each costs (``extractor/linear.py``).

Per model (224 px, batch 1, untrained, a child process each): contributions, the connected top-8 selection,
then every target's incoming weights from *all* kept source channels in both modes (``edges_per_target``
large enough to keep them all). Reported:

* **Spearman** correlation of the edge weights of both modes over the (target, source) pairs both keep;
* **top-8 overlap**: per target, the share of its 8 strongest incoming edges (by |weight|) that both modes
  name, averaged (and its median) over targets;
* **completeness gaps** of both modes: per site, ``max_j |sum_i w(i->j) - C_j|`` over the site's largest
  kept |C_j|, as median and maximum over sites;
* **(c)/(a)** of both modes: contributions, selection and top-8 edges over a plain forward + backward, timed
  in interleaved rounds (medians) after a warm-up call each (which finds the routes).

``auto`` makes ``direct`` the default for a model with attention modules; a mode whose median top-8 overlap
is under 0.5 or whose Spearman is under 0.8 would be called a bad disagreement here. Run:
``python bench/edge_modes.py [--only a,b]``; results go to ``bench/results/edge_modes.json`` and into
``make bench``'s report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "edge_modes.json"
MODELS = ("vit_b_16", "vit_b_32", "swin_t", "swin_v2_t", "maxvit_t", "convnext_tiny", "efficientnet_b0")
BAD_OVERLAP, BAD_SPEARMAN = 0.5, 0.8


def measure(name: str, rounds: int = 3) -> dict[str, Any]:
    """One model's row (runs in the child)."""
    import numpy as np
    import torch
    from scipy.stats import spearmanr

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from timing import _interleaved, _ours_c, _plain

    from extractor.batch import edges_of
    from extractor.contributions import mct_contributions
    from extractor.linear import edge_mode
    from extractor.models import load_torchvision
    from extractor.reach import bundle_reach
    from extractor.selection import select
    from extractor.settings import PathwaySettings

    torch.set_num_threads(2)
    torch.manual_seed(0)
    bundle = load_torchvision(name, untrained=True, input_size=224)
    x = torch.rand(1, 3, 224, 224)
    exact = PathwaySettings(k=8, edge_targets=8, edges_per_target=8)
    direct = replace(exact, edges="direct")
    a, c_exact, c_direct = _interleaved([lambda: _plain(bundle, x), lambda: _ours_c(bundle, x, exact),
                                         lambda: _ours_c(bundle, x, direct)], rounds)
    contrib = mct_contributions(bundle, x)
    sel = select(contrib, exact, bundle_reach(bundle, x))
    every = 8 * max(len(s.preds) for s in bundle.sites)  # each target keeps all its kept sources
    by_mode, gaps = {}, {}
    for mode in ("exact", "direct"):
        e = edges_of(bundle, x, slice(0, 1), settings=replace(exact, edges=mode, edges_per_target=every),
                     contrib=contrib, sel=sel)
        by_mode[mode] = {(int(i), int(c), int(j), int(t)): float(w) for i, c, j, t, w in
                         zip(e.src_site, e.src_channel, e.dst_site, e.dst_channel, e.weight, strict=True)}
        scale = np.array([float(contrib.channel[s.index][0].abs().masked_fill(~sel.kept[s.index][0], 0).max())
                          for s in bundle.sites])
        rel = e.gap[0] / np.maximum(scale, 1e-30)
        gaps[mode] = rel[~np.isnan(rel)]
    common = sorted(set(by_mode["exact"]) & set(by_mode["direct"]))
    rho = float(spearmanr([by_mode["exact"][k] for k in common], [by_mode["direct"][k] for k in common]).statistic)
    tops: dict[tuple[int, int], list[set[tuple[int, int]]]] = {}
    for m, mode in enumerate(("exact", "direct")):
        incoming: dict[tuple[int, int], list[tuple[float, tuple[int, int]]]] = {}
        for (i, c, j, t), w in by_mode[mode].items():
            incoming.setdefault((j, t), []).append((abs(w), (i, c)))
        for target, ws in incoming.items():
            tops.setdefault(target, [set(), set()])[m] = {k for _, k in sorted(ws, reverse=True)[:8]}
    overlap = [len(ex & di) / max(len(ex), 1) for ex, di in tops.values()]
    mode = edge_mode("auto", bundle.model)
    return {"model": name, "sites": len(bundle.sites), "default": mode, "targets": len(tops),
            "pairs": len(common), "spearman": rho, "top8_overlap_mean": float(np.mean(overlap)),
            "top8_overlap_median": float(np.median(overlap)),
            "gap_exact_median": float(np.median(gaps["exact"])), "gap_exact_max": float(gaps["exact"].max()),
            "gap_direct_median": float(np.median(gaps["direct"])), "gap_direct_max": float(gaps["direct"].max()),
            "a_s": a, "ratio_c_exact_a": c_exact / a, "ratio_c_direct_a": c_direct / a}


def run(only: list[str] | None = None, limit_s: float = 1800.0) -> dict[str, Any]:
    from children import Rows, child_json, commit  # bench/ is on the path wherever this runs

    rows = Rows(OUT)
    for name in only or MODELS:
        try:
            row = {**child_json(__file__, [name], "MODES", limit_s), "commit": commit()}
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            rows.leave_out(name, exc, limit_s, "edge modes")
            continue
        rows.keep(name, row, f"edge modes {name}: spearman {row['spearman']:.3f}, top-8 overlap "
                             f"{row['top8_overlap_mean']:.2f}, (c)/(a) exact {row['ratio_c_exact_a']:.2f} "
                             f"direct {row['ratio_c_direct_a']:.2f}")
    return rows.finish()


def markdown(p: dict[str, Any]) -> list[str]:
    from zoo import provenance  # bench/ is on the path wherever this runs
    rows = sorted(p["rows"].values(), key=lambda r: r["model"])
    if not rows:
        return []
    bad = [r["model"] for r in rows if r["top8_overlap_median"] < BAD_OVERLAP or r["spearman"] < BAD_SPEARMAN]
    lines = ["", "### Edge modes: direct against exact (224 px, batch 1, untrained)", "",
             f"{len(rows)} classifiers ({p.get('date', '')}). Spearman of the edge weights over the pairs both modes "
             "keep; per target, the share of its 8 strongest incoming edges both name (mean / median); completeness "
             "gap per site over its largest kept |C_j| (median / max over sites); (c)/(a) in each mode. A bad "
             f"disagreement (median overlap < {BAD_OVERLAP} or Spearman < {BAD_SPEARMAN}): "
             f"{', '.join(bad) if bad else 'none'}. Untrained weights: a trained network's attention may carry "
             "more, so its direct edges may differ more.", "",
             "| model | default | targets | Spearman | top-8 overlap | gap exact | gap direct | (c)/(a) exact | "
             "(c)/(a) direct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['default']} | {r['targets']} | {r['spearman']:.3f} | "
                     f"{r['top8_overlap_mean']:.2f} / {r['top8_overlap_median']:.2f} | "
                     f"{r['gap_exact_median']:.2g} / {r['gap_exact_max']:.2g} | "
                     f"{r['gap_direct_median']:.2g} / {r['gap_direct_max']:.2g} | {r['ratio_c_exact_a']:.2f} | "
                     f"{r['ratio_c_direct_a']:.2f} |")
    return lines + provenance(rows, p.get("left_out", {}))


if __name__ == "__main__":
    if "--child" in sys.argv:
        print("MODES " + json.dumps(measure(sys.argv[sys.argv.index("--child") + 1])), flush=True)
    else:
        run(sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None)
