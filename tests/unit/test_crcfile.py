from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mows import Crc32FileError, MowsError
from mows.manifest import format_crc32, parse_crc32

PRODUCT_SAMPLE = (
    "3d531b22 model-00004-of-00004.safetensors 1ba28546 model-00003-of-00004.safetensors "
    "b248a8c0 model-00002-of-00004.safetensors 09b46987 model-00001-of-00004.safetensors"
)


def test_canonical_tab_and_product_forms() -> None:
    assert parse_crc32("0000abcd a.bin\n\n# note\n0000ABCD sub/b c.bin\n") == {
        "a.bin": 0xABCD,
        "sub/b c.bin": 0xABCD,
    }
    assert parse_crc32(b"a17f38e2\tconfig.json\n") == {"config.json": 0xA17F38E2}
    parsed = parse_crc32(PRODUCT_SAMPLE)
    assert parsed["model-00001-of-00004.safetensors"] == 0x09B46987
    assert len(parsed) == 4


def test_round_trip() -> None:
    values = {"b.bin": 1, "a/c.bin": 0xFFFFFFFF}
    text = format_crc32(values)
    assert text.splitlines()[0] == "ffffffff a/c.bin"
    assert parse_crc32(text) == values


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0000abcd ../x\n", "'..'"),
        ("0000abcd /etc/passwd\n", "absolute"),
        ("0000abcd a/../../x\n", "'..'"),
        ("zzzzzzzz a.bin\n", "bad CRC-32"),
        ("abc a.bin\n", "bad CRC-32"),
        ("0000abcd a.bin\n0000abce a.bin\n", "listed twice"),
        ("0000abcd\n", "expected"),
        ("0000abcd ./a.bin\n", "normalised"),
    ],
)
def test_rejects(text: str, needle: str) -> None:
    with pytest.raises(Crc32FileError, match=needle) as e:
        parse_crc32(text, "m/crc32.txt")
    assert "m/crc32.txt:" in str(e.value)


def test_rejects_non_utf8() -> None:
    with pytest.raises(Crc32FileError, match="UTF-8"):
        parse_crc32(b"\xff\xfe 0000abcd a\n")


@given(st.binary(max_size=300))
def test_fuzz_bytes_only_raise_mows_errors(data: bytes) -> None:
    with contextlib.suppress(MowsError):
        parse_crc32(data)


@given(st.text(alphabet="0123456789abcdefgh \t\n./-_x", max_size=200))
def test_fuzz_text_parses_to_safe_paths(text: str) -> None:
    try:
        result = parse_crc32(text)
    except MowsError:
        return
    for path, value in result.items():
        assert not path.startswith("/")
        assert ".." not in path.split("/")
        assert 0 <= value <= 0xFFFFFFFF
