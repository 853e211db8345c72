"""MoDeST: decentralized sampling of trainers and aggregators, round by round, with no server.

de Vos et al., "MoDeST: Mostly-Consistent Decentralized Sampling Training" (arXiv 2302.13837 v1); the
steps follow the authors' code as specified in ../shared/ALGORITHMS.md §1.

Every node keeps a :class:`View` of the swarm (per peer: last active round, advertisement index,
JOIN/LEAVE) that rides along with every model. The candidates of round k are the active peers of the
view sorted by MD5(peer id ‖ "-" ‖ k) (:func:`order`); nodes with the same view compute the same list.
From it a node picks the first n *available* peers: it pings the first n in parallel, re-pings every
``ping_interval`` and replaces any that has not answered within ``ping_timeout`` by the next candidate
(:class:`Selection`); the node itself counts as available without a ping.

Round k: the aggregators of round k (first ``a`` available of O_k) send the round-k model to the
trainers of round k (first ``s`` available of O_k); each trainer trains one local pass and sends the
result, tagged k+1, to the aggregators of round k+1; an aggregator aggregates once ``ceil(sf·s)``
models of its round arrived (or ``aggregation_timeout`` after the first one, our default where the
authors' code leaves the timeout unused) and sends the result on. Our addition: a trainer that sees
no newer model within ``watch_timeout`` pings its aggregators again and hands its model to the next
available candidate if one has died (with one aggregator, its crash would otherwise stop training).
The members of the round-1 sample start by themselves. A joining node advertises JOIN to a few
peers, which apply it after their next model send, so a newcomer is sampled only once its JOIN has
spread; a leaving node advertises LEAVE, applied at once. Crashed nodes fail their pings and age
out after ``inactivity_threshold`` rounds.

Messages (``learning.messages``): ``ping``/``pong`` {sel, round}, ``aggregated`` and ``trained``
{round, samples, view} + model, ``advert`` {round, index, joined}.

Hostile peers (../shared/DESIGN.md principle 7): MoDeST reads rounds everywhere, so it bounds them all.
Every message is parsed with bounds and every model checked against ours (names, shapes, dtypes,
finite values, no layer over ``max_norm_ratio`` times ours), or refused with a reason. Then:

- **Window.** Our *own round* is the newest we trained or aggregated (for a joiner, see below). Rounds a
  peer merely reports (ping, pong, advert, and every view entry's last_active) are *clamped* to our own
  round + ``max_round_jump``: they are hearsay that an honest peer may pass on from a liar, so refusing
  them would let one liar get honest messages refused, while clamping caps what the lie can do. The
  round of a model (aggregated, trained) must lie within that window or the model is refused: taking it
  would move our own round. Hearsay never moves our own round, so no number of messages walks it up:
  the estimate stays within one window of rounds we took part in. Rounds behind ours are never refused
  (stale models are normal and are ignored as before). Choose the window well above the rounds a node
  may go unsampled, about n/s (the chance of a gap over w rounds is about exp(-w·s/n)): an honest node
  further behind refuses the model that would have brought it back.
- **Joiners.** A joining node has no round of its own: until it hears a first round above 0 it applies
  no window, and takes that first round as its own, so it can join a swarm at round 500. Residual risk:
  if a liar speaks to it first, it places the joiner's window anywhere up to 2**53 - 1, where an
  attacker that is also a plausible aggregator of a far round can then lead it away from the swarm.
- **Roles.** Derived from our view plus the peers the model's view adds (so a newcomer known to its
  sender is known to us; its entries for peers we know are not taken for this), with ``role_slack``
  extra candidates because availability filtering skips crashed peers and views differ slightly: an
  ``aggregated`` model of round k is taken only from one of the first ``aggregators + role_slack``
  candidates of round k, and only if we are among its first ``sample_size + role_slack``; a ``trained``
  model tagged k+1 only from one of the first ``sample_size + role_slack`` candidates of round k, and
  only if we are among the first ``aggregators + role_slack`` of round k+1. Residual risk: an attacker
  that really is a plausible aggregator (or trainer) of a round in the window can still send one bad
  model for it, within the norm bound, and MoDeST has no robust aggregation; by choosing such rounds it
  can also move the rounds of the nodes it reaches ahead by up to a window each time.
- **Blame and liveness.** A model refused only by the window or the role check is dropped without a
  penalty: an honest sender whose view holds fewer peers than ours (a join that has not reached it)
  ranks higher in its own view, and a node that fell behind sees honest rounds as far ahead. Since a
  refused model is never resent, a node that has neither begun training nor aggregated for
  ``watch_timeout`` takes a model the role check alone refuses (measured: three daemons joining at
  once with a slack of 1 otherwise stalled at round 2 for good). Residual risk: an attacker can make a
  node idle that long take one model per ``watch_timeout``, still within the window and norm bound.
  Statements about third peers in a view (a forged LEAVE with a higher index) are still believed:
  they need signatures.

Size: one state machine (view, availability selection, trainer, aggregator, the bounds on peers'
input) kept in one module because every part reads the same round state; the view and selection
could move out once a second sampling protocol needs them.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from shoal.learning.integrators import Contribution, Integrator, integrate_contained
from shoal.learning.messages import (
    MAX_ROUND,
    MAX_VIEW,
    Advert,
    Entry,
    ModestModel,
    Ping,
    Pong,
    model_fault,
    quote,
)
from shoal.learning.protocol import (
    Action,
    CancelTimer,
    Event,
    MessageIn,
    PeerDown,
    Rejected,
    RoundDone,
    Send,
    SendFailed,
    Started,
    StartTimer,
    State,
    Stopping,
    TimerFired,
    Train,
    Trained,
)


@dataclass(frozen=True)
class ModestConfig:
    sample_size: int = 10  # s
    aggregators: int = 1  # a
    success_fraction: float = 1.0  # sf
    ping_timeout: float = 5.0
    ping_interval: float = 1.0
    inactivity_threshold: int = 50
    aggregation_timeout: float = 5.0
    watch_timeout: float = 20.0  # a trainer re-checks its aggregators when nothing newer came by then
    max_round_jump: int = 100  # window: most rounds a peer's message may lie beyond our own round
    role_slack: int = 16  # candidates beyond a (or s) still plausible in a role (module docstring)
    max_norm_ratio: float = 10.0  # most a received layer's L2 norm may exceed ours (learning.messages)

    def __post_init__(self) -> None:
        for name in ("sample_size", "aggregators", "max_round_jump"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.success_fraction <= 1:
            raise ValueError(f"success_fraction must be in (0, 1], got {self.success_fraction}")
        for name in ("ping_timeout", "ping_interval", "aggregation_timeout", "watch_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"timeouts and intervals must be positive: {name} = {getattr(self, name)}")
        if self.role_slack < 0:
            raise ValueError(f"role_slack must not be negative, got {self.role_slack}")
        if not self.max_norm_ratio >= 1:
            raise ValueError(f"max_norm_ratio must be at least 1, got {self.max_norm_ratio}")

    @property
    def quorum(self) -> int:
        return max(1, math.ceil(self.sample_size * self.success_fraction - 1e-9))


class View:
    """Who is in the swarm, merged by the rule of ALGORITHMS.md §1 (with the fix of commit 2d45f90)."""

    def __init__(self, entries: Mapping[str, Entry] | None = None) -> None:
        self.entries: dict[str, Entry] = dict(entries or {})

    def merge(self, other: Mapping[str, Entry], limit: int = MAX_ROUND) -> None:
        """Take in ``other``, each last_active clamped to ``limit`` (our window)."""
        for peer, theirs in other.items():
            last = min(theirs.last_active, limit)
            mine = self.entries.get(peer)
            if mine is None:
                if len(self.entries) < MAX_VIEW:  # a full view takes no newcomers (views are never pruned)
                    self.entries[peer] = replace(theirs, last_active=last)
            elif theirs.index > mine.index:
                self.entries[peer] = Entry(max(mine.last_active, last), theirs.index, theirs.joined)
            elif last > mine.last_active:
                self.entries[peer] = replace(mine, last_active=last)

    def refresh(self, peer: str, round: int) -> None:
        entry = self.entries.get(peer)
        if entry is None and len(self.entries) >= MAX_VIEW:
            return
        entry = entry or Entry()
        self.entries[peer] = replace(entry, last_active=max(entry.last_active, round))

    def active(self, round: int, threshold: int, me: str) -> list[str]:
        """Peers that count for round ``round``: joined and active recently; always ``me``."""
        return [
            p for p, e in self.entries.items() if p == me or (e.joined and e.last_active >= round - threshold)
        ]

    def newest_round(self) -> int:
        return max((e.last_active for e in self.entries.values()), default=0)


class Timer(enum.Enum):
    """The keys of MoDeST's timers, each with what it is for, so none is told apart by parsing a name."""

    PING = "ping"  # (PING, selection id): ping that selection's silent candidates again
    WATCH = "watch"  # (WATCH, round): our hand-over of that round has not led to a newer model
    AGGREGATE = "aggregate"  # aggregate what came of our aggregation round (one at a time: replaced)


class Trainer(enum.Enum):
    IDLE = "idle"  # no Train out: not sampled yet, or trained and handed over
    TRAINING = "training"  # a Train is out for our training round


class Aggregation(enum.Enum):
    COLLECTING = "collecting"  # buffering the trained models of our aggregation round
    DONE = "done"  # that round is aggregated: later models of it are ignored


def order(peers: list[str], round: int) -> list[str]:
    """MoDeST's candidate order for a round: ascending MD5(peer ‖ "-" ‖ round)."""
    suffix = f"-{round}".encode()
    return sorted(peers, key=lambda p: hashlib.md5(p.encode() + suffix).digest())


@dataclass
class Selection:
    """Picking the first ``wanted`` available peers of a candidate list, by pings."""

    id: int
    round: int
    wanted: int
    candidates: list[str]
    then: Callable[[list[str]], list[Action]]
    next: int = 0
    pending: dict[str, float] = field(default_factory=dict)  # peer -> time of its first ping
    chosen: set[str] = field(default_factory=set)
    done: bool = False

    def result(self) -> list[str]:
        return [p for p in self.candidates if p in self.chosen]


class Modest:
    def __init__(
        self,
        me: str,
        peers: list[str],
        model: State,
        samples: int,
        integrator: Integrator,
        config: ModestConfig,
        rng: random.Random,
        *,
        joining: bool = False,
    ):
        self.me = me
        self.view = View({p: Entry() for p in [me, *peers]})  # only MoDeST's own messages change it
        self._model = model
        self._samples = samples
        self._integrator = integrator
        self._config = config
        self._rng = rng
        self._joining = joining
        self._now = 0.0
        self._model_round = 0
        self._train_round = 0
        self._trainer = Trainer.IDLE  # for _train_round
        self._agg_round = 0
        self._heard = not joining  # a joiner has no round of its own until it hears one
        self._joined_at = 0  # the first round a joiner heard
        self._buffer: dict[str, Contribution] = {}
        self._handed_to: set[str] = set()  # aggregators that have our latest trained model
        self._aggregation = Aggregation.COLLECTING  # of _agg_round
        self._pending_joins: dict[str, Entry] = {}
        self._selections: dict[int, Selection] = {}
        self._next_selection = 0
        self._index = 0  # our own advertisement counter
        self._progressed = 0.0  # when we started, last began training or aggregated (role check fallback)

    @property
    def model(self) -> State:
        return self._model

    @property
    def round(self) -> int:
        """The round of the model this node holds (what an observer should compare)."""
        return self._model_round

    def estimate(self) -> int:
        """The spec's round estimate: the newest round trained, aggregated or heard of."""
        return max(self._train_round, self._agg_round, self.view.newest_round())

    def _own_round(self) -> int:
        """The newest round we took part in (or a joiner first heard of): what the window is around."""
        return max(self._train_round, self._agg_round, self._joined_at)

    def _limit(self) -> int:
        """The newest round a peer may make us believe in."""
        if not self._heard:
            return MAX_ROUND
        return min(MAX_ROUND, self._own_round() + self._config.max_round_jump)

    def _hear(self, rnd: int) -> int:
        """A round a peer told us, clamped to our window; a joiner takes its first one above 0 as its own."""
        if not self._heard and rnd > 0:
            self._heard, self._joined_at = True, rnd
        return min(rnd, self._limit())

    def handle(self, event: Event, now: float) -> list[Action]:
        self._now = now
        match event:
            case Started():
                return self._start()
            case Stopping():
                self._index += 1
                return self._advertise(joined=False)
            case PeerDown(peer) | SendFailed(peer):
                return self._unavailable(peer)
            case MessageIn(peer, kind, body, tensors):
                return self._on_message(peer, kind, body, tensors)
            case Trained(tag, state) if tag == self._train_round and self._trainer is Trainer.TRAINING:
                return self._on_trained(state)
            case TimerFired((Timer.PING, sel_id)):
                return self._on_selection_timer(self._selections[sel_id])
            # a hand-over's selection may end, and start its watch, after a newer model reached us: the
            # round in the key tells that watch from the current one
            case TimerFired((Timer.WATCH, rnd)) if rnd == self._train_round + 1 and self._stalled():
                return self._hand_over(rnd)
            case TimerFired(Timer.AGGREGATE) if self._aggregation is Aggregation.COLLECTING:
                return self._aggregate()
        return []

    # --- membership -------------------------------------------------------------------------

    def _start(self) -> list[Action]:
        self._progressed = self._now
        if self._joining:
            self._index += 1
            return self._advertise(joined=True)
        sample = order(self.view.active(1, self._config.inactivity_threshold, self.me), 1)
        if self.me in sample[: self._config.sample_size]:
            return self._begin_training(1, self._model)
        return []

    def _advertise(self, *, joined: bool) -> list[Action]:
        others = [p for p in self.view.entries if p != self.me]
        targets = self._rng.sample(others, min(self._config.sample_size, len(others)))
        body = Advert(self.estimate(), self._index, joined).body()
        return [Send(p, "advert", body) for p in targets]

    def _apply_pending_joins(self) -> None:
        self.view.merge(self._pending_joins)
        self._pending_joins = {}

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, peer: str, kind: str, body: object, tensors: Mapping) -> list[Action]:
        match kind:
            case "ping":
                ping = Ping.parse(body)
                if isinstance(ping, str):
                    return [Rejected(peer, ping)]
                self._seen(peer, self._hear(ping.round))
                return [Send(peer, "pong", Pong(ping.sel, self.estimate()).body())]
            case "pong":
                pong = Pong.parse(body)
                if isinstance(pong, str):
                    return [Rejected(peer, pong)]
                self._seen(peer, self._hear(pong.round))
                return self._on_pong(peer, pong.sel)
            case "advert":
                advert = Advert.parse(body)
                if isinstance(advert, str):
                    return [Rejected(peer, advert)]
                return self._on_advert(peer, advert)
            case "aggregated" | "trained":
                return self._on_model(peer, kind, body, tensors)
        return [Rejected(peer, f"unknown message kind {quote(kind)}")]

    def _seen(self, peer: str, rnd: int) -> None:
        """A sign of life from ``peer``: its activity becomes at least max(its round, our estimate)."""
        self.view.refresh(peer, max(rnd, self.estimate()))

    def _on_advert(self, peer: str, advert: Advert) -> list[Action]:
        entry = {peer: Entry(self._hear(advert.round), advert.index, advert.joined)}
        if advert.joined:
            self._pending_joins.update(entry)  # applied after our next model send
        else:
            self.view.merge(entry)
        return []

    def _on_model(self, peer: str, kind: str, body: object, tensors: Mapping) -> list[Action]:
        msg = ModestModel.parse(body, kind)
        if isinstance(msg, str):
            return [Rejected(peer, msg)]
        fault = model_fault(self._model, tensors, self._config.max_norm_ratio)
        if fault:
            return [Rejected(peer, fault)]
        if msg.round > self._limit():
            reason = (
                f"{kind} model of round {msg.round} is more than {self._config.max_round_jump} rounds "
                f"ahead of our round {self._own_round()}"
            )
            return [Rejected(peer, reason, blame=False)]  # or we fell behind: not proof of a lie
        implausible = self._implausible_role(peer, kind, msg)
        if implausible and self._now - self._progressed < self._config.watch_timeout:
            return [Rejected(peer, implausible, blame=False)]  # or its view is ahead of ours
        self._hear(msg.round)
        self.view.merge(msg.view, self._limit())
        self._seen(peer, msg.round)
        if kind == "aggregated":
            return self._on_aggregated(msg.round, dict(tensors))
        return self._on_trained_model(peer, msg.round, Contribution(dict(tensors), msg.samples, peer))

    def _implausible_role(self, peer: str, kind: str, msg: ModestModel) -> str | None:
        """Why ``peer`` cannot be sending us this model, by the roles of our view plus what its view adds:
        newcomers and newer activity, never a status change of a peer we know (a LEAVE with a higher
        index for every honest peer would let it rank itself first; more active peers only rank it lower)."""
        known = self.view.entries
        view = View(known)
        view.merge(
            {
                p: Entry(e.last_active, known[p].index, known[p].joined) if p in known else e
                for p, e in msg.view.items()
            },
            self._limit(),
        )
        c = self._config

        def plausible(who: str, rnd: int, wanted: int) -> bool:
            candidates = order(view.active(rnd, c.inactivity_threshold, self.me), rnd)
            return who in candidates[: wanted + c.role_slack]

        k = msg.round
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

    def _on_aggregated(self, rnd: int, state: State) -> list[Action]:
        """A newer round's model replaces whatever we were training; later copies of a round are ignored."""
        return self._begin_training(rnd, state) if rnd > self._train_round else []

    def _begin_training(self, rnd: int, state: State) -> list[Action]:
        self._progressed = self._now
        self._model, self._model_round = state, rnd
        self._train_round = rnd
        self._trainer = Trainer.TRAINING
        return [Train(rnd, state)]

    def _on_trained(self, state: State) -> list[Action]:
        self._model = state
        self._trainer = Trainer.IDLE
        self._handed_to = set()
        return self._hand_over(self._train_round + 1)

    def _hand_over(self, nxt: int) -> list[Action]:
        """Send our trained model to the available aggregators of round ``nxt`` that do not have it yet,
        then watch: if no newer model reaches us in time, check them again (an aggregator may crash
        after it received the models, which would otherwise end training for everyone)."""

        def send(aggregators: list[str]) -> list[Action]:
            new = [p for p in aggregators if p not in self._handed_to]
            self._handed_to.update(new)
            if not new:
                return []  # our aggregators are alive: the round is in their hands
            watch = StartTimer((Timer.WATCH, nxt), self._config.watch_timeout)
            return [*self._send_model("trained", new, nxt, self._model), watch]

        return self._select(nxt, self._config.aggregators, send)

    def _stalled(self) -> bool:
        """Trained and handed over, but no model of a newer round has reached us."""
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
        """FedAvg of the buffer; our own trained model, when in it, is the trusted one a faulty
        contribution is told apart by (``integrate_contained``)."""
        self._progressed = self._now
        self._aggregation = Aggregation.DONE
        mine = self._buffer.pop(self.me, None)
        received = [*([mine] if mine else []), *self._buffer.values()]
        self._buffer = {}
        model, rejected = integrate_contained(self._integrator, received[0], received[1:])
        rnd = self._agg_round
        self._model, self._model_round = model, rnd
        sends = self._select(
            rnd, self._config.sample_size, lambda to: self._send_model("aggregated", to, rnd, model)
        )
        return [*rejected, RoundDone(rnd), *sends]

    def _send_model(self, kind: str, peers: list[str], rnd: int, state: State) -> list[Action]:
        self.view.refresh(self.me, self.estimate())
        body = ModestModel(rnd, self._samples, self.view.entries).body()
        actions: list[Action] = [Send(p, kind, body, state) for p in peers if p != self.me]
        self._apply_pending_joins()
        if self.me in peers:  # we picked ourselves: hand it over locally
            if kind == "aggregated":
                actions += self._on_aggregated(rnd, state)
            else:
                actions += self._on_trained_model(self.me, rnd, Contribution(state, self._samples, self.me))
        return actions

    # --- availability -----------------------------------------------------------------------

    def _select(self, rnd: int, wanted: int, then: Callable[[list[str]], list[Action]]) -> list[Action]:
        candidates = order(self.view.active(rnd, self._config.inactivity_threshold, self.me), rnd)
        sel = Selection(self._next_selection, rnd, wanted, candidates, then)
        self._next_selection += 1
        self._selections[sel.id] = sel
        actions = self._fill(sel)
        if not sel.done:
            actions.append(self._ping_timer(sel))
        return actions

    def _ping_timer(self, sel: Selection) -> StartTimer:
        return StartTimer((Timer.PING, sel.id), self._config.ping_interval)

    def _refill(self, sel: Selection) -> list[Action]:
        """:meth:`_fill` a selection under way; its timer ends with it."""
        actions = self._fill(sel)
        return [*actions, CancelTimer((Timer.PING, sel.id))] if sel.done else actions

    def _fill(self, sel: Selection) -> list[Action]:
        """Ping candidates until enough are chosen or pending; finish when nothing is left to wait for."""
        actions: list[Action] = []
        while len(sel.chosen) + len(sel.pending) < sel.wanted and sel.next < len(sel.candidates):
            peer = sel.candidates[sel.next]
            sel.next += 1
            if peer == self.me:
                sel.chosen.add(peer)
            else:
                sel.pending[peer] = self._now
                actions.append(Send(peer, "ping", Ping(sel.id, sel.round).body()))
        if not sel.pending and not sel.done:
            sel.done = True
            del self._selections[sel.id]
            actions += sel.then(sel.result())
        return actions

    def _on_pong(self, peer: str, sel_id: int) -> list[Action]:
        sel = self._selections.get(sel_id)
        if sel is None or peer not in sel.pending:
            return []
        del sel.pending[peer]
        sel.chosen.add(peer)
        if len(sel.chosen) >= sel.wanted:
            sel.pending.clear()
        return self._refill(sel)

    def _unavailable(self, peer: str) -> list[Action]:
        actions: list[Action] = []
        for sel in list(self._selections.values()):
            if sel.pending.pop(peer, None) is not None:
                actions += self._refill(sel)
        return actions

    def _on_selection_timer(self, sel: Selection) -> list[Action]:
        actions: list[Action] = []
        for peer, since in list(sel.pending.items()):
            if self._now - since >= self._config.ping_timeout:
                del sel.pending[peer]
            else:
                actions.append(Send(peer, "ping", Ping(sel.id, sel.round).body()))
        actions += self._fill(sel)
        if not sel.done:
            actions.append(self._ping_timer(sel))
        return actions
