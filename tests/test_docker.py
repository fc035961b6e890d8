"""docker/compose.yml: the Neo4j + app services as the README describes them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker" / "compose.yml"


def test_compose_file_shape() -> None:
    spec = yaml.safe_load(COMPOSE.read_text())
    neo4j, app = spec["services"]["neo4j"], spec["services"]["app"]
    assert neo4j["image"] == "neo4j:5.26-community"
    assert "NEO4J_PASSWORD" in neo4j["environment"]["NEO4J_AUTH"]
    assert "apoc" in neo4j["environment"]["NEO4J_PLUGINS"]
    assert "cypher-shell" in " ".join(neo4j["healthcheck"]["test"])
    for service in (neo4j, app):
        assert service["ports"] and all(p.startswith("127.0.0.1:") for p in service["ports"])
    assert app["depends_on"]["neo4j"]["condition"] == "service_healthy"
    assert app["environment"]["NEO4J_URI"] == "bolt://neo4j:7687"
    assert (COMPOSE.parent / app["build"]["dockerfile"].split("/")[-1]).exists()


def test_compose_config_lints_with_the_docker_tooling_present() -> None:
    """`docker compose config` (plugin) or `docker-compose config` (Debian's package, installed by make test)."""
    env = dict(os.environ, NEO4J_PASSWORD="lint-only-password")
    plugin = shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                       check=False).returncode == 0
    cmd = ["docker", "compose"] if plugin else [shutil.which("docker-compose") or "docker-compose"]
    res = subprocess.run([*cmd, "-f", str(COMPOSE), "config"], capture_output=True, text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert "neo4j:5.26-community" in res.stdout


def test_the_image_copies_every_package_it_installs() -> None:
    """The Dockerfile's `pip install .` builds from what it copied: every top-level package of pyproject.toml."""
    import tomllib

    root = COMPOSE.parent.parent
    packages = {p.split(".")[0] for p in tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                ["packages"]}
    copied = {line.split()[1] for line in (COMPOSE.parent / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}
    assert packages == {"records", "extractor", "graphstore", "ui", "pathx"} and packages <= copied
