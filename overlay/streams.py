"""Message streams to each peer, reused from one message to the next, at most a few open at once.

A new libp2p stream costs a Yamux SYN and a multistream-select negotiation (a round trip), and starts
with Yamux's 256 KiB send window: py-libp2p 0.8.1's writer polls every 10 ms for more credit once that
is spent, so every message over 256 KiB on a fresh stream waited at least 10 ms. Measured with
``benchmarks/transfer_speed.py`` (docs/measurements.md), a reused stream, whose receiver has
already granted a large window (``overlay.yamuxio.grow_receive_window``), took a 1 MB model and its
acknowledgement from ~35 ms to ~17 ms.

A receiver serves at most ``overlay.messaging.MAX_INBOUND_PER_PEER`` streams from one peer and resets
the next (a defence). Every send to a peer ran on a stream of its own when the last was busy, so a
burst to one peer (MoDeST's pings, models and aggregates) opened more and lost the excess: 650-700
messages refused "busy" in a 24-daemon MoDeST run. So a sender opens at most ``MAX_STREAMS_PER_PEER``
streams to a peer (in use, idle, or closing), one fewer than a receiver serves (a stream being closed
counts there until its end arrives); a further send waits for one of them.

The receiver reads frames from a stream until it ends (``overlay.framing.read_frame``'s ``idle``), so
reuse needs no change to the frame format: a sender may still open a stream per message.
A frame is whole or not at all, so a send that fails on a reused stream (the peer restarted, or
dropped the stream as idle) never delivered anything and is tried once more on a new stream. A stream
the receiver has reset (it refused a frame: no room, too slow, malformed) is not reused once the reset
has arrived; a message written to it within that round trip is lost, as the refused one was, and the
protocols treat it like any lost message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream

log = logging.getLogger("shoal.overlay")

IDLE_CLOSE = 20.0  # a sender closes streams unused this long; receivers wait longer (RECEIVE_IDLE)
RECEIVE_IDLE = 60.0
MAX_IDLE_PER_PEER = 2
MAX_STREAMS_PER_PEER = 3


@dataclass
class _Streams:
    """One peer's streams: the idle ones (with when they went idle), those to close, how many are open
    (in use, idle or closing), how many sends hold this record, and those waiting for a stream."""

    idle: list[tuple[INetStream, float]] = field(default_factory=list)
    closing: list[INetStream] = field(default_factory=list)
    open: int = 0
    users: int = 0
    waiting: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)


class StreamPool:
    """Outgoing streams per peer. ``open(peer)`` makes a new stream; ``reset(stream)`` drops one."""

    def __init__(
        self,
        open: Callable[[str], Awaitable[INetStream]],
        reset: Callable[[INetStream], Awaitable[None]],
    ) -> None:
        self._open, self._reset = open, reset
        self._peers: dict[str, _Streams] = {}

    async def run(self, peer: str, use: Callable[[INetStream], Awaitable[None]]) -> None:
        """``use`` a stream to ``peer`` for one message: an idle one, or a new one if fewer than
        ``MAX_STREAMS_PER_PEER`` are open, else the next one freed (the caller bounds the wait). The stream
        goes back to the pool when ``use`` returns and is reset when it raises; if a reused stream raised
        an Exception, ``use`` runs once more on a new stream (a cancellation, e.g. the caller's deadline,
        is not retried)."""
        streams = self._peers.setdefault(peer, _Streams())
        streams.users += 1
        try:
            stream, reused = await self._stream(peer, streams)
            if reused:
                try:
                    await use(stream)
                except Exception as e:
                    await self._drop(streams, stream)
                    log.debug("reused stream to %s failed (%s); opening a new one", peer, e)
                    stream = await self._new(peer, streams)
                except BaseException:
                    await self._drop(streams, stream)
                    raise
                else:
                    await self._give(streams, stream)
                    return
            try:
                await use(stream)
            except BaseException:
                await self._drop(streams, stream)
                raise
            await self._give(streams, stream)
        finally:
            streams.users -= 1
            self._tidy(peer, streams)

    async def _stream(self, peer: str, streams: _Streams) -> tuple[INetStream, bool]:
        """An idle stream (True), else a new one (False), waiting while the peer's streams are all in use."""
        while True:
            now = trio.current_time()
            while streams.idle:
                stream, since = streams.idle.pop()
                if now - since < IDLE_CLOSE and not _unusable(stream):
                    return stream, True
                await self._close(streams, stream)  # the receiver may be about to drop it, or has
            if streams.open < MAX_STREAMS_PER_PEER:
                return await self._new(peer, streams), False
            await streams.waiting.park()

    async def _new(self, peer: str, streams: _Streams) -> INetStream:
        streams.open += 1
        try:
            return await self._open(peer)
        except BaseException:
            self._closed(streams)
            raise

    async def _give(self, streams: _Streams, stream: INetStream) -> None:
        streams.idle.append((stream, trio.current_time()))
        if len(streams.idle) > MAX_IDLE_PER_PEER:
            await self._close(streams, streams.idle.pop(0)[0])  # the oldest makes room
        streams.waiting.unpark()

    async def _drop(self, streams: _Streams, stream: INetStream) -> None:
        await self._reset(stream)
        self._closed(streams)

    async def _close(self, streams: _Streams, stream: INetStream) -> None:
        with trio.move_on_after(1, shield=True), contextlib.suppress(Exception):
            await stream.close()
        self._closed(streams)

    def _closed(self, streams: _Streams) -> None:
        streams.open -= 1
        streams.waiting.unpark()

    async def close_idle(self) -> None:
        """Close streams unused for ``IDLE_CLOSE`` seconds and those set aside."""
        now = trio.current_time()
        for peer, streams in list(self._peers.items()):
            streams.closing += [s for s, t in streams.idle if now - t >= IDLE_CLOSE]
            streams.idle = [(s, t) for s, t in streams.idle if now - t < IDLE_CLOSE]
            closing, streams.closing = streams.closing, []
            for stream in closing:
                await self._close(streams, stream)
            self._tidy(peer, streams)

    def _tidy(self, peer: str, streams: _Streams) -> None:
        """Forget a peer's record once no stream is open and no send holds it."""
        if not streams.open and not streams.users and self._peers.get(peer) is streams:
            del self._peers[peer]

    def forget(self, peer: str) -> None:
        """The peer went down or is banned: its idle streams are closed (``close_idle``), not reused."""
        streams = self._peers.get(peer)
        if streams is not None:
            streams.closing += [s for s, _ in streams.idle]
            streams.idle = []


def _unusable(stream: INetStream) -> bool:
    """Closed or reset, as far as we know: py-libp2p's ``is_closed`` misses a reset the peer sent."""
    muxed = stream.muxed_stream
    return stream.is_closed or any(
        getattr(muxed, flag, False) for flag in ("reset_received", "closed", "send_closed")
    )
