"""Message streams to each peer, reused from one message to the next.

A new libp2p stream costs a Yamux SYN and a multistream-select negotiation (a round trip), and starts
with Yamux's 256 KiB send window: py-libp2p 0.8.1's writer polls every 10 ms for more credit once that
is spent, so every message over 256 KiB on a fresh stream waited at least 10 ms. Measured with
``benchmarks/transfer_speed.py`` (docs/measurements.md), a reused stream, whose receiver has
already granted a large window (``overlay.yamuxio.grow_receive_window``), took a 1 MB model and its
acknowledgement from ~35 ms to ~17 ms.

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

import trio
from libp2p.abc import INetStream

log = logging.getLogger("shoal.overlay")

IDLE_CLOSE = 20.0  # a sender closes streams unused this long; receivers wait longer (RECEIVE_IDLE)
RECEIVE_IDLE = 60.0
MAX_IDLE_PER_PEER = 2


class StreamPool:
    """Idle outgoing streams per peer. ``open(peer)`` makes a new stream; ``reset(stream)`` drops one."""

    def __init__(
        self,
        open: Callable[[str], Awaitable[INetStream]],
        reset: Callable[[INetStream], Awaitable[None]],
    ) -> None:
        self._open, self._reset = open, reset
        self._idle: dict[str, list[tuple[INetStream, float]]] = {}
        self._closing: list[INetStream] = []

    async def run(self, peer: str, use: Callable[[INetStream], Awaitable[None]]) -> None:
        """``use`` a stream to ``peer`` for one message: an idle one, or a new one. The stream goes back
        to the pool when ``use`` returns and is reset when it raises; if a reused stream raised an
        Exception, ``use`` runs once more on a new stream (a cancellation, e.g. the caller's deadline,
        is not retried)."""
        reused = self._take(peer)
        if reused is not None:
            try:
                await use(reused)
            except Exception as e:
                await self._reset(reused)
                log.debug("reused stream to %s failed (%s); opening a new one", peer, e)
            except BaseException:
                await self._reset(reused)
                raise
            else:
                self._give(peer, reused)
                return
        stream = await self._open(peer)
        try:
            await use(stream)
        except BaseException:
            await self._reset(stream)
            raise
        self._give(peer, stream)

    def _take(self, peer: str) -> INetStream | None:
        idle, now = self._idle.get(peer, []), trio.current_time()  # empty lists go in close_idle
        while idle:
            stream, since = idle.pop()
            if now - since >= IDLE_CLOSE:  # the receiver may be about to drop it
                self._closing.append(stream)
            elif not _unusable(stream):
                return stream
        return None

    def _give(self, peer: str, stream: INetStream) -> None:
        idle = self._idle.setdefault(peer, [])
        if len(idle) >= MAX_IDLE_PER_PEER:
            self._closing.append(idle.pop(0)[0])  # the oldest makes room; closed by close_idle
        idle.append((stream, trio.current_time()))

    async def close_idle(self) -> None:
        """Close streams unused for ``IDLE_CLOSE`` seconds and those set aside."""
        now = trio.current_time()
        for peer, idle in list(self._idle.items()):
            self._closing.extend(s for s, t in idle if now - t >= IDLE_CLOSE)
            idle[:] = [(s, t) for s, t in idle if now - t < IDLE_CLOSE]
            if not idle:
                del self._idle[peer]
        closing, self._closing = self._closing, []
        for stream in closing:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()

    def forget(self, peer: str) -> None:
        """The peer went down or is banned: its streams are closed (``close_idle``), not reused."""
        self._closing.extend(s for s, _ in self._idle.pop(peer, []))


def _unusable(stream: INetStream) -> bool:
    """Closed or reset, as far as we know: py-libp2p's ``is_closed`` misses a reset the peer sent."""
    muxed = stream.muxed_stream
    return stream.is_closed or any(
        getattr(muxed, flag, False) for flag in ("reset_received", "closed", "send_closed")
    )
