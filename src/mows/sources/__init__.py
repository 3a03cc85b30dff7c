"""Origin storage: one small interface, implementations chosen by URL scheme."""

from __future__ import annotations

from ._base import Source, open_source, register_source

__all__ = ["Source", "open_source", "register_source"]
