"""The neo4j driver's Rust extension (``neo4j-rust-ext``, a dependency): does it pay on a Bolt load?

The bench's demo-sized run (as section ``store`` makes it) is loaded through ``pathx load``'s code into an empty
store, each load in a child process of its own against a server of its own, alternately with the extension and
without it (the child hides ``neo4j._rust``, so the driver packs in pure Python, as it does where the wheel is
missing). Section ``bolt_codec`` of ``make bench``; the rounds alternate so that drift in this machine's speed
weighs on both. Run alone: ``python bench/bolt_codec.py``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TAG = "BOLT_CODEC"
MODES = ("rust", "python")


def child(mode: str, run: Path, home: Path) -> dict[str, Any]:
    """One load of ``run`` into a fresh server (runs in the child)."""
    if mode == "python":
        sys.modules["neo4j._rust"] = None  # type: ignore[assignment]  # the driver's fallback: pure-Python packstream
    sys.path.insert(0, str(ROOT))
    from neo4j._codec.packstream import v1

    from graphstore.connection import ConnectionSettings, open_driver
    from graphstore.loader import load_run
    from graphstore.server import USER, ServerConfig, read_password, start, stop

    base = ServerConfig.default(home)
    tmp = Path(tempfile.mkdtemp(prefix="pathx-codec-"))
    cfg = base.instance(tmp / "neo4j")
    try:
        start(cfg)
        driver = open_driver(ConnectionSettings(uri=cfg.bolt_uri, user=USER, password=read_password(cfg)))
        try:
            summary = load_run(driver, run, progress=False)
        finally:
            driver.close()
    finally:
        stop(cfg)
        shutil.rmtree(tmp, ignore_errors=True)
    rust = getattr(v1, "_rust_pack", None) is not None
    return {"mode": mode, "rust_packer": rust, "relationships": summary.includes + summary.edges,
            "seconds": summary.seconds, "write_seconds": summary.write_seconds}


def run(home: Path, rounds: int = 2) -> dict[str, Any]:
    """Loads of one run, ``rounds`` per mode, alternating; medians and the ratio python / rust."""
    sys.path.insert(0, str(ROOT / "bench"))
    from children import child_json
    from run import _bench_run

    tmp = Path(tempfile.mkdtemp(prefix="pathx-codec-run-"))
    loads: list[dict[str, Any]] = []
    try:
        made = _bench_run(home, tmp / "run")
        for _ in range(rounds):
            for mode in MODES:
                row = child_json(__file__, [mode, str(made), str(home)], TAG, 900.0)
                print(f"bolt codec {mode}: {row['seconds']:.1f} s (writes {row['write_seconds']:.1f} s)", flush=True)
                loads.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {m: {k: statistics.median(r[k] for r in loads if r["mode"] == m) for k in ("seconds", "write_seconds")}
           for m in MODES}
    return {"loads": loads, "median": med, "relationships": loads[0]["relationships"],
            "ratio_python_rust": med["python"]["seconds"] / med["rust"]["seconds"],
            "write_ratio_python_rust": med["python"]["write_seconds"] / med["rust"]["write_seconds"]}


def markdown(r: dict[str, Any]) -> list[str]:
    med = r["median"]
    rust, py = med["rust"], med["python"]
    return ["", "### The driver's Rust extension on a Bolt load", "",
            f"{r['relationships']:,} relationships into an empty store, {len(r['loads']) // 2} loads per mode "
            f"(medians): with `neo4j-rust-ext` {rust['seconds']:.1f} s (writes {rust['write_seconds']:.1f} s), "
            f"pure-Python packing {py['seconds']:.1f} s (writes {py['write_seconds']:.1f} s): "
            f"{r['ratio_python_rust']:.2f}× end to end, {r['write_ratio_python_rust']:.2f}× in the writes."]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(TAG, json.dumps(child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))), flush=True)
    else:
        sys.path.insert(0, str(ROOT))
        from graphstore.server import default_home

        print(json.dumps(run(default_home()), indent=1))
