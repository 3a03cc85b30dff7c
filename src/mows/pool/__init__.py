"""The node memory pool: shared-memory files under a hard cap, LRU eviction, pins."""

from __future__ import annotations

from ._pool import FileState, Pool, PoolFile, WouldWait, model_id

__all__ = ["FileState", "Pool", "PoolFile", "WouldWait", "model_id"]
