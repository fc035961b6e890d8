"""The schema in words and example user queries, for the UI console (both made elsewhere: the schema
text from :mod:`graphstore.schema`, the examples with every other Cypher string in :mod:`graphstore.queries`)."""

from __future__ import annotations

from graphstore import queries as Q
from graphstore.schema import schema_text

SCHEMA_TEXT = schema_text()
EXAMPLES = Q.EXAMPLES
