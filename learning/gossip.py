"""Gossip learning as a sans-IO state machine, asynchronous or in synchronous rounds (D-PSGD).

Each cycle a node trains on its own data, sends the result to its neighbours (all of them, or
``fanout`` drawn at random), and folds the models it has received into its own with an
:class:`~learning.integrators.Integrator`.

- **Asynchronous** (gossip learning, Ormándi et al. 2013): no barrier. After each local training the
  node integrates whatever arrived since the last cycle (the latest model per peer) and trains again;
  a peer that vanishes simply stops contributing.
- **Synchronous** (D-PSGD, Lian et al. 2017): round ``r`` ends when the round-``r`` model of every
  neighbour has arrived, or after ``round_timeout``; a neighbour that goes down (or cannot be reached)
  is no longer waited for, so a crash never deadlocks a round.

A node that joins a running swarm may first fetch a neighbour's current model (``join_by_fetch``) and
continue from its round, instead of starting from its own initialisation.

Messages: ``model`` {round, samples, reply, labels (optional: the classes the sender holds, for
integrators such as Bristle)} + tensors; ``fetch`` {} asks a peer for its model.
Every received model is checked against the node's own (names, shapes, dtypes, finite values) and
refused with a reason otherwise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from learning.averaging import incompatibility
from learning.integrators import Contribution, Integrator
from learning.protocol import (
    Action,
    Event,
    MessageIn,
    PeerDown,
    PeerUp,
    Rejected,
    RoundDone,
    Send,
    SendFailed,
    Started,
    StartTimer,
    State,
    TimerFired,
    Train,
    Trained,
    is_count,
)

MAX_LABELS = 10_000  # classes a peer may announce

# How far ahead of our own round a synchronous peer's model may be and still be kept for later.
MAX_ROUNDS_AHEAD = 2


@dataclass(frozen=True)
class GossipConfig:
    fanout: int | None = None  # asynchronous: peers sent to per cycle; None = every neighbour
    synchronous: bool = False
    round_timeout: float = 60.0  # synchronous: most seconds to wait for the neighbours' models
    join_by_fetch: bool = False
    fetch_timeout: float = 10.0
    period: float = 0.0  # least seconds from the start of one round's training to the next

    def __post_init__(self) -> None:
        if self.fanout is not None and self.fanout < 1:
            raise ValueError(f"fanout must be at least 1, got {self.fanout}")
        if self.synchronous and self.fanout is not None:
            raise ValueError("synchronous rounds (D-PSGD) exchange with every neighbour; leave fanout unset")
        if self.round_timeout <= 0 or self.fetch_timeout <= 0 or self.period < 0:
            raise ValueError("timeouts must be positive and the period not negative")


class Gossip:
    def __init__(
        self,
        model: State,
        samples: int,
        integrator: Integrator,
        config: GossipConfig,
        rng: random.Random,
        *,
        labels: Sequence[int] | None = None,
        round: int = 0,
    ):
        self._model = model
        self._samples = samples
        self._integrator = integrator
        self._config = config
        self._rng = rng
        self._labels = None if labels is None else sorted(set(labels))  # announced with our models
        if samples == 0 and config.period <= 0:
            raise ValueError("a node without data needs a period, or it could cycle without pause")
        self._round = round  # a daemon resuming from a checkpoint starts where it stopped
        self._now = self._cycle_started = 0.0
        self._phase = "idle"  # idle | fetching | training | waiting | resting
        self._neighbours: dict[str, None] = {}
        self._latest: dict[str, Contribution] = {}  # asynchronous: newest model per peer since last cycle
        self._inbox: dict[int, dict[str, Contribution]] = {}  # synchronous: models per round, per peer
        self._expected: dict[str, None] = {}  # synchronous: neighbours still awaited this round
        self._fetching_from: str | None = None
        self._fetches = 0

    @property
    def model(self) -> State:
        return self._model

    @property
    def round(self) -> int:
        return self._round

    @property
    def neighbours(self) -> list[str]:
        return list(self._neighbours)

    def handle(self, event: Event, now: float) -> list[Action]:
        self._now = now
        match event:
            case Started():
                return self._start()
            case PeerUp(peer):
                self._neighbours[peer] = None
                return []
            case PeerDown(peer):
                self._neighbours.pop(peer, None)
                return self._lost(peer)
            case SendFailed(peer):  # not gone (only PeerDown says so), but not to be waited for now
                return self._lost(peer)
            case MessageIn(peer, "fetch"):
                body = {"round": self._round, "samples": self._samples, "reply": True}
                return [Send(peer, "model", body, self._model)]
            case MessageIn(peer, "model", body, tensors):
                return self._on_model(peer, body, tensors)
            case MessageIn(peer, kind):
                return [Rejected(peer, f"unknown message kind {kind!r}")]
            case Trained(tag, state) if tag == self._round and self._phase == "training":
                return self._on_trained(state)
            case TimerFired(name) if name == f"fetch-{self._fetches}" and self._phase == "fetching":
                return self._train()
            case TimerFired("cycle") if self._phase == "resting":
                return self._train()
            case TimerFired(name) if name == f"round-{self._round}" and self._phase == "waiting":
                return self._complete_round()
        return []

    def _start(self) -> list[Action]:
        if self._config.join_by_fetch and self._neighbours:
            return self._fetch()
        return self._train()

    def _fetch(self) -> list[Action]:
        self._phase = "fetching"
        self._fetching_from = self._rng.choice(list(self._neighbours))
        self._fetches += 1  # a timer of an earlier attempt must not cut this one short
        return [
            Send(self._fetching_from, "fetch"),
            StartTimer(f"fetch-{self._fetches}", self._config.fetch_timeout),
        ]

    def _lost(self, peer: str) -> list[Action]:
        if self._phase == "fetching" and peer == self._fetching_from:
            return self._fetch() if self._neighbours else self._train()
        if self._phase == "waiting" and peer in self._expected:
            del self._expected[peer]
            return self._maybe_complete()
        return []

    def _on_model(self, peer: str, body: dict, tensors: dict) -> list[Action]:
        rnd, samples = body.get("round"), body.get("samples")
        if not (is_count(rnd) and is_count(samples)):
            return [
                Rejected(
                    peer, f"model message needs integer round and samples >= 0, got {rnd!r}, {samples!r}"
                )
            ]
        reason = incompatibility(self._model, tensors)
        if reason:
            return [Rejected(peer, f"model does not fit: {reason}")]
        labels = body.get("labels")
        if labels is not None and not (
            isinstance(labels, list) and len(labels) <= MAX_LABELS and all(is_count(c) for c in labels)
        ):
            return [Rejected(peer, f"labels must be a list of at most {MAX_LABELS} class numbers")]
        contribution = Contribution(dict(tensors), samples, peer, None if labels is None else tuple(labels))
        if self._phase == "fetching" and body.get("reply") and peer == self._fetching_from:
            self._model, self._round = contribution.state, rnd
            return self._train()
        if not self._config.synchronous:
            self._latest[peer] = contribution
            return []
        if self._round <= rnd <= self._round + MAX_ROUNDS_AHEAD:
            self._inbox.setdefault(rnd, {})[peer] = contribution
            return self._maybe_complete()
        return []

    def _on_trained(self, state: State) -> list[Action]:
        self._model = state
        if self._config.synchronous or self._config.fanout is None:
            targets = list(self._neighbours)
        else:
            targets = self._rng.sample(
                list(self._neighbours), min(self._config.fanout, len(self._neighbours))
            )
        body = {"round": self._round, "samples": self._samples}
        if self._labels is not None:
            body["labels"] = self._labels
        sends: list[Action] = [Send(p, "model", body, state) for p in targets]
        if not self._config.synchronous:
            received, self._latest = list(self._latest.values()), {}
            return sends + self._integrate_and_continue(received)
        self._phase = "waiting"
        self._expected = dict.fromkeys(self._neighbours)
        return [
            *sends,
            StartTimer(f"round-{self._round}", self._config.round_timeout),
            *self._maybe_complete(),
        ]

    def _maybe_complete(self) -> list[Action]:
        if self._phase != "waiting":
            return []
        arrived = self._inbox.get(self._round, {})
        if all(p in arrived for p in self._expected):
            return self._complete_round()
        return []

    def _complete_round(self) -> list[Action]:
        received = list(self._inbox.pop(self._round, {}).values())
        self._inbox = {r: m for r, m in self._inbox.items() if r > self._round}
        return self._integrate_and_continue(received)

    def _integrate_and_continue(self, received: list[Contribution]) -> list[Action]:
        if received:
            own = Contribution(self._model, self._samples)
            self._model = self._integrator.integrate(own, received)
        self._round += 1
        rest = self._cycle_started + self._config.period - self._now
        if rest > 0:
            self._phase = "resting"
            return [RoundDone(self._round), StartTimer("cycle", rest)]
        return [RoundDone(self._round), *self._train()]

    def _train(self) -> list[Action]:
        self._phase = "training"
        self._cycle_started = self._now
        return [Train(self._round, self._model)]
