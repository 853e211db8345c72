"""Moving one encoded message over a byte stream: an explicit frame with a length and a trailer.

Layout of a frame (a stream carries one or more, one after the other)::

    b"SHF" | version u8 | payload length u64 LE        (prefix, 12 bytes)
    payload, written in pieces of up to CHUNK bytes
    b"END" | 0 u8 | payload length u64 LE              (trailer, 12 bytes)

Why a length and a trailer: on py-libp2p 0.8.1 a sender killed mid-transfer reads as a clean end of
stream (measured), so "EOF" alone would hand a truncated model to the learner. The
receiver accepts a payload only once it has read as many bytes as the prefix announced and then the
trailer with the same length: a short payload is :class:`Truncated`, and bytes that do not end where
the prefix said (a desynchronised stream) are refused. No hash: Noise authenticates every message of
the connection (a flipped or missing byte fails its tag, and the connection with it), so a payload
hash caught nothing, and cost a pass over every payload at both ends (BLAKE3, 0.2 ms per MB here).

Why it costs little (each step measured, docs/measurements.md): the payload is written from
memoryviews of the tensors (no joined copy, no per-piece copy; small parts and the prefix and trailer
are joined into one write), received into one buffer of the announced length, and
``overlay.wire.decode`` then reads tensors out of that buffer without copying them. Pieces of
:data:`CHUNK` bytes fill the Yamux frames ``overlay.yamuxio`` sends.

Why bounds beyond the length limit (measured against real daemons: four frames claiming 256 MiB, fed
100 MiB each and then 1 byte/s, held 400 MB of one node's memory for minutes):

- :class:`Inflight` reserves a frame's claimed length at its prefix, node-wide and per peer, and
  refuses the frame there (:class:`Refused`) when it does not fit;
- :class:`Pace` drops a frame (:class:`TooSlow`) that delivers fewer than ``min_rate * window`` bytes in
  any ``window`` of its life. Per window, not averaged since the start: a frame fed 100 MiB at once and
  then trickled would keep a 64 KiB/s average for 1,600 s.

Refused and TooSlow, like Truncated, say nothing against the sender (``hostile`` is False): an honest
peer meets them under load or on a bad link. Every other TransferError proves the bytes wrong; a frame
of another version too, since :data:`VERSION` is part of the task id (``node.daemon.task_id``): an
honest peer on another release is in another task and never opens our task's streams.

The functions take any object with ``read(n) -> bytes`` (``b""`` at the end) and ``write(data)``,
so the frame logic is tested on in-memory streams and used unchanged on libp2p streams.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE

from shoal.overlay.yamuxio import YAMUX_FRAME

MAGIC = b"SHF"
TRAILER_MAGIC = b"END"
VERSION = 3  # 3: no payload hash (2: BLAKE3, 1: BLAKE2b)
PREFIX = struct.Struct("<3sBQ")
TRAILER = struct.Struct("<3sBQ")
CHUNK = YAMUX_FRAME - HEADER_SIZE  # one Yamux frame's body (its header is 12 bytes)
OFF_LOOP_BYTES = 1 << 20  # encode/decode messages larger than this in a worker thread

Buffer = bytes | bytearray | memoryview


class TransferError(Exception):
    """The frame did not arrive whole and intact; the message says what went wrong.

    ``hostile``: whether it proves the sender wrong (bad bytes) rather than slow, gone or unlucky;
    ``kind``: the reason's class, for log summaries."""

    hostile = True
    kind = "malformed frame"


class Truncated(TransferError):
    """The stream ended or failed before the frame was complete: a crashed or vanished sender, not a liar.

    ``empty``: not a single byte came (a sender that gave up before starting, e.g. while leaving)."""

    hostile = False
    kind = "truncated"

    def __init__(self, message: str, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty


class TooSlow(TransferError):
    """The frame fell below the minimum rate: a bad link or a peer holding our memory, not provably wrong."""

    hostile = False
    kind = "slow"


class Refused(TransferError):
    """No room for the length the frame announced: our load, not the sender's fault."""

    hostile = False
    kind = "load"


@dataclass(frozen=True)
class Pace:
    """A frame must deliver at least ``min_rate * window`` bytes (or finish) in every ``window`` seconds,
    the first window being the grace period in which a sender starts up."""

    min_rate: float
    window: float

    def __post_init__(self) -> None:
        if self.min_rate <= 0 or self.window <= 0:
            raise ValueError("min_rate and window must be positive")


class _Paced:
    """A ByteStream whose reads are bounded by when the current window would miss its quota."""

    def __init__(self, stream: ByteStream, pace: Pace) -> None:
        self.stream, self.pace = stream, pace
        self.quota = pace.min_rate * pace.window
        self.start = trio.current_time()
        self.window = 0  # index of the window the last bytes arrived in
        self.in_window = 0  # bytes that arrived in it

    def _deadline(self) -> float:
        ends = self.window + (2 if self.in_window >= self.quota else 1)
        return self.start + ends * self.pace.window

    def _too_slow(self) -> TooSlow:
        return TooSlow(
            f"under {self.pace.min_rate / 1024:g} KiB/s for {self.pace.window:g} s "
            f"({self.in_window} bytes in its window {self.window})"
        )

    async def read(self, max_bytes: int) -> bytes:
        with trio.move_on_at(self._deadline()) as scope:
            chunk = await self.stream.read(max_bytes)
        if scope.cancelled_caught:
            raise self._too_slow()
        window = int((trio.current_time() - self.start) // self.pace.window)
        if window > self.window:  # the windows passed since the last bytes must each have met the quota
            if self.in_window < self.quota or window > self.window + 1:
                raise self._too_slow()
            self.window, self.in_window = window, 0
        self.in_window += len(chunk)
        return chunk

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)


class Inflight:
    """Bytes of incoming frames being received, node-wide and per peer.

    A frame reserves the length its prefix announces before any payload is read, and holds it until
    the caller is done with the payload (decoded or dropped): so the memory peers can make us hold is
    bounded by ``total``, and one identity cannot take more than ``per_peer`` of it.
    """

    def __init__(self, total: int, per_peer: int) -> None:
        if not 0 < per_peer <= total:
            raise ValueError("need 0 < per_peer <= total")
        self.total, self.per_peer = total, per_peer
        self.used = 0
        self.by_peer: Counter[str] = Counter()

    @contextmanager
    def claim(self, peer: str) -> Iterator[Callable[[int], None]]:
        """An ``admit(length)`` for :func:`read_frame`; everything it admitted is released at exit."""
        held = 0

        def admit(length: int) -> None:
            nonlocal held
            if self.used + length > self.total:
                raise Refused(
                    f"no room for a {length}-byte frame: {self.used} of {self.total} bytes in flight"
                )
            if self.by_peer[peer] + length > self.per_peer:
                raise Refused(
                    f"no room for a {length}-byte frame: this peer has {self.by_peer[peer]} of its "
                    f"{self.per_peer} bytes in flight"
                )
            self.used += length
            self.by_peer[peer] += length
            held += length

        try:
            yield admit
        finally:
            self.used -= held
            self.by_peer[peer] -= held
            if self.by_peer[peer] <= 0:
                del self.by_peer[peer]


class ByteStream(Protocol):
    async def read(self, max_bytes: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


class Libp2pStream:
    """A libp2p stream as a :class:`ByteStream`: end of stream reads as ``b""``, a reset as Truncated."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream

    async def read(self, max_bytes: int) -> bytes:
        try:
            return await self.stream.read(max_bytes)
        except StreamEOF:
            return b""
        except Exception as e:  # StreamReset, connection errors: the sender is gone
            raise Truncated(f"stream failed: {type(e).__name__}: {e}") from e

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)


async def write_frame(stream: ByteStream, payload: Buffer | Sequence[Buffer]) -> None:
    """Write one frame of ``payload`` (one buffer, or the parts it is made of, e.g. ``wire.encode_parts``);
    the caller bounds the time (a hung reader otherwise blocks us forever). The parts must not change
    until this returns."""
    parts = [payload] if isinstance(payload, Buffer) else payload
    views = [memoryview(p).cast("B") for p in parts]
    length = sum(len(v) for v in views)
    pending = bytearray(PREFIX.pack(MAGIC, VERSION, length))  # pieces under CHUNK are joined here
    for view in views:
        fill = min(len(view), CHUNK - len(pending)) if len(pending) < CHUNK else 0
        pending += view[:fill]
        rest = view[fill:]
        if not rest:
            continue
        await stream.write(memoryview(pending))  # a view: the stream's slices of it are not copies
        pending = bytearray()
        whole = len(rest) - len(rest) % CHUNK
        for start in range(0, whole, CHUNK):
            await stream.write(rest[start : start + CHUNK])
        pending += rest[whole:]
    pending += TRAILER.pack(TRAILER_MAGIC, 0, length)
    await stream.write(memoryview(pending))


async def _read_exactly(stream: ByteStream, into: memoryview, what: str) -> None:
    filled = 0
    while filled < len(into):
        chunk = await stream.read(len(into) - filled)
        if not chunk:
            raise Truncated(f"stream ended in the {what} after {filled} of {len(into)} bytes")
        if len(chunk) > len(into) - filled:  # a stream that ignores max_bytes must not overrun the buffer
            raise TransferError(f"stream returned more bytes than asked for in the {what}")
        into[filled : filled + len(chunk)] = chunk
        filled += len(chunk)


async def read_frame(
    stream: ByteStream,
    max_payload: int,
    *,
    pace: Pace | None = None,
    admit: Callable[[int], None] | None = None,
    idle: float = math.inf,
    timeout: float = math.inf,
) -> memoryview:
    """Read one frame and return its verified payload (a writable buffer the caller owns); TransferError
    on anything short of that.

    ``idle``: seconds to wait for the frame's first byte (between messages on a reused stream), after
    which it is an empty :class:`Truncated`, like a stream that ends there; ``pace`` and ``timeout``
    (for the whole frame: :class:`TooSlow`) count from that byte. ``admit(length)`` is called with the
    announced length before the payload buffer is allocated and may raise (``Inflight.claim``). The
    buffer is not zero-filled, so memory still grows with the bytes that actually arrive, not with the
    length the prefix claims.
    """
    prefix = bytearray(PREFIX.size)
    try:
        with trio.move_on_after(idle) as waiting:
            first = await stream.read(PREFIX.size)
    except Truncated as e:  # the stream failed between frames: nothing was lost
        raise Truncated(f"stream ended before a frame: {e}", empty=True) from e
    if waiting.cancelled_caught:
        raise Truncated(f"no frame began within {idle:g} s", empty=True)
    if not first:
        raise Truncated("stream ended before a frame", empty=True)
    if len(first) > PREFIX.size:
        raise TransferError("stream returned more bytes than asked for in the frame prefix")
    prefix[: len(first)] = first
    try:
        with trio.fail_after(timeout):
            return await _rest_of_frame(stream, prefix, len(first), max_payload, pace, admit)
    except trio.TooSlowError:
        raise TooSlow(f"frame not complete within {timeout:g} s") from None


async def _rest_of_frame(
    stream: ByteStream,
    prefix: bytearray,
    have: int,
    max_payload: int,
    pace: Pace | None,
    admit: Callable[[int], None] | None,
) -> memoryview:
    if pace is not None:
        stream = _Paced(stream, pace)
    await _read_exactly(stream, memoryview(prefix)[have:], "frame prefix")
    magic, version, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise TransferError(f"not a Shoal frame (starts with {bytes(prefix[:3])!r})")
    if version != VERSION:
        raise TransferError(f"unsupported frame version {version} (this node speaks {VERSION})")
    if length > max_payload:
        raise TransferError(f"frame of {length} bytes is over the {max_payload}-byte limit")
    if admit is not None:
        admit(length)
    payload = memoryview(np.empty(length, np.uint8))
    await _read_exactly(stream, payload, "payload")
    trailer = bytearray(TRAILER.size)
    await _read_exactly(stream, memoryview(trailer), "trailer (sender stopped before finishing)")
    magic, _, trailer_length = TRAILER.unpack(trailer)
    if magic != TRAILER_MAGIC or trailer_length != length:
        raise TransferError("frame trailer does not match its prefix")
    return payload
