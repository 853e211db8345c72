"""MoDeST's decentralized sampling: who the candidates of a round are, and which of them are available.

de Vos et al., "MoDeST: Mostly-Consistent Decentralized Sampling Training" (arXiv 2302.13837 v1).
The candidates of round k are the swarm's members sorted by MD5(peer id ‖ "-" ‖ k) (:func:`order`);
nodes that know the same members compute the same list. To pick the first n *available* ones, a node
pings the first n in parallel, pings each silent one again every ``ping_interval`` and replaces any that
has not answered within ``ping_timeout`` (or is known to be down) by the next candidate
(:class:`Sampler`); the node itself counts as available without a ping.

Departures from the paper, for members that are connected but never answer (a hostile identity, or a
node whose loop is stuck): pinged through every selection they ranked in, each cost it ``ping_timeout``,
one after another (on the in-memory bench one such member of six cut a swarm's rounds to 29% of a clean
swarm's; three daemons joined by a fresh silent identity every 5 s went 30-54 s without a round).

- **Heard before sampled.** A member is a candidate only once it has answered a ping of ours
  (:meth:`Sampler.usable`): members never heard from are pinged in the background (:meth:`Sampler.probe`),
  outside any selection, so a silent one costs no round anything. A receiver checks roles against
  the same set, so both ends skip the same silent members.
- **Silence costs its standing.** A peer that lets a ping time out is no longer heard, is dropped from
  every selection waiting for it, and is not probed again for :data:`MUTE` seconds, doubling with each
  further time-out up to :data:`MUTE_MAX`; only an answer to our ping brings it back (a pong nobody asked
  for, or a reconnection, costs an attacker nothing). A background probe cost no round, and a newcomer
  may still be starting: its time-out mutes for :data:`PROBE_MUTE` seconds first (doubling alike), and
  a late answer to that probe still counts. At 24 daemons on 2 cores the joiners answered their first
  probes too late and, muted for 120 s, went unsampled for two minutes while the founder's rounds ran
  alone.

Sans-IO like the protocols: every method takes ``now`` and returns the actions to carry out; a
selection's pings are re-sent on a keyed timer ``(PING, selection id)`` that the protocol hands back to
:meth:`Sampler.on_timer`.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shoal.learning.messages import Ping
from shoal.learning.protocol import Action, CancelTimer, Send, StartTimer


class Timer(enum.Enum):
    PING = "ping"  # (PING, selection id): ping that selection's silent candidates again


MUTE = 120.0  # seconds a peer is not pinged again after its first ping time-out in a round's selection ...
PROBE_MUTE = 10.0  # ... or in a background probe ...
MUTE_MAX = 3600.0  # ... doubling with each further one up to this


def order(peers: Iterable[str], round: int) -> list[str]:
    """MoDeST's candidate order for a round: ascending MD5(peer ‖ "-" ‖ round)."""
    suffix = f"-{round}".encode()
    return sorted(peers, key=lambda p: hashlib.md5(p.encode() + suffix).digest())


@dataclass
class Selection:
    """Picking the first ``wanted`` available peers of a candidate list, by pings."""

    id: int
    round: int
    wanted: int
    candidates: list[str]
    then: Callable[[list[str]], list[Action]]
    probe: bool = False  # a background probe: its candidates have not been heard from
    next: int = 0
    pending: dict[str, float] = field(default_factory=dict)  # peer -> time of its first ping
    chosen: set[str] = field(default_factory=set)
    done: bool = False

    def result(self) -> list[str]:
        return [p for p in self.candidates if p in self.chosen]


class Sampler:
    """The selections under way of one node; ``then(chosen peers)`` runs when a selection is complete."""

    def __init__(self, me: str, ping_interval: float, ping_timeout: float) -> None:
        self.me = me
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self._selections: dict[int, Selection] = {}
        self._next_id = 0
        self._heard: set[str] = set()  # peers that answered a ping of ours and have not timed out since
        self._probing: set[str] = set()  # peers a background probe is waiting for
        self._muted: dict[str, tuple[float, float]] = {}  # peer -> (not probed until, its last mute length)
        self._late: dict[str, int] = {}  # peer -> the probe it let time out, whose answer still counts

    def select(
        self,
        rnd: int,
        wanted: int,
        candidates: list[str],
        then: Callable[[list[str]], list[Action]],
        now: float,
        *,
        probe: bool = False,
    ) -> list[Action]:
        """Start picking the first ``wanted`` available of ``candidates`` (in order) for round ``rnd``
        (``probe``: candidates not heard from yet are pinged too)."""
        sel = Selection(self._next_id, rnd, wanted, candidates, then, probe)
        self._next_id += 1
        self._selections[sel.id] = sel
        actions = self._fill(sel, now)
        if not sel.done:
            actions.append(self._timer(sel))
        return actions

    def usable(self, peer: str) -> bool:
        """Whether ``peer`` may be sampled: it answered a ping of ours and has not timed out since."""
        return peer == self.me or peer in self._heard

    def probe(
        self, rnd: int, peers: Iterable[str], now: float, then: Callable[[], list[Action]] | None = None
    ) -> list[Action]:
        """Ping, in the background, those of ``peers`` never heard from that are neither muted nor being
        probed; ``then()`` runs once they all answered or timed out (at once when there are none)."""
        new = [
            p
            for p in sorted(peers)  # a set's order is the process's string hashing: not a seed's
            if p != self.me
            and p not in self._heard
            and p not in self._probing
            and now >= self._muted.get(p, (-math.inf, 0.0))[0]
        ]
        if not new:
            return then() if then else []
        self._probing.update(new)

        def done(_: list[str]) -> list[Action]:
            self._probing.difference_update(new)
            return then() if then else []

        return self.select(rnd, len(new), new, done, now, probe=True)

    def on_pong(self, peer: str, sel_id: int, now: float) -> list[Action]:
        sel = self._selections.get(sel_id)
        if sel is None or peer not in sel.pending:
            if self._late.get(peer) == sel_id:  # our probe, answered late: heard, no selection waits
                self._hear(peer)
            return []
        del sel.pending[peer]
        self._hear(peer)
        sel.chosen.add(peer)
        if len(sel.chosen) >= sel.wanted:
            sel.pending.clear()
        return self._refill(sel, now)

    def unavailable(self, peer: str, now: float) -> list[Action]:
        """``peer`` went down or cannot be sent to: the selections waiting for it move on."""
        actions: list[Action] = []
        for sel in list(self._selections.values()):
            if sel.pending.pop(peer, None) is not None:
                actions += self._refill(sel, now)
        return actions

    def keep(self, peers: set[str]) -> None:
        """Forget what we heard of peers not in ``peers`` (the members): ids cost nothing."""
        self._heard &= peers
        for peer in self._muted.keys() - peers:
            del self._muted[peer]
        for peer in self._late.keys() - peers:
            del self._late[peer]

    def on_timer(self, sel_id: int, now: float) -> list[Action]:
        sel = self._selections.get(sel_id)
        if sel is None:
            return []
        actions: list[Action] = []
        silent = [peer for peer, since in sel.pending.items() if now - since >= self.ping_timeout]
        for peer in [p for p in sel.pending if p not in silent]:
            actions.append(Send(peer, Ping(sel.id, sel.round)))
        for peer in silent:
            self._mute(peer, now, PROBE_MUTE if sel.probe else MUTE)
            if sel.probe:
                self._late[peer] = sel.id
            actions += self.unavailable(peer, now)  # every selection waiting for it moves on
        if sel.id in self._selections:
            actions += self._fill(sel, now)
            if not sel.done:
                actions.append(self._timer(sel))
        return actions

    def _hear(self, peer: str) -> None:
        self._muted.pop(peer, None)
        self._late.pop(peer, None)
        self._heard.add(peer)

    def _mute(self, peer: str, now: float, first: float) -> None:
        """A new time-out doubles the last mute (``first`` the first time); one of a selection that
        began before it does not."""
        self._heard.discard(peer)
        until, length = self._muted.get(peer, (-math.inf, first / 2))
        if now >= until:
            length = min(MUTE_MAX, 2 * length)
            self._muted[peer] = (now + length, length)

    def _timer(self, sel: Selection) -> StartTimer:
        return StartTimer((Timer.PING, sel.id), self.ping_interval)

    def _refill(self, sel: Selection, now: float) -> list[Action]:
        """:meth:`_fill` a selection under way; its timer ends with it."""
        actions = self._fill(sel, now)
        return [*actions, CancelTimer((Timer.PING, sel.id))] if sel.done else actions

    def _fill(self, sel: Selection, now: float) -> list[Action]:
        """Ping candidates until enough are chosen or pending; finish when nothing is left to wait for."""
        actions: list[Action] = []
        while len(sel.chosen) + len(sel.pending) < sel.wanted and sel.next < len(sel.candidates):
            peer = sel.candidates[sel.next]
            sel.next += 1
            if peer == self.me:
                sel.chosen.add(peer)
            elif not (sel.probe or peer in self._heard):  # it timed out since the selection began
                continue
            else:
                sel.pending[peer] = now
                actions.append(Send(peer, Ping(sel.id, sel.round)))
        if not sel.pending and not sel.done:
            sel.done = True
            del self._selections[sel.id]
            actions += sel.then(sel.result())
        return actions
