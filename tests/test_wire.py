import contextlib
import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.overlay.wire import DTYPES, Limits, Message, WireError, decode, encode, encoded_size


def model_message():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(64, 33, generator=g),
        "b": torch.randn(7, generator=g).to(torch.float16),
        "h": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "steps": torch.tensor([3, -1], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    return Message("model", {"round": 7, "samples": 120, "reply": True}, tensors)


def test_round_trip_is_exact_and_size_is_known():
    msg = model_message()
    data = encode(msg)
    assert len(data) == encoded_size(msg)
    out = decode(data)
    assert out.kind == "model" and out.body == {"round": 7, "samples": 120, "reply": True}
    assert list(out.tensors) == list(msg.tensors)
    for name, t in msg.tensors.items():
        assert out.tensors[name].dtype == t.dtype and torch.equal(out.tensors[name], t)
    out.tensors["w"].add_(1)  # decoded tensors are the caller's own, writable
    assert decode(bytearray(data)).kind == "model"


def test_non_finite_and_oversized_input_is_refused():
    bad = Message("model", {}, {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(WireError, match="NaN"):
        decode(encode(bad))
    data = encode(model_message())
    with pytest.raises(WireError, match="exceeds the limit"):
        decode(data, Limits(max_message=len(data) - 1))
    with pytest.raises(WireError, match="tensors exceed"):
        decode(data, Limits(max_tensors=2))
    with pytest.raises(WireError, match="malformed header"):
        decode(encode(Message("x", {"big": list(range(50))})), Limits(max_container=10))


def frame(header, blob=b""):
    raw = msgpack.packb(header)
    start = 8 + len(raw)
    return struct.pack("<3sBI", b"SHL", 1, len(raw)) + raw + bytes(-start % 8) + blob


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than"),
        (b"XYZ\x01\x00\x00\x00\x00", "bad magic"),
        (b"SHL\x09\x00\x00\x00\x00", "unsupported wire version 9"),
        (struct.pack("<3sBI", b"SHL", 1, 999), "past the end"),
        (frame([1, 2, 3]), "must be a map"),
        (frame({"k": 1, "b": {}, "t": []}), "wrong types"),
        (frame({"k": "m", "b": {}, "t": [["w", "f32", [2], 0]]}), "must be \\[name"),
        (frame({"k": "m", "b": {}, "t": [["w", "c64", [2], 0, 16]]}, bytes(16)), "unknown dtype"),
        (frame({"k": "m", "b": {}, "t": [["w", "f32", [-2], 0, 8]]}, bytes(8)), "bad shape"),
        (frame({"k": "m", "b": {}, "t": [["w", "f32", [3], 0, 8]]}, bytes(8)), "do not fit shape"),
        (frame({"k": "m", "b": {}, "t": [["w", "f32", [2], 4, 8]]}, bytes(8)), "run past the end"),
        (
            frame({"k": "m", "b": {}, "t": [["w", "f32", [2], 0, 8], ["v", "f32", [2], 4, 8]]}, bytes(16)),
            "overlap",
        ),
        (
            frame({"k": "m", "b": {}, "t": [["w", "f32", [1], 0, 4], ["w", "f32", [1], 8, 4]]}, bytes(16)),
            "repeated",
        ),
        (frame({"k": "m", "b": {}, "t": [["w", "f32", [1], True, 4]]}, bytes(8)), "integers"),
        (frame({"k": "m", "b": {1: 2}, "t": []}), "malformed header"),
        (frame({"k": "m", "b": {}, "t": [["w", ["f32"], [2], 0, 8]]}, bytes(8)), "unknown dtype"),
        (frame({"k": "m", "b": {}, "t": [["w", "f32", [0, 2**62], 0, 0]]}), "bad shape"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(data, reason):
    with pytest.raises(WireError, match=reason):
        decode(data)


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=300), cut=st.integers(0, 400), flip=st.integers(0, 2000))
def test_fuzzed_frames_never_crash(data, cut, flip):
    """Random bytes, truncations and bit flips of a valid message: a decoded message or a WireError."""
    valid = bytearray(encode(model_message()))
    if flip < len(valid):
        valid[flip] ^= 0xFF
    for candidate in (data, bytes(valid[: len(valid) - cut]), bytes(valid), b"SHL\x01" + data):
        with contextlib.suppress(WireError):
            decode(candidate)


def test_every_dtype_name_round_trips():
    for dtype in DTYPES.values():
        t = torch.arange(6).to(dtype).reshape(2, 3)
        assert torch.equal(decode(encode(Message("m", {}, {"t": t}))).tensors["t"], t)
