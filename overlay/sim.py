"""A simulated network: many nodes in one process, on one trio loop, in virtual time.

Run it under ``trio.testing.MockClock(autojump_threshold=0)`` (see :func:`run_virtual`): whenever
every task waits, the clock jumps to the next deadline, so an hour of swarm time costs only the
compute done in it, and a run is reproducible from its seed.

The model of a link, per message of ``size`` bytes from ``a`` to ``b`` sent at ``t``:
- ``a``'s uplink sends one message at a time: the message starts at ``s = max(t, a's uplink free)``
  and leaves it at ``s + size/up(a)``; ``send()`` returns then (a sender feels its own bandwidth);
- it arrives after the link's latency, and ``b``'s downlink receives one message at a time, so it is
  delivered at ``max(s + size/up(a) + latency, max(s + latency, b's downlink free) + size/down(b))``:
  the slower end of the path sets the pace, as with one TCP flow (10 MB over 10 Mbit/s takes 8 s);
- it is lost with probability ``loss`` (decided at send, from the network's seeded generator);
- it is dropped if, at delivery, either end has crashed or left since it was sent (in flight = lost);
- messages to one node are delivered in the order they were sent, as over TCP.

Connectivity is a graph: ``peers()`` are the node's live graph neighbours not cut off from it.
With ``dial_any`` a node may also send to any live peer it is not cut off from (as libp2p can dial any
known address); without, only to neighbours (a disaster scenario's radio graph). A crash is noticed by
the neighbours ``detection_delay`` seconds later (a failure detector's timeout); a graceful leave after
one latency.

Refused input goes through the same policy as on libp2p (``overlay.penalties``, in virtual time): a
banned peer's messages and announcements are dropped at delivery, it leaves the banning node's
``peers()`` (PeerDisconnected) until the ban ends (PeerConnected, if the link is still usable), and
sends to it fail.

Bytes are counted per node and per message kind, sent when a message enters the uplink and received
when it is delivered. Announcements model gossipsub: they reach every live subscriber that is not
partitioned from the publisher after two latencies, and count their bytes once per recipient.

Size: the network model and the per-node overlay share the link state, so they stay together.

Over 400 lines in one module: the link model above and the simulated overlay share the per-node
queues and crash state it is computed on; split them behind one small interface before they grow.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import trio
import trio.testing

from shoal.overlay.interface import (
    Announced,
    Delivered,
    MembersChanged,
    OverlayEvent,
    PeerConnected,
    PeerDisconnected,
    PeerUnreachable,
)
from shoal.overlay.penalties import Penalties
from shoal.overlay.wire import Message, encoded_size

T = TypeVar("T")
ANNOUNCEMENT_OVERHEAD = 64  # bytes of pubsub framing counted per announcement


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


@dataclass
class NodeState:
    overlay: SimOverlay
    up: float
    down: float
    alive: bool = True
    incarnation: int = 0
    up_free: float = 0.0
    down_free: float = 0.0
    topics: set[str] = field(default_factory=set)
    member_until: float = 0.0  # once down: when its membership statement stops counting


@dataclass
class Traffic:
    """Bytes and messages per node and per message kind."""

    sent: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    received: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    messages: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lost: int = 0

    def total_sent(self, peer: str | None = None) -> int:
        rows = [self.sent[peer]] if peer is not None else self.sent.values()
        return sum(sum(kinds.values()) for kinds in rows)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for kinds in self.sent.values():
            for kind, n in kinds.items():
                out[kind] += n
        return dict(out)


class SimNetwork:
    """The shared medium of all simulated nodes; start :meth:`run` in a nursery before sending."""

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
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        self._latency = latency if callable(latency) else (lambda a, b, v=float(latency): v)
        self.bandwidth = bandwidth
        self.loss = loss
        self.dial_any = dial_any
        self.detection_delay = detection_delay
        self.max_penalty, self.ban_duration = max_penalty, ban_duration
        self.rng = random.Random(seed)
        self.nodes: dict[str, NodeState] = {}
        self.graph: dict[str, dict[str, None]] = {}  # ordered adjacency sets
        self.group: dict[str, int] = {}  # partition group per node; absent = group 0
        self.cut_links: set[tuple[str, str]] = set()
        self.providers: dict[str, dict[str, None]] = defaultdict(dict)
        self.traffic = Traffic()
        self._nursery: trio.Nursery | None = None
        # Per destination, messages in delivery order. Delivery times to one node never decrease (its
        # downlink is a queue), so one task per busy destination delivers them in order (TCP keeps order).
        self._queues: dict[str, deque[tuple[float, str, tuple[int, int], Message, int]]] = {}
        self._member_notices: set[float] = set()  # moments a members notice is due

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks that carry messages; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- membership -------------------------------------------------------------------------

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
        self._members_change(trio.current_time())
        return overlay

    def link(self, a: str, b: str) -> None:
        """Add a graph edge; both ends hear of it if the link is usable now."""
        if a == b:
            return
        self.graph.setdefault(a, {})[b] = None
        self.graph.setdefault(b, {})[a] = None
        if self.usable(a, b):
            self._notify(a, PeerConnected(b))
            self._notify(b, PeerConnected(a))

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
        state.member_until = trio.current_time() + (delay or 0.0)
        self._members_change(state.member_until)
        state.overlay._events_in.close()
        for n in was_linked:
            self._notify(n, PeerDisconnected(peer), delay if delay is not None else self.latency(peer, n))

    def alive(self) -> list[str]:
        return [p for p, s in self.nodes.items() if s.alive]

    def members(self) -> list[str]:
        """The nodes whose membership statement is current: every live node, and a crashed one until
        its crash is noticed (``detection_delay``), as a signed record outlives its writer until it
        expires. A model of the metadata document with instant, perfect spread."""
        now = trio.current_time()
        return [p for p, s in self.nodes.items() if s.alive or now < s.member_until]

    def _members_change(self, at: float) -> None:
        """Tell every live node the members at ``at``: once per moment, however many changed in it (a
        thousand nodes starting at once are one notice, not a thousand)."""
        if at not in self._member_notices:
            self._member_notices.add(at)
            self._spawn(self._notify_members, at)

    async def _notify_members(self, at: float) -> None:
        await trio.sleep_until(at)
        self._member_notices.discard(at)
        members = frozenset(self.members())
        for state in self.nodes.values():
            if state.alive:
                state.overlay._push(MembersChanged(members), state.incarnation)

    def is_alive(self, peer: str) -> bool:
        return peer in self.nodes and self.nodes[peer].alive

    # --- partitions -------------------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        self._reshape(lambda: self.cut_links.add(_key(a, b)))

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network: nodes in different groups cannot reach each other (unlisted: group 0)."""

        def apply() -> None:
            self.group = {p: i + 1 for i, members in enumerate(groups) for p in members}

        self._reshape(apply)

    def heal(self) -> None:
        """Remove all cuts and partitions."""

        def apply() -> None:
            self.cut_links.clear()
            self.group.clear()

        self._reshape(apply)

    def _reshape(self, change: Callable[[], None]) -> None:
        edges = [(a, b) for a in self.graph for b in self.graph[a] if a < b]
        before = {e: self.usable(*e) for e in edges}
        change()
        for (a, b), was in before.items():
            now = self.usable(a, b)
            if was and not now:
                self._notify(a, PeerDisconnected(b), self.detection_delay)
                self._notify(b, PeerDisconnected(a), self.detection_delay)
            elif now and not was:
                self._notify(a, PeerConnected(b))
                self._notify(b, PeerConnected(a))

    def reachable(self, a: str, b: str) -> bool:
        """Both up, in the same partition group, and the pair not cut."""
        return (
            self.is_alive(a)
            and self.is_alive(b)
            and self.group.get(a, 0) == self.group.get(b, 0)
            and _key(a, b) not in self.cut_links
        )

    def usable(self, a: str, b: str) -> bool:
        """A graph edge that can carry traffic now."""
        return b in self.graph.get(a, ()) and self.reachable(a, b)

    def latency(self, a: str, b: str) -> float:
        return self._latency(a, b)

    # --- carrying -------------------------------------------------------------------------

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is None:
            raise RuntimeError("SimNetwork.run() must be started in a nursery before nodes talk")
        self._nursery.start_soon(fn, *args)

    def _notify(self, peer: str, event: OverlayEvent, delay: float = 0.0) -> None:
        state = self.nodes.get(peer)
        if state is None or not state.alive:
            return
        if delay <= 0:
            state.overlay._push(event, state.incarnation)
        else:
            self._spawn(self._notify_later, peer, state.incarnation, event, trio.current_time() + delay)

    async def _notify_later(self, peer: str, incarnation: int, event: OverlayEvent, at: float) -> None:
        await trio.sleep_until(at)
        state = self.nodes[peer]
        stale = isinstance(event, PeerDisconnected) and self.usable(peer, event.peer)  # healed meanwhile
        if state.alive and state.incarnation == incarnation and not stale:
            state.overlay._push(event, incarnation)

    async def transmit(self, src: str, dst: str, message: Message) -> None:
        sender = self.nodes[src]
        if not sender.alive:
            raise PeerUnreachable(f"{src} is down")
        can_dial = dst in self.graph.get(src, ()) or (self.dial_any and dst in self.nodes)
        if not (can_dial and self.reachable(src, dst)):
            await trio.sleep(2 * self.latency(src, dst))  # the time a failed dial takes
            raise PeerUnreachable(f"{dst} is not reachable from {src}")
        receiver = self.nodes[dst]
        size = encoded_size(message)
        now = trio.current_time()
        start = max(now, sender.up_free)
        sender.up_free = left = start + size / sender.up
        latency = self.latency(src, dst)
        delivered = max(left + latency, max(start + latency, receiver.down_free) + size / receiver.down)
        receiver.down_free = delivered
        self.traffic.sent[src][message.kind] += size
        self.traffic.messages[message.kind] += 1
        if self.loss and self.rng.random() < self.loss:
            self.traffic.lost += 1
        else:
            queue = self._queues.get(dst)
            if queue is None:
                queue = self._queues[dst] = deque()
                self._spawn(self._deliver, dst, queue)
            queue.append((delivered, src, (sender.incarnation, receiver.incarnation), message, size))
        await trio.sleep_until(left)

    async def _deliver(
        self, dst: str, queue: deque[tuple[float, str, tuple[int, int], Message, int]]
    ) -> None:
        while queue:
            at, src, ends, message, size = queue[0]
            await trio.sleep_until(at)
            queue.popleft()
            s, d = self.nodes[src], self.nodes[dst]
            if s.alive and d.alive and (s.incarnation, d.incarnation) == ends and self.reachable(src, dst):
                self.traffic.received[dst][message.kind] += size
                d.overlay._push(Delivered(src, message), d.incarnation)
            else:
                self.traffic.lost += 1
        del self._queues[dst]

    async def announce(self, src: str, topic: str, data: bytes) -> None:
        size = len(data) + ANNOUNCEMENT_OVERHEAD
        for peer, state in self.nodes.items():
            if peer != src and topic in state.topics and self.reachable(src, peer):
                self.traffic.sent[src]["announce"] += size
                self.traffic.received[peer]["announce"] += size
                self._notify(peer, Announced(src, topic, data), 2 * self.latency(src, peer))


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


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

    def members(self) -> list[str]:
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
