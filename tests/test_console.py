"""Read-only user Cypher: each defence tested on its own, plus limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from graphstore.console import check_text, run_read_only
from graphstore.errors import QueryRefused

if TYPE_CHECKING:
    from neo4j import Driver

pytestmark = pytest.mark.store


def test_read_query_returns_rows_and_graph(loaded_store: Driver) -> None:
    res = run_read_only(loaded_store, "MATCH (a:Neuron)-[f:FLOWS_TO]->(b:Neuron) RETURN a, f, b LIMIT 5")
    assert res.columns == ["a", "f", "b"] and len(res.rows) == 5
    assert res.graph.number_of_edges() == 5
    assert res.rows[0]["f"]["_type"] == "FLOWS_TO"


def test_parameters_are_passed_not_formatted(loaded_store: Driver) -> None:
    res = run_read_only(loaded_store, "MATCH (c:Class) WHERE c.index = $i RETURN c.name AS name",
                        {"i": 3})
    assert [r["name"] for r in res.rows] == ["digit 3"]


@pytest.mark.parametrize("query", [
    "CREATE (:Evil)", "MATCH (n) DETACH DELETE n", "MATCH (c:Class) SET c.name = 'x'",
    "CREATE INDEX evil IF NOT EXISTS FOR (n:Evil) ON (n.x)", "MERGE (e:Evil {x: 1}) RETURN e",
])
def test_explain_gate_refuses_writes(loaded_store: Driver, query: str) -> None:
    with pytest.raises(QueryRefused, match=r"only read queries|not allowed|refused"):
        run_read_only(loaded_store, query)
    with loaded_store.session(database="neo4j") as s:
        assert s.run("MATCH (e:Evil) RETURN count(e) AS n").single(strict=True)["n"] == 0


@pytest.mark.parametrize("query", ["CREATE (:Evil)", "MATCH (c:Class) SET c.name = 'x'",
                                   "MATCH (n:Image) DETACH DELETE n"])
def test_server_read_mode_refuses_writes_without_explain_gate(loaded_store: Driver, query: str) -> None:
    with pytest.raises(QueryRefused, match="read access mode"):
        run_read_only(loaded_store, query, check_explain=False)
    with loaded_store.session(database="neo4j") as s:
        assert s.run("MATCH (e:Evil) RETURN count(e) AS n").single(strict=True)["n"] == 0
        assert s.run("MATCH (c:Class {name: 'x'}) RETURN count(c) AS n").single(strict=True)["n"] == 0


@pytest.mark.parametrize("query", [
    "LOAD CSV FROM 'file:///etc/passwd' AS row RETURN row", "USE system SHOW USERS",
    "CALL dbms.listConfig()", "CREATE USER eve SET PASSWORD 'x'", "SHOW DATABASES",
    "CALL apoc.periodic.iterate('MATCH (n) RETURN n', 'DELETE n', {})", "", "   ",
])
def test_deny_list(query: str) -> None:
    with pytest.raises(QueryRefused):
        check_text(query)


def test_row_cap_and_timeout(loaded_store: Driver) -> None:
    res = run_read_only(loaded_store, "UNWIND range(1, 5000) AS i RETURN i", max_rows=100)
    assert len(res.rows) == 100 and res.truncated
    with pytest.raises(QueryRefused, match=r"limit|Cypher error"):
        run_read_only(loaded_store,
                      "UNWIND range(1, 100000000) AS i WITH i WHERE i % 7 = 123 RETURN count(i)", timeout_s=0.5)


def test_syntax_error_is_one_line(loaded_store: Driver) -> None:
    with pytest.raises(QueryRefused, match="Cypher error") as info:
        run_read_only(loaded_store, "MATCH (n RETURN n")
    assert "\n" not in str(info.value)
