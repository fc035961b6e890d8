"""Exceptions of the graph store; each message is one line a user can act on."""

from __future__ import annotations


class GraphStoreError(Exception):
    """Root of every error the graph store raises on purpose."""


class ServerError(GraphStoreError):
    """The local Neo4j server could not be fetched, started or reached."""


class ConnectionFailed(GraphStoreError):
    """A configured Neo4j URI does not answer or refuses the credentials."""


class RecordsError(GraphStoreError):
    """Record files are missing, corrupt or of an incompatible schema version."""


class NotFound(GraphStoreError):
    """A class, image, pathway or model id named in a query does not exist in the store."""


class QueryRefused(GraphStoreError):
    """User Cypher that is not a read-only query (writes, schema, LOAD CSV, admin)."""
