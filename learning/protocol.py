"""The sans-IO vocabulary of learning protocols: events go in, actions come out.

A protocol (gossip, MoDeST) is a plain object with ``handle(event, now) -> list[Action]``. It never
sleeps, opens sockets or reads clocks (``now`` is given), as h11 and aioquic do; a driver
(``node/driver.py``) turns its actions into I/O on a real or simulated overlay and feeds back what
happens. Models travel as named tensors (:data:`State`); peers' messages as the typed values of
``learning.messages``, in ``MessageIn`` and ``Send``.

The driver translates the overlay's own events (a peer connected or disconnected, the members changed)
into this module's: ``learning`` imports nothing of ``overlay`` nor ``overlay`` of ``learning``.

Timers are keyed: ``StartTimer(key, delay)`` replaces any pending timer with an equal key,
``CancelTimer(key)`` removes it, and ``TimerFired(key)`` hands back the key given. A key is a typed
value (an enum member, or a tuple of one and an int such as a selection id), so a protocol matches on
what the timer is for instead of parsing a name. A replaced or cancelled timer never fires, even if its
delay had already run out, so a protocol needs no generation counter to tell a stale timer from a live one.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol

import torch

from shoal.learning.messages import PeerMessage

State = dict[str, torch.Tensor]
TimerKey = Hashable


# --- events (driver -> protocol) ------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The node is up; the driver has already reported its current peers as PeerUp."""


@dataclass(frozen=True)
class Stopping:
    """The node is about to leave gracefully: last chance to say goodbye (sends only)."""


@dataclass(frozen=True)
class PeerUp:
    """A peer of the task is reachable. The overlay says so with its own ``PeerConnected``; the driver
    translates, since learning and overlay import nothing of each other."""

    peer: str


@dataclass(frozen=True)
class PeerDown:
    peer: str


@dataclass(frozen=True)
class Members:
    """The peers of the task this node holds a current membership statement of, itself included: on
    libp2p each one's own signed metadata record (``overlay.interface.Overlay.members``), so no peer
    can add, remove or rank another. Given before ``Started`` and whenever the set changes."""

    peers: frozenset[str]


@dataclass(frozen=True)
class MessageIn:
    """A peer's message as a protocol reads it: typed and within its bounds (``learning.messages``).

    Not the overlay's ``Delivered(peer, Message)`` passed on: a wire ``Message`` holds *wire tensors*
    (a codec's quantised or sparse form, with the codec's fields in its body) that only the driver's
    :class:`~learning.compression.Compression` can read. The driver decodes them into the whole model,
    in our own names, shapes and dtypes, then the body into its message class, once; what fails either
    costs its sender a penalty there and never reaches a protocol. So a protocol matches on classes and
    never sees undecoded tensors or an unchecked body.
    """

    peer: str
    message: PeerMessage


@dataclass(frozen=True)
class SendFailed:
    peer: str
    message: PeerMessage


@dataclass(frozen=True)
class Trained:
    tag: int
    state: State


@dataclass(frozen=True)
class TimerFired:
    key: TimerKey


Event = Started | Stopping | PeerUp | PeerDown | Members | MessageIn | SendFailed | Trained | TimerFired


# --- actions (protocol -> driver) -----------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send ``message`` to ``peer``; the driver encodes its model with the node's codec."""

    peer: str
    message: PeerMessage


@dataclass(frozen=True)
class Train:
    """Train ``state`` on the node's data; the driver answers with ``Trained(tag, ...)``."""

    tag: int
    state: State


@dataclass(frozen=True)
class StartTimer:
    """Fire ``TimerFired(key)`` after ``delay`` seconds, replacing any pending timer with an equal key."""

    key: TimerKey
    delay: float


@dataclass(frozen=True)
class CancelTimer:
    """The pending timer with this key, if any, never fires."""

    key: TimerKey


@dataclass(frozen=True)
class RoundDone:
    """A round ended with a new local model (for logs, metrics and checkpoints)."""

    round: int


@dataclass(frozen=True)
class Rejected:
    """Input from a peer was refused. ``blame``: it proves the peer wrong, and the driver penalises it;
    without, it may be an honest peer's lag (a view or round we have not caught up with): only dropped."""

    peer: str
    reason: str
    blame: bool = True


@dataclass(frozen=True)
class Credited:
    """How much of ``peer``'s model the node took: 1.0 all of it, 0.0 nothing, in between when clipped.
    The overlay keeps a score per peer from these, to choose whom to keep when it has too many."""

    peer: str
    value: float


Action = Send | Train | StartTimer | CancelTimer | RoundDone | Rejected | Credited


class LearningProtocol(Protocol):
    @property
    def model(self) -> State:
        """The node's current model."""
        ...

    @property
    def round(self) -> int: ...

    def handle(self, event: Event, now: float) -> list[Action]: ...
