"""Frames on in-memory streams: whole payloads only, every other outcome a TransferError with a reason."""

import os

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.overlay.framing import (
    CHUNK,
    PREFIX,
    TRAILER,
    Inflight,
    Pace,
    Refused,
    TooSlow,
    TransferError,
    Truncated,
    read_frame,
    write_frame,
)
from shoal.overlay.wire import WireError, decode


class Pipe:
    """One direction of trio's in-memory stream pair, as the ByteStream the frame functions expect."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream

    async def read(self, max_bytes: int) -> bytes:
        return await self.stream.receive_some(max_bytes)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)


class Bytes:
    """A stream that yields fixed bytes in small pieces, then ends."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.data, self.pos, self.piece = data, 0, piece

    async def read(self, max_bytes: int) -> bytes:
        chunk = self.data[self.pos : self.pos + min(max_bytes, self.piece)]
        self.pos += len(chunk)
        return chunk


async def frame_bytes(payload: bytes) -> bytes:
    out = bytearray()

    class Sink:
        async def write(self, data: bytes) -> None:
            out.extend(data)

    await write_frame(Sink(), payload)
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK + 1, 5 * CHUNK + 3])
async def test_round_trip(size):
    payload = os.urandom(size)
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_frame, Pipe(a), payload)
        with trio.fail_after(10):
            assert await read_frame(Pipe(b), max_payload=size) == payload


async def test_sender_gone_mid_payload_is_truncated_not_short():
    frame = await frame_bytes(os.urandom(100_000))
    with pytest.raises(Truncated, match="payload after"):
        await read_frame(Bytes(frame[: PREFIX.size + 5_000], piece=4096), max_payload=1 << 20)


async def test_whole_payload_without_trailer_is_rejected():
    """A crashed sender reads as clean EOF on libp2p: without the trailer we must not accept."""
    payload = os.urandom(1000)
    frame = await frame_bytes(payload)
    with pytest.raises(Truncated, match="trailer"):
        await read_frame(Bytes(frame[: -TRAILER.size]), max_payload=1 << 20)


async def test_a_payload_that_does_not_end_where_its_prefix_says_is_refused():
    """A desynchronised stream (a byte more inside the payload): refused as wrong bytes, not as a
    truncation. A byte flipped in transit is Noise's to catch (tests/test_noiseio.py)."""
    frame = await frame_bytes(os.urandom(1000))
    shifted = frame[: PREFIX.size + 500] + b"x" + frame[PREFIX.size + 500 :]
    with pytest.raises(TransferError, match="trailer does not match") as info:
        await read_frame(Bytes(shifted), max_payload=1 << 20)
    assert not isinstance(info.value, Truncated)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: b"XYZ" + f[3:], "not a Shoal frame"),
        (lambda f: f[:3] + bytes([9]) + f[4:], "unsupported frame version 9"),
        (lambda f: f[:4] + (2**40).to_bytes(8, "little") + f[12:], "over the"),
    ],
)
async def test_bad_prefixes(mutate, match):
    frame = await frame_bytes(b"payload")
    with pytest.raises(TransferError, match=match) as info:
        await read_frame(Bytes(mutate(frame)), max_payload=1 << 20)
    assert info.value.hostile  # another release is in another task (VERSION is in the task id)


async def test_trailer_length_must_match_prefix():
    frame = bytearray(await frame_bytes(b"payload"))
    frame[-5] ^= 0xFF  # inside the trailer's length field
    with pytest.raises(TransferError, match="trailer does not match"):
        await read_frame(Bytes(bytes(frame)), max_payload=1 << 20)


@pytest.mark.parametrize("sizes", [[5, 3], [CHUNK + 5, 7, 2 * CHUNK], [0, CHUNK - 12, 1]])
async def test_a_payload_given_in_parts_arrives_as_their_concatenation(sizes):
    parts = [os.urandom(n) for n in sizes]
    frame = await frame_bytes(parts)
    assert await read_frame(Bytes(frame, CHUNK), sum(sizes)) == b"".join(parts)


async def test_frames_follow_each_other_on_one_stream_and_an_idle_stream_says_so():
    one, two = await frame_bytes(b"first"), await frame_bytes(b"second")
    stream = Bytes(one + two, 4096)
    assert await read_frame(stream, 100) == b"first"
    assert await read_frame(stream, 100) == b"second"
    with pytest.raises(Truncated) as ended:
        await read_frame(stream, 100)
    assert ended.value.empty  # the end between frames is the stream's end, not a lost frame
    _, b = trio.testing.memory_stream_pair()
    with pytest.raises(Truncated, match="no frame began") as idle:
        await read_frame(Pipe(b), 100, idle=0.05)
    assert idle.value.empty


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_random_bytes_never_crash_the_reader_or_the_decoder(data, piece):
    """1,000 random inputs, raw and as whole valid frames (so the decoder sees them too): a message,
    or a TransferError / WireError with a reason, never anything else."""

    async def main() -> None:
        delivered = 0
        for raw in (data, await frame_bytes(data)):
            try:
                payload = await read_frame(Bytes(raw, piece), max_payload=1 << 16)
            except TransferError as e:
                assert str(e)
                continue
            delivered += 1
            try:
                decode(payload)
            except WireError as e:
                assert str(e)
        assert delivered >= 1  # the framed copy always arrives

    trio.run(main)


class Paced:
    """A stream that yields ``burst`` bytes at once, then ``rate`` bytes per second (virtual time)."""

    def __init__(self, data: bytes, burst: int, rate: int) -> None:
        self.data, self.pos, self.burst, self.rate = data, 0, burst, rate

    async def read(self, max_bytes: int) -> bytes:
        if self.pos >= self.burst:
            await trio.sleep(1)
        n = min(max_bytes, self.burst - self.pos if self.pos < self.burst else self.rate)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


async def test_a_frame_fed_fast_then_trickled_is_dropped_within_two_windows(autojump_clock):
    frame = await frame_bytes(os.urandom(4 * CHUNK))
    start = trio.current_time()
    with pytest.raises(TooSlow, match="under 64 KiB/s") as info:
        await read_frame(Paced(frame, burst=2 * CHUNK, rate=1), 8 * CHUNK, pace=Pace(64 * 1024, 5.0))
    assert not info.value.hostile
    assert trio.current_time() - start <= 10.0  # not the 1,600 s a since-start average would allow


async def test_a_slow_but_steady_frame_arrives(autojump_clock):
    payload = os.urandom(2 * CHUNK)  # 2 MiB at 150 KiB/s: about 14 s, each window above 64 KiB/s
    frame = await frame_bytes(payload)
    stream = Paced(frame, burst=0, rate=150 * 1024)
    assert await read_frame(stream, 4 * CHUNK, pace=Pace(64 * 1024, 5.0)) == payload


async def test_inflight_refuses_frames_that_do_not_fit_and_releases_on_exit():
    budget = Inflight(total=3 * CHUNK, per_peer=2 * CHUNK)
    frame = await frame_bytes(os.urandom(CHUNK))
    with budget.claim("a") as admit_a, budget.claim("b") as admit_b:
        await read_frame(Bytes(frame, CHUNK), CHUNK, admit=admit_a)
        await read_frame(Bytes(frame, CHUNK), CHUNK, admit=admit_a)
        with pytest.raises(Refused, match="this peer has"):  # a's share is used up
            await read_frame(Bytes(frame, CHUNK), CHUNK, admit=admit_a)
        await read_frame(Bytes(frame, CHUNK), CHUNK, admit=admit_b)
        with pytest.raises(Refused, match="in flight") as info:  # the node's budget is used up
            await read_frame(Bytes(frame, CHUNK), CHUNK, admit=admit_b)
        assert not info.value.hostile and budget.used == 3 * CHUNK
    assert budget.used == 0 and not budget.by_peer
