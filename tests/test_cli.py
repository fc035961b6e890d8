"""The command line: one-line errors, non-zero exits, and query/cypher answers over the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graphstore.server import USER, free_port, read_password

ROOT = Path(__file__).resolve().parent.parent


def pathx(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pathx.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or dict(os.environ), check=False, timeout=300)


@pytest.mark.parametrize(("args", "message"), [
    (["extract", "--model", "nosuchnet", "--images", "demo:test", "--out", "/tmp/x"], "unknown model 'nosuchnet'"),
    (["extract", "--model", "resnet18", "--images", "demo:test", "--out", "/tmp/x"], "not in the local torch cache"),
    (["extract", "--model", "demo", "--images", "demo:test", "--out", "/tmp/x", "--sparsity", "120"], "sparsity"),
    (["extract", "--model", "demo", "--images", "demo:test", "--out", "/tmp/x", "--top-k", "0"], "k must be"),
    (["extract", "--model", "demo", "--images", "/no/such/dir", "--out", "/tmp/x"], "no such file or folder"),
    (["extract", "--model", "demo", "--images", "demo:test", "--out", "/tmp/x", "--variants", "blur"],
     "unknown variant"),
    (["extract", "--model", "demo", "--images", "demo:test", "--out", "/tmp/x", "--variant-kinds", "pixel=blur"],
     "unknown variant kind 'blur'"),
    (["extract", "--model", "demo", "--images", "demo:test", "--out", "/tmp/x", "--variant-kinds", "pixel"],
     "must look like METHOD=KIND+KIND"),
    (["load", "/no/such/run"], "not a run folder"),
    (["db", "import", "/no/such/run", "--overwrite"], "not a run folder"),
])
def test_bad_input_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    env = dict(os.environ, NEO4J_URI=f"bolt://127.0.0.1:{free_port()}", NEO4J_PASSWORD="x")
    res = pathx(*args, env=env)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_unanswering_database(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, NEO4J_URI=f"bolt://127.0.0.1:{port}", NEO4J_PASSWORD="x")
    res = pathx("query", "summary", env=env)
    assert res.returncode == 1 and f"127.0.0.1:{port} does not answer" in res.stderr


@pytest.mark.store
def test_queries_and_cypher_from_cli(loaded_store: object, neo4j_server: object) -> None:
    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,  # type: ignore[attr-defined]
               NEO4J_PASSWORD=read_password(neo4j_server))  # type: ignore[arg-type]
    summary = json.loads(pathx("query", "summary", env=env).stdout)
    with loaded_store.session(database="neo4j") as s:  # type: ignore[attr-defined]
        assert summary["images"] == s.run("MATCH (i:Image) RETURN count(i) AS n").single()["n"]
    top = json.loads(pathx("query", "top-neurons", "--class", "digit 3", "--limit", "3", env=env).stdout)
    assert len(top) <= 3
    for name in ("configs", "classes", "accuracy", "similarity", "counts", "hijacked --kind pgd",
                 "shared --class 1 --class-b 7", "signature --class 2"):
        res = pathx("query", *name.split(), env=env)
        assert res.returncode == 0, (name, res.stderr)
        json.loads(res.stdout)
    bad = pathx("query", "top-neurons", "--class", "x') DETACH DELETE n //", env=env)
    assert bad.returncode == 1 and "unknown class" in bad.stderr
    out = json.loads(pathx("cypher", "MATCH (c:Class) RETURN count(c) AS n", env=env).stdout)
    assert out["rows"] == [{"n": 10}]
    refused = pathx("cypher", "CREATE (:Evil)", env=env)
    assert refused.returncode == 1 and "only read queries" in refused.stderr
