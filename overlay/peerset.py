"""Whom a node keeps as task peers when more want in than it has room for: a plain object, with the time
passed in (``now``, any monotonic clock), so tests drive it without a loop (as ``overlay.penalties``).

Identities cost nothing, so the number of peers that *want* a slot says nothing; what an attacker cannot
fake cheaply is time, IP addresses, and whether its models were any use: trimming only by age let a wave
of fresh identities push out nearly all of a victim's honest peers (docs/measurements.md,
"Overlay internals"). The rules:

- **Outbound slots** (gossipsub v1.1's ``D_out``): up to ``outbound`` of the peers this node dialled
  itself are never evicted; ``overlay.membership`` dials more when it holds fewer, even above its low
  water mark, choosing with :meth:`PeerSet.choose`.
- **Bounded, worst first**: a newcomer that takes the set over ``high`` makes the worst unprotected peer
  go at once, the newcomer included: inbound before outbound, then the lowest score, then the most
  crowded IP range, then the newest. Neutral newcomers therefore lose to neutral incumbents: an old,
  still reachable peer is kept rather than a newcomer (test-before-evict, Heilman et al. 2015); dead
  ones are cut off by the failure detector, which frees their slot.
- **Long-lived peers protected**: peers held for ``settle`` seconds, the longest first, until half of
  ``high`` is protected (outbound and useful peers counted), are never evicted by newcomers (Bitcoin
  Core protects its longest-connected peers the same way); nor are the ``useful`` best scored. A
  long-lived peer whose connection drops and is back within :data:`REJOIN` seconds gets its age back:
  otherwise a flood of newcomers takes its slot while it is away, and, new again, it is refused (an
  eclipse test's victim lost an honest peer so on a loaded machine).
- **Per-IP limit** (gossipsub's IP colocation factor, as a hard bound): at most ``per_ip`` task peers
  from one remote IP; a newcomer beyond it is refused, incumbents stay. Loopback is exempt (tests,
  demos), and so are relayed peers, whose IP we do not see. Wider ranges (/16 for IPv4, /32 for IPv6,
  Bitcoin's netgroups) are a soft rule only: eviction takes from the most crowded range first and
  outbound choices spread over ranges, since one LAN or one provider's range can hold a whole honest
  swarm.
- **Credit** (:meth:`PeerSet.credit`): the learner's verdict on each contribution of a peer, 1.0 taken
  as it was, 0.0 refused, between when clipped; an exponential moving average per peer (weight
  ``alpha`` for the newest, starting from :data:`NEUTRAL`, which is also the score of a peer without a
  verdict), drifting back to :data:`NEUTRAL` by half every ``half_life`` seconds without one, kept for
  ``max_scores`` peers, connected or not. The score orders who goes when the set is full (a sybil
  whose models were refused goes before a neutral newcomer), protects the ``useful`` best, and orders
  whom to dial (below :data:`FLOOR`: last). It never takes a protection away nor drops a peer by
  itself: under attack the robust integrator refuses honest peers' models too, so dropping peers for
  it would turn a learner's confusion into lost honest links.

Protections are granted in that order (outbound, useful, long-lived) and never to more than ``high``
peers together, so a newcomer can always be weighed against someone.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

NEUTRAL = 0.5  # the score of a peer the learner has given no verdict on
FLOOR = 0.25  # below it (its models mostly refused): dialled last
SETTLE = 60.0  # seconds after which a peer counts as long-lived
USEFUL = 4  # peers protected for their scores
ALPHA = 0.2  # weight of a new verdict in a peer's score
HALF_LIFE = 300.0  # seconds without a verdict in which a score drifts half way back to NEUTRAL
MAX_SCORES = 4096  # peers whose scores are kept (connected or not)
MAX_KNOWN = 4096  # members whose first sighting is remembered, for choosing whom to dial
REJOIN = 60.0  # seconds a long-lived peer that lost its connection keeps its age for


def ip_of(address: str | None) -> str | None:
    """The IP a per-IP limit applies to: None for loopback, unknown, relayed or malformed addresses."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def group_of(ip: str | None) -> str:
    """The range an IP is bucketed in: /16 for IPv4, /32 for IPv6 (Bitcoin's netgroups); "" if unknown."""
    if ip is None:
        return ""
    parsed = ipaddress.ip_address(ip)
    prefix = 16 if parsed.version == 4 else 32
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@dataclass
class Slot:
    """One task peer as the peer set sees it."""

    outbound: bool
    ip: str | None  # None: exempt from the per-IP limit
    since: float
    order: int  # admissions before it: the newest of peers admitted at one ``now`` is the last


class PeerSet:
    """The task peers' slots: admission, eviction, credit, and which members to dial (module doc)."""

    def __init__(
        self,
        *,
        high: int,
        outbound: int,
        per_ip: int,
        settle: float | None = None,
        useful: int = USEFUL,
        alpha: float = ALPHA,
        half_life: float = HALF_LIFE,
        max_scores: int = MAX_SCORES,
        rng: random.Random | None = None,
    ) -> None:
        if high < 1 or min(outbound, per_ip, useful) < 0:
            raise ValueError("need high >= 1, and outbound, per_ip and useful >= 0")
        if not 0 < alpha <= 1 or half_life <= 0 or max_scores < 1:
            raise ValueError("need 0 < alpha <= 1, a positive half_life and max_scores >= 1")
        self.high, self.outbound, self.per_ip = high, outbound, per_ip
        self.settle = SETTLE if settle is None else settle
        self.useful, self.alpha, self.half_life, self.max_scores = useful, alpha, half_life, max_scores
        self.slots: dict[str, Slot] = {}
        self._admitted = 0
        self._scores: dict[str, tuple[float, float]] = {}  # peer -> (score, when last credited)
        self._known: dict[str, float] = {}  # member -> when we first saw it (choose's tiers)
        # long-lived peers gone -> (since when we held them, when they left): bounded, as each took
        # ``settle`` seconds in one of ``high`` slots and is forgotten after REJOIN
        self._departed: dict[str, tuple[float, float]] = {}
        self._rng = rng or random.Random()

    # -- credit -------------------------------------------------------------------------------------

    def credit(self, peer: str, value: float, now: float) -> None:
        """One verdict of the learner on a contribution of ``peer``, in [0, 1] (clamped; NaN counts 0)."""
        value = 0.0 if math.isnan(value) else min(1.0, max(0.0, value))
        score = (1 - self.alpha) * self.score(peer, now) + self.alpha * value  # from NEUTRAL at first
        if peer not in self._scores and len(self._scores) >= self.max_scores:
            self._forget_a_score()
        self._scores[peer] = (score, now)

    def score(self, peer: str, now: float) -> float:
        """The peer's moving average, drifting back to :data:`NEUTRAL` by half every ``half_life``
        seconds without a verdict; :data:`NEUTRAL` for a peer without one."""
        entry = self._scores.get(peer)
        if entry is None:
            return NEUTRAL
        score, at = entry
        return NEUTRAL + (score - NEUTRAL) * 0.5 ** (max(0.0, now - at) / self.half_life)

    def scored(self, peer: str) -> bool:
        return peer in self._scores

    def _forget_a_score(self) -> None:
        """Make room: the score credited longest ago of a peer we do not hold (or of anyone, if we hold
        them all)."""
        idle = [p for p in self._scores if p not in self.slots] or list(self._scores)
        del self._scores[min(idle, key=lambda p: self._scores[p][1])]

    # -- admission and eviction ---------------------------------------------------------------------

    def admit(self, peer: str, *, outbound: bool, ip: str | None, now: float) -> tuple[str | None, list[str]]:
        """``peer`` became a task peer on a connection we dialled (``outbound``) or it dialled, from
        ``ip`` (already through :func:`ip_of`). Returns why it is refused (None: admitted) and the peers
        it displaced, which the caller lets go. A refused peer is not in the set."""
        if peer in self.slots:
            return None, []
        if ip is not None and self.per_ip and sum(s.ip == ip for s in self.slots.values()) >= self.per_ip:
            return f"already {self.per_ip} peers from {ip}", []
        left = self._departed.pop(peer, None)
        since = left[0] if left is not None and now - left[1] < REJOIN else now
        self.slots[peer] = Slot(outbound, ip, since, self._admitted)
        self._admitted += 1
        evicted = self.to_let_go(now)
        for other in evicted:
            del self.slots[other]
        if peer in evicted:
            evicted.remove(peer)
            return f"over {self.high} peers and no worse one to let go", evicted
        return None, evicted

    def remove(self, peer: str, now: float) -> None:
        """``peer`` is gone (its connection closed): a long-lived one keeps its age for :data:`REJOIN`."""
        slot = self.slots.pop(peer, None)
        self._departed = {p: d for p, d in self._departed.items() if now - d[1] < REJOIN}
        if slot is not None and now - slot.since >= self.settle:
            self._departed[peer] = (slot.since, now)

    def to_let_go(self, now: float) -> list[str]:
        """The peers to let go to bring the set back to ``high``, worst first; never a protected one."""
        protected = self.protected(now)
        crowd: dict[str, int] = {}
        for slot in self.slots.values():
            crowd[group_of(slot.ip)] = crowd.get(group_of(slot.ip), 0) + 1

        def worst_first(peer: str) -> tuple[bool, float, int, float, int]:
            slot = self.slots[peer]
            return (slot.outbound, self.score(peer, now), -crowd[group_of(slot.ip)], -slot.since, -slot.order)

        over = max(0, len(self.slots) - self.high)
        return sorted((p for p in self.slots if p not in protected), key=worst_first)[:over]

    def protected(self, now: float) -> set[str]:
        """Who no newcomer can displace: outbound slots, the best scored, the long-lived (module doc)."""
        scores = {p: self.score(p, now) for p in self.slots}
        by_age = sorted(self.slots, key=lambda p: (self.slots[p].since, self.slots[p].order))
        chosen: list[str] = [p for p in by_age if self.slots[p].outbound][: self.outbound]
        useful = sorted(
            (p for p in self.slots if self.scored(p) and scores[p] > NEUTRAL and p not in chosen),
            key=lambda p: -scores[p],
        )
        chosen += useful[: self.useful]
        settled = [p for p in by_age if now - self.slots[p].since >= self.settle and p not in chosen]
        chosen += settled[: max(0, self.high // 2 - len(chosen))]
        return set(chosen[: self.high])

    def outbound_wanted(self) -> int:
        """Outbound slots not filled."""
        return max(0, self.outbound - sum(s.outbound for s in self.slots.values()))

    # -- whom to dial -------------------------------------------------------------------------------

    def seen(self, members: Iterable[str], now: float) -> None:
        """Note the members of the document now, to tell members known for long from new ones; members
        no longer there are forgotten once the memory is full."""
        members = list(members)
        for peer in members:
            self._known.setdefault(peer, now)
        if len(self._known) > MAX_KNOWN:
            current = set(members)
            self._known = {p: t for p, t in self._known.items() if p in current}
            for peer in list(self._known)[MAX_KNOWN:]:  # still over: the latest arrivals go
                del self._known[peer]

    def choose(self, candidates: Mapping[str, str | None], wanted: int, now: float) -> list[str]:
        """Up to ``wanted`` of ``candidates`` (peer -> the IP its record claims, through :func:`ip_of`) to
        dial: none from an IP at its limit; spread over IP ranges (the ranges we hold fewest peers from
        first); within that, peers that were useful before, then members known for ``settle`` seconds,
        then newer ones, then those whose models were mostly refused (below :data:`FLOOR`), at random
        within each tier. An attacker's identities on one range, or all announced at once, are one
        choice among others, not most."""
        per_ip: dict[str | None, int] = {}
        load: dict[str, int] = {}
        for slot in self.slots.values():
            per_ip[slot.ip] = per_ip.get(slot.ip, 0) + 1
            load[group_of(slot.ip)] = load.get(group_of(slot.ip), 0) + 1
        pool = [
            p
            for p, ip in candidates.items()
            if p not in self.slots
            and not (ip is not None and self.per_ip and per_ip.get(ip, 0) >= self.per_ip)
        ]
        self._rng.shuffle(pool)

        def tier(peer: str) -> int:
            score = self.score(peer, now)
            if score < FLOOR:
                return 3
            if self.scored(peer) and score > NEUTRAL:
                return 0
            return 1 if now - self._known.get(peer, now) >= self.settle else 2

        pool.sort(key=tier)  # stable: random within a tier
        chosen: list[str] = []
        for _ in range(min(wanted, len(pool))):
            best = min(pool, key=lambda p: (load.get(group_of(candidates[p]), 0), tier(p)))
            pool.remove(best)
            chosen.append(best)
            group = group_of(candidates[best])
            load[group] = load.get(group, 0) + 1
        return chosen
