"""A model directory on a local or mounted filesystem (how OSS, NAS and CPFS reach a node)."""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from urllib.parse import unquote, urlsplit

from .._errors import SourceError, SourceNotFoundError
from ..manifest import FileStat, check_relative_path
from ._base import Source

__all__ = ["LocalSource"]

log = logging.getLogger("mows.sources")


class LocalSource(Source):
    """Reads with ``preadv`` straight into the caller's buffer: no intermediate copy."""

    def __init__(self, location: str) -> None:
        path = unquote(urlsplit(location).path) if location.startswith("file://") else location
        self.root = os.path.realpath(path)
        self.url = self.root
        if not os.path.isdir(self.root):
            raise SourceNotFoundError(self.url, "", "model directory does not exist")

    def _resolve(self, rel: str) -> str:
        rel = check_relative_path(rel, self.url)
        full = os.path.realpath(os.path.join(self.root, rel))
        if os.path.commonpath([full, self.root]) != self.root:
            raise SourceError(self.url, rel, "resolves outside the model directory")
        return full

    def list_files(self) -> list[FileStat]:
        out: list[FileStat] = []
        for dirpath, dirnames, filenames in os.walk(self.root, onerror=self._walk_error):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                try:
                    out.append(self.stat(rel))
                except SourceError as e:
                    log.warning("skipping %s: %s", full, e.reason)
        return out

    def _walk_error(self, e: OSError) -> None:
        raise SourceError(self.url, e.filename or "", e.strerror or str(e))

    def stat(self, path: str) -> FileStat:
        full = self._resolve(path)
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise SourceNotFoundError(self.url, path, "no such file") from None
        except OSError as e:
            raise SourceError(self.url, path, e.strerror or str(e)) from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise SourceError(self.url, path, "not a regular file")
        return FileStat(path, st.st_size, st.st_mtime_ns)

    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        full = self._resolve(path)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceNotFoundError(self.url, path, "no such file") from None
        except OSError as e:
            raise SourceError(self.url, path, e.strerror or str(e)) from None
        try:
            view = buf.cast("B") if buf.format != "B" else buf
            done = 0
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
        finally:
            os.close(fd)
