"""Model manifests: file lists, chunk plans, crc32.txt, sha256 digests and safetensors headers
(pure code)."""

from __future__ import annotations

from ._crcfile import MAX_CRC32_FILE_BYTES, check_relative_path, format_crc32, parse_crc32
from ._model import (
    DEFAULT_CHUNK_SIZE,
    Chunk,
    FileEntry,
    FileStat,
    Manifest,
    ManifestSource,
    build_manifest,
    chunk_count,
    chunk_plan,
    version_id,
)
from ._safetensors import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    SafetensorsIndex,
    TensorInfo,
    parse_safetensors_header,
    read_safetensors_index,
)
from ._shafile import MAX_SHA256_FILE_BYTES, format_sha256, hf_blob_digest, parse_sha256

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DTYPE_SIZES",
    "MAX_CRC32_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_SHA256_FILE_BYTES",
    "Chunk",
    "FileEntry",
    "FileStat",
    "Manifest",
    "ManifestSource",
    "SafetensorsIndex",
    "TensorInfo",
    "build_manifest",
    "check_relative_path",
    "chunk_count",
    "chunk_plan",
    "format_crc32",
    "format_sha256",
    "hf_blob_digest",
    "parse_crc32",
    "parse_safetensors_header",
    "parse_sha256",
    "read_safetensors_index",
    "version_id",
]
