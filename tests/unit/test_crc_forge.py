from __future__ import annotations

import os
import zlib

import pytest

from tests.crc_forge import crc_preserving_delta, xor_at


@pytest.mark.parametrize(
    ("length", "offset"), [(5, 0), (64, 0), (64, 59), (4096, 1000), (1 << 20, 12345)]
)
def test_delta_keeps_the_crc_of_any_content(length: int, offset: int) -> None:
    delta = crc_preserving_delta(length, offset)
    assert len(delta) == 5 and any(delta)
    for data in (bytes(length), os.urandom(length), b"\xff" * length):
        forged = xor_at(data, offset, delta)
        assert forged != data
        assert zlib.crc32(forged) == zlib.crc32(data)


def test_offset_must_leave_five_bytes() -> None:
    with pytest.raises(ValueError):
        crc_preserving_delta(10, 6)
    with pytest.raises(ValueError):
        crc_preserving_delta(10, -1)
