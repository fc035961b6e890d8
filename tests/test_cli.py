"""The command line: one-line errors, non-zero exits, and query/cypher answers over the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from graphstore.server import USER, free_port, read_password

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

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
    (["extract", "--model", "demo", "--images", "demo:test", "--out", "/tmp/x", "--mean", "0.5,x"],
     "--mean must be comma-separated numbers"),
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


def test_the_command_line_starts_without_the_store_layer() -> None:
    """Building every command (as each ``pathx`` start does) imports no driver, pandas or Store."""
    code = ("import sys, typer.main, pathx.cli as c; typer.main.get_command(c.app); "
            "print(sorted(m for m in ('graphstore.api', 'neo4j', 'pandas', 'torch') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_unanswering_database(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, NEO4J_URI=f"bolt://127.0.0.1:{port}", NEO4J_PASSWORD="x")
    res = pathx("query", "summary", env=env)
    assert res.returncode == 1 and f"127.0.0.1:{port} does not answer" in res.stderr


@pytest.mark.store
def test_queries_and_cypher_from_cli(loaded_store: Driver, neo4j_server: ServerConfig) -> None:
    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server))
    summary = json.loads(pathx("query", "summary", env=env).stdout)
    with loaded_store.session(database="neo4j") as s:
        assert summary["images"] == s.run("MATCH (i:Image) RETURN count(i) AS n").single(strict=True)["n"]
    top = json.loads(pathx("query", "top-neurons", "--class", "digit 3", "--limit", "3", env=env).stdout)
    assert len(top) == 3 and top[0]["support"] >= top[-1]["support"]
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
    for args, message in ((["nosuch"], "unknown query 'nosuch'"), (["shift"], "query shift needs --image")):
        res = pathx("query", *args, env=env)
        assert res.returncode == 1 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.store
def test_a_load_reads_the_run_once(loaded_store: Driver, neo4j_server: ServerConfig, fixture_run: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`pathx load` checks the run folder once, where it enters, and every later step uses what it read."""
    from typer.testing import CliRunner

    import records.io
    from pathx.cli import app

    reads: list[Path] = []
    real = records.io.read_manifest

    def counted(run_dir: Path) -> object:
        reads.append(Path(run_dir))
        return real(run_dir)

    monkeypatch.setattr(records.io, "read_manifest", counted)
    for k, v in (("NEO4J_URI", neo4j_server.bolt_uri), ("NEO4J_USER", USER),
                 ("NEO4J_PASSWORD", read_password(neo4j_server))):
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(app, ["load", str(fixture_run)])
    assert res.exit_code == 0 and "0 new pathways" in res.output, res.output
    assert reads == [fixture_run]


@pytest.mark.store
def test_pathway_query_and_export_from_cli(loaded_store: Driver, neo4j_server: ServerConfig, fixture_run: Path,
                                           tmp_path: Path) -> None:
    import networkx as nx

    from records import pathway_to_networkx, read_run

    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server))
    manifest, _, pathways = read_run(fixture_run)
    pw = next(p for p in pathways if len(p.edge_weight))
    want = pathway_to_networkx(pw, manifest.model)
    data = json.loads(pathx("query", "pathway", "--pathway", pw.pathway_id, env=env).stdout)
    assert {n["id"] for n in data["nodes"]} == set(want.nodes)
    assert {(e["source"], e["target"]) for e in data["edges"]} == set(want.edges)
    res = pathx("export", str(tmp_path / "p.gexf"), "--pathway", pw.pathway_id, env=env)
    assert res.returncode == 0 and f"{want.number_of_edges()} edges" in res.stdout, res.stderr
    assert set(nx.read_gexf(tmp_path / "p.gexf").edges) == set(want.edges)
    bad = pathx("export", str(tmp_path / "p.txt"), "--pathway", pw.pathway_id, env=env)
    assert bad.returncode == 1 and "use .graphml or .gexf" in bad.stderr and not (tmp_path / "p.txt").exists()


def test_the_cli_and_the_api_accept_the_same_extraction_options(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``ExtractOptions`` field, set away from its default, reaches the run identically from
    ``pathx extract --field-name WORDS`` and from ``pathx.extract(field_name=VALUE)``."""
    import dataclasses

    from typer.testing import CliRunner

    import extractor.launch
    import pathx
    from extractor.options import ExtractOptions
    from pathx.cli import app

    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    weights = tmp_path / "w.pt"
    cases: dict[str, tuple[list[str], object]] = {  # field: (command-line words, Python value)
        "methods": (["--methods", "mct,pixel"], ("mct", "pixel")),
        "top_k": (["--top-k", "3"], 3),
        "sparsity": ([], None),  # exclusive with top_k: checked below on its own
        "granularity": (["--granularity", "channel"], "channel"),
        "edges": (["--edges", "direct"], "direct"),
        "variants": (["--variants", "fgsm,shift"], "fgsm,shift"),
        "limit": (["--limit", "5"], 5),
        "batch_size": (["--batch-size", "4"], 4),
        "weights_file": (["--weights-file", str(weights)], weights),
        "untrained": (["--untrained"], True),
        "input_size": (["--input-size", "64"], 64),
        "channels": (["--channels", "1"], 1),
        "mean": (["--mean", "0.5"], (0.5,)),
        "std": (["--std", "0.25"], (0.25,)),
        "class_names": (["--class-names", str(names)], ("cat", "dog")),
        "sites": (["--sites", "features.1,features.3"], ("features.1", "features.3")),
        "device": (["--device", "cuda:1"], "cuda:1"),
        "loader_workers": (["--loader-workers", "0"], 0),
        "shard": (["--shard", "1/2"], "1/2"),
        "strict": (["--strict"], True),
        "exemplars": (["--exemplars", "0"], 0),
        "pixel_stride": (["--pixel-stride", "4"], 4),
        "pixel_beam": (["--pixel-beam", "4"], 4),
        "pixel_top": (["--pixel-top", "2"], 2),
        "originals_only": (["--originals-only", "pixel"], ("pixel",)),
        "resamples": (["--resamples", "10"], 10),
        "variant_kinds": (["--variant-kinds", "pixel=shift+affine"], {"pixel": ("shift", "affine")}),
        "progress": (["--no-progress"], False),
    }
    fields = {f.name: f for f in dataclasses.fields(ExtractOptions)}
    assert sorted(cases) == sorted(fields), "each option needs a case here"
    seen: list[ExtractOptions] = []

    def capture(model: object, images: object, out: Path, options: ExtractOptions, home: Path) -> object:
        seen.append(options)
        raise SystemExit(0)

    monkeypatch.setattr(extractor.launch, "run_extraction", capture)
    base = ["extract", "--model", "demo", "--images", "demo:test", "--out", str(tmp_path / "run")]
    for words, python in (
        ([w for ws, _ in cases.values() for w in ws], {k: v for k, (_, v) in cases.items() if k != "sparsity"}),
        (["--sparsity", "70"], {"sparsity": 70.0}),
    ):
        res = CliRunner().invoke(app, [*base, *words])
        assert res.exit_code == 0, res.output
        with pytest.raises(SystemExit):
            pathx.extract("demo", "demo:test", tmp_path / "run", **python)
        cli, api = seen[-2:]
        assert cli == api
        for name, value in python.items():  # each case moved its field away from the default
            assert getattr(cli, name) == value != ExtractOptions().__getattribute__(name), name
    with pytest.raises(TypeError):
        pathx.extract("demo", "demo:test", tmp_path / "run", method="mct")  # the CLI has no --method either
