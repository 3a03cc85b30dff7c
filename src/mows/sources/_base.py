"""The origin-storage contract and the registry of implementations by URL scheme."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from urllib.parse import urlsplit

from .._errors import ConfigError, SourceError
from ..manifest import FileStat

__all__ = ["Source", "open_source", "register_source"]

log = logging.getLogger("mows.sources")


class Source(ABC):
    """Origin storage holding one model directory.

    Paths are relative POSIX paths inside the model. Every method raises ``SourceError``
    (``SourceNotFoundError`` for a missing file) naming the source and the file; nothing
    else escapes. Implementations must be safe to call from several threads at once.
    """

    url: str

    @abstractmethod
    def list_files(self) -> list[FileStat]:
        """Every regular file of the model, recursively."""

    @abstractmethod
    def stat(self, path: str) -> FileStat:
        """Size and modification time of one file."""

    @abstractmethod
    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` with the file's bytes from ``offset``; a short read is an error."""

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_into(path, offset, memoryview(buf))
        return bytes(buf)

    def read_file(self, path: str, limit: int) -> bytes:
        """A whole small file (crc32.txt), at most ``limit`` bytes; one request where the
        source allows it (a warm open revalidates with this alone)."""
        st = self.stat(path)
        if st.size > limit:
            raise SourceError(self.url, path, f"file of {st.size} bytes exceeds {limit} bytes")
        return self.read_range(path, 0, st.size)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and descriptors."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# scheme -> "module:Class"; imported only when used. Third parties add entry points in the
# "mows.sources" group.
_REGISTRY: dict[str, str] = {
    "file": "mows.sources._local:LocalSource",
    "http": "mows.sources._http:HttpSource",
    "https": "mows.sources._http:HttpSource",
    "s3": "mows.sources._s3:S3Source",
}


def register_source(scheme: str, target: str) -> None:
    """Map a URL scheme to ``"module:Class"`` (a ``Source`` subclass taking the URL)."""
    _REGISTRY[scheme.lower()] = target


def open_source(location: str | os.PathLike[str], **options: object) -> Source:
    """Open the model at a path or URL (``file://``, ``http(s)://``, ``s3://`` or a registered
    scheme). ``options`` (the daemon's ``[sources]`` table) serve every scheme: each source
    gets those its constructor names (all of them if it takes ``**kwargs``)."""
    text = os.fspath(location)
    scheme = urlsplit(text).scheme.lower() if "://" in text else "file"
    target = _REGISTRY.get(scheme)
    if target is None:
        for ep in entry_points(group="mows.sources"):
            if ep.name == scheme:
                target = ep.value
                break
    if target is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"{text}: unknown source scheme {scheme!r} (known: {known})")
    module_name, _, cls_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except ImportError as e:
        extra = " (pip install 'mows[s3]')" if scheme == "s3" else ": pip install it"
        raise ConfigError(f"{text}: the {scheme!r} source needs {e.name!r}{extra}") from e
    source = cls(text, **_accepted(cls, options))
    if not isinstance(source, Source):
        raise SourceError(text, "", f"{target} is not a mows.sources.Source")
    return source


def _accepted(cls: type, options: dict[str, object]) -> dict[str, object]:
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return options
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    ignored = sorted(set(options) - names)
    if ignored:
        log.debug("%s: options %s are for other sources", cls.__name__, ", ".join(ignored))
    return {k: v for k, v in options.items() if k in names}
