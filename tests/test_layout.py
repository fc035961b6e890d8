"""The house rules that a file list can check: the import map, Cypher's one home, shared constants."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from graphstore import queries as Q
from graphstore.schema import SIGNATURE_DIMENSIONS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("records", "extractor", "graphstore", "ui")
NEVER = {"records": {"torch", "neo4j", "streamlit", "extractor", "graphstore", "ui"},
         "extractor": {"neo4j", "streamlit", "graphstore", "ui"},
         "graphstore": {"torch", "torchvision", "streamlit", "extractor", "ui"},
         "ui": {"torch", "extractor", "records", "numpy", "neo4j"}}  # ui draws; graphstore analyses


def _imported(path: Path) -> set[str]:
    """Every absolute import of a file (also inside functions and under TYPE_CHECKING): module names, and
    ``module.name`` for each name taken from a module (a submodule when it is one)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return out


def _imports(path: Path) -> set[str]:
    """The top-level packages a file imports."""
    return {m.split(".")[0] for m in _imported(path)}


def test_data_flows_one_way() -> None:
    for package in PACKAGES:
        files = sorted((ROOT / package).rglob("*.py"))
        assert files
        for f in files:
            bad = _imports(f) & NEVER[package]
            assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_ui_reads_only_through_the_store() -> None:
    allowed = {"graphstore.api", "graphstore.errors", "graphstore.names", "graphstore.results",
               "graphstore.examples", "graphstore.server"}  # server: a free port for ui.serve
    for f in (ROOT / "ui").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphstore"):
                assert node.module in allowed, f"{f.relative_to(ROOT)} imports {node.module}"


def test_no_cypher_outside_the_queries_module() -> None:
    cypher = re.compile(r"\b(MATCH|MERGE|CREATE|UNWIND)\s*\(|\bRETURN\s+\w+\s+AS\b")
    for package in (*PACKAGES, "pathx"):
        for f in (ROOT / package).rglob("*.py"):
            if f.name == "queries.py" and f.parent.name == "graphstore":
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert not cypher.search(node.value), f"Cypher in {f.relative_to(ROOT)}: {node.value[:60]!r}"


def test_the_vector_index_has_the_signature_dimensions() -> None:
    index = next(q for q in Q.SCHEMA if "VECTOR INDEX" in q)
    assert f"`vector.dimensions`: {SIGNATURE_DIMENSIONS}," in index


def test_every_query_name_is_defined_once() -> None:
    tree = ast.parse((ROOT / "graphstore" / "queries.py").read_text())
    names = [t.id for node in tree.body if isinstance(node, ast.Assign | ast.AnnAssign)
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]
    assert len(names) > 50 and len(names) == len(set(names)), [n for n in names if names.count(n) > 1]


def test_the_page_list_exists_once_and_names_every_view() -> None:
    from ui.serve import PAGES

    views = {f.name for f in (ROOT / "ui" / "views").glob("*.py")} - {"__init__.py"}
    assert len(views) >= 6 and sorted(p.file for p in PAGES) == sorted(views)
    assert len({p.path for p in PAGES}) == len(PAGES)


def test_the_import_map_has_no_circle() -> None:
    """Module to module imports inside the project (also those inside functions and under
    ``TYPE_CHECKING``) form no cycle."""
    import networkx as nx

    modules: dict[str, Path] = {}
    for package in (*PACKAGES, "pathx"):
        for f in (ROOT / package).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = f
    graph = nx.DiGraph()
    for name, f in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, t) for t in _imported(f) if t in modules and t != name and
                             not name.startswith(f"{t}."))  # a package's own __init__ is no circle
    assert graph.number_of_edges() > 100
    assert list(nx.simple_cycles(graph)) == []
