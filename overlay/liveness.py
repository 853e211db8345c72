"""Ping-based failure detection.

py-libp2p 0.8.1 never notices a peer that hangs while its TCP connection stays up: Yamux keep-alives
do not close the connection and a blocked writer waits forever (../shared/LIBP2P.md §7). So each
node pings all its peers at once every ``max(interval, timeout)`` seconds (a round waits for its
slowest ping) and declares a peer down after ``misses`` consecutive failures: about
``misses * max(interval, timeout)`` after it hung, 6 s with the defaults (2 s, 2 s, 3 misses).

The counting is a plain object (:class:`FailureDetector`); :func:`ping` is the I/O. We do not use
``PingService``: it holds one lock across peers while opening streams, so one hung peer would delay
the pings of all the others and make them look dead too.
"""

from __future__ import annotations

import secrets

import trio
from libp2p.abc import IHost
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import PING_LENGTH
from libp2p.peer.id import ID


class FailureDetector:
    """Consecutive missed pings per peer; a peer is down at ``misses`` in a row."""

    def __init__(self, misses: int) -> None:
        if misses < 1:
            raise ValueError("misses must be at least 1")
        self.misses = misses
        self._missed: dict[str, int] = {}

    def answered(self, peer: str) -> None:
        self._missed.pop(peer, None)

    def missed(self, peer: str) -> bool:
        """Record a miss; True when this miss makes the peer down (reported once, then forgotten)."""
        count = self._missed.get(peer, 0) + 1
        if count >= self.misses:
            self._missed.pop(peer, None)
            return True
        self._missed[peer] = count
        return False

    def forget(self, peer: str) -> None:
        self._missed.pop(peer, None)


async def ping(host: IHost, peer: ID, timeout: float) -> float | None:
    """Round-trip time in seconds of one libp2p ping on a fresh stream, or None if none came back in time."""
    payload = secrets.token_bytes(PING_LENGTH)
    with trio.move_on_after(timeout):
        try:
            stream = await host.new_stream(peer, [PING_PROTOCOL])
            try:
                start = trio.current_time()
                await stream.write(payload)
                echoed = b""
                while len(echoed) < PING_LENGTH:
                    chunk = await stream.read(PING_LENGTH - len(echoed))
                    if not chunk:
                        return None
                    echoed += chunk
                return trio.current_time() - start if echoed == payload else None
            finally:
                await stream.reset()
        except Exception:  # any failure to open, write or read is a missed ping
            return None
    return None
