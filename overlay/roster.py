"""What readers of the metadata document see: the last valid record of each peer, under a member cap
that many identities cannot take over (``overlay.metadata`` feeds it the values its document holds).

A value is taken if it is a record signed for this task by the key its doc key names
(``overlay.records``), newer than the last one taken from that peer (its counter only grows), not stale
(``seen`` more than ``expiry`` before the latest time we were told) and there is room for it. Readers
keep a peer's last valid record until it expires: a hostile delete or replay of the doc copy hides
nothing. A peer leaves on its own signed ``"left"`` (its counter is then kept as a floor for
``expiry``, so an older record replayed later cannot revive it) or when its ``seen`` is too old or too
far ahead.

The cap is ``max_entries`` slots of ``slot_bytes``; a record takes one slot per started ``slot_bytes``
(so records of ``max_entry_bytes`` cannot fill the bytes that many small ones would). Identities cost
nothing, so the cap is shared by who delivered the records, not first come, first kept (measured: ~990
records signed by fresh keys, relayed by one peer, filled it and later joiners were ignored):

- each record is charged to its *introducer*, the peer that delivered it first (the sync partner, or
  the gossip forwarder), or to its own peer once that peer delivers it itself;
- protected records always have a place: our own, and those of our direct peers (told by the I/O side,
  :meth:`Roster.protect`): the node's connections vouch for them;
- when the cap is full, a newcomer delivered by a peer that introduced fewer slots than the peer that
  introduced the most (or a protected newcomer) evicts one record of the latter, its least recently
  seen; otherwise it is refused, without blame: an honest relayer may hold more records than we do.

So a relayer of sybils keeps at most an equal share with every other relayer once newcomers arrive,
and a newcomer that connects to us always gets in.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from shoal.overlay.records import Verified, verify


class Roster:
    """The verified records of task ``task``'s members as seen by peer ``own``; see the module doc."""

    def __init__(
        self, task: str, own: str, *, expiry: float, max_entries: int, max_entry_bytes: int, slot_bytes: int
    ) -> None:
        self.task, self.own, self.expiry = task, own, expiry
        self.max_entries, self.max_entry_bytes, self.slot_bytes = max_entries, max_entry_bytes, slot_bytes
        self.records: dict[str, Verified] = {}  # this peer's own record included
        self.now: float | None = None  # the latest time we were told
        self._introducer: dict[str, str] = {}  # peer: who delivered its record first
        self._direct: frozenset[str] = frozenset()
        self._used = 0  # slots
        self._floors: dict[str, tuple[int, float]] = {}  # counter and seen of peers forgotten on "left"
        self._load: Counter[str] | None = None  # slots per introducer of unprotected records, while full
        self._evicted: list[str] = []  # evicted since the last take_evicted

    def tick(self, now: float) -> None:
        self.now = now if self.now is None else max(self.now, now)

    def protect(self, peers: Iterable[str]) -> None:
        """Our direct peers now: their own records always have a place."""
        self._direct = frozenset(peers)
        self._load = None

    def slots(self, record: Verified) -> int:
        return max(1, math.ceil(record.size / self.slot_bytes))

    def set_own(self, record: Verified) -> None:
        """Our own record, just written: it always has a place."""
        self._put(self.own, record, self.own)

    def accept(self, peer: str, value: object, introducer: str, verified: Verified | None = None) -> bool:
        """Whether the doc's ``value`` for ``peer`` is (now) the record readers see of it. ``verified``:
        the same value, already verified by the caller (it is checked to be the same)."""
        known = self.records.get(peer)
        if known is not None and isinstance(value, dict) and value == known.value:
            if introducer == peer:
                self._introducer[peer] = peer  # delivered by itself: charged to itself from now on
            return True  # already verified: reads and re-deliveries cost no signature check
        if (
            known is None
            and not self._protected(peer)
            and self._full(1)
            and not self._entitled(introducer, 1)
        ):
            return False  # over the cap, refused before paying for a signature check
        if verified is None or verified.value != value:
            verified = verify(self.task, peer, value, self.max_entry_bytes)
        if verified is None or not self._newer(peer, verified, known):
            return False
        need = self.slots(verified) - (self.slots(known) if known else 0)
        if not self._make_room(peer, introducer, need):
            return False
        self._put(peer, verified, self._introducer.get(peer, introducer) if introducer != peer else peer)
        self._floors.pop(peer, None)
        return True

    def judge(self, peer: str, record: Verified, introducer: str) -> bool:
        """Whether :meth:`accept` would take ``record`` (verified) now, taking nothing."""
        known = self.records.get(peer)
        if known is not None and record.value == known.value:
            return True
        if not self._newer(peer, record, known):
            return False
        need = self.slots(record) - (self.slots(known) if known else 0)
        if not self._full(need) or self._entitled(introducer, need):
            return True
        return self._protected(peer) and any(not self._protected(p) for p in self.records)

    def _newer(self, peer: str, record: Verified, known: Verified | None) -> bool:
        """Not a replay (its counter beats the last taken, or the floor of a peer that left) nor stale."""
        floor = max(known.counter if known else -1, self._floors.get(peer, (-1, 0.0))[0])
        if record.counter <= floor:
            return False  # a replay (or an equivocation) of an older record
        return self.now is None or self.now - record.entry.member.seen <= self.expiry  # else stale

    def expire(self, now: float) -> list[str]:
        """Forget peers whose record is stale, too far in the future or ``"left"``; never our own."""
        self.tick(now)
        forgotten = []
        for peer, record in list(self.records.items()):
            member = record.entry.member
            if peer != self.own and not member.current(now, self.expiry):
                forgotten.append(peer)
                self._drop(peer)
                if member.state == "left":  # older records of its, replayed, must not revive it
                    self._floors[peer] = (record.counter, member.seen)
        # a replayed record older than a floor that aged out is stale, which accept refuses anyway
        floors = sorted(self._floors.items(), key=lambda f: -f[1][1])
        self._floors = {p: f for p, f in floors[: self.max_entries] if abs(now - f[1]) <= self.expiry}
        return forgotten

    def take_evicted(self) -> list[str]:
        """The peers evicted to make room since the last call (their doc entries are now junk)."""
        evicted, self._evicted = self._evicted, []
        return [peer for peer in evicted if peer not in self.records]

    def introducers(self) -> Counter[str]:
        """Slots per introducer of the records that are not protected: what the cap is shared by."""
        return Counter(self._loads())

    # -- the cap ------------------------------------------------------------------------------------

    def _protected(self, peer: str) -> bool:
        return peer == self.own or peer in self._direct

    def _full(self, need: int) -> bool:
        return self._used + need > self.max_entries

    def _loads(self) -> Counter[str]:
        if self._load is None:
            self._load = Counter()
            for peer, record in self.records.items():
                if not self._protected(peer):
                    self._load[self._introducer[peer]] += self.slots(record)
        return self._load

    def _entitled(self, introducer: str, need: int) -> bool:
        """Whether a newcomer of ``need`` slots from ``introducer`` may evict: its introducer would still
        hold fewer slots than the one that holds the most."""
        loads = self._loads()
        top = max(loads.values(), default=0)
        return loads.get(introducer, 0) + need < top

    def _make_room(self, peer: str, introducer: str, need: int) -> bool:
        if not self._full(need):
            return True
        protected = self._protected(peer)
        if not protected and not self._entitled(introducer, need):
            return False
        victims = []
        loads = Counter(self._loads())
        while self._used - sum(self.slots(self.records[v]) for v in victims) + need > self.max_entries:
            top = max((p for p in loads if loads[p] > 0), key=lambda p: loads[p], default=None)
            if top is None or (not protected and loads.get(introducer, 0) + need >= loads[top]):
                return False
            candidates = [
                p for p, i in self._introducer.items()
                if i == top and p not in victims and p != peer and not self._protected(p)
            ]  # fmt: skip
            if not candidates:
                loads[top] = 0
                continue
            victim = min(candidates, key=lambda p: self.records[p].entry.member.seen)
            victims.append(victim)
            loads[top] -= self.slots(self.records[victim])
        for victim in victims:
            self._drop(victim)
        self._evicted += victims
        return True

    def _put(self, peer: str, record: Verified, introducer: str) -> None:
        self._drop(peer)
        self.records[peer] = record
        self._introducer[peer] = introducer
        self._used += self.slots(record)
        if self._load is not None and not self._protected(peer):
            self._load[introducer] += self.slots(record)

    def _drop(self, peer: str) -> None:
        record = self.records.pop(peer, None)
        if record is None:
            return
        introducer = self._introducer.pop(peer)
        self._used -= self.slots(record)
        if self._load is not None and not self._protected(peer):
            self._load[introducer] -= self.slots(record)
            if self._load[introducer] <= 0:
                del self._load[introducer]
