"""GPU figures, taken on a CUDA machine (the `device` tool lends one to some sessions; CI never has one).

``python bench/gpu.py zoo OUT [--only a,b]``: every torchvision classifier (untrained) at 224 px
(Inception-v3 299) on ``cuda``, batch 1 and 16: (a) plain forward + backward, (b) contributions,
(c) contributions + top-8 edges along the site graph, timed in interleaved rounds with a CUDA
synchronisation around each sample, and the peak GPU memory of (c). One model failing is written
down with its reason and does not stop the others.

``python bench/gpu.py folder OUT``: ``pathx extract --device cuda`` over a generated folder of
224-px JPEGs (ResNet-50, untrained, the streaming path with loader workers and pinned memory), and
the same command on the machine's CPU cores for comparison.

Results go to ``OUT/gpu_zoo.json`` / ``OUT/gpu_folder.json``; committed as ``bench/results/gpu.json``
(merged by ``python bench/gpu.py merge FILES...``), rendered into the bench README by bench/run.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "gpu.json"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def zoo(out: Path, only: list[str] | None) -> dict[str, Any]:
    import torch
    import torchvision
    from timing import _interleaved, _ours_b, _ours_c, _plain, fast_routes

    from extractor.models import load_torchvision
    from extractor.settings import PathwaySettings

    names = only or sorted(torchvision.models.list_models(module=torchvision.models))
    path = out / "gpu_zoo.json"
    done: dict[str, Any] = {"rows": {}, "left_out": {}, "gpu": torch.cuda.get_device_name(0),
                            "torch": torch.__version__}
    settings = PathwaySettings(k=8, edge_targets=8, edges_per_target=8)
    for name in names:
        began = time.perf_counter()
        try:
            torch.manual_seed(0)
            size = 299 if name == "inception_v3" else 224
            bundle = load_torchvision(name, untrained=True, input_size=size)
            bundle.model.to("cuda")
            row: dict[str, Any] = {"model": name, "input": size, "sites": len(bundle.sites)}
            for batch in (1, 16):
                x = torch.rand(batch, 3, size, size, device="cuda")
                torch.cuda.reset_peak_memory_stats()
                a, b, c = _interleaved([partial(_plain, bundle, x), partial(_ours_b, bundle, x),
                                        partial(_ours_c, bundle, x, settings)], 5)
                row[f"b{batch}"] = {"a_s": a, "b_s": b, "c_s": c, "ratio_b_a": b / a, "ratio_c_a": c / a,
                                    "images_per_s_with_edges": batch / c,
                                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            row["routes"] = fast_routes(bundle, x)
            row["graph_edges"], row["fast_edges"] = sum(row["routes"].values()), row["routes"]["mixing"]
            row["wall_s"] = time.perf_counter() - began
            done["rows"][name] = row
            print(f"{name}: b1 c/a {row['b1']['ratio_c_a']:.2f} b16 c/a {row['b16']['ratio_c_a']:.2f} "
                  f"{row['b16']['images_per_s_with_edges']:.1f} img/s", flush=True)
        except Exception as exc:  # one model's failure is a result, not the end of the run
            done["left_out"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"{name}: {done['left_out'][name]}", flush=True)
        finally:
            bundle = None  # type: ignore[assignment] # frees its GPU memory before the next model
            torch.cuda.empty_cache()
        path.write_text(json.dumps(done, indent=1, sort_keys=True))
    return done


CHILD = """
import sys, time
from pathx.cli import app
began = time.perf_counter()
app(sys.argv[1:], standalone_mode=False)
print(f"BENCH {time.perf_counter() - began:.3f}")
"""


def folder(out: Path, n: int = 1024) -> dict[str, Any]:
    import torch
    from folders import generate

    rows = []
    with tempfile.TemporaryDirectory(prefix="pathx-gpu-") as tmp:
        t = Path(tmp)
        began = time.perf_counter()
        images = generate(t / "imgs", n)
        print(f"generated {n} JPEGs in {time.perf_counter() - began:.0f} s", flush=True)
        for device, limit, batch in (("cuda", n, 64), ("cpu", 64, 16)):
            args = ["extract", "--model", "resnet50", "--untrained", "--images", str(images), "--out",
                    str(t / f"run-{device}"), "--top-k", "8", "--batch-size", str(batch), "--device", device,
                    "--limit", str(limit), "--loader-workers", "8"]
            res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT,
                                 env=dict(os.environ, TQDM_DISABLE="1",
                                          PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
            if res.returncode != 0:
                raise SystemExit(f"{device}: {res.stderr.strip().splitlines()[-1:]}")
            summary = next(ln for ln in res.stdout.splitlines() if " images, " in ln)
            seconds = float(next(ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")).split()[1])
            images_done = int(summary.split()[0])
            rows.append({"device": device, "images": images_done, "batch": batch, "seconds": seconds,
                         "images_per_s": images_done / seconds, "summary": summary})
            print(f"{device}: {summary}", flush=True)
    result = {"gpu": torch.cuda.get_device_name(0), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
              "rows": rows}
    (out / "gpu_folder.json").write_text(json.dumps(result, indent=1))
    return result


def merge(files: list[Path]) -> dict[str, Any]:
    """Merge the device's result files into ``bench/results/gpu.json``."""
    merged: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for f in files:
        part = json.loads(f.read_text())
        if f.name.startswith("gpu_zoo"):
            z = merged.setdefault("zoo", {"rows": {}, "left_out": {}})
            z["rows"].update(part["rows"])
            z["left_out"].update(part["left_out"])
            for name in part["rows"]:
                z["left_out"].pop(name, None)
            z["gpu"], z["torch"] = part["gpu"], part["torch"]
        else:
            merged["folder"] = part
    merged["date"] = time.strftime("%Y-%m-%d")
    RESULTS.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return merged


def markdown(g: dict[str, Any]) -> list[str]:
    lines = ["", f"### GPU ({g.get('zoo', g.get('folder', {})).get('gpu', '?')}, {g.get('date', '')})", "",
             "Taken with `python bench/gpu.py` on a lent GPU machine (16 CPU cores); not part of `make bench` "
             "here (no GPU)."]
    if "folder" in g:
        lines += ["", "`pathx extract --model resnet50 --untrained --top-k 8 --loader-workers 8` over generated "
                  "224-px JPEGs:", "", "| device | images | batch | seconds | images/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['device']} | {r['images']} | {r['batch']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} |"
                  for r in g["folder"]["rows"]]
    if "zoo" in g and g["zoo"]["rows"]:
        rows = sorted(g["zoo"]["rows"].values(), key=lambda r: r["model"])
        worst = max(rows, key=lambda r: r["b16"]["ratio_c_a"])
        lines += ["", f"Model zoo on the GPU: {len(rows)} classifiers, worst (c)/(a) at batch 16 "
                  f"{worst['b16']['ratio_c_a']:.2f} ({worst['model']}).", "",
                  "| model | sites | b=1 (a) ms | b=1 (c)/(a) | b=16 (a) ms | b=16 (b)/(a) | b=16 (c)/(a) | "
                  "b=16 images/s with edges | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            one, many = r["b1"], r["b16"]
            lines.append(f"| {r['model']} | {r['sites']} | {one['a_s'] * 1e3:.1f} | {one['ratio_c_a']:.2f} | "
                         f"{many['a_s'] * 1e3:.1f} | {many['ratio_b_a']:.2f} | {many['ratio_c_a']:.2f} | "
                         f"{many['images_per_s_with_edges']:.1f} | {many['peak_gib']:.1f} |")
        if g["zoo"]["left_out"]:
            lines += ["", "Not measured on the GPU: " + "; ".join(
                f"{k}: {v}" for k, v in sorted(g["zoo"]["left_out"].items())) + "."]
    return lines


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "merge":
        merge([Path(p) for p in sys.argv[2:]])
    else:
        target = Path(sys.argv[2])
        target.mkdir(parents=True, exist_ok=True)
        if what == "zoo":
            only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else None
            zoo(target, only)
        else:
            folder(target)
