"""The peer set: keep between ``peers_low`` and ``peers_high`` task peers, as libp2p's connection manager
keeps connections between its water marks and gossipsub its mesh between D_low and D_high.

Without it a node's peers were whoever it found at start and whoever dialled it: in a 24-daemon demo
on 2 cores the mean fell to 2.5-3.2 of 23, some nodes to 0, and nothing brought it back up. Every
``INTERVAL`` seconds, below ``low``: dial members of the metadata document (their signed records carry
addresses) that are not peers yet, a few at a time; when those run out, ask the DHT for the providers
of our keys (at most every ``LOOKUP_INTERVAL``; ``find_providers`` dials them itself). A peer that
cannot be dialled waits before the next try, from ``BACKOFF`` seconds doubling to ``MAX_BACKOFF``.
Above ``high``: the newest task peers beyond it are let go (a connection younger than ``GRACE`` is
kept: it may still be syncing), newest first since the oldest have proved themselves.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable

import trio
from libp2p.peer.id import ID

from shoal.overlay.metadata import Metadata
from shoal.overlay.peers import Peers

log = logging.getLogger("shoal.overlay")

INTERVAL = 5.0
LOOKUP_INTERVAL = 30.0
DIAL_TIMEOUT = 10.0
BACKOFF, MAX_BACKOFF = 5.0, 300.0
GRACE = 60.0
MAX_BACKOFFS = 4096  # peers with a pending backoff: member records are bounded, this keeps it so too


class Membership:
    """Refills and trims the task peer set; remembers whom not to dial again yet."""

    def __init__(
        self,
        peers: Peers,
        metadata: Metadata,
        *,
        low: int,
        high: int,
        banned: Callable[[str], bool],
        lookup: Callable[[], Awaitable[object]],
    ) -> None:
        self.peers, self.metadata, self.low, self.high = peers, metadata, low, high
        self._banned, self._lookup = banned, lookup
        self._backoff: dict[str, tuple[float, float]] = {}  # peer -> (not before, next delay)
        self._last_lookup = -LOOKUP_INTERVAL

    async def run(self) -> None:
        while True:
            await trio.sleep(INTERVAL)
            count = len(self.peers.task_peers)
            if count < self.low:
                await self.refill(self.low - count)
            elif count > self.high:
                await self.trim(count - self.high)

    def candidates(self, now: float) -> list[str]:
        """Members not yet task peers, neither banned nor waiting out a backoff (nor us, nor gone)."""
        me, known = str(self.peers.host.get_id()), self.peers.task_peers
        return [
            peer
            for peer, member in self.metadata.members().items()
            if peer != me
            and peer not in known
            and member.state != "left"
            and not self._banned(peer)
            and self._backoff.get(peer, (0.0, 0.0))[0] <= now
        ]

    async def refill(self, wanted: int) -> None:
        now = time.monotonic()
        candidates = self.candidates(now)
        if len(candidates) < wanted and now - self._last_lookup >= LOOKUP_INTERVAL:
            self._last_lookup = now
            await self._lookup()
            candidates = self.candidates(time.monotonic())
        async with trio.open_nursery() as nursery:
            for peer in random.sample(candidates, min(wanted, len(candidates))):
                nursery.start_soon(self._dial, peer)

    async def _dial(self, peer: str) -> None:
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self.peers.connect(ID.from_base58(peer))
        except Exception as e:  # PeerUnreachable, a timeout, or one of libp2p's many dial errors
            _, delay = self._backoff.get(peer, (0.0, BACKOFF))
            if len(self._backoff) >= MAX_BACKOFFS:
                now = time.monotonic()
                self._backoff = {p: b for p, b in self._backoff.items() if b[0] > now}
            self._backoff[peer] = (time.monotonic() + delay, min(2 * delay, MAX_BACKOFF))
            log.debug("peer set: %s not reachable (next try in %.0f s): %s", peer, delay, e)
        else:
            self._backoff.pop(peer, None)

    async def trim(self, excess: int) -> None:
        now = time.monotonic()
        settled = [p for p in self.peers.task_peers if now - self.peers.since.get(p, now) >= GRACE]
        for peer in sorted(settled, key=lambda p: self.peers.since[p], reverse=True)[:excess]:
            log.info("peer set: letting %s go (over %d peers)", peer, self.high)
            await self.peers.disconnect(peer)
