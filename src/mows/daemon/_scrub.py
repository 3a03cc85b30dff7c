"""Scrub: READY pool files re-read in the background against the chunk CRCs recorded at commit.

Every pool file is checked as it is filled, but clients map its pages zero-copy: a byte that
flips later in node memory (bad RAM, a stray write by a process with write access) would reach
every later open. The scrub re-reads each READY file chunk by chunk on a thread of its own,
never on the event loop, at a pace that spreads a full pass over ``scrub_interval`` seconds
(never faster than ``scrub_rate`` bytes a second), and pauses while any load runs, as the
prefetch does. A chunk whose CRC-32 no longer matches takes its file out of service at once
(``Pool.retire``): new opens fetch it again, from peers or the origin, and peers learn this
node no longer holds it. Clients that mapped it before keep their mapping: with zero-copy
there is nothing to take back. ``run_now`` (``mows scrub``) runs a full pass at once,
unpaced, and answers with what it found.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .._bounce import thread_buffer
from .._config import DaemonConfig
from .._crc import crc32
from ..manifest import Chunk
from ..pool import FileState, Pool, PoolFile
from ._loads import LoadService

__all__ = ["Scrubber", "chunk_crc", "pace", "scrub_rate"]

log = logging.getLogger("mows.daemon")

EMPTY_WAIT = 60.0  # seconds before looking again at a pool that held nothing to check


def scrub_rate(pool_bytes: int, interval: float, ceiling: int) -> float:
    """Bytes a second that re-read ``pool_bytes`` once per ``interval`` seconds, at most
    ``ceiling`` (0: no cap); 0.0 when there is nothing to pace (no interval, no bytes)."""
    if interval <= 0 or pool_bytes <= 0:
        return 0.0
    rate = pool_bytes / interval
    return min(rate, float(ceiling)) if ceiling > 0 else rate


def pace(now: float, slot: float, nbytes: int, rate: float) -> tuple[float, float]:
    """When ``nbytes`` may be read at ``rate`` bytes a second: (seconds to wait, the next free
    slot). ``slot`` is the previous answer's; a slot long past is no credit, so time spent
    paused (for loads) never turns into a burst. ``rate`` <= 0: no pacing."""
    if rate <= 0:
        return 0.0, now
    start = max(now, slot)
    return start - now, start + nbytes / rate


def chunk_crc(path: str, offset: int, length: int) -> int | str:
    """CRC-32 of ``length`` bytes of the file at ``offset``, read block by block into this
    thread's small buffer (it stays in cache); a reason string if they cannot be read whole.
    Runs in a worker thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open it: {e.strerror or e}"
    try:
        buf = thread_buffer()
        crc, pos, end = 0, offset, offset + length
        while pos < end:
            view = buf[: min(len(buf), end - pos)]
            n = os.preadv(fd, [view], pos)
            if n == 0:
                return f"it ends at byte {pos}, before the chunk does"
            crc = crc32(view[:n], crc)
            pos += n
        return crc
    except OSError as e:
        return f"read failed: {e.strerror or e}"
    finally:
        os.close(fd)


@dataclass
class _Pass:
    paced: bool
    started: float  # monotonic
    total_bytes: int
    files: int = 0
    chunks: int = 0
    bytes: int = 0
    mismatches: list[dict[str, object]] | None = None

    def summary(self) -> dict[str, object]:
        return {
            "files": self.files,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "seconds": round(time.monotonic() - self.started, 3),
            "mismatches": list(self.mismatches or []),
        }


class Scrubber:
    """The background scrub of one daemon; every method runs on its event loop."""

    def __init__(self, config: DaemonConfig, pool: Pool, loads: LoadService) -> None:
        self.config = config
        self.pool = pool
        self.loads = loads
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="mows-scrub")
        self.passes = 0  # full passes completed
        self.bytes_checked = 0
        self.chunks_checked = 0
        self.mismatched_chunks = 0
        self.files_dropped = 0
        self.last_mismatch: dict[str, object] | None = None
        self.last_pass: dict[str, object] | None = None
        self.state = "idle"
        self._current: _Pass | None = None
        self.reading: PoolFile | None = None  # the file a chunk is being read from now
        self._slot = 0.0  # the pacer's next free time (loop clock)
        self._last_bytes = 0  # of the last pass that ran to its end
        self._waiters: list[asyncio.Future[dict[str, object]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for w in self._waiters:
            w.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def run_now(self) -> dict[str, object]:
        """A full pass that starts now, unpaced (still yielding to loads); its summary. A
        paced pass in progress gives way to it."""
        if self._task is None or self._task.done():
            raise RuntimeError("the scrub is not running")
        w: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()
        self._waiters.append(w)
        self._wake.set()
        return await asyncio.shield(w)

    def status(self) -> dict[str, object]:
        cur = self._current
        rate = self._rate()
        return {
            "interval_s": self.config.scrub_interval or None,
            "max_rate_bytes_per_s": self.config.scrub_rate or None,
            "rate_bytes_per_s": round(rate) if rate else None,
            "state": self.state,
            "passes": self.passes,
            "bytes_checked": self.bytes_checked,
            "chunks_checked": self.chunks_checked,
            "mismatched_chunks": self.mismatched_chunks,
            "files_dropped": self.files_dropped,
            "progress": {"done": cur.bytes, "total": cur.total_bytes} if cur else None,
            "last_pass": self.last_pass,
            "last_mismatch": self.last_mismatch,
        }

    # -- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not self._waiters:
                self.state = "idle" if self.config.scrub_interval > 0 else "off"
                interval = self.config.scrub_interval
                wait = min(EMPTY_WAIT, interval) if interval > 0 else None
                if wait is not None and self._last_bytes:
                    wait = 0.0  # paced passes follow each other: the pacer spaces them
                if wait != 0.0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            p = _Pass(paced=not waiters, started=time.monotonic(), total_bytes=0)
            if p.paced and self.config.scrub_interval <= 0:
                continue
            try:
                done = await self._pass(p)
            except asyncio.CancelledError:
                for w in waiters:
                    w.cancel()
                raise
            except Exception as e:  # a bug: logged, the scrub goes on
                log.exception("scrub pass failed")
                for w in waiters:
                    if not w.done():
                        w.set_exception(e)
                await asyncio.sleep(EMPTY_WAIT)
                continue
            finally:
                self._current = None
            summary = p.summary()
            if done:
                self._last_bytes = p.bytes
                if not p.paced:  # it did a paced pass's work: the next one starts later
                    rate = self._rate()
                    if rate > 0:
                        now = asyncio.get_running_loop().time()
                        self._slot = max(self._slot, now + p.bytes / rate)
            if done and (p.files or not p.paced):  # an empty pool's passes are not counted
                self.passes += 1
                self.last_pass = summary
                if p.mismatches:
                    log.warning(
                        "scrub pass: %d files, %d bytes checked, %d bad chunks",
                        p.files,
                        p.bytes,
                        len(p.mismatches),
                    )
            for w in waiters:
                if not w.done():
                    w.set_result(summary)

    def _rate(self) -> float:
        return scrub_rate(self.pool.used_bytes, self.config.scrub_interval, self.config.scrub_rate)

    async def _pass(self, p: _Pass) -> bool:
        """Check every file READY when the pass starts; False if a request cut it short."""
        files = [f for f in self.pool.files() if f.state is FileState.READY]
        p.total_bytes = sum(f.size for f in files)
        p.mismatches = []
        self._current = p
        self.state = "running"
        loop = asyncio.get_running_loop()
        for f in files:
            if not self._held(f):
                continue  # evicted or dropped since the pass began
            p.files += 1
            for c in f.chunks():
                if p.paced:
                    wait, self._slot = pace(loop.time(), self._slot, c.length, self._rate())
                    if wait > 0:
                        self.state = "waiting"
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), wait)
                    if self._waiters:
                        return False  # an on-demand pass replaces this one
                if not self.loads.idle.is_set():
                    self.state = "paused"
                    await self.loads.idle.wait()
                if not self._held(f):
                    break
                self.state = "running"
                self.reading = f  # not evicted meanwhile: our descriptor would keep its pages
                try:
                    got = await loop.run_in_executor(
                        self.executor, chunk_crc, f.path, c.offset, c.length
                    )
                finally:
                    self.reading = None
                if not self._held(f):
                    break  # evicted while being read: what was read proves nothing
                p.chunks += 1
                p.bytes += c.length
                self.chunks_checked += 1
                self.bytes_checked += c.length
                want = f.chunk_crcs.get(c.index)
                if got != want:
                    self._bad(p, f, c, got, want)
                    break
        return True

    def _held(self, f: PoolFile) -> bool:
        v = f.version
        return (
            self.pool.versions.get(v.id) is v
            and v.files.get(f.rel) is f
            and f.state is FileState.READY
        )

    def _bad(self, p: _Pass, f: PoolFile, c: Chunk, got: int | str, want: int | None) -> None:
        v = f.version
        what = got if isinstance(got, str) else f"CRC-32 {got:08x}, recorded {want or 0:08x}"
        held = f.pins + f.transient_pins
        record: dict[str, object] = {
            "model": v.manifest.source,
            "version": v.id,
            "file": f.rel,
            "chunk": c.index,
            "offset": c.offset,
            "length": c.length,
            "error": what,
        }
        log.error(
            "scrub: %s (version %s) file %s chunk %d, bytes %d-%d: %s: dropped from the pool, "
            "the next open fetches it again%s",
            v.manifest.source,
            v.id,
            f.rel,
            c.index,
            c.offset,
            c.offset + c.length,
            what,
            f" ({held} holds keep their mapping until released)" if held else "",
        )
        self.mismatched_chunks += 1
        self.files_dropped += 1
        self.last_mismatch = record
        assert p.mismatches is not None
        p.mismatches.append(record)
        self.pool.retire(f)
