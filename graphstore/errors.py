"""Exceptions of the graph store; each message is one line a user can act on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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


@contextmanager
def reading_records() -> Iterator[None]:
    """Inside: a damaged or foreign run folder (``records.RecordsFormatError``) is this store's ``RecordsError``."""
    from records import RecordsFormatError  # here: `pathx` imports these errors at every start, records pulls pyarrow

    try:
        yield
    except RecordsFormatError as exc:
        raise RecordsError(str(exc)) from exc
