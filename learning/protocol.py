"""The sans-IO vocabulary of learning protocols: events go in, actions come out.

A protocol (gossip, MoDeST) is a plain object with ``handle(event, now) -> list[Action]``. It never
sleeps, opens sockets or reads clocks (``now`` is given), as h11 and aioquic do; a driver
(``node/driver.py``) turns its actions into I/O on a real or simulated overlay and feeds back what
happens. Models travel as named tensors (:data:`State`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from shoal.learning.training import TrainStats

State = dict[str, torch.Tensor]


# --- events (driver -> protocol) ------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The node is up; the driver has already reported its current peers as PeerUp."""


@dataclass(frozen=True)
class Stopping:
    """The node is about to leave gracefully: last chance to say goodbye (sends only)."""


@dataclass(frozen=True)
class PeerUp:
    peer: str


@dataclass(frozen=True)
class PeerDown:
    peer: str


@dataclass(frozen=True)
class MessageIn:
    peer: str
    kind: str
    body: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SendFailed:
    peer: str
    kind: str


@dataclass(frozen=True)
class Trained:
    tag: int
    state: State
    stats: TrainStats


@dataclass(frozen=True)
class TimerFired:
    name: str


Event = Started | Stopping | PeerUp | PeerDown | MessageIn | SendFailed | Trained | TimerFired


# --- actions (protocol -> driver) -----------------------------------------------------------


@dataclass(frozen=True)
class Send:
    peer: str
    kind: str
    body: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Train:
    """Train ``state`` on the node's data; the driver answers with ``Trained(tag, ...)``."""

    tag: int
    state: State


@dataclass(frozen=True)
class StartTimer:
    """Fire ``TimerFired(name)`` after ``delay`` seconds."""

    name: str
    delay: float


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


Action = Send | Train | StartTimer | RoundDone | Rejected


class LearningProtocol(Protocol):
    @property
    def model(self) -> State:
        """The node's current model."""
        ...

    @property
    def round(self) -> int: ...

    def handle(self, event: Event, now: float) -> list[Action]: ...
