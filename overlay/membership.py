"""The peer set's upkeep: keep between ``peers_low`` and ``peers_high`` task peers, at least ``peers_out``
of them dialled by us, as libp2p's connection manager keeps connections between its water marks and
gossipsub v1.1 its mesh between D_low and D_high with D_out outbound.

Without it a node's peers were whoever it found at start and whoever dialled it: in a 24-daemon demo
on 2 cores the mean fell to 2.5-3.2 of 23, some nodes to 0, and nothing brought it back up. Every
``INTERVAL`` seconds:

- below ``low`` task peers, or below ``peers_out`` outbound ones (even above ``low``: those are the
  slots no inbound newcomer can take), dial members of the metadata document (their signed records
  carry addresses) that are not peers yet, a few at a time, chosen by the peer set's policy
  (``overlay.peerset``: spread over IP ranges, members known for long and peers that were useful
  first); below ``low``, when those run out, ask the DHT for the providers of our keys (at most every
  ``LOOKUP_INTERVAL``; ``find_providers`` dials them itself);
- let the worst unprotected peers go above ``high`` (newcomers are weighed as they arrive, in
  ``overlay.peers``, so this only catches a set that grew otherwise);
- close connections that never became task peers, beyond a bound (``overlay.peers``).

Every dial of a member, answered or not, pushes its next dial back, from ``BACKOFF`` seconds doubling
to ``MAX_BACKOFF``: a peer that does not answer, or that closes our connection because it has no room
for us, is not dialled again at once. The backoff is forgotten once the peer has been our task peer for
``STAYED`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio
from libp2p.peer.id import ID

from shoal.overlay.metadata import Metadata
from shoal.overlay.nat import is_circuit
from shoal.overlay.peers import Peers
from shoal.overlay.peerset import ip_of

log = logging.getLogger("shoal.overlay")

INTERVAL = 5.0
LOOKUP_INTERVAL = 30.0
DIAL_TIMEOUT = 10.0
BACKOFF, MAX_BACKOFF = 5.0, 300.0
STAYED = 30.0
MAX_BACKOFFS = 4096  # peers with a pending backoff: member records are bounded, this keeps it so too


def claimed_ip(addrs: tuple[str, ...]) -> str | None:
    """The IP a member's record gives first for a direct address (it may lie: this only spreads our
    choices, the per-IP limit applies to the IP its connection comes from)."""
    for addr in addrs:
        parts = addr.split("/")
        if not is_circuit(addr) and len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return ip_of(parts[2])
    return None


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
        admitted: Callable[[str], bool] = lambda peer: True,
        keep: Callable[[], set[str]] | None = None,
    ) -> None:
        self.peers, self.metadata, self.low, self.high = peers, metadata, low, high
        self.policy = peers.policy
        self._banned, self._lookup, self._admitted, self._keep = banned, lookup, admitted, keep
        self._backoff: dict[str, tuple[float, float]] = {}  # peer -> (not before, next delay)
        self._last_lookup = -LOOKUP_INTERVAL

    async def run(self) -> None:
        while True:
            await trio.sleep(INTERVAL)
            now = time.monotonic()
            for peer in [p for p in self._backoff if now - self.peers.since.get(p, now) >= STAYED]:
                del self._backoff[peer]
            short = self.low - len(self.peers.task_peers)
            wanted = max(short, self.policy.outbound_wanted())
            if wanted > 0:
                await self.refill(wanted, lookup=short > 0)
            await self.trim()
            if self._keep is not None:  # None: a relay, which carries others' connections by design
                await self.peers.close_strangers(self._keep())

    def candidates(self, now: float) -> dict[str, str | None]:
        """Members not yet task peers, neither banned, refused, off the allowlist nor waiting out a
        backoff (nor us, nor gone), with the IP their records claim."""
        me, known = str(self.peers.host.get_id()), self.peers.task_peers
        members = self.metadata.members()
        self.policy.seen(members, now)
        return {
            peer: claimed_ip(member.addrs)
            for peer, member in members.items()
            if peer != me
            and peer not in known
            and member.state != "left"
            and self._admitted(peer)
            and not self._banned(peer)
            and not self.peers.refused(peer)
            and self._backoff.get(peer, (0.0, 0.0))[0] <= now
        }

    async def refill(self, wanted: int, lookup: bool = True) -> None:
        """Dial up to ``wanted`` members; with ``lookup``, ask the DHT first if the document has too few."""
        now = time.monotonic()
        candidates = self.candidates(now)
        if lookup and len(candidates) < wanted and now - self._last_lookup >= LOOKUP_INTERVAL:
            self._last_lookup = now
            await self._lookup()
            candidates = self.candidates(time.monotonic())
        async with trio.open_nursery() as nursery:
            for peer in self.policy.choose(candidates, wanted, time.monotonic()):
                nursery.start_soon(self._dial, peer)

    async def _dial(self, peer: str) -> None:
        _, delay = self._backoff.get(peer, (0.0, BACKOFF))
        if len(self._backoff) >= MAX_BACKOFFS:
            now = time.monotonic()
            self._backoff = {p: b for p, b in self._backoff.items() if b[0] > now}
        self._backoff[peer] = (time.monotonic() + delay, min(2 * delay, MAX_BACKOFF))
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self.peers.connect(ID.from_base58(peer))
        except Exception as e:  # PeerUnreachable, a timeout, or one of libp2p's many dial errors
            log.debug("peer set: %s not reachable (next try in %.0f s): %s", peer, delay, e)

    async def trim(self) -> None:
        """Let go of the worst unprotected peers while the set is over ``high`` (``overlay.peerset``)."""
        now = time.monotonic()
        for peer in self.policy.to_let_go(now):
            self.peers.note(f"peer set: letting {peer} go (score {self.policy.score(peer, now):.2f})")
            await self.peers.disconnect(peer)
