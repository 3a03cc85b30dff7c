"""The one exception tree of mows.

    MowsError
    ├── ConfigError           a bad setting, flag or argument (names the key)
    ├── ManifestError         a model that cannot be described (names the file)
    │   ├── HeaderError       a malformed safetensors header
    │   └── Crc32FileError    a malformed or unsafe crc32.txt or sha256 file (names the line)
    ├── IntegrityError        bytes whose CRC-32 or SHA-256 is not the expected one
    ├── SourceError           origin storage failed (names the source and file)
    │   └── SourceNotFoundError
    ├── AccessDeniedError     a path outside the daemon's allowed roots
    ├── CapacityError         does not fit under the pool's memory cap
    ├── ProtocolError         a malformed message on the local socket or from a peer
    ├── PeerError             a peer failed, stalled, refused us or sent bad bytes (names it)
    ├── ClusterError          the cluster directory (etcd) failed
    └── DaemonError           the daemon refused or failed a request
        └── DaemonUnavailableError   no daemon answers on the socket

Errors of the layers below (OSError, urllib3, msgspec) are translated at the boundary so
callers only ever catch ``MowsError``.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "CapacityError",
    "ClusterError",
    "ConfigError",
    "Crc32FileError",
    "DaemonError",
    "DaemonUnavailableError",
    "HeaderError",
    "IntegrityError",
    "ManifestError",
    "MowsError",
    "PeerError",
    "ProtocolError",
    "SourceError",
    "SourceNotFoundError",
]


class MowsError(Exception):
    """Base class of every error mows raises on purpose."""


class ConfigError(MowsError):
    """A setting, flag or argument is invalid."""


class ManifestError(MowsError):
    """A model directory or one of its files cannot be described."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class HeaderError(ManifestError):
    """A safetensors header is malformed or inconsistent with its file."""


class Crc32FileError(ManifestError):
    """A checksum file (crc32.txt, the sha256 file) is malformed, unsafe, or names files that
    do not exist."""

    def __init__(self, path: str, reason: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else path
        ManifestError.__init__(self, where, reason)
        self.line = line


class IntegrityError(MowsError):
    """Bytes failed their CRC-32 check (``expected``/``actual`` are ints) or their SHA-256
    check (hex strings); they are never served."""

    def __init__(
        self,
        path: str,
        expected: int | str,
        actual: int | str,
        chunk: int | None = None,
        source: str = "",
    ) -> None:
        part = f" chunk {chunk}" if chunk is not None else ""
        origin = f" (from {source})" if source else ""
        if isinstance(expected, str):
            what = f"SHA-256 mismatch, expected {expected}, got {actual}"
        else:
            what = f"CRC-32 mismatch, expected {expected:08x}, got {actual:08x}"
        super().__init__(f"{path}{part}: {what}{origin}")
        self.path = path
        self.chunk = chunk
        self.expected = expected
        self.actual = actual
        self.source = source


class SourceError(MowsError):
    """Reading from origin storage failed."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        super().__init__(f"{source}: {path}: {reason}")
        self.source = source
        self.path = path
        self.reason = reason


class SourceNotFoundError(SourceError):
    """The source has no such file or directory."""


class AccessDeniedError(MowsError):
    """A path lies outside the roots the daemon may read."""


class CapacityError(MowsError):
    """The request does not fit under the pool's memory cap."""


class ProtocolError(MowsError):
    """A message on the local socket is malformed, too large or of another version."""


class PeerError(MowsError):
    """A peer failed, stalled, refused the handshake or sent bytes that failed their CRC."""

    def __init__(
        self, peer: str, reason: str, corrupt: bool = False, *, missing: bool = False
    ) -> None:
        super().__init__(f"peer {peer}: {reason}")
        self.peer = peer
        self.reason = reason
        self.corrupt = corrupt
        self.missing = missing  # the peer is fine but does not hold the chunk (yet)


class ClusterError(MowsError):
    """The cluster directory (etcd) is unreachable or returned an error."""


class DaemonError(MowsError):
    """The daemon refused or failed a request; ``kind`` names the daemon-side error class."""

    def __init__(self, message: str, kind: str = "DaemonError") -> None:
        super().__init__(message)
        self.kind = kind


class DaemonUnavailableError(DaemonError):
    """No daemon answers on the configured socket."""
