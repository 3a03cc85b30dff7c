"""The crc32.txt format: ``<crc32-hex> <relative path>`` (untrusted input).

Accepted forms, all of standard CRC-32 as zlib and the ``crc32`` tool compute it:
  * canonical: one ``<8 hex> <path>`` per line (the path may contain spaces);
  * the ``crc32`` tool's output: ``<8 hex>\\t<path>``;
  * the product page's sample: several ``<hex> <path>`` pairs on one line, space-separated.
Blank lines and lines starting with ``#`` are ignored. Paths must be relative, normalised,
without ``..``; a path listed twice with different values is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .._errors import Crc32FileError

__all__ = ["MAX_CRC32_FILE_BYTES", "check_relative_path", "format_crc32", "parse_crc32"]

MAX_CRC32_FILE_BYTES = 16 * 1024 * 1024
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")


def check_relative_path(rel: str, where: str, line: int | None = None) -> str:
    """Return ``rel`` if it is a safe relative POSIX path inside a model, else raise."""
    if not rel or "\x00" in rel:
        raise Crc32FileError(where, f"empty or NUL-containing path {rel!r}", line)
    if rel.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise Crc32FileError(where, f"absolute path {rel!r} is not allowed", line)
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise Crc32FileError(where, f"path {rel!r} leaves the model directory ('..')", line)
    if any(p in ("", ".") for p in parts):
        raise Crc32FileError(where, f"path {rel!r} is not normalised", line)
    return "/".join(parts)


def checksum_text(data: bytes | str, where: str, limit: int) -> str:
    """A checksum file's bytes as text: at most ``limit`` bytes of UTF-8, else an error
    naming the file."""
    if isinstance(data, str):
        return data
    if len(data) > limit:
        raise Crc32FileError(where, f"file is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Crc32FileError(where, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def parse_crc32(data: bytes | str, where: str = "crc32.txt") -> dict[str, int]:
    """Parse a crc32 file's content into ``{relative path: crc}``."""
    text = checksum_text(data, where, MAX_CRC32_FILE_BYTES)
    out: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        for hexval, rel in _pairs(line, where, lineno):
            if not _HEX8.fullmatch(hexval):
                raise Crc32FileError(where, f"bad CRC-32 {hexval!r} (want 8 hex digits)", lineno)
            rel = check_relative_path(rel, where, lineno)
            value = int(hexval, 16)
            if out.get(rel, value) != value:
                raise Crc32FileError(
                    where, f"{rel!r} listed twice: {out[rel]:08x} and {value:08x}", lineno
                )
            out[rel] = value
    return out


def _pairs(line: str, where: str, lineno: int) -> list[tuple[str, str]]:
    if "\t" in line:
        hexval, _, rel = line.partition("\t")
        return [(hexval.strip(), rel.strip())]
    tokens = line.split()
    if len(tokens) < 2:
        raise Crc32FileError(where, f"expected '<crc32> <path>', got {line[:80]!r}", lineno)
    if len(tokens) > 2 and len(tokens) % 2 == 0 and all(_HEX8.fullmatch(t) for t in tokens[::2]):
        return list(zip(tokens[::2], tokens[1::2], strict=True))
    hexval, _, rel = line.partition(" ")
    return [(hexval, rel.strip())]


def format_crc32(values: Mapping[str, int]) -> str:
    """The canonical form: sorted by path, one ``<8 hex> <path>`` per line."""
    return "".join(f"{values[p]:08x} {p}\n" for p in sorted(values))
