"""The link model of the simulated network: who can reach whom, when a message arrives, what it cost.

:class:`SimLinks` is the shared medium under :class:`overlay.sim.SimNetwork` (which adds the nodes'
lifecycle and their overlays). Times are trio's, so virtual under ``overlay.sim.run_virtual``; the
only randomness is ``rng``, seeded, so a run is reproducible.

A message of ``size`` bytes (``wire.encoded_size``) from ``a`` to ``b`` sent at ``t``:
- ``a``'s uplink sends one message at a time: the message starts at ``s = max(t, a's uplink free)``
  and leaves it at ``s + size/up(a)``; ``transmit()`` returns then (a sender feels its own bandwidth);
- it arrives after the link's latency, and ``b``'s downlink receives one message at a time, so it is
  delivered at ``max(s + size/up(a) + latency, max(s + latency, b's downlink free) + size/down(b))``:
  the slower end of the path sets the pace, as with one TCP flow (10 MB over 10 Mbit/s takes 8 s);
- it is lost with probability ``loss`` (decided at send, from ``rng``);
- it is dropped if, at delivery, either end has crashed or left since it was sent, or the pair is no
  longer reachable (in flight = lost);
- messages to one node are delivered in the order they were sent, as over TCP.

Reachability: both ends up, in the same :meth:`SimLinks.partition` group, the pair not :meth:`SimLinks.cut`.
A graph edge that is reachable is usable; a sender may use any reachable node with ``dial_any`` (as
libp2p can dial any known address), else only its graph neighbours (a disaster scenario's radio graph).
A dial that fails raises ``PeerUnreachable`` after two latencies; so does sending from a node that is down.
When an edge stops being usable through a cut or partition, both ends get ``PeerDisconnected`` after
``detection_delay`` (a failure detector's timeout); when it becomes usable, ``PeerConnected`` at once.

Announcements model gossipsub: they reach every live subscriber reachable from the publisher after two
latencies. :class:`Traffic` counts bytes per node and message kind: sent when a message enters the
uplink, received when it is delivered, announcements once per recipient plus ``ANNOUNCEMENT_OVERHEAD``.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from shoal.overlay.interface import (
    Announced,
    Delivered,
    OverlayEvent,
    PeerConnected,
    PeerDisconnected,
    PeerUnreachable,
)
from shoal.overlay.wire import Message, encoded_size

if TYPE_CHECKING:
    from shoal.overlay.sim import SimOverlay

ANNOUNCEMENT_OVERHEAD = 64  # bytes of pubsub framing counted per announcement


@dataclass
class NodeState:
    """One node's end of the links: its bandwidth and queues, and which incarnation is up."""

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


class SimLinks:
    """Links, partitions and the carrying of messages and events; start :meth:`run` in a nursery first.

    Raises ``ValueError`` for a ``loss`` outside [0, 1), ``RuntimeError`` when something must be
    carried before :meth:`run` started.
    """

    def __init__(
        self,
        *,
        seed: int,
        latency: float | Callable[[str, str], float],
        bandwidth: float,
        loss: float,
        dial_any: bool,
        detection_delay: float,
    ):
        if not 0.0 <= loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {loss}")
        self._latency = latency if callable(latency) else (lambda a, b, v=float(latency): v)
        self.bandwidth = bandwidth
        self.loss = loss
        self.dial_any = dial_any
        self.detection_delay = detection_delay
        self.rng = random.Random(seed)
        self.nodes: dict[str, NodeState] = {}
        self.graph: dict[str, dict[str, None]] = {}  # ordered adjacency sets
        self.group: dict[str, int] = {}  # partition group per node; absent = group 0
        self.cut_links: set[tuple[str, str]] = set()
        self.traffic = Traffic()
        self._nursery: trio.Nursery | None = None
        # Per destination, messages in delivery order. Delivery times to one node never decrease (its
        # downlink is a queue), so one task per busy destination delivers them in order (TCP keeps order).
        self._queues: dict[str, deque[tuple[float, str, tuple[int, int], Message, int]]] = {}

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks that carry messages; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def link(self, a: str, b: str) -> None:
        """Add a graph edge; both ends hear of it if the link is usable now."""
        if a == b:
            return
        self.graph.setdefault(a, {})[b] = None
        self.graph.setdefault(b, {})[a] = None
        if self.usable(a, b):
            self._notify(a, PeerConnected(b))
            self._notify(b, PeerConnected(a))

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
