"""Which Neo4j to talk to: ``NEO4J_URI`` (+ ``NEO4J_USER``/``NEO4J_PASSWORD``) or the local server."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import neo4j

from graphstore.errors import ConnectionFailed
from graphstore.server import USER, ServerConfig, load_state, read_password

DATABASE = "neo4j"


@dataclass(kw_only=True, frozen=True)
class ConnectionSettings:
    """Bolt URI and credentials; ``external`` is True when they came from the environment."""

    uri: str
    user: str
    password: str = ""
    database: str = DATABASE
    external: bool = False

    def __repr__(self) -> str:  # never show the password
        return f"ConnectionSettings(uri={self.uri!r}, user={self.user!r}, database={self.database!r})"


def settings_from_env(home: Path | None = None) -> ConnectionSettings:
    """``NEO4J_URI`` wins; otherwise the project's local server under ``home``."""
    uri = os.environ.get("NEO4J_URI")
    if uri:
        return ConnectionSettings(
            uri=uri,
            user=os.environ.get("NEO4J_USER", USER),
            password=os.environ.get("NEO4J_PASSWORD", ""),
            database=os.environ.get("NEO4J_DATABASE", DATABASE),
            external=True,
        )
    config = load_state(ServerConfig.default(home))
    return ConnectionSettings(uri=config.bolt_uri, user=USER, password=read_password(config))


def open_driver(settings: ConnectionSettings) -> neo4j.Driver:
    """A connected driver, or ``ConnectionFailed`` naming the URI and what to do."""
    driver = neo4j.GraphDatabase.driver(
        settings.uri, auth=(settings.user, settings.password), connection_timeout=5.0,
        max_transaction_retry_time=30.0, notifications_min_severity="OFF",
    )
    try:
        driver.verify_connectivity()
    except neo4j.exceptions.AuthError as exc:
        driver.close()
        raise ConnectionFailed(f"Neo4j at {settings.uri} refused the credentials for user {settings.user!r}") from exc
    except Exception as exc:
        driver.close()
        hint = (
            "check NEO4J_URI / NEO4J_USER / NEO4J_PASSWORD"
            if settings.external
            else "start the local server with `pathx db start` or set NEO4J_URI"
        )
        raise ConnectionFailed(f"Neo4j at {settings.uri} does not answer ({type(exc).__name__}); {hint}") from exc
    return driver
