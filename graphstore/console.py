"""Read-only user Cypher, defended in depth.

1. A deny-list refuses ``LOAD CSV``, ``USE``, admin and ``dbms.*`` procedures and APOC
   procedures that run inner transactions, before anything reaches the server.
2. ``EXPLAIN`` runs in a read transaction; only query type ``r`` passes.
3. The query runs in a READ access-mode session, so the server itself rejects any write.
4. A per-transaction timeout and a row cap bound every query.

Node and relationship values come back as plain dicts, plus a ``networkx`` graph of every
node and relationship in the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import neo4j
import networkx as nx
from neo4j.graph import Node, Path, Relationship

from graphstore.connection import DATABASE
from graphstore.errors import QueryRefused

DENY = re.compile(
    r"\bLOAD\s+CSV\b|^\s*USE\b|\bUSE\s+\w+\s*(MATCH|RETURN|CALL)|\bdbms\.|\bdb\.(create|drop|clear)|"
    r"\bapoc\.(periodic|cypher|load|export|import|trigger|schema|refactor|create|merge|nodes\.delete)|"
    r"\b(CREATE|DROP|ALTER|GRANT|REVOKE|DENY|START|STOP|SHOW)\s+(USER|ROLE|DATABASE|ALIAS|SERVER|PRIVILEGE)",
    re.IGNORECASE | re.MULTILINE,
)
MAX_QUERY_CHARS = 20_000


@dataclass(kw_only=True)
class CypherResult:
    """Rows (values made plain), column names, a graph of returned entities, and truncation."""

    columns: list[str]
    rows: list[dict[str, Any]]
    graph: nx.MultiDiGraph = field(default_factory=nx.MultiDiGraph)
    truncated: bool = False


def _plain(value: Any, graph: nx.MultiDiGraph) -> Any:
    if isinstance(value, Node):
        props = {k: v for k, v in value.items() if not isinstance(v, bytes | bytearray)}
        graph.add_node(value.element_id, labels=":".join(sorted(value.labels)), **_scalar_props(props))
        return {"_labels": sorted(value.labels), **props}
    if isinstance(value, Relationship):
        for node in value.nodes:
            if node is not None:
                _plain(node, graph)
        start, end = value.start_node, value.end_node
        if start is not None and end is not None:
            graph.add_edge(start.element_id, end.element_id, key=value.element_id, type=value.type,
                           **_scalar_props(dict(value.items())))
        return {"_type": value.type, **dict(value.items())}
    if isinstance(value, Path):
        for rel in value.relationships:
            _plain(rel, graph)
        return [_plain(n, graph) for n in value.nodes]
    if isinstance(value, list):
        return [_plain(v, graph) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v, graph) for k, v in value.items()}
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return value


def _scalar_props(props: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in props.items() if isinstance(v, str | int | float | bool)}


def check_text(query: str) -> None:
    """Refuse empty, oversized or deny-listed text (a first line of defence)."""
    if not query.strip():
        raise QueryRefused("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryRefused(f"the query is longer than {MAX_QUERY_CHARS} characters")
    match = DENY.search(query)
    if match:
        raise QueryRefused(f"refused: {match.group(0).strip()!r} is not allowed in the read-only console")


def run_read_only(
    driver: neo4j.Driver,
    query: str,
    params: dict[str, Any] | None = None,
    *,
    timeout_s: float = 10.0,
    max_rows: int = 1000,
    database: str = DATABASE,
    check_explain: bool = True,
) -> CypherResult:
    """Run user Cypher read-only; ``QueryRefused`` with a one-line reason otherwise.

    ``check_explain=False`` skips the ``EXPLAIN`` gate (tests use it to prove the server's
    read mode holds on its own).
    """
    check_text(query)
    params = params or {}

    @neo4j.unit_of_work(timeout=timeout_s)
    def explain(tx: neo4j.ManagedTransaction) -> str:
        summary = tx.run("EXPLAIN " + query, params).consume()
        return str(summary.query_type)

    @neo4j.unit_of_work(timeout=timeout_s)
    def fetch(tx: neo4j.ManagedTransaction) -> CypherResult:
        result = tx.run(query, params)
        graph = nx.MultiDiGraph()
        rows: list[dict[str, Any]] = []
        truncated = False
        for record in result:
            if len(rows) >= max_rows:
                truncated = True
                break
            rows.append({k: _plain(v, graph) for k, v in record.items()})
        columns = list(result.keys())
        return CypherResult(columns=columns, rows=rows, graph=graph, truncated=truncated)

    try:
        with driver.session(database=database, default_access_mode=neo4j.READ_ACCESS) as session:
            if check_explain:
                kind = session.execute_read(explain)
                if kind != "r":
                    raise QueryRefused(f"refused: only read queries may run here (this one is of type {kind!r})")
            return session.execute_read(fetch)
    except neo4j.exceptions.ClientError as exc:
        code = exc.code or ""
        if "AccessMode" in code or "Forbidden" in code:
            raise QueryRefused("refused by the server: writing is not allowed in read access mode") from exc
        if "TransactionTimedOut" in code or "Terminated" in code:
            raise QueryRefused(f"stopped: the query ran past the {timeout_s:g} s limit") from exc
        message = (exc.message or str(exc)).strip().splitlines()[0]
        raise QueryRefused(f"Cypher error: {message}") from exc
