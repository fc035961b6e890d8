"""Per-model bench rows, each measured in a child process of its own (a time budget; a crash or an
out-of-memory cannot take the bench down), kept in one JSON file with what was left out and why."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip()


def child_json(script: str, args: list[str], tag: str, limit_s: float, env: Mapping[str, str] | None = None) \
        -> dict[str, Any]:
    """``python script --child *args``: its last stdout line that starts with ``tag``, parsed. Raises
    ``RuntimeError`` (the child's last stderr line) or ``subprocess.TimeoutExpired``."""
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True,
                          timeout=limit_s, cwd=ROOT, env=dict(env) if env is not None else None)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag + " ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["no output"])[-1][:200])
    return dict(json.loads(lines[-1][len(tag) + 1:]))


class Rows:
    """The rows of one results file (``rows`` by model, ``left_out`` by model with the reason), written after
    every row so that an interrupted run keeps what it measured."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.done: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"rows": {}, "left_out": {}}

    def keep(self, name: str, row: dict[str, Any], line: str) -> None:
        self.done["rows"][name] = row
        self.done["left_out"].pop(name, None)
        print(line, flush=True)
        self._write()

    def leave_out(self, name: str, exc: Exception, limit_s: float, label: str) -> None:
        self.done["left_out"][name] = str(exc) if isinstance(exc, RuntimeError) else f"over {limit_s:.0f} s"
        self.done["rows"].pop(name, None)
        print(f"{label} {name}: {self.done['left_out'][name]}", flush=True)

    def finish(self) -> dict[str, Any]:
        self.done["date"] = time.strftime("%Y-%m-%d")
        self._write()
        return self.done

    def _write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.done, indent=1, sort_keys=True))
