"""Moving one encoded message over a byte stream: an explicit frame with a length and a hash trailer.

Layout of a frame (one frame per stream)::

    b"SHF" | version u8 | payload length u64 LE        (prefix, 12 bytes)
    payload, written in chunks of CHUNK bytes
    b"END" | 0 u8 | payload length u64 LE | BLAKE2b-256(payload)   (trailer, 44 bytes)

Why a trailer: on py-libp2p 0.8.1 a sender killed mid-transfer reads as a clean end of stream
(../shared/LIBP2P.md §7), so "EOF" alone would hand a truncated model to the learner. The receiver
accepts a payload only after reading the trailer, the same length twice and a matching hash.

Why chunks of 1 MiB: Yamux + Noise cost Python work per write; 256 KiB–1 MiB writes are about 1.5x
faster than 64 KiB ones and bigger writes add nothing (LIBP2P.md §1).

The functions take any object with ``read(n) -> bytes`` (``b""`` at the end) and ``write(data)``,
so the frame logic is tested on in-memory streams and used unchanged on libp2p streams.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Protocol

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

MAGIC = b"SHF"
TRAILER_MAGIC = b"END"
VERSION = 1
PREFIX = struct.Struct("<3sBQ")
TRAILER = struct.Struct("<3sBQ32s")
CHUNK = 1 << 20
OFF_LOOP_BYTES = 1 << 20  # hash/decode payloads larger than this in a worker thread


class TransferError(Exception):
    """The frame did not arrive whole and intact; the message says what went wrong."""


class Truncated(TransferError):
    """The stream ended or failed before the frame was complete: a crashed or vanished sender, not a liar.

    ``empty``: not a single byte came (a sender that gave up before starting, e.g. while leaving)."""

    def __init__(self, message: str, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty


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


def digest(payload: bytes | bytearray | memoryview) -> bytes:
    """Content hash of an encoded message (BLAKE2b-256): the trailer's checksum and a model's version id."""
    return hashlib.blake2b(payload, digest_size=32).digest()


async def _digest(payload: bytes | bytearray | memoryview) -> bytes:
    if len(payload) > OFF_LOOP_BYTES:
        return await trio.to_thread.run_sync(digest, payload)
    return digest(payload)


async def write_frame(stream: ByteStream, payload: bytes | bytearray | memoryview) -> None:
    """Write one frame; the caller bounds the time (a hung reader otherwise blocks us forever)."""
    view = memoryview(payload).cast("B")
    trailer = TRAILER.pack(TRAILER_MAGIC, 0, len(view), await _digest(view))
    await stream.write(PREFIX.pack(MAGIC, VERSION, len(view)))
    for start in range(0, len(view), CHUNK):
        await stream.write(bytes(view[start : start + CHUNK]))
    await stream.write(trailer)


async def _read_exactly(stream: ByteStream, into: memoryview, what: str) -> None:
    filled = 0
    while filled < len(into):
        chunk = await stream.read(min(CHUNK, len(into) - filled))
        if not chunk:
            raise Truncated(
                f"stream ended in the {what} after {filled} of {len(into)} bytes",
                empty=what == "frame prefix" and filled == 0,
            )
        if len(chunk) > len(into) - filled:  # a stream that ignores max_bytes must not overrun the buffer
            raise TransferError(f"stream returned more bytes than asked for in the {what}")
        into[filled : filled + len(chunk)] = chunk
        filled += len(chunk)


async def read_frame(stream: ByteStream, max_payload: int) -> bytes:
    """Read one frame and return its verified payload; TransferError on anything short of that.

    Memory grows with the bytes that actually arrive, not with the length the prefix claims: a peer
    must send 256 MiB to make us hold 256 MiB.
    """
    prefix = bytearray(PREFIX.size)
    await _read_exactly(stream, memoryview(prefix), "frame prefix")
    magic, version, length = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise TransferError(f"not a Shoal frame (starts with {bytes(prefix[:3])!r})")
    if version != VERSION:
        raise TransferError(f"unsupported frame version {version} (this node speaks {VERSION})")
    if length > max_payload:
        raise TransferError(f"frame of {length} bytes is over the {max_payload}-byte limit")
    chunks, received = [], 0
    while received < length:
        chunk = await stream.read(min(CHUNK, length - received))
        if not chunk:
            raise Truncated(f"stream ended in the payload after {received} of {length} bytes")
        if len(chunk) > length - received:  # a stream that ignores max_bytes must not overrun the frame
            raise TransferError("stream returned more bytes than asked for in the payload")
        chunks.append(chunk)
        received += len(chunk)
    payload = b"".join(chunks)
    del chunks
    trailer = bytearray(TRAILER.size)
    await _read_exactly(stream, memoryview(trailer), "trailer (sender stopped before finishing)")
    magic, _, trailer_length, expected = TRAILER.unpack(trailer)
    if magic != TRAILER_MAGIC or trailer_length != length:
        raise TransferError("frame trailer does not match its prefix")
    if await _digest(payload) != expected:
        raise TransferError("payload hash does not match the trailer (corrupted in transit)")
    return payload
