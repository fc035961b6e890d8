"""Model zoo: every torchvision classifier at 224 px, batch 1, untrained (structure and speed only).

Per model, in a child process of its own (a time budget; a crash or an out-of-memory cannot take
the bench down): sites found and their layouts, edges of the site graph and the route each takes
(mixing, junction, VJP: ``extractor.edges``), and (a) plain forward + backward, (b) contributions,
(c) contributions + top-8 edges along the site graph, (e) the whole per-batch pipeline
(``extract_batch``), timed in interleaved rounds (medians) after one warm-up call each (which finds
the routes). Run: ``python bench/zoo.py [--limit-s S] [--only a,b] [--batch N] [--rounds R]`` (3 rounds unless
told: the largest classifiers at batch 16 take one, and their row says so); results go to
``bench/results/zoo.json`` (batch 1) or ``zoo_b{N}.json`` and into ``make bench``'s report. Section ``zoo16``
measures :data:`BATCH16` at batch 16: the batch a folder run uses.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "zoo.json"
MEMORY_GIB = 24
# at batch 16 (section zoo16): one or two of each family whose edges take a different route
BATCH16 = ("resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
           "regnet_y_400mf", "densenet121", "googlenet", "shufflenet_v2_x1_0", "convnext_tiny", "vit_b_16", "swin_t")


def out_file(batch: int) -> Path:
    """Where the rows of one batch size go."""
    return OUT if batch == 1 else OUT.with_name(f"zoo_b{batch}.json")


def measure(name: str, rounds: int = 3, batch: int = 1) -> dict[str, Any]:
    """One model's row (runs in the child)."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from timing import _interleaved, _ours_b, _ours_c, _plain, fast_routes

    from extractor.linear import edge_mode
    from extractor.methods import extract_batch
    from extractor.models import load_torchvision
    from extractor.settings import PathwaySettings

    torch.set_num_threads(2)
    torch.manual_seed(0)
    size = 299 if name == "inception_v3" else 224
    bundle = load_torchvision(name, untrained=True, input_size=size)
    x = torch.rand(batch, 3, size, size)
    mode = edge_mode("auto", bundle.model)  # the default mode, as `pathx extract` picks it
    settings = PathwaySettings(k=8, edge_targets=8, edges_per_target=8, edges=mode)
    fns = [lambda: _plain(bundle, x), lambda: _ours_b(bundle, x), lambda: _ours_c(bundle, x, settings),
           lambda: extract_batch(bundle, x, settings)]
    if mode != "exact":  # the exact mode's figure beside the default's
        exact = replace(settings, edges="exact")
        fns.append(lambda: _ours_c(bundle, x, exact))
    a, b, c, e, *rest = _interleaved(fns, rounds)
    routes = fast_routes(bundle, x, mode)
    layouts: dict[str, int] = {}
    for s in bundle.sites:
        layouts[s.layout] = layouts.get(s.layout, 0) + 1
    params = sum(p.numel() for p in bundle.model.parameters())
    return {"model": name, "input": size, "params_m": params / 1e6, "sites": len(bundle.sites),
            "layouts": layouts, "graph_edges": sum(routes.values()), "routes": routes, "a_s": a, "b_s": b, "c_s": c,
            "e_s": e, "ratio_b_a": b / a, "ratio_c_a": c / a, "ratio_e_a": e / a, "images_per_s_with_edges": batch / c,
            "batch": batch, "rounds": rounds,
            "edges": mode, **({"c_exact_s": rest[0], "ratio_c_exact_a": rest[0] / a} if rest else {})}


def run(limit_s: float, only: list[str] | None = None, batch: int = 1, rounds: int = 3) -> dict[str, Any]:
    import torchvision

    out = out_file(batch)
    names = only or sorted(torchvision.models.list_models(module=torchvision.models))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    done: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"rows": {}, "left_out": {}}
    for name in names:
        began = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(batch),
                                   "--rounds", str(rounds)],
                                  capture_output=True, text=True, timeout=limit_s, cwd=ROOT)
        except subprocess.TimeoutExpired:
            done["left_out"][name] = f"over the {limit_s:.0f} s budget per model on this machine"
            done["rows"].pop(name, None)
            print(f"{name}: over budget", flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ZOO ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            reason = f"out of memory ({MEMORY_GIB} GiB)" if proc.returncode in (-9, 137) else tail
            done["left_out"][name] = reason
            done["rows"].pop(name, None)
            print(f"{name}: {reason}", flush=True)
            continue
        row = json.loads(lines[-1][4:])
        row["wall_s"] = time.perf_counter() - began
        row["commit"] = commit
        done["rows"][name] = row
        done["left_out"].pop(name, None)
        print(f"{name}: c/a {row['ratio_c_a']:.2f} b/a {row['ratio_b_a']:.2f} routes {_routes(row)}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1, sort_keys=True))
    done["date"] = time.strftime("%Y-%m-%d")
    done["batch"] = batch
    done["listed"] = len(torchvision.models.list_models(module=torchvision.models))
    out.write_text(json.dumps(done, indent=1, sort_keys=True))
    return done


def _routes(row: dict[str, Any]) -> str:
    """Edges by route; a row measured before the junction route counts its fast (mixing) edges only."""
    if "routes" in row:
        return " / ".join(str(row["routes"].get(k, 0)) for k in ("mixing", "junction", "vjp"))
    return f"{row['fast_edges']} / (not measured) / {row['graph_edges'] - row['fast_edges']}"


def markdown(z: dict[str, Any]) -> list[str]:
    rows = sorted(z["rows"].values(), key=lambda r: r["model"])
    if not rows:
        return []
    worst = max(rows, key=lambda r: r["ratio_c_a"])
    batch = z.get("batch", 1)
    lines = ["", f"### Model zoo (torchvision classifiers, 224 px, batch {batch}, untrained)", "",
             f"Coverage: {len(rows)} of {z.get('listed', '?')} torchvision classifiers measured ({z.get('date', '')}); "
             f"worst (c)/(a) {worst['ratio_c_a']:.2f} ({worst['model']}); median (c)/(a) "
             f"{statistics.median(r['ratio_c_a'] for r in rows):.2f}. Each figure is the median of 3 interleaved "
             "rounds after a warm-up call, unless the row says fewer. Targets: (b)/(a) ≤ 1.3, (c)/(a) ≤ 3, (e)/(a) ≤ 4 "
             "((e): the whole per-batch pipeline, `extract_batch`: contributions, selection, edges, Pathway "
             "Gradient; — where the row predates it). (c) and (e) are in the model's default edge mode "
             "(`--edges auto`: direct for a model with attention modules, pattern for Swin V2 and MaxViT, whose "
             "direct edges disagree badly with the exact ones, else exact; `extractor/linear.py`); where it is not "
             "exact, the exact mode's (c)/(a) follows it.", "",
             "| model | params M | sites (layouts) | site-graph edges: mixing / junction / VJP | (a) s | (b)/(a) | "
             "(c)/(a) | (e)/(a) | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lay = ", ".join(f"{k} {v}" for k, v in sorted(r["layouts"].items()))
        pipeline = f"{r['ratio_e_a']:.2f}" if "ratio_e_a" in r else "—"
        c_a = f"{r['ratio_c_a']:.2f}"
        if "ratio_c_exact_a" in r:
            c_a += f" {r.get('edges', 'direct')} (exact {r['ratio_c_exact_a']:.2f})"
        once = r.get("rounds", 3)
        model = r["model"] + (f" ({once} round{'s' if once > 1 else ''})" if once != 3 else "")
        lines.append(f"| {model} | {r['params_m']:.1f} | {r['sites']} ({lay}) | {r['graph_edges']}: "
                     f"{_routes(r)} | {r['a_s']:.3f} | {r['ratio_b_a']:.2f} | {c_a} | {pipeline} | "
                     f"{r['images_per_s_with_edges']:.2f} |")
    return lines + provenance(rows, z.get("left_out", {}))


def provenance(rows: list[dict[str, Any]], left_out: dict[str, str]) -> list[str]:
    """Lines under a per-model table: which commits its rows come from (when more than one), and what was
    left out and why (shared by the zoo and the peak-memory sections)."""
    lines: list[str] = []
    commits = sorted({r.get("commit", "?") for r in rows})
    if len(commits) > 1:
        lines += ["", "Measured at commits: " + "; ".join(
            f"{c}: {', '.join(r['model'] for r in rows if r.get('commit', '?') == c)}" for c in commits) + "."]
    if left_out:
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in sorted(left_out.items())) + "."]
    return lines


if __name__ == "__main__":
    size = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 1
    times = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    if "--child" in sys.argv:
        print("ZOO " + json.dumps(measure(sys.argv[sys.argv.index("--child") + 1], rounds=times, batch=size)),
              flush=True)
    else:
        limit = float(sys.argv[sys.argv.index("--limit-s") + 1]) if "--limit-s" in sys.argv else 600.0
        only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
        run(limit, only, size, times)
