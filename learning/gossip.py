"""Gossip learning as a sans-IO state machine, asynchronous or in synchronous rounds (D-PSGD).

Each cycle a node trains on its own data, sends the result to its neighbours (all of them, or
``fanout`` of them: those whose models it took lately first, the rest at random), and folds the models
it has received into its own with an :class:`~learning.integrators.Integrator`; the outer step
(``learning.outer``, DiLoCo's) then goes from where the cycle's training began towards that.

- **Asynchronous** (gossip learning, Ormándi et al. 2013): no barrier. After each local training the
  node integrates whatever arrived since the last cycle (the latest model per peer) and trains again;
  a peer that vanishes simply stops contributing.
- **Synchronous** (D-PSGD, Lian et al. 2017): round ``r`` ends when the round-``r`` model of every
  neighbour has arrived, or after ``round_timeout``; a neighbour that goes down (or cannot be reached)
  is no longer waited for, so a crash never deadlocks a round. Streaming DiLoCo (``learning.outer``:
  ``fragments``, ``overlap``) sends one part of the model a round, completed with the receiver's own
  other tensors when integrated, and may wait at round ``r``'s end for the models of ``r - 1``.

A node that joins a running swarm may first fetch a neighbour's current model (``join_by_fetch``) and
continue from its round, instead of starting from its own initialisation. A reply no further than our
own round (a neighbour that joined with us) is not taken: the joiner asks another neighbour, up to
``fetch_attempts`` of them. Its first peers are whoever it met first, often other joiners: at 24
daemons, joiners that took their first reply trained from scratch and reached 90% ~20 s later.

Messages (``learning.messages``): :class:`GossipModel` (round, samples, reply, labels: optional, the
classes the sender holds, for integrators such as Bristle; and the model); :class:`Fetch` asks a peer
for its model. Another protocol's message is refused, blamed.

Hostile peers (docs/security.md). Every received model arrives within its bounds (the driver parsed it)
and is checked against the node's own (``learning.messages.model_fault``): other names, shapes or
dtypes, or NaN/Inf, prove the sender wrong; a layer over ``max_norm_ratio`` times ours is only dropped,
since a node an attacker has moved sees honest models that way too (blaming them once made honest nodes
ban each other). What is taken goes through the integrator (by default robust clipping,
``learning.clipping``, whose verdicts become ``Credited``); a model it cannot take at all is dropped and
reported alone (``integrate_contained``). A fetched model replaces ours only if our anchor admits it
(not far worse on our own data than our recent models, ``learning.anchor``); otherwise the joiner asks
another neighbour.
Peers' rounds barely matter here, and that is the defence:
- asynchronous gossip never reads a peer's round, except that a joiner adopts the round of the model
  it fetched, which is limited to ``max_round_jump`` above its own. The round is a local counter (logs,
  metrics, checkpoints): a joiner fetching from a swarm further ahead reports a lower round, nothing
  else changes, and a lying peer cannot send it to 2**53;
- synchronous rounds keep a model only for our round up to ``MAX_ROUNDS_AHEAD`` beyond it; others are
  dropped without blame (late or early models are normal). A synchronous joiner whose swarm is more
  than ``max_round_jump`` ahead cannot line up with it: set the window above the swarm's age there.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from shoal.learning.anchor import Anchor
from shoal.learning.integrators import Contribution, Integrator, integrate_contained
from shoal.learning.messages import Fetch, GossipModel, model_fault
from shoal.learning.outer import Outer, OuterConfig, applied_late, partition
from shoal.learning.protocol import (
    Action,
    CancelTimer,
    Credited,
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
)

# How far ahead of our own round a synchronous peer's model may be and still be kept for later.
MAX_ROUNDS_AHEAD = 2
USEFUL = 0.5  # a neighbour is useful when we took at least this much of its last model
FETCH_INTERVAL = 1.0  # seconds: we answer one fetch per peer in this long
MAX_ANSWERED = 4096  # peers whose last fetch we remember
EXPLORE = 0.25  # the share of cycles in which one of the fanout is any neighbour


class Phase(enum.Enum):
    IDLE = "idle"  # not started
    FETCHING = "fetching"  # a joiner waits for the model it asked a neighbour for
    TRAINING = "training"  # a Train is out for our round
    WAITING = "waiting"  # synchronous: for the neighbours' models of our round
    RESTING = "resting"  # until ``period`` has passed since the cycle began


class Timer(enum.Enum):
    """The keys of gossip's timers. One phase at a time has a timer, so each key is pending at most once:
    a new fetch attempt replaces the last one's, and a phase that ends early cancels its own."""

    FETCH = "fetch"  # FETCHING: give up on the fetch and train from our own model
    ROUND = "round"  # WAITING: end the round with the models that came
    CYCLE = "cycle"  # RESTING: begin the next cycle


@dataclass(frozen=True)
class GossipConfig:
    """Also the daemon's ``[protocol.gossip]`` settings (``learning.settings``): the defaults are a
    daemon's. Synchronous rounds exchange with every neighbour, so they set ``fanout`` to None."""

    fanout: int | None = field(  # None: every neighbour (simulations; TOML has no null)
        default=2, metadata={"help": "peers each model is sent to per round", "flag": True}
    )
    synchronous: bool = False  # simulations: synchronous rounds (D-PSGD)
    round_timeout: float = 30.0  # synchronous: most seconds to wait for the neighbours' models
    join_by_fetch: bool = False
    fetch_timeout: float = 10.0
    fetch_attempts: int = 3  # most neighbours a joiner asks for a model ahead of its own
    period: float = field(
        default=1.0,
        metadata={"help": "least seconds from the start of one round's training to the next", "flag": True},
    )
    max_round_jump: int = field(
        default=100,
        metadata={
            "group": 'every peer is a possible adversary (docs/security.md):',
            "help": "most rounds a fetched model may move this node's round ahead",
        },
    )
    max_norm_ratio: float = field(  # learning.messages
        default=10.0, metadata={"help": "models with a layer's L2 norm over this many times ours are refused"}
    )

    def __post_init__(self) -> None:
        if self.synchronous:
            object.__setattr__(self, "fanout", None)
        if self.fanout is not None and self.fanout < 1:
            raise ValueError(f"fanout must be at least 1, got {self.fanout}")
        for name in ("round_timeout", "fetch_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"timeouts must be positive: {name} = {getattr(self, name)}")
        if not self.period >= 0:
            raise ValueError(f"period must not be negative, got {self.period}")
        if self.fetch_attempts < 1:
            raise ValueError(f"fetch_attempts must be at least 1, got {self.fetch_attempts}")
        if self.max_round_jump < 1:
            raise ValueError(f"max_round_jump must be at least 1, got {self.max_round_jump}")
        if not self.max_norm_ratio >= 1:
            raise ValueError(f"max_norm_ratio must be at least 1, got {self.max_norm_ratio}")


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
        anchor: Anchor | None = None,
        outer: Outer | None = None,
    ):
        """``anchor``: what the node knows of its own training (``learning.anchor``), to judge a fetched
        model that would replace ours; without one, any model ahead of ours is taken. ``outer``: the
        step from where a round's training began towards the integrated model (``learning.outer``;
        default: take the integrated model)."""
        self._model = model
        self._origin = model  # where each fragment's last outer step ended: the next one's origin
        self._outer = Outer(OuterConfig()) if outer is None else outer
        self._fragments = partition(model, self._outer.config.fragments)
        self._pending: tuple[int, State] | None = None  # overlap: our last round and what it sent
        self._exchange: tuple[int, State] = (round, model)  # the round being integrated, what we sent
        self._anchor = anchor
        self._samples = samples
        self._integrator = integrator
        self._config = config
        self._rng = rng
        self._labels = None if labels is None else tuple(sorted(set(labels)))  # announced with our models
        if samples == 0 and config.period <= 0:
            raise ValueError("a node without data needs a period, or it could cycle without pause")
        self._round = round  # a daemon resuming from a checkpoint starts where it stopped
        self._now = self._cycle_started = 0.0
        self._phase = Phase.IDLE
        self._neighbours: dict[str, None] = {}
        self._latest: dict[str, Contribution] = {}  # asynchronous: newest model per peer since last cycle
        self._inbox: dict[int, dict[str, Contribution]] = {}  # synchronous: models per round, per peer
        self._expected: dict[str, None] = {}  # synchronous: neighbours still awaited this round
        self._taken: dict[str, float] = {}  # per neighbour: how much of its last model we took (0..1)
        self._answered: dict[str, float] = {}  # per peer: when we last answered its fetch
        self._fetching_from: str | None = None
        self._asked: set[str] = set()  # neighbours a joiner asked for their model

    @property
    def model(self) -> State:
        """What the node evaluates, checkpoints and answers fetches with: streaming, its outer model
        (each part as its last outer step left it; the one it trains has parts a round or more apart)."""
        return self._origin if self._outer.config.streaming else self._model

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
                self._taken.pop(peer, None)
                return self._lost(peer)
            case SendFailed(peer):  # not gone (only PeerDown says so), but not to be waited for now
                return self._lost(peer)
            case MessageIn(peer, Fetch()):
                return self._on_fetch(peer)
            case MessageIn(peer, GossipModel() as msg):
                return self._on_model(peer, msg)
            case MessageIn(peer, msg):
                return [Rejected(peer, f"{msg.KIND} is not a gossip message")]
            case Trained(tag, state) if tag == self._round and self._phase is Phase.TRAINING:
                return self._on_trained(state)
            case TimerFired(Timer.FETCH) if self._phase is Phase.FETCHING:
                return self._train()
            case TimerFired(Timer.CYCLE) if self._phase is Phase.RESTING:
                return self._train()
            case TimerFired(Timer.ROUND) if self._phase is Phase.WAITING:
                return self._complete_round()
        return []

    def _on_fetch(self, peer: str) -> list[Action]:
        """Our model, at most once per FETCH_INTERVAL per peer: each answer is a whole model, so a stream
        of small fetches would have us send models as fast as it asks (an honest joiner asks once)."""
        if self._now - self._answered.get(peer, -FETCH_INTERVAL) < FETCH_INTERVAL:
            return []
        self._answered.pop(peer, None)  # re-inserted last: the dict stays in order of answers
        self._answered[peer] = self._now
        if len(self._answered) > MAX_ANSWERED:
            del self._answered[next(iter(self._answered))]
        return [Send(peer, GossipModel(self._round, self._samples, self.model, reply=True))]

    def _start(self) -> list[Action]:
        if self._config.join_by_fetch and self._neighbours:
            return self._fetch()
        return self._train()

    def _fetch(self) -> list[Action]:
        """Ask a neighbour not asked yet for its model; the timer replaces an earlier attempt's, which
        would cut this one short."""
        self._phase = Phase.FETCHING
        self._fetching_from = self._rng.choice(self._unasked())
        self._asked.add(self._fetching_from)
        return [Send(self._fetching_from, Fetch()), StartTimer(Timer.FETCH, self._config.fetch_timeout)]

    def _unasked(self) -> list[str]:
        return [p for p in self._neighbours if p not in self._asked]

    def _can_fetch_again(self) -> bool:
        return len(self._asked) < self._config.fetch_attempts and bool(self._unasked())

    def _lost(self, peer: str) -> list[Action]:
        if self._phase is Phase.FETCHING and peer == self._fetching_from:
            return self._fetch() if self._can_fetch_again() else [CancelTimer(Timer.FETCH), *self._train()]
        if self._phase is Phase.WAITING and peer in self._expected:
            del self._expected[peer]
            return self._maybe_complete()
        return []

    def _fragment(self, rnd: int) -> tuple[str, ...]:
        """The names round ``rnd`` exchanges (all of them unless the outer step streams fragments)."""
        return self._fragments[rnd % len(self._fragments)]

    def _on_model(self, peer: str, msg: GossipModel) -> list[Action]:
        expected = self._model if msg.reply else {k: self._model[k] for k in self._fragment(msg.round)}
        fault = model_fault(expected, msg.state, self._config.max_norm_ratio)
        if fault:
            reason, blame = fault
            return [Rejected(peer, reason, blame=blame)]
        contribution = Contribution(msg.state, msg.samples, peer, msg.labels)
        if self._phase is Phase.FETCHING and msg.reply and peer == self._fetching_from:
            return self._on_fetched(peer, msg.round, contribution.state)
        if not self._config.synchronous:
            self._latest[peer] = contribution
            return []
        if self._round - self._outer.config.overlap <= msg.round <= self._round + MAX_ROUNDS_AHEAD:
            self._inbox.setdefault(msg.round, {})[peer] = contribution
            return self._maybe_complete()
        return []

    def _on_fetched(self, peer: str, rnd: int, state: State) -> list[Action]:
        """A joiner's fetch reply: taken if it is ahead of us and not far worse on our own data than our
        known-good model (a liar's reply would replace our model whole); else ask another neighbour."""
        refused: list[Action] = []
        if rnd > self._round and (
            self._anchor is None or self._anchor.admits(state, self._model, rnd - self._round)
        ):
            self._model = self._origin = state
            self._round = min(rnd, self._round + self._config.max_round_jump)
            return [CancelTimer(Timer.FETCH), *self._train()]
        if rnd > self._round:
            refused.append(Rejected(peer, "fetched model not admitted by our anchor", blame=False))
        if self._can_fetch_again():
            return [*refused, *self._fetch()]
        return [*refused, CancelTimer(Timer.FETCH), *self._train()]

    def _targets(self) -> list[str]:
        """Whom this cycle's model goes to: every neighbour, or ``fanout`` of them, first among those
        whose models we took lately (a model sent to a peer that sends nothing useful back, such as one
        of the sybils a node's peer set may hold, is lost to the swarm), the rest at random; one in
        EXPLORE cycles one of them is any neighbour at random, so that newcomers are heard."""
        neighbours = list(self._neighbours)
        if self._config.synchronous or self._config.fanout is None:
            return neighbours
        k = min(self._config.fanout, len(neighbours))
        useful = [p for p in neighbours if self._taken.get(p, 0.0) >= USEFUL]
        explore = 1 if k and self._rng.random() < EXPLORE else 0
        chosen = self._rng.sample(useful, min(k - explore, len(useful)))
        rest = [p for p in neighbours if p not in chosen]
        return chosen + self._rng.sample(rest, k - len(chosen))

    def _on_trained(self, state: State) -> list[Action]:
        self._model = state
        targets = self._targets()
        sent = {k: state[k] for k in self._fragment(self._round)}
        msg = GossipModel(self._round, self._samples, sent, labels=self._labels)
        sends: list[Action] = [Send(p, msg) for p in targets]
        self._exchange = (self._round, sent)
        if not self._config.synchronous:
            received, self._latest = list(self._latest.values()), {}
            return sends + self._integrate_and_continue(received)
        if self._outer.config.overlap:  # integrate last round's exchange; this one's travels meanwhile
            pending, self._pending = self._pending, self._exchange
            if pending is None:
                return [*sends, *self._next_round([])]
            self._exchange = pending
        self._phase = Phase.WAITING
        self._expected = dict.fromkeys(self._neighbours)
        if self._all_arrived():
            return [*sends, *self._complete_round()]
        return [*sends, StartTimer(Timer.ROUND, self._config.round_timeout)]

    def _all_arrived(self) -> bool:
        arrived = self._inbox.get(self._exchange[0], {})
        return all(p in arrived for p in self._expected)

    def _maybe_complete(self) -> list[Action]:
        """End the round before its timer if every awaited model is in."""
        if self._phase is Phase.WAITING and self._all_arrived():
            return [CancelTimer(Timer.ROUND), *self._complete_round()]
        return []

    def _complete_round(self) -> list[Action]:
        rnd = self._exchange[0]
        received = list(self._inbox.pop(rnd, {}).values())
        self._inbox = {r: m for r, m in self._inbox.items() if r > rnd}
        return self._integrate_and_continue(received)

    def _integrate_and_continue(self, received: list[Contribution]) -> list[Action]:
        """Integrate what we sent with what came, as whole models: a fragment completed with our own
        other tensors (so robust integrators judge models they can score), then the outer step on
        the exchanged names; with overlap, it lands on those names as trained since."""
        model, sent = self._model, self._exchange[1]
        own = Contribution({**model, **sent}, self._samples)
        whole = [dataclasses.replace(c, state={**model, **c.state}) for c in received]
        integrated, judged = integrate_contained(self._integrator, own, whole)
        stepped = self._outer.step({k: self._origin[k] for k in sent}, {k: integrated[k] for k in sent})
        self._origin = {**self._origin, **stepped}
        if self._outer.config.overlap:
            stepped = applied_late(stepped, model, sent)
        self._model = {**model, **stepped}
        taken = {c.peer: 1.0 for c in received}  # a plain integrator takes all it keeps
        for action in judged:
            match action:
                case Credited(peer, value):
                    taken[peer] = value
                case Rejected(peer):
                    taken[peer] = 0.0
        # neighbours only (PeerDown forgets them): a model can arrive from a peer already gone
        self._taken.update({p: v for p, v in taken.items() if p in self._neighbours})
        return self._next_round(judged)

    def _next_round(self, judged: list[Action]) -> list[Action]:
        self._round += 1
        rest = self._cycle_started + self._config.period - self._now
        if rest > 0:
            self._phase = Phase.RESTING
            return [*judged, RoundDone(self._round), StartTimer(Timer.CYCLE, rest)]
        return [*judged, RoundDone(self._round), *self._train()]

    def _train(self) -> list[Action]:
        self._phase = Phase.TRAINING
        self._cycle_started = self._now
        return [Train(self._round, self._model)]
