from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from mows import crc32, crc32_combine
from mows._crc import combine_chunks


@given(st.binary(max_size=4096), st.binary(max_size=4096))
def test_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@given(st.lists(st.binary(max_size=512), max_size=12))
def test_combine_chunks_matches_whole(parts: list[bytes]) -> None:
    whole = b"".join(parts)
    assert combine_chunks((crc32(p), len(p)) for p in parts) == zlib.crc32(whole)


def test_known_value() -> None:
    # The value every CRC-32 tool prints for this string.
    assert crc32(b"123456789") == 0xCBF43926
