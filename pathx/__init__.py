"""Pathway Explorer: the ``pathx`` command line (``pathx.cli``) and the Python API (``pathx.api``).

``pathx.extract``, ``pathx.read_run``, ``pathx.load`` and ``pathx.connect`` are imported on first use,
so the command line does not pay for torch when it only queries the store.
"""

from __future__ import annotations

from typing import Any

__all__ = ["connect", "extract", "load", "read_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pathx import api

        return getattr(api, name)
    raise AttributeError(f"module 'pathx' has no attribute {name!r}")
