"""README's Python example runs as written, against the real Neo4j of the test run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from graphstore.server import USER, read_password

if TYPE_CHECKING:
    from neo4j import Driver

    from graphstore.server import ServerConfig

ROOT = Path(__file__).resolve().parent.parent


def python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Python\n"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python section has no python block"
    return match.group(1)


@pytest.mark.store
def test_readme_python_example_runs(empty_store: Driver, neo4j_server: ServerConfig, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(python_block())
    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server))
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "8 images, 8 pathways" in res.stdout  # 2 photos + FGSM at 3 strengths each
    neurons = re.search(r"(\d+) neurons, (\d+) edges", res.stdout)
    assert neurons and int(neurons.group(1)) > 0 and int(neurons.group(2)) > 0
    assert "support" in res.stdout and "mean_contribution" in res.stdout
    with empty_store.session(database="neo4j") as s:
        rows = s.run("MATCH (i:Image {kind: 'original'})-[:LABELED_AS]->(c:Class) RETURN c.name AS n, c.index AS k "
                     "ORDER BY k").data()
        assert rows == [{"n": "palace", "k": 698}, {"n": "daisy", "k": 985}]  # folder names = class names


def test_readme_schema_block_is_the_schema_in_code() -> None:
    """README's schema block is ``graphstore.schema.schema_text()`` (regenerate it with
    ``python -m graphstore.schema``)."""
    from graphstore.schema import schema_text

    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Graph schema\n"):]
    match = re.search(r"```\n(.*?)```", section, re.S)
    assert match, "README's schema section has no block"
    assert match.group(1) == schema_text()
    assert "(:Neuron)-[:CLASS_FLOW" in match.group(1) and "VariantStat" in match.group(1)
