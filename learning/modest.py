"""MoDeST: decentralized sampling of trainers and aggregators, round by round, with no server.

de Vos et al., "MoDeST: Mostly-Consistent Decentralized Sampling Training" (arXiv 2302.13837 v1), as the
authors' code runs it (README, "MoDeST"). Round k: the aggregators of round k (the first ``a`` available
candidates of round k, ``learning.sampling``) send the round-k model to its trainers (the first ``s``
available); each trainer trains one local pass and sends the result, tagged k+1, to the aggregators of
round k+1; an aggregator aggregates once ``ceil(sf·s)`` models of its round arrived (or
``aggregation_timeout`` after the first, our default where the authors' code leaves the timeout unused)
and sends the result on. The members of the round-1 sample start by themselves.

Messages (``learning.messages``): ``ping``/``pong`` {sel, round}; ``aggregated`` and ``trained``
{round, samples} + model.

Departures from the paper, each for a hostile or failing peer (README, "Hostile peers"):

- **Members, not views.** The candidates are the members the overlay vouches for (:class:`Members`: on
  libp2p the peers whose own signed metadata record is current), not a view piggy-backed on models.
  The paper's views are hearsay: any peer could add entries, mark others as gone or shift who ranks
  first (measured: crafted views froze every node's round). A member that appears is sampled only after
  our next model send (the paper's JOIN rule); one that disappears (it left, or its record expired)
  drops out at once. The paper's inactivity threshold is the records' expiry. A member is sampled
  only once it has answered a ping of ours (``learning.sampling``): identities cost nothing, and a
  stream of members that never answer otherwise kept rounds waiting on ``ping_timeout``.
- **A window on rounds.** Our *own round* is the newest we trained or aggregated (a joiner's: the first
  above 0 it hears). Rounds a peer merely reports (ping, pong) are clamped to our own round +
  ``max_round_jump``; a model's round must lie within that window or the model is refused (taking it
  would move our round), without blame: a node that fell behind sees honest rounds as far ahead. Choose
  the window well above the rounds a node may go unsampled, about n/s. Residual risk: a liar that
  speaks first to a joiner places its window anywhere up to 2**53 - 1.
- **Roles checked against a sample we compute ourselves.** An ``aggregated`` model of round k is taken
  only from one of the first ``aggregators + role_slack`` candidates of round k by our members (members
  we know to be down skipped, as the sender's availability filter skipped them) and only if we are among
  its first ``sample_size + role_slack``; a ``trained`` model tagged k+1 only from one of the first
  ``sample_size + role_slack`` of round k, and only if we are among the first ``aggregators +
  role_slack`` of round k+1. The slack covers members still spreading and hand-overs to later
  candidates (below). A model refused by this check costs its sender nothing (it may know members we do
  not yet).
- **Models judged, not just counted.** An ``aggregated`` model replaces ours only if our anchor admits
  it (``learning.anchor``: not far worse on our own data than our recent start points, and not far
  from our model unless clearly better); one it refuses is credited 0 to its sender, and we train our
  own model for its round instead, so the round goes on without it at its usual pace. Only within
  the rounds a trainer goes unsampled (twice members / sample size): further ahead, a refused model
  moves nothing of ours, or a plausible aggregator of a far round could lead us away from the swarm.
  Residual risk: within that gap it moves our round, and our next model makes the aggregators we
  hand it to leave the round they were collecting. An aggregator that trained none of the round's
  models itself judges its aggregate the same way, and sends nothing rather than one it would refuse
  (all the round's models were poison).
  Aggregation is the node's integrator: by default clipping around the round's medoid
  (``learning.clipping``).
- **Rounds that go on.** A trainer whose hand-over has led to no newer model within ten of the swarm's
  rounds (as the models it took measured them; at least an honest aggregator's time-outs, at most
  ``watch_timeout``) hands its model to one more available candidate aggregator each time, up to
  ``role_slack`` more: an aggregator that crashed holding the round's models (with one aggregator,
  that once stopped training for good), refuses to aggregate or sends nothing costs the swarm at most
  that long per round it aggregates, and once per trainer: one whose round came to nothing, or whose
  model we refused, gets one more aggregator beside it in our later hand-overs. With ``aggregators``
  = 2 no round waits at all, at the cost of each trained model sent twice. Only a model counts as a
  sign the round went on: a round a peer merely reports could be a lie that keeps us waiting.

One module, over 400 lines, for one state machine: the trainer's and the aggregator's roles share the
round state (own round, window, members, suspects) that each of them reads and moves; the pieces that
stand alone are apart already (sampling in ``learning.sampling``, messages in ``learning.messages``,
judging models in ``learning.anchor`` and ``learning.clipping``).
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from shoal.learning.anchor import Anchor
from shoal.learning.integrators import Contribution, Integrator, integrate_contained
from shoal.learning.messages import MAX_ROUND, ModestModel, Ping, Pong, model_fault, quote
from shoal.learning.protocol import (
    Action,
    CancelTimer,
    Credited,
    Event,
    Members,
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
from shoal.learning.sampling import Sampler, order
from shoal.learning.sampling import Timer as SamplingTimer


@dataclass(frozen=True)
class ModestConfig:
    """Also the daemon's ``[protocol.modest]`` settings (``learning.settings``): the defaults are a
    daemon's, paced (the scenarios run MoDeST unpaced, as the paper does: ``period`` 0)."""

    sample_size: int = field(  # s
        default=10, metadata={"help": "trainers per round; keep it at most the swarm's size, or rounds wait"}
    )
    aggregators: int = field(default=1, metadata={"help": "aggregators per round"})  # a
    success_fraction: float = field(  # sf
        default=1.0, metadata={"help": "share of the sample's models an aggregator waits for ..."}
    )
    ping_timeout: float = 5.0
    ping_interval: float = 1.0
    aggregation_timeout: float = field(default=5.0, metadata={"help": "... or at most this many seconds"})
    watch_timeout: float = 20.0  # most seconds a hand-over may come to nothing (see Modest._watch)
    period: float = field(
        default=1.0,
        metadata={"help": "least seconds between the starts of two of this node's trainings", "flag": True},
    )
    max_round_jump: int = field(  # window: most rounds a peer's message may lie beyond our own round
        default=100,
        metadata={
            "group": 'every peer is a possible adversary (README, "Hostile peers"):',
            "help": "most rounds a peer's message may move this node's round ahead",
        },
    )
    role_slack: int = field(  # candidates beyond a (or s) still plausible in a role (module docstring)
        default=2,
        metadata={"help": "how far past the first a (or s) candidates a sender may rank in its role"},
    )
    max_norm_ratio: float = field(  # learning.messages
        default=10.0, metadata={"help": "models with a layer's L2 norm over this many times ours are refused"}
    )

    def __post_init__(self) -> None:
        for name in ("sample_size", "aggregators", "max_round_jump"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.success_fraction <= 1:
            raise ValueError(f"success_fraction must be in (0, 1], got {self.success_fraction}")
        for name in ("ping_timeout", "ping_interval", "aggregation_timeout", "watch_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"timeouts and intervals must be positive: {name} = {getattr(self, name)}")
        if self.role_slack < 0 or not self.period >= 0:
            raise ValueError(f"role_slack and period must not be negative: {self.role_slack}, {self.period}")
        if not self.max_norm_ratio >= 1:
            raise ValueError(f"max_norm_ratio must be at least 1, got {self.max_norm_ratio}")

    @property
    def quorum(self) -> int:
        return max(1, math.ceil(self.sample_size * self.success_fraction - 1e-9))


WATCH_ROUNDS = 10  # a hand-over may come to nothing for this many of the swarm's rounds


class Timer(enum.Enum):
    """The keys of MoDeST's own timers (the sampler's pings have theirs, ``learning.sampling``)."""

    WATCH = "watch"  # (WATCH, round): our hand-over of that round has not led to a newer model yet
    AGGREGATE = "aggregate"  # aggregate what came of our aggregation round (one at a time: replaced)
    PACE = "pace"  # start the training that waits for ``period`` to pass since our last one


class Trainer(enum.Enum):
    IDLE = "idle"  # no Train out: not sampled yet, or trained and handed over
    TRAINING = "training"  # a Train is out for our training round


class Aggregation(enum.Enum):
    COLLECTING = "collecting"  # buffering the trained models of our aggregation round
    DONE = "done"  # that round is aggregated: later models of it are ignored


class Modest:
    def __init__(
        self,
        me: str,
        peers: Iterable[str],
        model: State,
        samples: int,
        integrator: Integrator,
        config: ModestConfig,
        *,
        joining: bool = False,
        anchor: Anchor | None = None,
    ):
        """``peers``: the members known at the start (``Members`` events before ``Started`` replace
        them). ``anchor`` judges aggregated models before they replace ours; without one, all are taken."""
        self.me = me
        self.members: set[str] = {me, *peers}  # whom we sample from
        self._appeared: set[str] = set()  # new members, sampled from after our next model send
        self._down: set[str] = set()  # members we know to be down, until we hear from them again
        self._suspects: set[str] = set()  # members whose aggregation came to nothing or was refused
        self._took: tuple[int, float] | None = None  # the round and time of the last aggregate we took
        self._pace: deque[float] = deque(maxlen=10)  # seconds per round between the aggregates we took
        self._model = model
        self._samples = samples
        self._integrator = integrator
        self._config = config
        self._anchor = anchor
        self._joining = joining
        self._started = False
        self._now = 0.0
        self._model_round = 0
        self._train_round = 0
        self._trainer = Trainer.IDLE  # for _train_round
        self._agg_round = 0
        self._heard_round = 0  # the newest round a peer told us of, clamped to our window
        self._heard = not joining  # a joiner has no round of its own until it hears one
        self._joined_at = 0  # the first round a joiner heard
        self._buffer: dict[str, Contribution] = {}
        self._handed_to: set[str] = set()  # aggregators that have our latest trained model
        self._extra = (0, 0)  # (round, aggregators added to our hand-over of it by watch timeouts)
        self._aggregation = Aggregation.COLLECTING  # of _agg_round
        self._sampler = Sampler(me, config.ping_interval, config.ping_timeout)
        self._trained_at = -math.inf  # when our last training began (``period``)

    @property
    def model(self) -> State:
        return self._model

    @property
    def round(self) -> int:
        """The round of the model this node holds (what an observer should compare)."""
        return self._model_round

    def estimate(self) -> int:
        """The spec's round estimate: the newest round trained, aggregated or heard of."""
        return max(self._train_round, self._agg_round, self._heard_round)

    def _own_round(self) -> int:
        """The newest round we took part in (or a joiner first heard of): what the window is around."""
        return max(self._train_round, self._agg_round, self._joined_at)

    def _limit(self) -> int:
        """The newest round a peer may make us believe in."""
        if not self._heard:
            return MAX_ROUND
        return min(MAX_ROUND, self._own_round() + self._config.max_round_jump)

    def _hear(self, rnd: int) -> None:
        """A round a peer told us, clamped to our window; a joiner takes its first above 0 as its own."""
        if not self._heard and rnd > 0:
            self._heard, self._joined_at = True, rnd
        self._heard_round = max(self._heard_round, min(rnd, self._limit()))

    def handle(self, event: Event, now: float) -> list[Action]:
        self._now = now
        match event:
            case Started():
                return self._start()
            case Members(peers):
                return self._on_members(peers)
            case PeerUp(peer):
                self._down.discard(peer)
            case PeerDown(peer) | SendFailed(peer):
                if peer in self.members or peer in self._appeared:  # only members: ids cost nothing
                    self._down.add(peer)
                return self._sampler.unavailable(peer, now)
            case MessageIn(peer, kind, body, tensors):
                self._down.discard(peer)
                return self._on_message(peer, kind, body, tensors)
            case Trained(tag, state) if tag == self._train_round and self._trainer is Trainer.TRAINING:
                return self._on_trained(state)
            case TimerFired((SamplingTimer.PING, sel_id)):
                return self._sampler.on_timer(sel_id, now)
            # a hand-over's selection may end, and start its watch, after a newer model reached us: the
            # round in the key tells that watch from the current one
            case TimerFired((Timer.WATCH, rnd)) if rnd == self._train_round + 1 and self._stalled():
                return self._hand_over(rnd, escalate=True)
            case TimerFired(Timer.AGGREGATE) if self._aggregation is Aggregation.COLLECTING:
                return self._aggregate()
            case TimerFired(Timer.PACE) if self._trainer is Trainer.TRAINING:
                return self._train()
        return []

    # --- membership -------------------------------------------------------------------------

    def _start(self) -> list[Action]:
        self._started = True
        if self._joining:  # sampled once the members' next model sends take us in
            return self._sampler.probe(0, self.members, self._now)
        return self._sampler.probe(0, self.members, self._now, then=self._first_round)

    def _first_round(self) -> list[Action]:
        """Once the members answered or timed out: train round 1 if we are in its sample (and no
        round reached us meanwhile)."""
        if self._train_round or self._agg_round:
            return []
        if self.me in order(self.candidates(), 1)[: self._config.sample_size]:
            return self._begin_training(1, self._model)
        return []

    def _on_members(self, peers: frozenset[str]) -> list[Action]:
        if not self._started:  # the swarm as we find it: all of it sampled from at once
            self.members = {self.me, *peers}
            return []
        gone = self.members - peers - {self.me}
        self._appeared = set(peers) - self.members
        self.members -= gone
        self._down &= self.members | self._appeared
        self._suspects &= self.members
        self._sampler.keep(self.members | self._appeared)
        actions = self._sampler.probe(self.estimate(), self._appeared, self._now)
        for peer in gone:
            actions += self._sampler.unavailable(peer, self._now)
        return actions

    def candidates(self) -> set[str]:
        """Whom we sample from: members not known to be down that answered our pings
        (``learning.sampling``: a member that never answers costs no round anything)."""
        return self._available(self.members)

    def _available(self, peers: set[str]) -> set[str]:
        """Those of ``peers`` not known to be down that answered our pings, and us."""
        return {p for p in peers - self._down if self._sampler.usable(p)} | {self.me}

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, peer: str, kind: str, body: object, tensors: Mapping) -> list[Action]:
        match kind:
            case "ping":
                ping = Ping.parse(body)
                if isinstance(ping, str):
                    return [Rejected(peer, ping)]
                self._hear(ping.round)
                return [Send(peer, "pong", Pong(ping.sel, self.estimate()).body())]
            case "pong":
                pong = Pong.parse(body)
                if isinstance(pong, str):
                    return [Rejected(peer, pong)]
                self._hear(pong.round)
                return self._sampler.on_pong(peer, pong.sel, self._now)
            case "aggregated" | "trained":
                return self._on_model(peer, kind, body, tensors)
        return [Rejected(peer, f"unknown message kind {quote(kind)}")]

    def _on_model(self, peer: str, kind: str, body: object, tensors: Mapping) -> list[Action]:
        msg = ModestModel.parse(body, kind)
        if isinstance(msg, str):
            return [Rejected(peer, msg)]
        fault = model_fault(self._model, tensors, self._config.max_norm_ratio)
        if fault:
            reason, blame = fault
            return [Rejected(peer, reason, blame=blame)]
        if msg.round > self._limit():
            reason = (
                f"{kind} model of round {msg.round} is more than {self._config.max_round_jump} rounds "
                f"ahead of our round {self._own_round()}"
            )
            return [Rejected(peer, reason, blame=False)]  # or we fell behind: not proof of a lie
        implausible = self._implausible_role(peer, kind, msg.round)
        if implausible:
            return [Rejected(peer, implausible, blame=False)]  # or it knows members we do not yet
        self._hear(msg.round)
        if kind == "aggregated":
            return self._on_aggregated(peer, msg.round, dict(tensors))
        return self._on_trained_model(peer, msg.round, Contribution(dict(tensors), msg.samples, peer))

    def _implausible_role(self, peer: str, kind: str, k: int) -> str | None:
        """Why ``peer`` cannot be sending us this model, by the sample of round k that we compute from
        our own members (those appearing included, those we know to be down or never heard from
        skipped, as the sender's own pings skipped them)."""
        members = self.members | self._appeared
        known = self._available(members)
        if peer in members:
            known.add(peer)  # it is evidently up
        c = self._config

        def plausible(who: str, rnd: int, wanted: int) -> bool:
            return who in order(known, rnd)[: wanted + c.role_slack]

        if kind == "aggregated":
            if not plausible(peer, k, c.aggregators):
                return f"aggregated model of round {k} from a peer that is no plausible aggregator of it"
            if not plausible(self.me, k, c.sample_size):
                return f"aggregated model of round {k} sent to us, no plausible trainer of it"
        else:
            if not plausible(peer, k - 1, c.sample_size):
                return f"trained model tagged {k} from a peer that is no plausible trainer of round {k - 1}"
            if not plausible(self.me, k, c.aggregators):
                return f"trained model tagged {k} sent to us, no plausible aggregator of round {k}"
        return None

    # --- trainer ----------------------------------------------------------------------------

    def _on_aggregated(self, peer: str, rnd: int, state: State) -> list[Action]:
        """A newer round's model replaces whatever we were training, if our anchor admits it; later
        copies of a round are ignored."""
        if rnd <= self._train_round:
            return []
        if (
            peer == self.me
            or self._anchor is None
            or self._anchor.admits(state, self._model, rnd - self._model_round)
        ):
            self._suspects.discard(peer)
            if peer == self.me:
                return self._begin_training(rnd, state)
            if self._took is not None and rnd > self._took[0]:
                self._pace.append((self._now - self._took[1]) / (rnd - self._took[0]))
            self._took = (rnd, self._now)
            return [Credited(peer, 1.0), *self._begin_training(rnd, state)]
        self._suspects.add(peer)
        reason = f"aggregated model of round {rnd} not admitted by our anchor (learning.anchor)"
        refused: list[Action] = [Rejected(peer, reason, blame=False), Credited(peer, 0.0)]
        if rnd - self._train_round > self._gap():
            return refused  # further ahead than a trainer goes unsampled: no round of ours moves
        return [*refused, *self._begin_training(rnd, self._model)]  # the round goes on without it

    def _gap(self) -> int:
        """The most rounds a trainer goes unsampled, about twice members / sample size."""
        return max(2, math.ceil(2 * len(self.members) / self._config.sample_size))

    def _begin_training(self, rnd: int, state: State) -> list[Action]:
        """Train ``state`` for round ``rnd``, once ``period`` has passed since our last training began:
        unpaced, three daemons ran 33 rounds a second of a small model, most of the CPU and 60
        messages a second between two of them, for little more learning."""
        self._model, self._model_round = state, rnd
        self._train_round = rnd
        self._trainer = Trainer.TRAINING
        wait = self._trained_at + self._config.period - self._now
        return [StartTimer(Timer.PACE, wait)] if wait > 0 else self._train()

    def _train(self) -> list[Action]:
        self._trained_at = self._now
        return [Train(self._train_round, self._model)]

    def _on_trained(self, state: State) -> list[Action]:
        self._model = state
        self._trainer = Trainer.IDLE
        self._handed_to = set()
        return self._hand_over(self._train_round + 1)

    def _hand_over(self, nxt: int, *, escalate: bool = False) -> list[Action]:
        """Send our trained model to the available aggregators of round ``nxt`` that do not have it yet,
        then watch for a newer model. ``escalate`` (the watch ran out): if every aggregator we chose
        has it already and is alive, one more candidate gets it too, up to the slack receivers allow
        (an aggregator may have crashed holding the models, refuse to aggregate, or send nothing)."""

        def send(aggregators: list[str]) -> list[Action]:
            new = [p for p in aggregators if p not in self._handed_to]
            extra = self._added(nxt)
            if not new and escalate and extra < self._config.role_slack:
                # alive, holding our model, and nothing came of it
                self._suspects.update(p for p in aggregators if p != self.me)
                self._extra = (nxt, extra + 1)
                return self._hand_over(nxt)
            self._handed_to.update(new)
            watch = StartTimer((Timer.WATCH, nxt), self._watch())
            return [*self._send_model("trained", new, nxt, self._model), watch]

        return self._select(nxt, self._config.aggregators + self._added(nxt), send)

    def _watch(self) -> float:
        """How long a hand-over may come to nothing: WATCH_ROUNDS of the swarm's rounds as the models
        we took measured them (a fixed 20 s let each silent aggregator stall a simulated swarm of 0.3 s
        rounds for 60 rounds), at most ``watch_timeout``, and at least what an honest aggregator may
        take: its aggregation timeout and a ping time-out while it picks the trainers (shorter, the
        watch fired on honest rounds and sent models twice: 18% more bytes to the target, 60 nodes)."""
        c = self._config
        honest = c.aggregation_timeout + c.ping_timeout
        rounds = WATCH_ROUNDS * statistics.median(self._pace) if self._pace else c.watch_timeout
        return min(c.watch_timeout, max(honest, rounds))

    def _added(self, nxt: int) -> int:
        """Aggregators beyond ``aggregators`` our model of round ``nxt`` goes to: those watch timeouts
        added, and at least one for each suspect among the round's first candidates (an aggregator
        that let a round of ours come to nothing, or sent us a model we refused), so that a hostile
        aggregator stalls a round of ours at most once."""
        first = order(self.candidates(), nxt)[: self._config.aggregators]
        suspected = sum(1 for p in first if p in self._suspects)
        added = self._extra[1] if self._extra[0] == nxt else 0
        return min(max(added, suspected), self._config.role_slack)

    def _stalled(self) -> bool:
        """Trained and handed over, but no model of a newer round has reached us. Only a model counts:
        a round any peer merely reports could be a lie that keeps us waiting. A round that went on
        without us costs at most ``role_slack`` more hand-overs of one model."""
        return self._trainer is Trainer.IDLE and self._model_round <= self._train_round

    # --- aggregator -------------------------------------------------------------------------

    def _on_trained_model(self, peer: str, rnd: int, contribution: Contribution) -> list[Action]:
        if rnd > self._agg_round:
            self._agg_round, self._buffer, self._aggregation = rnd, {}, Aggregation.COLLECTING
        if rnd != self._agg_round or self._aggregation is Aggregation.DONE:
            return []
        first = not self._buffer
        self._buffer[peer] = contribution
        if len(self._buffer) >= self._config.quorum:
            return [*([] if first else [CancelTimer(Timer.AGGREGATE)]), *self._aggregate()]
        # the first model of a round starts its deadline, replacing an older round's
        return [StartTimer(Timer.AGGREGATE, self._config.aggregation_timeout)] if first else []

    def _aggregate(self) -> list[Action]:
        """The round's models through our integrator; our own trained model, when among them, is the
        trusted one a faulty contribution is told apart by (``integrate_contained``)."""
        self._aggregation = Aggregation.DONE
        mine = self._buffer.pop(self.me, None)
        received = [*([mine] if mine else []), *self._buffer.values()]
        self._buffer = {}
        model, judged = integrate_contained(self._integrator, received[0], received[1:], self.me)
        rnd = self._agg_round
        if (
            mine is None
            and self._anchor is not None
            and not self._anchor.admits(model, self._model, rnd - self._model_round)
        ):
            return judged  # the round's models were poison: nothing goes out
        self._model, self._model_round = model, rnd
        sends = self._select(
            rnd, self._config.sample_size, lambda to: self._send_model("aggregated", to, rnd, model)
        )
        return [*judged, RoundDone(rnd), *sends]

    def _send_model(self, kind: str, peers: list[str], rnd: int, state: State) -> list[Action]:
        body = ModestModel(rnd, self._samples).body()
        actions: list[Action] = [Send(p, kind, body, state) for p in peers if p != self.me]
        self.members |= self._appeared  # the JOIN rule: newcomers count from our next send on
        self._appeared = set()
        if self.me in peers:  # we picked ourselves: hand it over locally
            if kind == "aggregated":
                actions += self._on_aggregated(self.me, rnd, state)
            else:
                actions += self._on_trained_model(self.me, rnd, Contribution(state, self._samples))
        return actions

    def _select(self, rnd: int, wanted: int, then: Callable[[list[str]], list[Action]]) -> list[Action]:
        # members whose mute has passed are heard from again in the background, not in this selection
        probes = self._sampler.probe(rnd, self.members - self._down, self._now)
        candidates = order(self.candidates(), rnd)
        return [*probes, *self._sampler.select(rnd, wanted, candidates, then, self._now)]
