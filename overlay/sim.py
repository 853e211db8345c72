"""A simulated network: many nodes in one process, on one trio loop, in virtual time.

Run it under ``trio.testing.MockClock(autojump_threshold=0)`` (see :func:`run_virtual`): whenever
every task waits, the clock jumps to the next deadline, so an hour of swarm time costs only the
compute done in it, and a run is reproducible from its seed.

:class:`SimNetwork` is the link model of ``overlay.simlinks`` (latency, bandwidth, loss, partitions,
traffic) plus the nodes' lifecycle: :meth:`SimNetwork.add_node` returns a node's
:class:`SimOverlay` (an :class:`overlay.interface.Overlay`), :meth:`SimNetwork.crash` and
:meth:`SimNetwork.leave` stop it. A crash is noticed by the neighbours ``detection_delay`` seconds
later (a failure detector's timeout), a graceful leave after one latency; either way the node's events
channel closes and messages in flight to or from it are lost. ``peers()`` are the node's live graph
neighbours it can reach. Membership is the metadata document with instant, perfect spread: every live
node gets one ``MembersChanged`` per moment in which the members changed.

Refused input goes through the same policy as on libp2p (``overlay.penalties``, in virtual time): a
banned peer's messages and announcements are dropped at delivery, it leaves the banning node's
``peers()`` (PeerDisconnected) until the ban ends (PeerConnected, if the link is still usable), and
sends to it fail with ``PeerUnreachable``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio
import trio.testing

from shoal.overlay.interface import (
    Delivered,
    MembersChanged,
    OverlayEvent,
    PeerConnected,
    PeerDisconnected,
    PeerUnreachable,
)
from shoal.overlay.penalties import Penalties
from shoal.overlay.simlinks import NodeState, SimLinks
from shoal.overlay.wire import Message

T = TypeVar("T")


def run_virtual(main: Callable[[], Awaitable[T]], seed: int) -> T:
    """``trio.run(main)`` in virtual time with a reproducible task schedule.

    Trio randomises the order in which runnable tasks of one batch run (trio/_core/_run.py, "we
    randomize the order of each batch"), so two runs of one simulation could interleave differently.
    Trio offers a deterministic mode for Hypothesis (pytest-trio switches it on): batches sorted by task
    creation order, then shuffled by trio's own generator, which we seed. This is the one place that
    touches trio internals; delete it if trio gains public deterministic scheduling.
    """
    import trio._core._run as trio_run

    saved = trio_run._ALLOW_DETERMINISTIC_SCHEDULING, trio_run._r.getstate()
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True
    trio_run._r.seed(seed)
    try:
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved[0]
        trio_run._r.setstate(saved[1])


class SimNetwork(SimLinks):
    """The links of :class:`SimLinks` and the nodes on them; start :meth:`run` in a nursery before sending.

    ``max_penalty`` and ``ban_duration`` configure every node's ``Penalties``; :meth:`add_node` raises
    ``ValueError`` for a node that is already up.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float | Callable[[str, str], float] = 0.02,
        bandwidth: float = math.inf,
        loss: float = 0.0,
        dial_any: bool = True,
        detection_delay: float = 2.0,
        max_penalty: int = 5,
        ban_duration: float = 600.0,
    ):
        super().__init__(
            seed=seed,
            latency=latency,
            bandwidth=bandwidth,
            loss=loss,
            dial_any=dial_any,
            detection_delay=detection_delay,
        )
        self.max_penalty, self.ban_duration = max_penalty, ban_duration
        self.providers: dict[str, dict[str, None]] = defaultdict(dict)
        self._member_notices: set[float] = set()  # moments a members notice is due
        self._changes = 0  # nodes added or removed so far
        # the members at (a moment, after that many changes)
        self._members: tuple[float, int, frozenset[str]] = (math.nan, 0, frozenset())

    def add_node(
        self, peer: str, *, neighbours: Iterable[str] = (), up: float | None = None, down: float | None = None
    ) -> SimOverlay:
        """Create a node (or bring a crashed one back with a fresh overlay) linked to ``neighbours``."""
        old = self.nodes.get(peer)
        if old is not None and old.alive:
            raise ValueError(f"node {peer} is already up")
        overlay = SimOverlay(self, peer)
        bw = self.bandwidth
        self.nodes[peer] = NodeState(
            overlay,
            up if up is not None else bw,
            down if down is not None else bw,
            incarnation=old.incarnation + 1 if old else 0,
            down_free=old.down_free if old else 0.0,  # messages to the old incarnation still hold the line
        )
        for other in dict.fromkeys([*self.graph.setdefault(peer, {}), *neighbours]):
            self.link(peer, other)  # a node that comes back finds its old links again
        self._changes += 1
        self._members_change(trio.current_time())
        return overlay

    def crash(self, peer: str) -> None:
        """Stop a node without warning: in-flight messages are lost; neighbours notice after a delay."""
        self._remove(peer, self.detection_delay)

    def leave(self, peer: str) -> None:
        """Graceful departure: neighbours hear of it after one latency."""
        self._remove(peer, None)

    def _remove(self, peer: str, delay: float | None) -> None:
        state = self.nodes[peer]
        if not state.alive:
            return
        was_linked = [n for n in self.graph[peer] if self.usable(peer, n)]
        state.alive = False
        self._changes += 1
        state.member_until = trio.current_time() + (delay or 0.0)
        self._members_change(state.member_until)
        state.overlay._events_in.close()
        for n in was_linked:
            self._notify(n, PeerDisconnected(peer), delay if delay is not None else self.latency(peer, n))

    def alive(self) -> list[str]:
        return [p for p, s in self.nodes.items() if s.alive]

    def members(self) -> frozenset[str]:
        """The nodes whose membership statement is current: every live node, and a crashed one until
        its crash is noticed (``detection_delay``), as a signed record outlives its writer until it
        expires. A model of the metadata document with instant, perfect spread. One set per moment,
        shared: 10,000 nodes starting at once ask for it 10,000 times."""
        now = trio.current_time()
        if self._members[:2] != (now, self._changes):
            members = frozenset(p for p, s in self.nodes.items() if s.alive or now < s.member_until)
            self._members = (now, self._changes, members)
        return self._members[2]

    def _members_change(self, at: float) -> None:
        """Tell every live node the members at ``at``: once per moment, however many changed in it (a
        thousand nodes starting at once are one notice, not a thousand)."""
        if at not in self._member_notices:
            self._member_notices.add(at)
            self._spawn(self._notify_members, at)

    async def _notify_members(self, at: float) -> None:
        await trio.sleep_until(at)
        self._member_notices.discard(at)
        members = self.members()
        for state in self.nodes.values():
            if state.alive:
                state.overlay._push(MembersChanged(members), state.incarnation)


class SimOverlay:
    """One node's view of a :class:`SimNetwork`; implements :class:`overlay.interface.Overlay`."""

    def __init__(self, network: SimNetwork, peer_id: str):
        self._network = network
        self._peer_id = peer_id
        self._events_in, self._events = trio.open_memory_channel[OverlayEvent](math.inf)
        self.policy = Penalties(network.max_penalty, network.ban_duration)

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def events(self) -> trio.MemoryReceiveChannel[OverlayEvent]:
        return self._events

    @property
    def penalties(self) -> Counter[str]:
        return self.policy.counts()

    def _push(self, event: OverlayEvent, incarnation: int) -> None:
        state = self._network.nodes[self._peer_id]
        if not (state.alive and state.overlay is self and state.incarnation == incarnation):
            return
        if not isinstance(event, MembersChanged) and self.policy.banned(event.peer, trio.current_time()):
            if isinstance(event, Delivered):
                self._network.traffic.lost += 1
            return  # nothing from a banned peer: its messages, announcements, or link changes
        self._events_in.send_nowait(event)

    def peers(self) -> list[str]:
        net, now = self._network, trio.current_time()
        return [
            n
            for n in net.graph.get(self._peer_id, ())
            if net.usable(self._peer_id, n) and not self.policy.banned(n, now)
        ]

    async def send(self, peer: str, message: Message) -> None:
        if self.policy.banned(peer, trio.current_time()):
            raise PeerUnreachable(f"{peer} is banned for sending wrong input")
        await self._network.transmit(self._peer_id, peer, message)

    def subscribe(self, topic: str) -> None:
        self._network.nodes[self._peer_id].topics.add(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        await self._network.announce(self._peer_id, topic, data)

    async def provide(self, key: str) -> None:
        await trio.sleep(2 * self._network.latency(self._peer_id, self._peer_id))
        self._network.providers[key][self._peer_id] = None

    async def find_providers(self, key: str, limit: int = 20) -> list[str]:
        net = self._network
        await trio.sleep(2 * net.latency(self._peer_id, self._peer_id))
        found = [
            p for p in net.providers.get(key, ()) if p != self._peer_id and net.reachable(self._peer_id, p)
        ]
        return found[:limit]

    def members(self) -> frozenset[str]:
        return self._network.members()

    def credit(self, peer: str, value: float) -> None:
        """Nothing: the simulated network has no peer set to choose from (the graph is given)."""

    def penalize(self, peer: str, reason: str) -> None:
        now = trio.current_time()
        banned = self.policy.reject(peer, "refused by protocol", reason, now)
        if banned and self._network.is_alive(self._peer_id):
            self._events_in.send_nowait(PeerDisconnected(peer))
            self._network._spawn(self._lift_ban, peer, now + self._network.ban_duration)

    async def _lift_ban(self, peer: str, at: float) -> None:
        await trio.sleep_until(at)
        now = trio.current_time()
        self.policy.tick(now)
        state = self._network.nodes[self._peer_id]
        live = state.alive and state.overlay is self
        if live and not self.policy.banned(peer, now) and self._network.usable(self._peer_id, peer):
            self._events_in.send_nowait(PeerConnected(peer))
