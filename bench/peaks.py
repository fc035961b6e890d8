"""Peak memory at batch 16: ``extract_batch``'s peak increment over a plain forward + backward's.

Per model and per operation, a child process of its own loads the model, makes 16 random images
at the model's input size and runs the operation twice (the first call of ``extract_batch`` also
finds the segment routes). Before each call the process's high-water mark is reset
(``/proc/self/clear_refs``), so a call's peak increment is ``VmHWM`` after it minus ``VmRSS`` before
it; the larger of the two calls is reported. The children run with glibc's mmap threshold fixed at
64 KiB: with its default, the threshold grows as large blocks are freed, the first call's freed
memory stays in the heap, and the second call's increment reads near zero. (a) is the plain pass:
the target logit's gradient with respect to the input. Target: (e)/(a) ≤ 2 on every classifier.
Run: ``python bench/peaks.py [--only a,b]``; results go to ``bench/results/peaks.json`` and into
``make bench``'s report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "peaks.json"
BATCH = 16
# the trained network a user meets first, then classifiers of each architecture family
MODELS = ("efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121",
          "googlenet", "convnext_tiny", "vit_b_16", "swin_t")


def _status(key: str) -> float:
    """MiB of ``VmRSS`` or ``VmHWM`` of this process."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":")) / 1024


def child(name: str, what: str) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT))
    from extractor.launch import model_from_spec
    from extractor.methods import extract_batch
    from extractor.settings import PathwaySettings
    from graphstore.server import default_home

    torch.set_num_threads(2)
    torch.manual_seed(0)
    from extractor.trained import TRAINED

    bundle = model_from_spec(name, default_home(), untrained=name not in TRAINED)
    x = torch.rand(BATCH, *bundle.info.input_shape)
    settings = PathwaySettings(k=8, edge_targets=8, edges_per_target=8)

    def plain() -> None:
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(bundle.forward(xr).max(1).values.sum(), xr)

    fn = plain if what == "plain" else (lambda: extract_batch(bundle, x, settings))
    peaks, seconds = [], []
    for _ in range(2):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before, began = _status("VmRSS"), time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - began)
        peaks.append(_status("VmHWM") - before)
    return {"peak_mib": max(peaks), "peaks_mib": peaks, "seconds": seconds}


def run(only: list[str] | None = None, limit_s: float = 900.0) -> dict[str, Any]:
    from children import Rows, child_json, commit  # bench/ is on the path wherever this runs

    rows = Rows(OUT)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in only or MODELS:
        row: dict[str, Any] = {"model": name, "batch": BATCH, "commit": commit()}
        try:
            for what in ("plain", "extract"):
                row[what] = child_json(__file__, [name, what], "PEAK", limit_s, env)
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            rows.leave_out(name, exc, limit_s, "peaks")
            continue
        row["ratio"] = row["extract"]["peak_mib"] / row["plain"]["peak_mib"]
        rows.keep(name, row, f"peaks {name}: plain +{row['plain']['peak_mib']:.0f} MiB, extract_batch "
                             f"+{row['extract']['peak_mib']:.0f} MiB ({row['ratio']:.2f}x)")
    return rows.finish()


def markdown(p: dict[str, Any]) -> list[str]:
    from zoo import provenance  # bench/ is on the path wherever this runs
    rows = sorted(p["rows"].values(), key=lambda r: r["model"])
    if not rows:
        return []
    over = [r["model"] for r in rows if r["ratio"] > 2]
    lines = ["", f"### Peak memory at batch {BATCH} (`extract_batch` over a plain forward + backward)", "",
             f"{len(rows)} classifiers ({p.get('date', '')}); target (e)/(a) ≤ 2; over it: "
             f"{', '.join(over) if over else 'none'}. Peak increment = the process's high-water mark during a call "
             "minus its RSS before it (see `bench/peaks.py`).", "",
             "| model | (a) plain MiB | (e) extract_batch MiB | (e)/(a) | extract_batch s (first, second call) |",
             "|---|---|---|---|---|"]
    for r in rows:
        s = r["extract"]["seconds"]
        lines.append(f"| {r['model']} | {r['plain']['peak_mib']:.0f} | {r['extract']['peak_mib']:.0f} | "
                     f"{r['ratio']:.2f} | {s[0]:.1f}, {s[1]:.1f} |")
    return lines + provenance(rows, p.get("left_out", {}))


if __name__ == "__main__":
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        print("PEAK " + json.dumps(child(sys.argv[i + 1], sys.argv[i + 2])), flush=True)
    else:
        run(sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None)
