"""What a node can do with the network, whichever network it is: the Overlay interface.

Two implementations: ``overlay.sim`` (many nodes in one process, virtual time) and the libp2p one.
The node's driver (``node/driver.py``) is written against this interface only, so the daemon and the
simulations run the same protocol code.

Everything that happens to a node arrives, in order, on one channel (:attr:`Overlay.events`):
a peer connected or disconnected, a message delivered, an announcement published on a topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from shoal.overlay.wire import Message


class PeerUnreachable(Exception):
    """A message could not be handed to the peer (down, cut off, unknown, or too slow)."""


@dataclass(frozen=True)
class PeerConnected:
    peer: str


@dataclass(frozen=True)
class PeerDisconnected:
    peer: str


@dataclass(frozen=True)
class Delivered:
    peer: str
    message: Message


@dataclass(frozen=True)
class Announced:
    peer: str
    topic: str
    data: bytes


OverlayEvent = PeerConnected | PeerDisconnected | Delivered | Announced


class Overlay(Protocol):
    @property
    def peer_id(self) -> str: ...

    @property
    def events(self) -> trio.MemoryReceiveChannel[OverlayEvent]: ...

    def peers(self) -> list[str]:
        """Peers this node is connected to now, in a stable order."""
        ...

    async def send(self, peer: str, message: Message) -> None:
        """Hand a message to a peer; returns once it is on its way, raises PeerUnreachable if it cannot be."""
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

    def penalize(self, peer: str, reason: str) -> None:
        """Count input from ``peer`` that was refused as wrong (malformed or implausible, not merely
        late) against it, under the same policy as wire errors: enough of it bans the peer."""
        ...
