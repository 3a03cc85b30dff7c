"""The node daemon (``mows serve``): the composition root of pool, sources and local API."""

from __future__ import annotations

from ._daemon import Daemon, run_daemon

__all__ = ["Daemon", "run_daemon"]
