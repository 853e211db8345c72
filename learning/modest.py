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

Messages: ``ping``/``pong`` {sel, round}, ``aggregated`` and ``trained`` {round, samples, view} +
model, ``advert`` {round, index, joined}.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from learning.averaging import incompatibility
from learning.integrators import Contribution, Integrator
from learning.protocol import (
    Action,
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
    is_count,
)

MAX_VIEW = 100_000  # entries accepted in a received view


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

    def __post_init__(self) -> None:
        if self.sample_size < 1 or self.aggregators < 1:
            raise ValueError("sample_size and aggregators must be at least 1")
        if not 0 < self.success_fraction <= 1:
            raise ValueError(f"success_fraction must be in (0, 1], got {self.success_fraction}")
        if min(self.ping_timeout, self.ping_interval, self.aggregation_timeout, self.watch_timeout) <= 0:
            raise ValueError("timeouts and intervals must be positive")

    @property
    def quorum(self) -> int:
        return max(1, math.ceil(self.sample_size * self.success_fraction - 1e-9))


@dataclass
class Entry:
    last_active: int = 0
    index: int = 0  # advertisement counter of the peer; only grows
    joined: bool = True


class View:
    """Who is in the swarm, merged by the rule of ALGORITHMS.md §1 (with the fix of commit 2d45f90)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def merge(self, other: Mapping[str, Entry]) -> None:
        for peer, theirs in other.items():
            mine = self.entries.get(peer)
            if mine is None:
                self.entries[peer] = Entry(theirs.last_active, theirs.index, theirs.joined)
                continue
            mine.last_active = max(mine.last_active, theirs.last_active)
            if theirs.index > mine.index:
                mine.index, mine.joined = theirs.index, theirs.joined

    def refresh(self, peer: str, round: int) -> None:
        entry = self.entries.setdefault(peer, Entry())
        entry.last_active = max(entry.last_active, round)

    def active(self, round: int, threshold: int, me: str) -> list[str]:
        """Peers that count for round ``round``: joined and active recently; always ``me``."""
        return [
            p for p, e in self.entries.items() if p == me or (e.joined and e.last_active >= round - threshold)
        ]

    def newest_round(self) -> int:
        return max((e.last_active for e in self.entries.values()), default=0)

    def to_wire(self) -> dict[str, list]:
        return {p: [e.last_active, e.index, e.joined] for p, e in self.entries.items()}

    @staticmethod
    def from_wire(data: object) -> dict[str, Entry]:
        """Parse a received view; raises ValueError with the reason if it is malformed."""
        if not isinstance(data, dict) or len(data) > MAX_VIEW:
            raise ValueError(f"view must be a map of at most {MAX_VIEW} peers")
        out = {}
        for peer, value in data.items():
            if not (isinstance(peer, str) and isinstance(value, list) and len(value) == 3):
                raise ValueError(f"view entry {peer!r} is not [last_active, index, joined]")
            last, index, joined = value
            if not (is_count(last) and is_count(index) and isinstance(joined, bool)):
                raise ValueError(f"view entry {peer!r} has bad values {value!r}")
            out[peer] = Entry(last, index, joined)
        return out


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
        self.view = View()  # connections do not change it: only MoDeST's own messages do
        self.view.merge({p: Entry() for p in [me, *peers]})
        self._model = model
        self._samples = samples
        self._integrator = integrator
        self._config = config
        self._rng = rng
        self._joining = joining
        self._now = 0.0
        self._model_round = 0
        self._train_round = 0
        self._training = False  # a Train action is out for _train_round
        self._agg_round = 0
        self._buffer: dict[str, Contribution] = {}
        self._handed_to: set[str] = set()  # aggregators that have our latest trained model
        self._aggregated = False  # aggregation of _agg_round done
        self._pending_joins: dict[str, Entry] = {}
        self._selections: dict[int, Selection] = {}
        self._next_selection = 0
        self._index = 0  # our own advertisement counter

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
            case Trained(tag, state) if tag == self._train_round and self._training:
                return self._on_trained(state)
            case TimerFired(name) if name.startswith("sel-"):
                return self._on_selection_timer(int(name[4:]))
            case TimerFired(name) if name == f"watch-{self._train_round + 1}" and self._stalled():
                return self._hand_over(self._train_round + 1)
            case TimerFired(name) if name == f"agg-{self._agg_round}" and not self._aggregated:
                return self._aggregate()
        return []

    # --- membership -------------------------------------------------------------------------

    def _start(self) -> list[Action]:
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
        body = {"round": self.estimate(), "index": self._index, "joined": joined}
        return [Send(p, "advert", body) for p in targets]

    def _apply_pending_joins(self) -> None:
        self.view.merge(self._pending_joins)
        self._pending_joins = {}

    # --- messages ---------------------------------------------------------------------------

    def _on_message(self, peer: str, kind: str, body: Mapping, tensors: Mapping) -> list[Action]:
        rnd = body.get("round")
        if not is_count(rnd):
            return [Rejected(peer, f"{kind} message needs a round >= 0, got {rnd!r}")]
        match kind:
            case "ping":
                self._seen(peer, rnd)
                return [Send(peer, "pong", {"sel": body.get("sel"), "round": self.estimate()})]
            case "pong":
                self._seen(peer, rnd)
                return self._on_pong(peer, body.get("sel"))
            case "advert":
                return self._on_advert(peer, rnd, body)
            case "aggregated" | "trained":
                return self._on_model(peer, kind, rnd, body, tensors)
        return [Rejected(peer, f"unknown message kind {kind!r}")]

    def _seen(self, peer: str, rnd: int) -> None:
        """A sign of life from ``peer``: its activity becomes at least max(its round, our estimate)."""
        self.view.refresh(peer, max(rnd, self.estimate()))

    def _on_advert(self, peer: str, rnd: int, body: Mapping) -> list[Action]:
        index, joined = body.get("index"), body.get("joined")
        if not (is_count(index) and isinstance(joined, bool)):
            return [Rejected(peer, "advert needs an index >= 0 and a joined flag")]
        entry = {peer: Entry(rnd, index, joined)}
        if joined:
            self._pending_joins.update(entry)  # applied after our next model send
        else:
            self.view.merge(entry)
        return []

    def _on_model(self, peer: str, kind: str, rnd: int, body: Mapping, tensors: Mapping) -> list[Action]:
        samples = body.get("samples")
        if not is_count(samples):
            return [Rejected(peer, f"{kind} message needs samples >= 0, got {samples!r}")]
        reason = incompatibility(self._model, tensors)
        if reason:
            return [Rejected(peer, f"model does not fit: {reason}")]
        try:
            view = View.from_wire(body.get("view", {}))
        except ValueError as exc:
            return [Rejected(peer, f"bad view: {exc}")]
        self.view.merge(view)
        self._seen(peer, rnd)
        if kind == "aggregated":
            return self._on_aggregated(rnd, dict(tensors))
        return self._on_trained_model(peer, rnd, Contribution(dict(tensors), samples, peer))

    # --- trainer ----------------------------------------------------------------------------

    def _on_aggregated(self, rnd: int, state: State) -> list[Action]:
        """A newer round's model replaces whatever we were training; later copies of a round are ignored."""
        return self._begin_training(rnd, state) if rnd > self._train_round else []

    def _begin_training(self, rnd: int, state: State) -> list[Action]:
        self._model, self._model_round = state, rnd
        self._train_round = rnd
        self._training = True
        return [Train(rnd, state)]

    def _on_trained(self, state: State) -> list[Action]:
        self._model = state
        self._training = False
        self._handed_to = set()
        return self._hand_over(self._train_round + 1)

    def _hand_over(self, nxt: int) -> list[Action]:
        """Send our trained model to the available aggregators of round ``nxt`` that do not have it yet,
        then watch: if no newer model reaches us in time, check them again (an aggregator may crash
        after it received the models, which would otherwise end training for everyone)."""
        body = {"round": nxt, "samples": self._samples}

        def send(aggregators: list[str]) -> list[Action]:
            new = [p for p in aggregators if p not in self._handed_to]
            self._handed_to.update(new)
            if not new:
                return []  # our aggregators are alive: the round is in their hands
            watch = StartTimer(f"watch-{nxt}", self._config.watch_timeout)
            return [*self._send_model("trained", new, body, self._model), watch]

        return self._select(nxt, self._config.aggregators, send)

    def _stalled(self) -> bool:
        """Trained and handed over, but no model of a newer round has reached us."""
        return not self._training and self._model_round <= self._train_round

    # --- aggregator -------------------------------------------------------------------------

    def _on_trained_model(self, peer: str, rnd: int, contribution: Contribution) -> list[Action]:
        if rnd > self._agg_round:
            self._agg_round, self._buffer, self._aggregated = rnd, {}, False
        if rnd != self._agg_round or self._aggregated:
            return []
        first = not self._buffer
        self._buffer[peer] = contribution
        if len(self._buffer) >= self._config.quorum:
            return self._aggregate()
        return [StartTimer(f"agg-{rnd}", self._config.aggregation_timeout)] if first else []

    def _aggregate(self) -> list[Action]:
        self._aggregated = True
        received = list(self._buffer.values())
        self._buffer = {}
        if len(received) == 1:
            model = received[0].state
        else:
            model = self._integrator.integrate(received[0], received[1:])
        rnd = self._agg_round
        self._model, self._model_round = model, rnd
        body = {"round": rnd, "samples": self._samples}
        sends = self._select(
            rnd, self._config.sample_size, lambda to: self._send_model("aggregated", to, body, model)
        )
        return [RoundDone(rnd), *sends]

    def _send_model(self, kind: str, peers: list[str], body: dict, state: State) -> list[Action]:
        self.view.refresh(self.me, self.estimate())
        full = {**body, "view": self.view.to_wire()}
        actions: list[Action] = [Send(p, kind, full, state) for p in peers if p != self.me]
        self._apply_pending_joins()
        if self.me in peers:  # we picked ourselves: hand it over locally
            rnd = body["round"]
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
            actions.append(StartTimer(f"sel-{sel.id}", self._config.ping_interval))
        return actions

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
                actions.append(Send(peer, "ping", {"sel": sel.id, "round": sel.round}))
        if not sel.pending and not sel.done:
            sel.done = True
            del self._selections[sel.id]
            actions += sel.then(sel.result())
        return actions

    def _on_pong(self, peer: str, sel_id: object) -> list[Action]:
        sel = self._selections.get(sel_id) if isinstance(sel_id, int) else None
        if sel is None or peer not in sel.pending:
            return []
        del sel.pending[peer]
        sel.chosen.add(peer)
        if len(sel.chosen) >= sel.wanted:
            sel.pending.clear()
        return self._fill(sel)

    def _unavailable(self, peer: str) -> list[Action]:
        actions: list[Action] = []
        for sel in list(self._selections.values()):
            if sel.pending.pop(peer, None) is not None:
                actions += self._fill(sel)
        return actions

    def _on_selection_timer(self, sel_id: int) -> list[Action]:
        sel = self._selections.get(sel_id)
        if sel is None:
            return []
        actions: list[Action] = []
        for peer, since in list(sel.pending.items()):
            if self._now - since >= self._config.ping_timeout:
                del sel.pending[peer]
            else:
                actions.append(Send(peer, "ping", {"sel": sel.id, "round": sel.round}))
        actions += self._fill(sel)
        if not sel.done:
            actions.append(StartTimer(f"sel-{sel.id}", self._config.ping_interval))
        return actions
