"""``make bench``: measured speed and memory, written to bench/results/*.json and bench/results/README.md.

Every figure is a ratio or rate measured in one run, on this machine (described in the output).
Sections: ``extraction`` (vs plain PyTorch and Captum), ``zoo`` (every torchvision classifier: :mod:`zoo`), ``zoo16``
(12 of them at batch 16), ``edge_modes`` (direct and pattern edges against exact ones: :mod:`edge_modes`), ``pixel``
(pixel pathways per second), ``memory`` (peak RSS while streaming records), ``peaks`` (``extract_batch``'s peak memory
at batch 16 over a plain pass's, per classifier: :mod:`peaks`), ``folders`` (generated JPEG folders up to 50,000: peak
RSS of ``--limit`` and full runs, images/s by loader workers), ``exemplars`` (cost of ``--exemplars 9`` over 0, extra
store size and load time), ``store`` (loading the demo-sized run into a private Neo4j, batched vs one query per row,
and named-query latency), ``scale`` (a synthetic 10,000-image x 3-method run bulk-imported: size, query latency, UI
first paint) and ``scale100k`` (100,000 images, one method).
``--sections a,b`` re-runs only those and keeps the others' last results (each carries its date).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bolt_codec  # noqa: E402
import edge_modes  # noqa: E402
import folders  # noqa: E402  (bench/ is put on the path just above)
import gpu  # noqa: E402
import peaks  # noqa: E402
import zoo  # noqa: E402
from store_scale import query_latency, scale  # noqa: E402


def machine() -> dict[str, Any]:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


MEMORY_CHILD = """
import sys
from pathlib import Path
from extractor.demo import demo_bundle
from extractor.settings import PathwaySettings
from extractor.pipeline import extract_run, load_images
home, out, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
bundle, _ = demo_bundle(home)
images = load_images("demo:train", bundle, home)
extract_run(bundle, images, [PathwaySettings(k=8)], [], out, batch_size=32, limit=n, progress=False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a child of a big process
# would report its parent's size
print(next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
"""


def memory(home: Path) -> list[dict[str, Any]]:
    rows = []
    for n in (100, 1000):
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(home), str(Path(tmp) / "run"), str(n)],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append({"images": n, "peak_rss_mib": int(res.stdout.strip().splitlines()[-1]) / 1024,
                         "seconds": time.perf_counter() - began})
        print(f"memory: {n} images peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    return rows


def _bench_run(home: Path, out: Path) -> Path:
    from extractor.demo import demo_bundle
    from extractor.pipeline import extract_run, load_images
    from extractor.settings import PathwaySettings
    from extractor.variants import VariantSpec

    bundle, _ = demo_bundle(home)
    images = load_images("demo:test", bundle, home)
    extract_run(bundle, images, [PathwaySettings(k=8), PathwaySettings(method="intgrad", k=8)],
                VariantSpec.parse("fgsm,pgd,occlude,shift,deform"), out, limit=120, progress=False)
    return out


NAIVE = "MATCH (a:Neuron {id: $src}) MATCH (b:Neuron {id: $dst}) CREATE (a)-[:FLOWS_TO {pathway: $p, weight: $w}]->(b)"


def loading_and_queries(home: Path) -> dict[str, Any]:
    from graphstore.api import Store
    from graphstore.connection import ConnectionSettings, open_driver
    from graphstore.loader import load_run
    from graphstore.rows import NeuronIndex, flow_columns, neuron_table, plain
    from graphstore.server import USER, ServerConfig, fetch_jars, read_password, start, stop
    from records import read_run

    base = ServerConfig.default(home)
    fetch_jars(base)
    tmp = Path(tempfile.mkdtemp(prefix="pathx-bench-"))
    cfg = base.instance(tmp / "neo4j")
    out: dict[str, Any] = {}
    try:
        began = time.perf_counter()
        start(cfg)
        out["neo4j_start_s"] = time.perf_counter() - began
        run = _bench_run(home, tmp / "run")
        driver = open_driver(ConnectionSettings(uri=cfg.bolt_uri, user=USER, password=read_password(cfg)))
        summary = load_run(driver, run, progress=False)
        rels = summary.includes + summary.edges
        out["load"] = {"relationships": rels, "seconds": summary.seconds,
                       "relationships_per_s": summary.relationships_per_second,
                       "write_seconds": summary.write_seconds,
                       "write_relationships_per_s": summary.write_relationships_per_second}
        print(f"load: {rels} relationships at {summary.relationships_per_second:,.0f}/s", flush=True)
        manifest, _, pathways = read_run(run)
        flows = plain(flow_columns(pathways[:20], NeuronIndex.of(neuron_table(manifest.model))), 0, 3000)
        rows = list(zip(flows["start"], flows["end"], flows["weight"], strict=True))
        began = time.perf_counter()
        with driver.session(database="neo4j") as s:
            for src, dst, w in rows:
                s.run(NAIVE, src=src, dst=dst, p=-1, w=w).consume()
        naive = len(rows) / (time.perf_counter() - began)
        out["load"]["naive_relationships_per_s"] = naive
        out["load"]["ratio_batched_naive"] = summary.relationships_per_second / naive
        with driver.session(database="neo4j") as s:
            s.run("MATCH ()-[f:FLOWS_TO]->() WHERE f.pathway = -1 DELETE f").consume()
        print(f"naive loader: {naive:,.0f}/s", flush=True)
        out["queries"] = query_latency(Store(driver), repeats=20)
        driver.close()
    finally:
        stop(cfg)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def exemplar_store(home: Path) -> dict[str, Any]:
    """What exemplars add to the store: the demo-sized run extracted with ``--exemplars 0`` and 9, each
    loaded into an empty private Neo4j: load seconds, EXEMPLAR relationships, store and record size."""
    from extractor.demo import demo_bundle
    from extractor.pipeline import extract_run, load_images
    from extractor.settings import PathwaySettings
    from extractor.variants import VariantSpec
    from graphstore.connection import ConnectionSettings, open_driver
    from graphstore.loader import load_run
    from graphstore.server import USER, ServerConfig, fetch_jars, read_password, start, stop

    def du(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    base = ServerConfig.default(home)
    fetch_jars(base)
    bundle, _ = demo_bundle(home)
    images = load_images("demo:test", bundle, home)
    out: dict[str, Any] = {}
    for n in (0, 9):
        tmp = Path(tempfile.mkdtemp(prefix="pathx-bench-ex-"))
        cfg = base.instance(tmp / "neo4j")
        try:
            run = tmp / "run"
            extract_run(bundle, images, [PathwaySettings(k=8), PathwaySettings(method="intgrad", k=8)],
                        VariantSpec.parse("fgsm,pgd,occlude"), run, limit=120, exemplars=n, progress=False)
            start(cfg)
            driver = open_driver(ConnectionSettings(uri=cfg.bolt_uri, user=USER, password=read_password(cfg)))
            summary = load_run(driver, run, progress=False)
            driver.close()
            stop(cfg)  # a clean stop flushes the store files before they are measured
            out[str(n)] = {"load_s": summary.seconds, "exemplars": summary.exemplars,
                           "store_mib": du(cfg.instance_dir / "data") / 2**20, "records_mib": du(run) / 2**20}
            print(f"exemplars {n}: load {summary.seconds:.1f} s, {summary.exemplars} EXEMPLAR, store "
                  f"{out[str(n)]['store_mib']:.1f} MiB", flush=True)
        finally:
            stop(cfg)
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _exemplar_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "### Exemplars (`--exemplars 9` vs `--exemplars 0`)", "",
             "| model | images (batch) | seconds with 0 | seconds with 9 | ratio (target ≤ 1.10) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['model']} {r['input']}px | {r['images']} ({r['batch']}) | {r['seconds_off']:.2f} | "
              f"{r['seconds_on']:.2f} | {r['ratio']:.3f} |" for r in results.get("exemplars", {}).get("extraction", [])]
    st = results.get("exemplars", {}).get("store")
    if st:
        a, b = st["0"], st["9"]
        lines += ["", f"Demo-sized run (120 originals, mct + intgrad, FGSM/PGD/occlusion): {b['exemplars']:,} EXEMPLAR "
                  f"relationships; load {a['load_s']:.1f} s → {b['load_s']:.1f} s; store on disk "
                  f"{a['store_mib']:.1f} → {b['store_mib']:.1f} MiB; record files {a['records_mib']:.1f} → "
                  f"{b['records_mib']:.1f} MiB."]
    return lines


def _footprint(r: dict[str, Any]) -> list[str]:
    """The run's memory and disk footprint, where it was measured."""
    if "peak_rss_mib" not in r:
        return []
    b = r["bulk"]
    return ["", f"Peak RSS: Python (records, CSV, aggregates) {r['peak_rss_mib']:,.0f} MiB, `neo4j-admin` "
            f"{r['importer_peak_rss_mib']:,.0f} MiB. Disk at the import's peak: records "
            f"{r['records_mib']:,.0f} MiB + CSV {b['csv_mib']:,.0f} MiB + store; generating the records "
            f"took {r['generate_s']:.0f} s (not counted in the import)."]


def _small_load(r: dict[str, Any]) -> list[str]:
    """A small Bolt load into the imported store: what a load costs there."""
    if "small_load" not in r:
        return []
    s = r["small_load"]
    return ["", f"Then through Bolt, {s['images']} new images of one class ({s['relationships']:,} relationships): "
            f"{s['seconds']:.2f} s (writes {s['write_s']:.2f} s, aggregates {s['aggregate_s']:.2f} s); the same "
            f"run again, nothing new: {s['again_s']:.2f} s (target ≤ 2 s)."]


def _scale_lines(r: dict[str, Any], title: str) -> list[str]:
    b = r["bulk"]
    lines = ["", f"### {title}", "",
             f"{r['images']:,} synthetic images ({', '.join(r['methods'])}): {b['nodes']:,} nodes, "
             f"{b['relationships']:,} relationships; records {r['records_mib']:.0f} MiB, store on disk "
             f"{r['store_mib']:,.0f} MiB: {r['store_mib'] * 2**20 / b['relationships']:.0f} bytes per relationship, "
             "indexes included (target ≤ 120).", *_footprint(r), "",
             "| bulk import phase | seconds |", "|---|---|",
             f"| records → CSV and the aggregates (Python: pyarrow, pandas) | {b['csv_s']:.1f} |",
             f"| `neo4j-admin database import full` | {b['import_s']:.1f} ({b['import_relationships_per_s']:,.0f} "
             "relationships/s) |",
             f"| restart and indexes (the aggregates come with the import) | {b['finish_s']:.1f} |",
             f"| end to end | {b['csv_s'] + b['import_s'] + b['finish_s']:.1f} "
             f"({b['end_to_end_relationships_per_s']:,.0f} relationships/s; target ≥ 150,000/s) |", *_small_load(r),
             "",
             "| named query | p50 ms | p95 ms | p95 ≤ 100 ms |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {'yes' if v['p95_ms'] <= 100 else 'no'} |"
              for k, v in r["queries"].items()]
    if r.get("ui"):
        lines += ["", "| UI page (Chromium, warm) | first paint s | main figure s | cold figure s |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['first_paint_s']:.2f} | {v['figure_s']:.2f} | {v['cold_figure_s']:.2f} |"
                  for k, v in r["ui"].items()]
    return lines


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    dates = results.get("dates", {})
    lines = [f"Machine: {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, torch {m['torch']} "
             f"({m['threads']} threads). Sections measured: "
             + ", ".join(f"{k} {v}" for k, v in sorted(dates.items())) + "."]
    if "extraction" in results:
        lines += ["", "### Extraction", "",
                  "| model | batch | (a) plain fwd+bwd s | (b)/(a) | (c)/(a) | (d)/(b) | (e)/(c) | "
                  "images/s with edges | max diff (b)-(d), (c)-(e) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["extraction"]:
            lines.append(f"| {r['model']} {r['input']}px | {r['batch']} | {r['a_plain_s']:.3f} | "
                         f"{r['ratio_b_a']:.2f} | {r['ratio_c_a']:.2f} | {r['ratio_d_b']:.1f} | {r['ratio_e_c']:.1f} | "
                         f"{r['images_per_s_with_edges']:.1f} | {r['max_abs_diff_b_vs_d']:.1e}, "
                         f"{r['max_abs_diff_c_vs_e'] or 0:.1e} |")
        lines += ["", "Site pairs whose edges come from the segment's one mixing layer (fast path) / all pairs: "
                  + ", ".join(f"{r['model']} {r.get('fast_pairs', '?')}/{r.get('site_pairs', '?')}"
                              for r in results["extraction"] if r["batch"] == 1) + "."]
        if results.get("skipped"):
            lines += ["", f"Left out of this run (--skip): {', '.join(results['skipped'])}."]
        lines += ["", "Targets: (b)/(a) ≤ 1.3, (c)/(a) ≤ 3, (d)/(b) ≥ 5, (e)/(c) ≥ 20. (e) is timed on "
                  f"{results['extraction'][0]['e_targets_timed']} target neurons per configuration and scaled to all."]
    for section in ("zoo", "zoo16"):
        if section in results:
            lines += zoo.markdown(results[section])
    if gpu.RESULTS.exists():  # taken on a lent GPU machine with bench/gpu.py, not by `make bench`
        lines += gpu.markdown(json.loads(gpu.RESULTS.read_text()))
    if "pixel" in results:
        lines += ["", "### Pixel pathways", "", "| model | pixels traced (stride) | seconds | pixels/s |",
                  "|---|---|---|---|"]
        lines += [f"| {r['model']} {r['input']}px, {r['sites']} sites | {r['pixels']} ({r['stride']}) | "
                  f"{r['seconds']:.1f} | {r['pixels_per_s']:.2f} |" for r in results["pixel"]]
    if "memory" in results:
        lines += ["", "### Memory", "", "| images extracted (streamed to Parquet) | peak RSS MiB |", "|---|---|"]
        lines += [f"| {r['images']} | {r['peak_rss_mib']:.0f} |" for r in results["memory"]]
    if "edge_modes" in results:
        lines += edge_modes.markdown(results["edge_modes"])
    if "peaks" in results:
        lines += peaks.markdown(results["peaks"])
    if "exemplars" in results:
        lines += _exemplar_lines(results)
    if "folders" in results:
        lines += folders.markdown(results["folders"])
    if "store" in results:
        load = results["store"]["load"]
        lines += ["", "### Loading through Bolt and queries on the demo-sized store", "",
                  f"Neo4j start: {results['store']['neo4j_start_s']:.1f} s. Load: {load['relationships']:,} "
                  f"relationships at {load['relationships_per_s']:,.0f}/s end to end (schema, repair check, "
                  f"writes, aggregates; target ≥ 50,000/s), "
                  f"{load.get('write_relationships_per_s', 0):,.0f}/s in the write transactions, vs "
                  f"{load['naive_relationships_per_s']:,.0f}/s one query per row ({load['ratio_batched_naive']:.0f}×).",
                  "", "| named query (demo-sized store) | p50 ms | p95 ms |", "|---|---|---|"]
        lines += [f"| {k} | {v['p50_ms']:.1f} | {v['p95_ms']:.1f} |" for k, v in results["store"]["queries"].items()]
    if "bolt_codec" in results:
        lines += bolt_codec.markdown(results["bolt_codec"])
    if "scale" in results:
        lines += _scale_lines(results["scale"], "Synthetic store, bulk import, query latency, UI first paint")
    if "scale100k" in results:
        lines += _scale_lines(results["scale100k"], "100,000 images end to end")
    if "scale1m" in results:
        lines += _scale_lines(results["scale1m"], "1,000,000 images end to end")
    if "retrain" in results:
        r = results["retrain"]
        lines += ["", "### The demo's Fashion-MNIST CNN, trained again", "",
                  f"`pathx train-demo`'s recipe on 2 cores: {r['seconds']} s; test accuracy {r['accuracy']:.4f} "
                  f"(committed weights {r['committed_accuracy']:.4f}); same weights: {r['same_weights']}."]
    return "\n".join(lines) + "\n"


SECTIONS = ("extraction", "zoo", "zoo16", "edge_modes", "pixel", "memory", "peaks", "exemplars", "folders", "store",
            "bolt_codec", "scale", "scale100k", "scale1m", "retrain")


def retrain() -> dict[str, Any]:
    """The demo's Fashion-MNIST CNN trained again from its recipe: its test accuracy beside the committed
    weights' (must agree within 1 point), and whether the bytes are the same."""
    from extractor.demo import accuracy
    from extractor.fashion import WEIGHTS, split, train_fashion_cnn
    from extractor.trained import TRAINED, load_trained

    began = time.perf_counter()
    model = train_fashion_cnn()
    seconds = time.perf_counter() - began
    x, y = split("test")
    ours, committed = accuracy(model, x, y), accuracy(load_trained(TRAINED["fashion_cnn"]), x, y)
    committed_state = __import__("torch").load(WEIGHTS, weights_only=True)
    same = all(bool((committed_state[k] == v).all()) for k, v in model.state_dict().items())
    if abs(ours - committed) > 0.01:
        raise SystemExit(f"retrained accuracy {ours:.4f} is more than a point from the committed {committed:.4f}")
    return {"seconds": round(seconds, 1), "accuracy": ours, "committed_accuracy": committed, "same_weights": same}


def main() -> None:
    import extraction

    from graphstore.server import default_home

    home = default_home()
    quick = "--quick" in sys.argv
    skip = frozenset(sys.argv[sys.argv.index("--skip") + 1].split(",")) if "--skip" in sys.argv else frozenset()
    wanted = sys.argv[sys.argv.index("--sections") + 1].split(",") if "--sections" in sys.argv else list(SECTIONS)
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    path = RESULTS / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() and len(wanted) < len(SECTIONS) else {}
    results["machine"] = machine()
    dated = results.setdefault("dates", {})
    runners = {
        "extraction": lambda: extraction.run((1,) if quick else (1, 16), skip=skip),
        "zoo": lambda: zoo.run(600.0),
        "zoo16": lambda: zoo.run(600.0, list(zoo.BATCH16), batch=16),
        "pixel": extraction.pixel_rates,
        "memory": lambda: memory(home),
        "peaks": peaks.run,
        "edge_modes": edge_modes.run,
        "folders": lambda: folders.folders_memory(quick),
        "exemplars": lambda: {"extraction": extraction.exemplar_overhead(), "store": exemplar_store(home)},
        "store": lambda: loading_and_queries(home),
        "bolt_codec": lambda: bolt_codec.run(home),
        "scale": lambda: scale(home, 1000 if quick else 10_000, ("mct", "intgrad", "correlation"), ui=True),
        "scale100k": lambda: scale(home, 100_000, ("mct",), ui=False, repeats=10),
        "scale1m": lambda: scale(home, 1_000_000, ("mct",), ui=False, repeats=10),
        "retrain": retrain,
    }
    for name in wanted:
        results[name] = runners[name]()
        dated[name] = time.strftime("%Y-%m-%d %H:%M")
        if name == "extraction":
            results["skipped"] = sorted(skip)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    (RESULTS / "README.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
