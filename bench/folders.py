"""Bench sections on generated image folders: memory and throughput of the streaming input.

``folders_memory``: peak RSS of ``pathx extract --limit 32`` over folders of 1,000, 10,000 and
50,000 generated 224-px JPEGs (ImageNet-like: five ``n0...`` class folders), a full run of
1,000, and the first run a new user tried (3,000 400x300 JPEGs, ``--limit 4``). ``folders_rate``:
images/s with 0 and 2 loader workers. Each run is its own process; peak RSS is the main
process's ``VmHWM`` plus the largest loader worker's (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import resource, sys, time
from pathx.cli import app
began = time.perf_counter()
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    main = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"BENCH {main} {worker} {time.perf_counter() - began:.3f}")
"""


def generate(root: Path, n: int, size: tuple[int, int] = (224, 224), classes: int = 5, seed: int = 0) -> Path:
    """``n`` smooth random JPEGs (gradients and discs: small files, like photos) in ``classes`` folders."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    names = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a, b, c = rng.random(3)
        base = np.stack([(a * xx / w + b * yy / h) % 1, (c * xx / w) % 1, (b * yy / h) % 1], -1)
        cy, cx, r = rng.random() * h, rng.random() * w, 10 + rng.random() * h / 3
        base[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.random(3)
        Image.fromarray((base * 255).astype(np.uint8)).save(root / names[i % classes] / f"img{i:06d}.jpg", quality=85)
    return root


def _extract(folder: Path, out: Path, extra: list[str]) -> dict[str, float]:
    args = ["extract", "--model", "resnet18", "--untrained", "--images", str(folder), "--out", str(out),
            "--top-k", "4", "--batch-size", "16", *extra]
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT,
                         check=True, env=dict(os.environ, TQDM_DISABLE="1"))
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("BENCH "))
    main_kib, worker_kib, seconds = line.split()[1:]
    summary = next(ln for ln in res.stdout.splitlines() if " images, " in ln)
    return {"main_mib": int(main_kib) / 1024, "worker_mib": int(worker_kib) / 1024,
            "peak_rss_mib": (int(main_kib) + int(worker_kib)) / 1024, "seconds": float(seconds),
            "images": int(summary.split()[0])}


def folders_memory(quick: bool = False) -> dict[str, Any]:
    sizes = (1000, 2000) if quick else (1000, 10_000, 50_000)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pathx-folders-") as tmp:
        t = Path(tmp)
        began = time.perf_counter()
        big = generate(t / "big", sizes[-1])
        gen_s = time.perf_counter() - began
        print(f"folders: generated {sizes[-1]} JPEGs in {gen_s:.0f} s", flush=True)
        files = sorted(big.rglob("*.jpg"))
        for n in sizes:
            if n == sizes[-1]:
                folder = big
            else:  # hard links: the first n files, same class folders
                folder = t / f"f{n}"
                for f in files[:n]:
                    (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
                    os.link(f, folder / f.parent.name / f.name)
            r = _extract(folder, t / f"run{n}", ["--limit", "32"])
            rows.append({"folder": n, "mode": "--limit 32", **r})
            print(f"folders: {n} files, --limit 32: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f} s",
                  flush=True)
        full_n = 1000 if not quick else 200
        full = _extract(t / "f1000", t / "full", ["--limit", str(full_n)] if quick else [])
        rows.append({"folder": 1000, "mode": "full run", **full})
        print(f"folders: full run of {full['images']}: peak RSS {full['peak_rss_mib']:.0f} MiB", flush=True)
        first = generate(t / "first", 3000, size=(300, 400), seed=1)
        r = _extract(first, t / "firstrun", ["--limit", "4"])
        rows.append({"folder": 3000, "mode": "400x300 JPEGs, --limit 4", **r})
        print(f"folders: 3,000 400x300 --limit 4: {r['seconds']:.1f} s, {r['peak_rss_mib']:.0f} MiB", flush=True)
        rates = []
        for workers in (0, 2):
            r = _extract(t / "f1000", t / f"rate{workers}", ["--limit", "128" if not quick else "32",
                                                             "--loader-workers", str(workers)])
            rates.append({"workers": workers, "images_per_s": r["images"] / r["seconds"], **r})
            print(f"folders: {workers} loader workers: {rates[-1]['images_per_s']:.2f} images/s", flush=True)
    return {"generate_s": gen_s, "memory": rows, "rates": rates}


def markdown(r: dict[str, Any]) -> list[str]:
    lines = ["", "### Image folders (streaming input)", "",
             "ResNet-18 (untrained) at 224 px, `--methods mct --top-k 4 --batch-size 16`, generated JPEGs in five "
             "WordNet-style folders. Peak RSS = main process + largest loader worker.", "",
             "| folder | run | images extracted | seconds | peak RSS MiB (main + worker) |", "|---|---|---|---|---|"]
    lines += [f"| {m['folder']:,} | {m['mode']} | {m['images']} | {m['seconds']:.1f} | "
              f"{m['peak_rss_mib']:.0f} ({m['main_mib']:.0f} + {m['worker_mib']:.0f}) |" for m in r["memory"]]
    limited = [m["peak_rss_mib"] for m in r["memory"] if m["mode"] == "--limit 32"]
    full = [m["peak_rss_mib"] for m in r["memory"] if m["mode"] == "full run"]
    spread = (max(limited + full) / min(limited + full) - 1) * 100
    lines += ["", f"Largest over smallest peak RSS across the `--limit` runs and the full run: +{spread:.1f} % "
              "(target: within 10 %).", "", "| loader workers | images | images/s |", "|---|---|---|"]
    lines += [f"| {x['workers']} | {x['images']} | {x['images_per_s']:.2f} |" for x in r["rates"]]
    return lines
