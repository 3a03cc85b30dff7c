"""SHA-256 digests of a model's files (untrusted input): the ``sha256sum`` format, and the
digests Hugging Face cache snapshots carry in their blob names.

CRC-32 catches accidents, not forgeries: it is linear, so anyone can change bytes and keep it.
A model that ships SHA-256 digests is checked against them as well.

Accepted lines, as ``sha256sum`` writes them and ``sha256sum -c`` reads them:
  * ``<64 hex>  <path>`` (text mode) or ``<64 hex> *<path>`` (binary mode; the same bytes);
  * ``<64 hex> <path>`` (one space, as ``md5 -r`` style tools write);
  * ``SHA256 (<path>) = <64 hex>`` (``sha256sum --tag``);
  * a leading ``\\`` when the path is escaped (``\\\\`` and ``\\n``, as GNU writes names with
    backslashes or newlines).
Hex may be upper or lower case (kept lower case). Blank lines and ``#`` comments are ignored;
a leading ``./`` is dropped (``find . -exec sha256sum``). Paths must be relative and
normalised; a path listed twice is an error, whatever its digests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from .._errors import Crc32FileError
from ._crcfile import check_relative_path, checksum_text

__all__ = ["MAX_SHA256_FILE_BYTES", "format_sha256", "hf_blob_digest", "parse_sha256"]

MAX_SHA256_FILE_BYTES = 16 * 1024 * 1024
_GNU = re.compile(r"(?P<esc>\\?)(?P<hex>[0-9a-fA-F]{64}) [ *]?(?P<path>.+)")
_TAG = re.compile(r"(?P<esc>\\?)SHA256 \((?P<path>.+)\) = (?P<hex>[0-9a-fA-F]{64})")
_ESCAPES = re.compile(r"\\(.?)")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_sha256(data: bytes | str, where: str = "sha256sums.txt") -> dict[str, str]:
    """Parse a sha256 file's content into ``{relative path: lower-case hex digest}``."""
    text = checksum_text(data, where, MAX_SHA256_FILE_BYTES)
    out: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _GNU.fullmatch(line) or _TAG.fullmatch(line)
        if m is None:
            raise Crc32FileError(
                where, f"expected '<sha256>  <path>' (64 hex digits), got {line[:100]!r}", lineno
            )
        rel = _unescape(m["path"], where, lineno) if m["esc"] else m["path"]
        rel = check_relative_path(rel.removeprefix("./"), where, lineno)
        if rel in out:
            raise Crc32FileError(where, f"{rel!r} listed twice", lineno)
        out[rel] = m["hex"].lower()
    return out


def _unescape(path: str, where: str, lineno: int) -> str:
    def one(m: re.Match[str]) -> str:
        if m[1] not in ("\\", "n", "r"):
            raise Crc32FileError(where, f"unknown escape '\\{m[1]}' in an escaped path", lineno)
        return {"\\": "\\", "n": "\n", "r": "\r"}[m[1]]

    return _ESCAPES.sub(one, path)


def format_sha256(values: Mapping[str, str]) -> str:
    """``sha256sum``'s own form, sorted by path (``sha256sum -c`` checks it)."""
    lines = []
    for p in sorted(values):
        if "\\" in p or "\n" in p or "\r" in p:
            esc = p.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            lines.append(f"\\{values[p]}  {esc}\n")
        else:
            lines.append(f"{values[p]}  {p}\n")
    return "".join(lines)


def hf_blob_digest(root: str, rel: str) -> str | None:
    """The SHA-256 a Hugging Face cache snapshot gives ``root/rel`` in its name: the file is a
    symlink to ``.../blobs/<sha256 of its content>`` (LFS files; small files are named by
    their git SHA-1, 40 hex, and get nothing). None for anything else."""
    full = os.path.join(root, rel)
    if not os.path.islink(full):
        return None
    target = os.path.realpath(full)
    parent, name = os.path.split(target)
    if os.path.basename(parent) != "blobs" or not _HEX64.fullmatch(name):
        return None
    return name
