"""Hostile peers: well-formed messages with hostile values, sent by a share of a swarm's nodes.

:class:`Hostile` is a sans-IO :class:`~learning.protocol.LearningProtocol` like gossip and MoDeST, so
the engine runs it through the node's own driver (``with_hostile`` places it on some nodes) and an
attacker process can run it through ``node.driver.Driver`` on the libp2p overlay. It never trains and
never answers pings (to MoDeST it looks crashed); every ``period`` seconds it sends each variant of each
of its attack modes to one of its neighbours, the next one for the next variant, so over a few cycles
every neighbour receives every variant. Every message is encodable: the wire would refuse the rest
before any protocol saw it.

Modes (``ATTACKS``):
- ``huge``: models with the right names, shapes and dtypes and every value 1e30 (finite);
- ``far-rounds``: rounds of 2**63, 2**53 and our estimate of the swarm's round + 10**6, in every field
  that carries one (MoDeST: ping, pong, aggregated, trained), with the newest model received as
  payload so that only the round is wrong; MoDeST models also carry a crafted view (the field of an
  earlier release that ranked whom it named, the sender first) and an earlier release's JOIN advert;
- ``hijack`` (MoDeST only: gossip has no roles): aggregated and trained models with random weights of
  the template's scale, for far-future rounds and for rounds within the window where this node is no
  plausible aggregator (or trainer) by the rule of ``learning/modest.py``;
- ``garbage``: wrong types, negative and oversized counts, bad labels, wrong names, shapes and dtypes,
  NaN, unknown kinds.

The estimate of the swarm's round comes from messages that hostile nodes do not send with plausible
rounds (gossip ``model``, MoDeST ``ping``), taken only within ``max_round_jump`` of the last one: the
honest swarm moves it, other attackers cannot.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shoal.learning.messages import (
    MAX_LABELS,
    MAX_ROUND,
    MODELS,
    AggregatedModel,
    GossipModel,
    PeerMessage,
    Ping,
    Pong,
    TrainedModel,
)
from shoal.learning.modest import ModestConfig
from shoal.learning.node import LearningNode
from shoal.learning.protocol import (
    Action,
    Event,
    MessageIn,
    PeerDown,
    PeerUp,
    Send,
    Started,
    StartTimer,
    State,
    TimerFired,
)
from shoal.learning.sampling import order
from shoal.simulations.engine import ProtocolFactory, Simulation, node_name

ATTACKS = ("huge", "far-rounds", "hijack", "garbage")
PROTOCOLS = ("gossip", "modest")
HUGE = 1e30
FAR_ROUNDS = (2**63, 2**53)
FAR_AHEAD = 10**6

Body = dict
Variant = tuple[str, Body, State]  # kind, body, tensors
MODEL, PING, PONG = GossipModel.KIND, Ping.KIND, Pong.KIND
AGGREGATED, TRAINED = AggregatedModel.KIND, TrainedModel.KIND


@dataclass(frozen=True)
class Raw:
    """A variant as it goes on the wire, written past the bounds of ``learning.messages`` on purpose (the
    receiver's driver applies them). Not a message class: ``Send`` carries it all the same, since the
    driver reads only a message's ``KIND``, ``body()`` and ``tensors``."""

    KIND: str
    raw: Body
    tensors: State

    def body(self) -> Body:
        return self.raw


class Timer(enum.Enum):
    ATTACK = "attack"  # the next cycle of attacks


class Hostile:
    def __init__(
        self,
        me: str,
        peers: Sequence[str],
        model: State,
        protocol: str,
        attacks: Sequence[str],
        rng: random.Random,
        *,
        period: float = 1.0,
        config: ModestConfig | None = None,
    ):
        """``model`` is a template of the task's model (names, shapes, dtypes, scale); ``peers`` the
        neighbours known at the start (more arrive as PeerUp); ``config`` the MoDeST settings its
        victims use, to pick rounds where it is no plausible aggregator."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
        if unknown := set(attacks) - set(ATTACKS):
            raise ValueError(f"unknown attack(s) {sorted(unknown)}: use {', '.join(ATTACKS)}")
        if protocol == "gossip" and "hijack" in attacks:
            raise ValueError("hijack needs MoDeST's roles; gossip has none")
        if period <= 0:
            raise ValueError(f"period must be positive, got {period}")
        self.me = me
        self._everyone = sorted({me, *peers})  # MoDeST's candidates, as the victims' members hold them
        self._neighbours = dict.fromkeys(p for p in peers if p != me)
        self._template = model
        self._payload = model  # the newest model received: an honest-looking load for wrong rounds
        self._protocol = protocol
        self._attacks = list(attacks)
        self._rng = rng
        self._gen = torch.Generator().manual_seed(rng.randrange(2**31))
        self._period = period
        self._config = config or ModestConfig()
        self._estimate = 0
        self._next_peer = 0

    @property
    def model(self) -> State:
        return self._template

    @property
    def round(self) -> int:
        return self._estimate

    def handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case Started():
                return [StartTimer(Timer.ATTACK, self._period)]
            case PeerUp(peer):
                self._neighbours[peer] = None
            case PeerDown(peer):
                self._neighbours.pop(peer, None)
            case MessageIn(_, msg):
                self._observe(msg)
            case TimerFired(Timer.ATTACK):
                return [*self._attack(), StartTimer(Timer.ATTACK, self._period)]
        return []

    def _observe(self, msg: PeerMessage) -> None:
        honest = GossipModel if self._protocol == "gossip" else Ping  # its round: the swarm's
        if isinstance(msg, honest) and msg.round <= self._estimate + self._config.max_round_jump:
            self._estimate = max(self._estimate, msg.round)
        if isinstance(msg, MODELS) and list(msg.state) == list(self._template):
            self._payload = msg.state

    def _attack(self) -> list[Action]:
        peers = list(self._neighbours)
        if not peers:
            return []
        variants = [v for mode in self._attacks for v in self._variants(mode)]
        sends = []
        for kind, body, tensors in variants:
            sends.append(Send(peers[self._next_peer % len(peers)], Raw(kind, body, tensors)))
            self._next_peer += 1
        return sends

    # --- what each mode sends ---------------------------------------------------------------

    def _variants(self, mode: str) -> list[Variant]:
        return {
            "huge": self._huge,
            "far-rounds": self._far_rounds,
            "hijack": self._hijack,
            "garbage": self._garbage,
        }[mode]()

    def _model_kinds(self) -> tuple[str, ...]:
        return (MODEL,) if self._protocol == "gossip" else (AGGREGATED, TRAINED)

    def _body(self, rnd: int, **extra: object) -> Body:
        return {"round": rnd, "samples": 10, **extra}

    def _huge(self) -> list[Variant]:
        huge = {
            n: torch.full_like(t, HUGE) if t.is_floating_point() else t for n, t in self._template.items()
        }
        return [(kind, self._body(self._estimate + 1), huge) for kind in self._model_kinds()]

    def _far_rounds(self) -> list[Variant]:
        rounds = (*FAR_ROUNDS, self._estimate + FAR_AHEAD)
        out: list[Variant] = []
        for rnd in rounds:
            if self._protocol == "gossip":
                out += [
                    (MODEL, self._body(rnd), self._payload),
                    (MODEL, self._body(rnd, reply=True), self._payload),
                ]
                continue
            # a view that names the sender active and everyone else gone, as an earlier release read it
            view = {p: [rnd, 1, p == self.me] for p in self._everyone}
            out += [
                (PING, {"sel": 0, "round": rnd}, {}),
                (PONG, {"sel": 0, "round": rnd}, {}),
                ("advert", {"round": rnd, "index": 1, "joined": True}, {}),
                (AGGREGATED, self._body(rnd, view=view), self._payload),
                (TRAINED, self._body(rnd, view=view), self._payload),
                (AGGREGATED, self._body(self._estimate + 1, view=view), self._payload),  # the view lies
            ]
        return out

    def _hijack(self) -> list[Variant]:
        c = self._config
        window = c.max_round_jump
        random_model = {
            n: (torch.randn(t.shape, generator=self._gen) * t.double().std().item()).to(t.dtype)
            if t.is_floating_point() and t.numel() > 1
            else t
            for n, t in self._template.items()
        }
        far = self._estimate + 10 * window
        out: list[Variant] = [
            (AGGREGATED, self._body(far), random_model),
            (TRAINED, self._body(far), random_model),
        ]
        for rnd in range(self._estimate + 1, self._estimate + window + 1):
            if self.me not in order(self._everyone, rnd)[: c.aggregators + c.role_slack]:
                out.append((AGGREGATED, self._body(rnd), random_model))
                break
        for rnd in range(self._estimate + 1, self._estimate + window + 1):
            if self.me not in order(self._everyone, rnd - 1)[: c.sample_size + c.role_slack]:
                out.append((TRAINED, self._body(rnd), random_model))
                break
        return out

    def _garbage(self) -> list[Variant]:
        t = self._template
        first = next(iter(t))
        wrong_shape = {**t, first: torch.zeros(t[first].numel() + 1)}
        wrong_dtype = {
            **t,
            first: t[first].to(torch.float64 if t[first].dtype != torch.float64 else torch.float32),
        }
        nan = {n: torch.full_like(v, float("nan")) if v.is_floating_point() else v for n, v in t.items()}
        missing = dict(list(t.items())[1:])
        rnd = self._estimate
        bad_bodies = [
            {"round": str(rnd), "samples": 10},
            {"round": True, "samples": 10},
            {"round": 1.5, "samples": 10},
            {"round": -1, "samples": 10},
            {"round": rnd, "samples": -5},
            {"round": rnd, "samples": 10**12},
            {"samples": 10},
        ]
        out: list[Variant] = [(kind, b, t) for kind in self._model_kinds() for b in bad_bodies]
        out += [
            (kind, self._body(rnd), m)
            for kind in self._model_kinds()
            for m in (wrong_shape, wrong_dtype, nan, missing)
        ]
        out.append(("vote", {"round": rnd}, {}))
        if self._protocol == "gossip":
            out += [
                (MODEL, self._body(rnd, labels="x"), t),
                (MODEL, self._body(rnd, labels=[-1, 2]), t),
                (MODEL, self._body(rnd, labels=list(range(MAX_LABELS + 1))), t),
                (MODEL, self._body(rnd, reply="yes"), t),
            ]
            return out
        out += [
            (PING, {"sel": "x", "round": rnd}, {}),
            (PING, {"sel": -1, "round": rnd}, {}),
            (PONG, {"sel": MAX_ROUND + 1, "round": rnd}, {}),
            ("advert", {"round": rnd, "index": -5, "joined": "yes"}, {}),
        ]
        return out


def with_hostile(
    make_protocol: ProtocolFactory,
    hostile: set[int],
    protocol: str,
    attacks: Sequence[str],
    *,
    config: ModestConfig | None = None,
    period: float = 1.0,
) -> ProtocolFactory:
    """A protocol factory for the engine that puts :class:`Hostile` on the ``hostile`` nodes, each
    attacking every ``period`` seconds."""

    def make(sim: Simulation, i: int, node: LearningNode, joining: bool):
        if i not in hostile:
            return make_protocol(sim, i, node, joining)
        peers = (
            [node_name(j) for j in sim.graph.neighbors(i)]
            if protocol == "gossip"
            else [node_name(j) for j in range(sim.config.nodes) if j != i]
        )
        return Hostile(
            node_name(i),
            peers,
            sim.initial[i],
            protocol,
            attacks,
            sim.rng(i),
            period=period,
            config=config,
        )

    return make
