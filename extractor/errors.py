"""Exceptions of the extractor; each message is one line a user can act on."""

from __future__ import annotations


class ExtractionError(Exception):
    """Bad model, input or settings for an extraction."""
