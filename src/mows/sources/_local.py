"""A model directory on a local or mounted filesystem (how OSS, NAS and CPFS reach a node).

Every file is opened relative to a descriptor of the model directory held from the start,
never by a path checked earlier (see ``_openat``): a symlink swapped in after ``stat`` cannot
lead the daemon outside the model. Relative symlinks that stay inside are followed, so are
those of a Hugging Face cache snapshot into its ``blobs``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import threading
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from .._errors import SourceError, SourceNotFoundError
from ..manifest import FileStat, check_relative_path
from ._base import Source
from ._openat import open_beneath, open_no_symlinks

__all__ = ["LocalSource"]

log = logging.getLogger("mows.sources")

# O_NONBLOCK: a FIFO swapped in for a file must not hang the reader in open(); cleared once
# fstat shows a regular file.
_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

_REASONS = {
    errno.EXDEV: "resolves outside the model directory",
    errno.ELOOP: "a symbolic link loop, or a link that may not be followed",
}


class LocalSource(Source):
    """Reads with ``preadv`` straight into the caller's buffer: no intermediate copy.
    ``read_through`` reads a range block by block through one small buffer instead (how
    an origin fill copies into the pool: see ``mows.daemon._fill``)."""

    def __init__(self, location: str) -> None:
        self._anchor = -1
        self._retired: list[int] = []  # anchors of a directory since replaced at its path
        self._users = 0  # opens in flight: descriptors they use are closed by the last one
        self._closed = False
        self._lock = threading.Lock()
        path = unquote(urlsplit(location).path) if location.startswith("file://") else location
        self.root = os.path.realpath(path)
        self.url = self.root
        # A Hugging Face cache snapshot <repo>/snapshots/<rev> links its files to
        # ../../blobs/<sha256>: anchor at <repo> so those (and only those beneath it) resolve.
        snapshots, rev = os.path.split(self.root)
        repo, name = os.path.split(snapshots)
        if name == "snapshots" and os.path.isdir(os.path.join(repo, "blobs")):
            self._anchor_path, self._prefix = repo, f"snapshots/{rev}/"
        else:
            self._anchor_path, self._prefix = self.root, ""
        self._anchor, self._anchor_id = self._open_anchor("")
        if self._prefix:
            os.close(self._open("", _DIR))  # the snapshot directory itself

    def _open_anchor(self, rel: str) -> tuple[int, tuple[int, int]]:
        # Realpath'd at the start: a symlink found in the path now was swapped in since.
        try:
            fd = open_no_symlinks(self._anchor_path, _DIR)
        except (FileNotFoundError, NotADirectoryError):
            raise SourceNotFoundError(self.url, rel, "model directory does not exist") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SourceError(
                    self.url, rel, f"{self._anchor_path} holds a symbolic link now"
                ) from None
            raise self._error(rel, e) from None
        st = os.fstat(fd)
        return fd, (st.st_dev, st.st_ino)

    def _current_anchor(self, fd: int, rel: str) -> int:
        """The anchor, opened again if its path names another directory now (a model
        replaced by a new copy, or renamed away): the directory held open is the one the
        path named, never a stale copy the path no longer leads to."""
        try:
            st = os.stat(self._anchor_path)
            if (st.st_dev, st.st_ino) == self._anchor_id:
                return fd
        except OSError:
            pass
        new, ident = self._open_anchor(rel)
        with self._lock:
            if self._closed:
                os.close(new)
                raise SourceError(self.url, rel, "the source is closed")
            self._retired.append(self._anchor)
            self._anchor, self._anchor_id = new, ident
        return new

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._release()

    def __del__(self) -> None:
        if getattr(self, "_anchor", -1) >= 0:
            self.close()

    def _release(self) -> None:
        # Under the lock. A closed descriptor's number is soon reused: closing an anchor
        # under an open in flight could resolve that open beneath some other directory.
        if self._users:
            return
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()
        if self._closed and self._anchor >= 0:
            os.close(self._anchor)
            self._anchor = -1

    def _error(self, rel: str, e: OSError) -> SourceError:
        if e.errno == errno.ENOENT:
            return SourceNotFoundError(self.url, rel, "no such file")
        return SourceError(self.url, rel, _REASONS.get(e.errno or 0, e.strerror or str(e)))

    def _open(self, rel: str, flags: int) -> int:
        """``rel`` ("" for the model directory) opened beneath the anchor."""
        with self._lock:
            if self._closed:
                raise SourceError(self.url, rel, "the source is closed")
            self._users += 1
            anchor = self._anchor
        try:
            anchor = self._current_anchor(anchor, rel)
            return open_beneath(anchor, (self._prefix + rel) or ".", flags)
        except OSError as e:
            raise self._error(rel, e) from None
        finally:
            with self._lock:
                self._users -= 1
                self._release()

    def _open_file(self, rel: str) -> tuple[int, os.stat_result]:
        fd = self._open(check_relative_path(rel, self.url), _READ)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise SourceError(self.url, rel, "not a regular file")
            os.set_blocking(fd, True)
        except OSError as e:
            os.close(fd)
            raise self._error(rel, e) from None
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def list_files(self) -> list[FileStat]:
        out: list[FileStat] = []
        self._list("", out)
        return out

    def _list(self, prefix: str, out: list[FileStat]) -> None:
        """Files of one directory (sorted), then its subdirectories, as ``os.walk`` did;
        each directory and file opened beneath the anchor like a read, so what is listed is
        what is read."""
        fd = self._open(prefix.rstrip("/"), _DIR)
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
            subdirs = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        except OSError as e:
            raise self._error(prefix, e) from None
        finally:
            os.close(fd)
        for entry in entries:
            if entry.name in subdirs:
                continue
            try:
                out.append(self.stat(prefix + entry.name))
            except SourceError as e:
                log.warning(
                    "skipping %s: %s", os.path.join(self.root, prefix + entry.name), e.reason
                )
        for name in sorted(subdirs):
            self._list(f"{prefix}{name}/", out)

    def stat(self, path: str) -> FileStat:
        fd, st = self._open_file(path)
        os.close(fd)
        return FileStat(path, st.st_size, st.st_mtime_ns)

    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        fd, _ = self._open_file(path)
        try:
            self._pread(fd, path, offset, buf.cast("B") if buf.format != "B" else buf)
        finally:
            os.close(fd)

    def read_through(
        self,
        path: str,
        offset: int,
        length: int,
        buf: memoryview,
        sink: Callable[[memoryview, int], None],
    ) -> None:
        """``length`` bytes of the file from ``offset``, read block by block into ``buf``
        (reused for each block): ``sink(block, at)`` gets each one while it is still in
        cache, ``at`` its offset in the range. One open for the range; what ``sink`` raises
        passes through unchanged."""
        if not len(buf) and length:
            raise ValueError("read_through needs a non-empty buffer")
        fd, _ = self._open_file(path)
        try:
            at = 0
            while at < length:
                n = min(len(buf), length - at)
                with buf[:n] as block:
                    self._pread(fd, path, offset + at, block)
                    sink(block, at)
                at += n
        finally:
            os.close(fd)

    def _pread(self, fd: int, path: str, offset: int, view: memoryview) -> None:
        """All of ``view`` from ``offset``; a short read is a ``SourceError``."""
        done = 0
        try:
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise SourceError(
                        self.url,
                        path,
                        f"short read: {done} of {len(view)} bytes at offset {offset}",
                    )
                done += n
        except OSError as e:
            if e.errno == errno.EINTR:  # pragma: no cover - retried by Python itself
                raise
            raise SourceError(self.url, path, e.strerror or str(e)) from None
