"""The node memory pool: model versions in shared memory under a hard cap, pins, eviction."""

from __future__ import annotations

from ._pool import LocationRecord, Pool, index_file
from ._version import FileState, PoolFile, Version, pages

__all__ = ["FileState", "LocationRecord", "Pool", "PoolFile", "Version", "index_file", "pages"]
