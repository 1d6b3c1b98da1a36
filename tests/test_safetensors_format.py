"""The safetensors header as untrusted input: every malformed file is a one-line CheckpointError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mergescope.checkpoints import CheckpointError, read_header


def make_file(path, header: object, data: bytes = b"", raw_header: bytes | None = None, length: int | None = None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_header_matches_the_safetensors_library(tmp_path):
    state = {
        "a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.arange(6, dtype=torch.int32).reshape(2, 3)
    }
    save_file(state, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "k": "v"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt", "k": "v"}
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            info = header.tensors[name]
            assert list(info.shape) == sl.get_shape()
            assert info.dtype == sl.get_dtype()
    raw = (tmp_path / "x.safetensors").read_bytes()
    for name, tensor in state.items():
        info = header.tensors[name]
        assert (
            raw[info.offset : info.offset + info.nbytes]
            == tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"header": GOOD, "data": b"\0" * 4}, "truncated"),
        ({"header": GOOD, "data": b"\0" * 8, "length": 10_000}, "past the end of the file"),
        ({"header": None, "raw_header": b"\xff\xfe not json"}, "not valid JSON"),
        ({"header": [1, 2]}, "not a JSON object"),
        ({"header": {"t": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, "data": b"\0" * 8},
         "unsupported dtype"),
        ({"header": {"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "data": b"\0" * 12},
         "needs 12 bytes"),
        ({"header": {"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "data": b"\0" * 8}, "non-negative"),
        ({"header": {"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "data": b"\0" * 8}, "begin <= end"),
        ({"header": {"t": {"dtype": "F32", "shape": [2]}}, "data": b"\0" * 8}, "data_offsets"),
        (
            {
                "header": {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                "data": b"\0" * 12,
            },
            "overlap",
        ),
        (
            {"header": None, "raw_header": b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "t": {}}'},
            "listed twice",
        ),
        ({"header": {"__metadata__": {"a": 1}}}, "__metadata__"),
    ],
)
def test_malformed_headers(tmp_path, kwargs, message):
    path = make_file(tmp_path / "bad.safetensors", **kwargs)
    with pytest.raises(CheckpointError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_too_short(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(tmp_path / "x.safetensors")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "I8", "U64", "F8_E4M3", "X", 3]),
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | json_values,
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.dictionaries(st.text(max_size=6), entries | json_values, max_size=5) | json_values,
    data_len=st.integers(0, 96),
    length_delta=st.integers(-3, 3) | st.just(0),
)
def test_random_headers_either_parse_consistently_or_fail_cleanly(tmp_path, header, data_len, length_delta):
    raw = json.dumps(header).encode()
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + b"\0" * data_len)
    try:
        parsed = read_header(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    size = path.stat().st_size
    spans = sorted((i.offset, i.offset + i.nbytes) for i in parsed.tensors.values() if i.nbytes)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert all(end <= size for _, end in spans)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 200), value=st.integers(0, 255), cut=st.integers(0, 300))
def test_mutated_real_files_fail_cleanly(tmp_path, position, value, cut):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(4, 3), "b": torch.zeros(5).bfloat16()}, str(path))
    raw = bytearray(path.read_bytes())
    raw[position % len(raw)] = value
    path.write_bytes(bytes(raw[: len(raw) - cut % 40]))
    try:
        read_header(path)
    except CheckpointError:
        pass


def header_error_and_peak_memory(path) -> tuple[str, int]:
    """The one-line error reading ``path``'s header raises, and the most memory Python held meanwhile."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            read_header(path)
        return str(info.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("length, size, message", [
    (2**64 - 1, 64, "runs past the end of the file"),
    (150_000_000, 200_000_000, "larger than the 100 MB limit"),  # a sparse file: the length fits, the limit not
])
def test_a_huge_declared_header_length_is_refused_without_reading_it(tmp_path, length, size, message):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length))
        f.truncate(size)
    error, peak = header_error_and_peak_memory(path)
    assert message in error and "\n" not in error and str(path) in error
    assert peak < 1_000_000


@pytest.mark.parametrize("raw", [b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 200_000 + b"1" + b"}" * 200_000],
                         ids=["arrays", "objects"])
def test_deeply_nested_header_json_is_one_line_in_bounded_memory(tmp_path, raw):
    path = make_file(tmp_path / "deep.safetensors", None, raw_header=raw)
    error, peak = header_error_and_peak_memory(path)
    assert "header is not valid JSON" in error and "\n" not in error
    assert peak < 10 * len(raw)  # the header's bytes and its text, not a structure per level
