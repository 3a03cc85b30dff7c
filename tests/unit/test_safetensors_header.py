from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mows import HeaderError, MowsError
from mows.manifest import build_manifest, parse_safetensors_header
from mows.sources import open_source


def _file(header: dict[str, object], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_index_equals_safe_open_for_every_tensor(tiny_qwen2: Path) -> None:
    manifest = build_manifest(open_source(tiny_qwen2))
    shards = [f for f in manifest.files if f.path.endswith(".safetensors")]
    assert len(shards) >= 3, "the fixture should be sharded"
    count = 0
    for entry in shards:
        assert entry.safetensors is not None
        raw = (tiny_qwen2 / entry.path).read_bytes()
        with safe_open(tiny_qwen2 / entry.path, "pt") as f:
            assert sorted(t.name for t in entry.safetensors.tensors) == sorted(f.keys())
            for t in entry.safetensors.tensors:
                ref = f.get_tensor(t.name)
                assert list(ref.shape) == list(t.shape)
                assert ref.dtype == {"BF16": torch.bfloat16, "F32": torch.float32}[t.dtype]
                # The absolute byte range holds exactly the tensor's bytes.
                assert raw[t.start : t.end] == ref.contiguous().view(torch.uint8).numpy().tobytes()
                count += 1
    assert count > 10


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    ("header", "data_len", "needle"),
    [
        ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, 1, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, 16, "needs 16 bytes"),
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, 8, "past the data"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 4, "begin <= end"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "overlap",
        ),
        ({"__metadata__": {"k": 1}}, 0, "__metadata__"),
        ({"a": [1, 2]}, 0, "not an object"),
    ],
)
def test_rejects_bad_headers(header: dict[str, object], data_len: int, needle: str) -> None:
    blob = _file(header, b"\0" * data_len)
    with pytest.raises(HeaderError, match=needle) as e:
        parse_safetensors_header(blob, len(blob), "x.safetensors")
    assert str(e.value).startswith("x.safetensors: ")


def test_rejects_huge_and_truncated_headers() -> None:
    blob = struct.pack("<Q", 2**40) + b"{}"
    with pytest.raises(HeaderError, match="limit"):
        parse_safetensors_header(blob, len(blob), "x")
    blob = struct.pack("<Q", 100) + b"{}"
    with pytest.raises(HeaderError, match="past the end"):
        parse_safetensors_header(blob, len(blob), "x")
    with pytest.raises(HeaderError, match="JSON"):
        blob = struct.pack("<Q", 3) + b"{x}"
        parse_safetensors_header(blob, len(blob), "x")


def test_accepts_good_header() -> None:
    blob = _file({**GOOD, "__metadata__": {"format": "pt"}}, b"\0" * 16)
    idx = parse_safetensors_header(blob, len(blob), "x")
    assert idx.metadata == {"format": "pt"}
    (t,) = idx.tensors
    assert (t.start, t.end, t.shape) == (len(blob) - 16, len(blob), (2, 2))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(MowsError):
        parse_safetensors_header(data, len(data), "f")


@settings(max_examples=300)
@given(st.data())
def test_fuzz_mutated_valid_header(data: st.DataObject) -> None:
    blob = bytearray(_file(GOOD, b"\0" * 16))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        idx = parse_safetensors_header(bytes(blob[:cut]), cut, "f")
    except MowsError:
        return
    for t in idx.tensors:
        assert idx.data_start <= t.start <= t.end <= cut
