"""Store-side figures at scale: a synthetic run bulk-imported into a private Neo4j, named-query
latency over it, the store's size on disk, and each UI page's time to first paint in Chromium."""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthetic import write_synthetic

CHROMIUM = "/usr/bin/chromium"


class ImporterPeak:
    """The peak RSS (MiB) of this process's ``neo4j-admin`` child and its own children, read from
    ``/proc`` while they run.

    ``RUSAGE_CHILDREN`` would not do: Linux carries ``ru_maxrss`` over fork + exec, so a child of a
    big process reports its parent's size. ``neo4j-admin`` is a small launcher JVM that runs the import
    in a second JVM; the figure is the sum of their ``VmHWM`` high-water marks (a bound on their joint
    peak), each read until its process exits, short of at most one polling interval's growth.
    """

    def __init__(self, every_s: float = 0.2) -> None:
        self._hwm: dict[int, float] = {}
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @property
    def mib(self) -> float:
        return sum(self._hwm.values())

    def __enter__(self) -> ImporterPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        from graphstore.server import ADMIN_ENTRY_POINT

        me = os.getpid()
        while not self._stop.wait(self._every):
            procs: dict[int, tuple[int, float, str]] = {}  # pid -> (parent, VmHWM MiB, command line)
            for proc in Path("/proc").glob("[0-9]*"):
                try:
                    status = dict(ln.split(":", 1) for ln in (proc / "status").read_text().splitlines() if ":" in ln)
                    hwm = int(status["VmHWM"].split()[0]) / 1024
                    procs[int(proc.name)] = (int(status["PPid"]), hwm, (proc / "cmdline").read_text())
                except (OSError, KeyError, ValueError):
                    continue  # gone between listing and reading, or a kernel thread (no VmHWM)
            tree = {pid for pid, (parent, _, cmd) in procs.items() if parent == me and ADMIN_ENTRY_POINT in cmd}
            while grown := {pid for pid, (parent, _, _) in procs.items() if parent in tree} - tree:
                tree |= grown
            for pid in tree:
                self._hwm[pid] = max(self._hwm.get(pid, 0.0), procs[pid][1])


def query_latency(store: Any, repeats: int = 20) -> dict[str, dict[str, float]]:
    """p50 and p95 (ms) of each named query over ``repeats`` calls after one warm-up call."""
    model = store.default_model()
    config = store.default_config(model)
    classes = store.classes(model)
    variant = store.images(model, kind="pgd", limit=1)[0].id
    original = store.images(model, kind="original", limit=1)[0].id
    pathway = store.pathways_of_image(original)[0].id
    named: dict[str, Callable[[], Any]] = {
        "summary": lambda: store.summary(),
        "top_neurons": lambda: store.top_neurons(classes[3].id, config),
        "shared_pathways": lambda: store.shared_pathways(classes[1].id, classes[7].id, config),
        "similarity_matrix": lambda: store.similarity_matrix(model, config),
        "class_signature": lambda: store.class_signature(classes[2].id, config),
        "adversarial_shift": lambda: store.adversarial_shift(variant, config),
        "hijacked_neurons": lambda: store.hijacked_neurons(model, config, "pgd"),
        "pathway_counts": lambda: store.pathway_counts(config),
        "variant_overlap": lambda: store.variant_overlap(model, config),
        "similar_images": lambda: store.similar_images(original, config),
        "method_agreement": lambda: store.method_agreement(original),
        "pathway_graph": lambda: store.pathway_graph(pathway),
    }
    out = {}
    for name, fn in named.items():
        fn()
        samples = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1000)
        samples.sort()
        out[name] = {"p50_ms": statistics.median(samples), "p95_ms": samples[int(0.95 * (len(samples) - 1))]}
        print(f"query {name}: p50 {out[name]['p50_ms']:.1f} ms p95 {out[name]['p95_ms']:.1f} ms", flush=True)
    return out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def first_paint(env: dict[str, str], repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per UI page: seconds from navigation to its title (first paint) and to its main figure."""
    from playwright.sync_api import sync_playwright

    from ui.serve import PAGES, running_ui

    out: dict[str, dict[str, float]] = {}
    with running_ui(env) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                for path, title, drawn in ((pg.path, pg.title, pg.figure) for pg in PAGES):
                    paints, figures = [], []
                    for _ in range(repeats + 1):  # the first visit warms Streamlit's caches; not counted
                        page = browser.new_page(viewport={"width": 1400, "height": 2200})
                        began = time.perf_counter()
                        page.goto(f"{url}/{path}")
                        page.get_by_role("heading", name=title).first.wait_for(timeout=120_000)
                        paints.append(time.perf_counter() - began)
                        page.locator(drawn).first.wait_for(timeout=120_000)
                        figures.append(time.perf_counter() - began)
                        page.close()
                    out[path] = {"first_paint_s": statistics.median(paints[1:]),
                                 "figure_s": statistics.median(figures[1:]), "cold_figure_s": figures[0]}
                    print(f"ui {path}: first paint {out[path]['first_paint_s']:.2f} s, figure "
                          f"{out[path]['figure_s']:.2f} s (cold {figures[0]:.2f} s)", flush=True)
            finally:
                browser.close()
    return out


def small_load(driver: Any, out: Path, methods: tuple[str, ...], images: int = 100) -> dict[str, float]:
    """A load's cost on a large store: ``images`` new synthetic images of one class through Bolt, then the same
    run again (nothing new)."""
    from graphstore.loader import load_run

    run = write_synthetic(out, images, methods, seed=1, labels=(3,))
    first = load_run(driver, run, progress=False)
    again = load_run(driver, run, progress=False)
    r = {"images": images, "relationships": first.includes + first.edges, "seconds": first.seconds,
         "write_s": first.write_seconds, "aggregate_s": first.aggregate_seconds, "again_s": again.seconds}
    print(f"small load: {images} images of one class in {r['seconds']:.2f} s (writes {r['write_s']:.2f} s, "
          f"aggregates {r['aggregate_s']:.2f} s); again {r['again_s']:.2f} s", flush=True)
    return r


def scale(home: Path, images: int, methods: tuple[str, ...], ui: bool, repeats: int = 20) -> dict[str, Any]:
    """Synthetic run of ``images`` images -> bulk import -> size, query latency (and UI paint)."""
    from graphstore.api import Store
    from graphstore.bulk import bulk_import
    from graphstore.connection import ConnectionSettings, open_driver
    from graphstore.server import USER, ServerConfig, fetch_jars, read_password, stop

    base = ServerConfig.default(home)
    fetch_jars(base)
    tmp = Path(tempfile.mkdtemp(prefix="pathx-scale-"))
    cfg = base.instance(tmp / "neo4j", heap_initial="2g", heap_max="4g", pagecache="4g")
    out: dict[str, Any] = {"images": images, "methods": list(methods)}
    try:
        began = time.perf_counter()
        run = write_synthetic(tmp / "run", images, methods)
        out["generate_s"] = time.perf_counter() - began
        out["records_mib"] = _du(run) / 2**20

        def connect() -> Any:
            return open_driver(ConnectionSettings(uri=cfg.bolt_uri, user=USER, password=read_password(cfg)))

        with ImporterPeak() as importer:
            summary = bulk_import(cfg, [run], connect, overwrite=True)
        out["bulk"] = {"nodes": summary.nodes, "relationships": summary.relationships,
                       "csv_s": summary.csv_seconds, "import_s": summary.import_seconds,
                       "finish_s": summary.finish_seconds, "csv_mib": summary.csv_bytes / 2**20,
                       "import_relationships_per_s": summary.relationships_per_second,
                       "end_to_end_relationships_per_s": summary.relationships / (
                           summary.csv_seconds + summary.import_seconds + summary.finish_seconds)}
        out["store_mib"] = _du(cfg.instance_dir / "data") / 2**20
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process's, all along
        out["importer_peak_rss_mib"] = importer.mib
        print(f"scale {images}: {summary.relationships:,} relationships, import {summary.import_seconds:.1f} s "
              f"({summary.relationships_per_second:,.0f}/s), store {out['store_mib']:.0f} MiB", flush=True)
        driver = connect()
        try:
            out["queries"] = query_latency(Store(driver), repeats)
            out["small_load"] = small_load(driver, tmp / "small", methods)
        finally:
            driver.close()
        if ui:
            env = dict(os.environ, NEO4J_URI=cfg.bolt_uri, NEO4J_USER=USER, NEO4J_PASSWORD=read_password(cfg))
            out["ui"] = first_paint(env)
    finally:
        stop(cfg)
        shutil.rmtree(tmp, ignore_errors=True)
    return out
