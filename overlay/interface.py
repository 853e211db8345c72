"""What a node can do with the network, whichever network it is: the Overlay interface.

Two implementations: ``overlay.sim`` (many nodes in one process, virtual time) and the libp2p one.
The node's driver (``node/driver.py``) is written against this interface only, so the daemon and the
simulations run the same protocol code.

Everything that happens to a node arrives, in order, on one channel (:attr:`Overlay.events`):
a peer connected or disconnected, the task's members changed, a message delivered, an announcement
published on a topic. The driver translates them into the learning protocols' own events
(``learning.protocol``), so this module imports nothing of ``learning``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import trio

from shoal.overlay.wire import Message


class PeerUnreachable(Exception):
    """A message could not be handed to the peer (down, cut off, unknown, or too slow)."""


@dataclass(frozen=True)
class PeerConnected:
    """``peer`` can be sent to now (for libp2p: a peer of the same task)."""

    peer: str


@dataclass(frozen=True)
class PeerDisconnected:
    """``peer`` is gone, cut off or banned: do not wait for it."""

    peer: str


@dataclass(frozen=True)
class Delivered:
    """A message from ``peer``: on libp2p decoded by ``overlay.wire`` (bounds, finite tensors); the
    simulated overlay hands over the sender's message as it is."""

    peer: str
    message: Message


@dataclass(frozen=True)
class MembersChanged:
    """The peers :meth:`Overlay.members` returns changed; ``peers`` is the new set."""

    peers: frozenset[str]


@dataclass(frozen=True)
class Announced:
    peer: str
    topic: str
    data: bytes


OverlayEvent = PeerConnected | PeerDisconnected | MembersChanged | Delivered | Announced


class Overlay(Protocol):
    @property
    def peer_id(self) -> str: ...

    @property
    def events(self) -> trio.MemoryReceiveChannel[OverlayEvent]: ...

    def peers(self) -> list[str]:
        """Peers this node is connected to now, in a stable order."""
        ...

    async def send(self, peer: str, message: Message) -> None:
        """Hand a message to a peer; returns once it is on its way, raises PeerUnreachable if it cannot be.

        How long to wait is the caller's to bound (the driver's ``send_timeout``): a slow receiver can
        hold a libp2p send for as long as it takes, a simulated send takes its upload time."""
        ...

    def subscribe(self, topic: str) -> None:
        """Receive :class:`Announced` events for a topic."""
        ...

    async def publish(self, topic: str, data: bytes) -> None:
        """Announce a small message (well under 1 MiB) to the topic's subscribers."""
        ...

    async def provide(self, key: str) -> None:
        """Advertise this node under a discovery key (e.g. a task id)."""
        ...

    async def find_providers(self, key: str, limit: int = 20) -> list[str]:
        """Peers that advertised ``key``, this node excluded."""
        ...

    def members(self) -> Collection[str]:
        """The peers of this node's task it holds a current membership statement of, this node included:
        on libp2p each one's own signed metadata record, not yet expired and not "left". Unlike
        :meth:`peers`, not only those connected now, and nothing a third peer could make up."""
        ...

    def credit(self, peer: str, value: float) -> None:
        """The learner's verdict on one model of ``peer``'s: 1.0 taken as sent, 0.0 refused, in between
        when clipped. The overlay keeps a score per peer from these, to choose whom to keep."""
        ...

    def penalize(self, peer: str, reason: str) -> None:
        """Count input from ``peer`` that was refused as wrong (malformed or implausible, not merely
        late) against it, under the same policy as wire errors: enough of it bans the peer."""
        ...
