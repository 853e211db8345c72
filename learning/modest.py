"""MoDeST: decentralized sampling of trainers and aggregators, round by round, with no server.

de Vos et al., "MoDeST: Mostly-Consistent Decentralized Sampling Training" (arXiv 2302.13837 v1), as the
authors' code runs it (docs/protocols.md). Round k: the aggregators of round k (the first ``a`` available
candidates of round k, ``learning.sampling``) send the round-k model to its trainers (the first ``s``
available); each trainer trains one local pass and sends the result, tagged k+1, to the aggregators of
round k+1; an aggregator aggregates once ``ceil(sf·s)`` models of its round arrived (or
``aggregation_timeout`` after the first, our default where the authors' code leaves the timeout unused)
and sends the result on. The members of the round-1 sample start by themselves.

The round state machine (sans-IO, ``learning.protocol``): a node's trainer and aggregator roles and the
round state they share. In: events, with :class:`Ping`/:class:`Pong` (sel, round),
:class:`AggregatedModel` and :class:`TrainedModel` (round, samples, model) of ``learning.messages``
(another protocol's message is refused, blamed); out: actions. Settings: ``learning.modest_config``.
Departures from the paper, each for a hostile or failing peer (docs/security.md); members, not
views, and roles checked against a sample we compute ourselves are ``learning.modest_view``'s:

- **A window on rounds.** Our *own round* is the newest we trained or aggregated (a joiner's: the first
  above 0 it hears). Rounds a peer merely reports (ping, pong) are clamped to our own round +
  ``max_round_jump``; a model's round must lie within that window or the model is refused (taking it
  would move our round), without blame: a node that fell behind sees honest rounds as far ahead. Choose
  the window well above the rounds a node may go unsampled, about n/s. Residual risk: a liar that
  speaks first to a joiner places its window anywhere up to 2**53 - 1.
- **Models judged, not just counted.** An aggregated model replaces ours only if our anchor admits it
  (``learning.anchor``: not far worse on our own data than our recent start points, and not far from our
  model unless clearly better); one it refuses is credited 0 to its sender, and we train our own model
  for its round instead, so the round goes on without it at its usual pace. Only within the rounds a
  trainer goes unsampled (twice members / sample size): further ahead, a refused model moves nothing of
  ours, or a plausible aggregator of a far round could lead us away from the swarm. Residual risk:
  within that gap it moves our round, and our next model makes the aggregators we hand it to leave the
  round they were collecting. An aggregator that trained none of the round's models itself judges its
  aggregate the same way, and sends nothing rather than one it would refuse (all the round's models were
  poison). Aggregation is the node's integrator: by default clipping around the round's medoid
  (``learning.clipping``).
- **Rounds that go on.** A trainer whose hand-over has led to no newer model within ten of the swarm's
  rounds (as the models it took measured them; at least an honest aggregator's time-outs, at most
  ``watch_timeout``) hands its model to one more available candidate aggregator each time, up to
  ``role_slack`` more: an aggregator that crashed holding the round's models, refuses to aggregate or
  sends nothing costs the swarm at most that long per round it aggregates, and once per trainer: one
  whose round came to nothing, or whose model we refused, gets one more aggregator beside it in our
  later hand-overs. With ``aggregators`` = 2 no round waits at all, at the cost of each trained model
  sent twice. Only a model counts as a sign the round went on: a round a peer merely reports could be a
  lie that keeps us waiting; a joiner in a swarm where no round goes on starts by itself
  (:meth:`Modest._join_alone`).

One module, past 400 lines, because it is one state machine: the trainer and aggregator roles share
the round state and each event's transition reads both; the sampling, the view and the settings are
their own modules already.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import deque
from collections.abc import Iterable

from shoal.learning.anchor import Anchor
from shoal.learning.integrators import Contribution, Integrator, integrate_contained
from shoal.learning.messages import (
    MAX_ROUND,
    AggregatedModel,
    PeerMessage,
    Ping,
    Pong,
    TrainedModel,
    model_fault,
)
from shoal.learning.modest_config import ModestConfig
from shoal.learning.modest_view import View
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
from shoal.learning.sampling import Timer as SamplingTimer
from shoal.learning.sampling import order

WATCH_ROUNDS = 10  # a hand-over may come to nothing for this many of the swarm's rounds


class Timer(enum.Enum):
    """The keys of MoDeST's own timers (the sampler's pings have theirs, ``learning.sampling``)."""

    WATCH = "watch"  # (WATCH, round): our hand-over of that round has not led to a newer model yet
    AGGREGATE = "aggregate"  # aggregate what came of our aggregation round (one at a time: replaced)
    PACE = "pace"  # start the training that waits for ``period`` to pass since our last one
    JOIN = "join"  # a joiner no round has reached yet starts by itself if it is in the sample


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
        self.view = View(me, peers, config)  # whom we sample from, and whom we take models from
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
        self._waited_at = 0  # a joiner's round estimate when its JOIN timer was last set
        self._buffer: dict[str, Contribution] = {}
        self._handed_to: set[str] = set()  # aggregators that have our latest trained model
        self._extra = (0, 0)  # (round, aggregators added to our hand-over of it by watch timeouts)
        self._aggregation = Aggregation.COLLECTING  # of _agg_round
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
            case Members(peers) if not self._started:
                self.view.found(peers)
            case Members(peers):
                return self.view.on_members(peers, self.estimate(), now)
            case PeerUp(peer):
                self.view.down.discard(peer)
            case PeerDown(peer) | SendFailed(peer):
                return self.view.unavailable(peer, now)
            case MessageIn(peer, msg):
                self.view.down.discard(peer)
                return self._on_message(peer, msg)
            case Trained(tag, state) if tag == self._train_round and self._trainer is Trainer.TRAINING:
                return self._on_trained(state)
            case TimerFired((SamplingTimer.PING, sel_id)):
                return self.view.sampler.on_timer(sel_id, now)
            # a hand-over's selection may end, and start its watch, after a newer model reached us: the
            # round in the key tells that watch from the current one
            case TimerFired((Timer.WATCH, rnd)) if rnd == self._train_round + 1 and self._stalled():
                return self._hand_over(rnd, escalate=True)
            case TimerFired(Timer.AGGREGATE) if self._aggregation is Aggregation.COLLECTING:
                return self._aggregate()
            case TimerFired(Timer.PACE) if self._trainer is Trainer.TRAINING:
                return self._train()
            case TimerFired(Timer.JOIN) if not (self._train_round or self._agg_round):
                return self._join_alone()
        return []

    def _start(self) -> list[Action]:
        self._started = True
        if self._joining:  # sampled once the members' next model sends take us in
            return [*self.view.sampler.probe(0, self.view.members, self._now), *self._join_alone()]
        return self.view.sampler.probe(0, self.view.members, self._now, then=self._first_round)

    def _first_round(self) -> list[Action]:
        """Once the members answered or timed out: train round 1 if we are in its sample (and no
        round reached us meanwhile)."""
        if self._train_round or self._agg_round:
            return []
        return self._begin_training(1, self._model) if self._sampled(1) else []

    def _join_alone(self) -> list[Action]:
        """A joiner's check, at its start and every ``watch_timeout`` while no round has reached it. If
        no round we heard of went on since the last check either, the swarm may have stalled on its
        joiners, who refuse the last trainer's model when it ranks too low in the sample they compute
        from more members than it knew: we train the newest round we heard of if we are in its sample,
        as round 1's members start. Else we look again later (rounds that go on reach us in time)."""
        rnd = max(1, self.estimate())
        if rnd == self._waited_at and self._sampled(rnd):
            return self._begin_training(rnd, self._model)
        self._waited_at = rnd
        return [StartTimer(Timer.JOIN, self._config.watch_timeout)]

    def _sampled(self, rnd: int) -> bool:
        return self.me in order(self.view.candidates(), rnd)[: self._config.sample_size]

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, peer: str, msg: PeerMessage) -> list[Action]:
        match msg:
            case Ping():
                self._hear(msg.round)
                return [Send(peer, Pong(msg.sel, self.estimate()))]
            case Pong():
                self._hear(msg.round)
                return self.view.sampler.on_pong(peer, msg.sel, self._now)
            case AggregatedModel() | TrainedModel():
                return self._on_model(peer, msg)
        return [Rejected(peer, f"{msg.KIND} is not a MoDeST message")]

    def _on_model(self, peer: str, msg: AggregatedModel | TrainedModel) -> list[Action]:
        fault = model_fault(self._model, msg.state, self._config.max_norm_ratio)
        if fault:
            reason, blame = fault
            return [Rejected(peer, reason, blame=blame)]
        if msg.round > self._limit():
            reason = (
                f"{msg.KIND} model of round {msg.round} is more than {self._config.max_round_jump} rounds "
                f"ahead of our round {self._own_round()}"
            )
            return [Rejected(peer, reason, blame=False)]  # or we fell behind: not proof of a lie
        implausible = self.view.implausible_role(peer, msg)
        if implausible:
            return [Rejected(peer, implausible, blame=False)]  # or it knows members we do not yet
        self._hear(msg.round)
        if isinstance(msg, AggregatedModel):
            return self._on_aggregated(peer, msg.round, msg.state)
        return self._on_trained_model(peer, msg.round, Contribution(msg.state, msg.samples, peer))

    # --- trainer ----------------------------------------------------------------------------

    def _on_aggregated(self, peer: str, rnd: int, state: State) -> list[Action]:
        """A newer round's model replaces whatever we were training, if our anchor admits it; later
        copies of a round are ignored. Holding that round's model, we are done with the round as its
        aggregator is: the node evaluates and checkpoints what it holds, not only what it aggregated."""
        if rnd <= self._train_round:
            return []
        if (
            peer == self.me
            or self._anchor is None
            or self._anchor.admits(state, self._model, rnd - self._model_round)
        ):
            self.view.suspects.discard(peer)
            if peer == self.me:
                return self._begin_training(rnd, state)
            if self._took is not None and rnd > self._took[0]:
                self._pace.append((self._now - self._took[1]) / (rnd - self._took[0]))
            self._took = (rnd, self._now)
            return [Credited(peer, 1.0), RoundDone(rnd), *self._begin_training(rnd, state)]
        self.view.suspects.add(peer)
        reason = f"aggregated model of round {rnd} not admitted by our anchor (learning.anchor)"
        refused: list[Action] = [Rejected(peer, reason, blame=False), Credited(peer, 0.0)]
        if rnd - self._train_round > self._gap():
            return refused  # further ahead than a trainer goes unsampled: no round of ours moves
        return [*refused, *self._begin_training(rnd, self._model)]  # the round goes on without it

    def _gap(self) -> int:
        """The most rounds a trainer goes unsampled, about twice members / sample size."""
        return max(2, math.ceil(2 * len(self.view.members) / self._config.sample_size))

    def _begin_training(self, rnd: int, state: State) -> list[Action]:
        """Train ``state`` for round ``rnd``, once ``period`` has passed since our last training began:
        unpaced, daemons spend their CPU and links on many more rounds for little more learning."""
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
                self.view.suspects.update(p for p in aggregators if p != self.me)
                self._extra = (nxt, extra + 1)
                return self._hand_over(nxt)
            self._handed_to.update(new)
            watch = StartTimer((Timer.WATCH, nxt), self._watch())
            return [*self._send_model(TrainedModel(nxt, self._samples, self._model), new), watch]

        return self.view.select(nxt, self._config.aggregators + self._added(nxt), send, self._now)

    def _watch(self) -> float:
        """How long a hand-over may come to nothing: WATCH_ROUNDS of the swarm's rounds as the models
        we took measured them (a fixed time lets each silent aggregator stall a swarm of short rounds
        for many rounds), at most ``watch_timeout``, and at least what an honest aggregator may take:
        its aggregation timeout and a ping time-out while it picks the trainers (shorter, the watch
        fires on honest rounds and sends models twice)."""
        c = self._config
        honest = c.aggregation_timeout + c.ping_timeout
        rounds = WATCH_ROUNDS * statistics.median(self._pace) if self._pace else c.watch_timeout
        return min(c.watch_timeout, max(honest, rounds))

    def _added(self, nxt: int) -> int:
        """Aggregators beyond ``aggregators`` our model of round ``nxt`` goes to: those watch timeouts
        added, and at least one for each suspect among the round's first candidates (an aggregator
        that let a round of ours come to nothing, or sent us a model we refused), so that a hostile
        aggregator stalls a round of ours at most once."""
        first = order(self.view.candidates(), nxt)[: self._config.aggregators]
        suspected = sum(1 for p in first if p in self.view.suspects)
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
        msg = AggregatedModel(rnd, self._samples, model)
        sends = self.view.select(
            rnd, self._config.sample_size, lambda to: self._send_model(msg, to), self._now
        )
        return [*judged, RoundDone(rnd), *sends]

    def _send_model(self, msg: AggregatedModel | TrainedModel, peers: list[str]) -> list[Action]:
        actions: list[Action] = [Send(p, msg) for p in peers if p != self.me]
        self.view.join()  # newcomers count from our next send on
        if self.me in peers:  # we picked ourselves: hand it over locally
            if isinstance(msg, AggregatedModel):
                actions += self._on_aggregated(self.me, msg.round, msg.state)
            else:
                actions += self._on_trained_model(self.me, msg.round, Contribution(msg.state, self._samples))
        return actions
