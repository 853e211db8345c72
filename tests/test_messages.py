"""The message registry and the bounds on every field the protocols read, containment of what slips
through, and MoDeST's window and roles: each rejection with its reason."""

import logging
from typing import get_args

import pytest
import torch

from shoal.learning.averaging import AveragingError
from shoal.learning.integrators import Contribution, Mean, integrate_contained
from shoal.learning.learner import Learner
from shoal.learning.messages import (
    MAX_LABELS,
    MAX_ROUND,
    MAX_SAMPLES,
    MESSAGES,
    AggregatedModel,
    CodecReset,
    Fetch,
    GossipModel,
    PeerMessage,
    Ping,
    Pong,
    TrainedModel,
    decode,
    model_fault,
)
from shoal.learning.models import build_model
from shoal.learning.modest import Modest, ModestConfig, Timer, order
from shoal.learning.protocol import Credited, MessageIn, Rejected, RoundDone, Started, StartTimer, Train
from shoal.learning.task import classification

# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([1, 2], "body must be a map"),
        ({"samples": 1}, "round must be an integer"),
        ({"round": True, "samples": 1}, "round must be an integer"),
        ({"round": 1.0, "samples": 1}, "round must be an integer"),
        ({"round": -1, "samples": 1}, "round must be an integer"),
        ({"round": 2**63, "samples": 1}, "round must be an integer"),
        ({"round": MAX_ROUND + 1, "samples": 1}, "round must be an integer"),
        ({"round": 0, "samples": MAX_SAMPLES + 1}, "samples must be an integer"),
        ({"round": 0, "samples": -1}, "samples must be an integer"),
        ({"round": 0, "samples": 1, "reply": 1}, "reply must be true or false"),
        ({"round": 0, "samples": 1, "labels": "x"}, "labels"),
        ({"round": 0, "samples": 1, "labels": [MAX_LABELS]}, "labels"),
        ({"round": 0, "samples": 1, "labels": list(range(MAX_LABELS + 1))}, "labels"),
        ({"round": 0, "samples": 1, "labels": ["x" * 10_000]}, "labels"),
    ],
)
def test_gossip_model_bounds(body, reason):
    msg = GossipModel.parse(body, layers(0.5))
    assert isinstance(msg, str) and reason in msg and len(msg) < 200  # reasons quote input briefly


def test_gossip_model_round_trip_and_the_largest_values():
    msg = GossipModel(MAX_ROUND, MAX_SAMPLES, layers(0.5), reply=True, labels=(1, 3))
    assert GossipModel.parse(msg.body(), msg.tensors) == msg
    assert GossipModel(0, 5, layers(0.5)).body() == {"round": 0, "samples": 5}


@pytest.mark.parametrize(
    ("cls", "body", "reason"),
    [
        (Ping, {"round": 1}, "sel must be an integer"),
        (Ping, {"sel": "0", "round": 1}, "sel must be an integer"),
        (Pong, {"sel": MAX_ROUND + 1, "round": 1}, "pong message: sel"),
        (Pong, {"sel": 0, "round": 2**63}, "pong message: round"),
    ],
)
def test_modest_small_message_bounds(cls, body, reason):
    msg = cls.parse(body, {})
    assert isinstance(msg, str) and reason in msg


def every_message() -> list[PeerMessage]:
    """One of each class, with the largest values its fields take."""
    state = layers(0.5)
    return [
        GossipModel(MAX_ROUND, MAX_SAMPLES, state, reply=True, labels=(1, 3)),
        AggregatedModel(MAX_ROUND, MAX_SAMPLES, state),
        TrainedModel(0, 0, state),
        Fetch(),
        Ping(MAX_ROUND, 0),
        Pong(1, MAX_ROUND),
        CodecReset(),
    ]


def test_the_registry_holds_every_message_and_each_round_trips():
    messages = every_message()
    assert set(MESSAGES.values()) == {type(m) for m in messages} == set(get_args(PeerMessage))
    assert all(MESSAGES[m.KIND] is type(m) for m in messages) and len(MESSAGES) == len(messages)
    for m in messages:
        assert decode(m.KIND, m.body(), m.tensors) == m
    assert AggregatedModel(1, 2, layers(0.5)).body() == {"round": 1, "samples": 2}


def test_a_model_message_needs_a_model_and_a_control_message_takes_none():
    assert decode(Ping.KIND, {"sel": 0, "round": 0}, layers(0.5)) == "ping message: takes no tensors, got 3"
    for cls in (Fetch, CodecReset):
        assert "takes no tensors" in cls.parse({}, layers(0.5))
    refused = decode(TrainedModel.KIND, {"round": 1, "samples": 1}, {})
    assert refused == "trained message: carries no model"


def test_unknown_kinds_and_bad_fields_are_refused_quoting_little():
    assert decode("advert", {"round": 1}, {}) == "unknown message kind 'advert'"  # views are gone
    assert len(decode("x" * 10_000, {}, {})) < 80
    refused = decode(TrainedModel.KIND, {"round": 1}, layers(0.5))
    assert isinstance(refused, str) and refused.startswith("trained message") and "samples" in refused


def layers(w: float, b: float = 0.0) -> dict:
    return {"w": torch.full((4, 4), w), "b": torch.full((4,), b), "steps": torch.tensor([3])}


@pytest.mark.parametrize(
    ("model", "reason", "blame"),
    [
        # implausible: dropped, not held against the sender (honest models look so to a poisoned node)
        (layers(1e30), "'w' has L2 norm", False),
        (layers(0.5 * 11), "'w' has L2 norm", False),  # just over 10x our 0.5
        (layers(0.5, 1.1), "'b' has L2 norm", False),  # over 10x the floor of our zero bias
        # wrong: no honest peer of the task sends these
        (layers(float("inf")), "'w' contains NaN or infinite", True),
        (layers(0.5, float("nan")), "'b' contains NaN or infinite", True),
        ({"w": torch.zeros(4, 4)}, "names", True),
    ],
)
def test_implausible_models_are_refused_and_wrong_ones_blamed(model, reason, blame):
    fault = model_fault(layers(0.5), model, max_norm_ratio=10)
    assert fault is not None and reason in fault[0] and fault[1] is blame


def test_plausible_models_pass_even_against_zero_layers():
    assert model_fault(layers(0.5), layers(-4.9, 0.9), max_norm_ratio=10) is None
    assert model_fault(layers(0.0), layers(0.9, 0.9), max_norm_ratio=10) is None  # floor: 0.1 per element


# --- containment -----------------------------------------------------------------------------


class Picky(Mean):
    """Refuses to integrate any model of the peer "evil", as an integrator might on values it cannot use."""

    def integrate(self, own, received):
        if any(c.peer == "evil" for c in received):
            raise AveragingError("cannot use evil's model")
        return super().integrate(own, received)


def test_a_contribution_the_integrator_refuses_costs_only_itself():
    own = Contribution(layers(0.0), 1)
    received = [Contribution(layers(3.0), 1, "good"), Contribution(layers(9.0), 1, "evil")]
    model, rejected = integrate_contained(Picky(), own, received)
    assert rejected == [Rejected("evil", "model could not be integrated: cannot use evil's model")]
    assert torch.allclose(model["w"], torch.full((4, 4), 1.5))  # own and good only
    assert integrate_contained(Mean(), own, []) == (own.state, [])


def test_our_own_bad_model_is_our_bug_and_raises():
    own = Contribution(layers(float("nan")), 1)
    with pytest.raises(AveragingError):
        integrate_contained(Mean(), own, [Contribution(layers(1.0), 1, "good")])


def test_training_to_non_finite_weights_is_rolled_back(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.learner")  # scenario runs in this process quiet it
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model = build_model("mlp", (4,), 3, seed=0)
    learner = Learner(classification(model, x, y, steps=3))
    initial = learner.initial_state()
    start = {n: torch.full_like(t, 1e30) for n, t in initial.items()}  # finite, but overflows
    state, stats = learner.train(start, round=1)
    assert state is start and stats["samples"] == 3 * 32  # it trained its 3 steps of 32, then rolled back
    assert "non-finite" in caplog.text and "non-finite" in learner.error
    good, _ = learner.train(initial, round=2)
    assert learner.error is None
    assert all(torch.isfinite(t).all() for t in good.values())


# --- MoDeST: window and roles ----------------------------------------------------------------

PEERS = [f"p{i:02d}" for i in range(12)]
CONFIG = ModestConfig(sample_size=4, aggregators=1, role_slack=1, max_round_jump=100, period=0.0)


def modest(me="p00", joining=False, config=CONFIG):
    """A node that knows every peer as a member that answered its pings (``learning.sampling``)."""
    node = Modest(me, [p for p in PEERS if p != me], layers(0.5), 10, Mean(), config, joining=joining)
    node.view.sampler._heard.update(PEERS)
    return node


def role(rnd: int, rank: int) -> str:
    """The peer at ``rank`` in round ``rnd``'s candidate order (everyone active)."""
    return order(PEERS, rnd)[rank]


def find_round(me: str, want_trainer: bool, lo: int = 2) -> tuple[int, str]:
    """A round where ``me`` is (or is not) among its plausible trainers, and its first aggregator."""
    for rnd in range(lo, lo + 500):
        if (me in order(PEERS, rnd)[: CONFIG.sample_size + CONFIG.role_slack]) == want_trainer and role(
            rnd, 0
        ) != me:
            return rnd, role(rnd, 0)
    raise AssertionError("no such round")


def aggregated(peer: str, rnd: int) -> MessageIn:
    return MessageIn(peer, AggregatedModel(rnd, 1, layers(0.6)))


def test_hearsay_is_clamped_to_the_window_and_cannot_walk_it_up():
    node = modest()
    for step in range(1, 6):  # a liar pings with ever larger rounds: each is clamped to our round + 100
        (pong,) = node.handle(MessageIn("p01", Ping(0, step * 90)), 1.0)
        assert isinstance(pong.message, Pong) and pong.message.round <= 100
    assert node.estimate() == 100 and node.round == 0


def test_a_model_beyond_the_window_is_refused():
    node = modest()
    (action,) = node.handle(aggregated(role(10**6, 0), 10**6), 1.0)
    assert isinstance(action, Rejected) and "more than 100 rounds ahead of our round 0" in action.reason
    assert node.round == 0 and node.estimate() == 0


def test_an_aggregated_model_only_from_a_plausible_aggregator_to_a_plausible_trainer():
    rnd, aggregator = find_round("p00", want_trainer=True)
    impostor = role(rnd, 5)  # deeper than aggregators + role_slack
    (action,) = modest().handle(aggregated(impostor, rnd), 1.0)
    assert isinstance(action, Rejected) and "no plausible aggregator" in action.reason
    node = modest()
    credit, done, train = node.handle(aggregated(aggregator, rnd), 1.0)
    assert credit == Credited(aggregator, 1.0) and done == RoundDone(rnd) and isinstance(train, Train)
    assert node.round == rnd
    other, aggregator = find_round("p00", want_trainer=False)
    (action,) = modest().handle(aggregated(aggregator, other), 1.0)
    assert isinstance(action, Rejected) and "no plausible trainer" in action.reason


def test_role_and_window_refusals_blame_nobody():
    """An honest sender that knows members we do not yet, or a node that fell behind, looks like a liar:
    the refusal is not held against the sender."""
    rnd, _ = find_round("p00", want_trainer=True)
    impostor = role(rnd, 5)
    node = modest()
    node.handle(Started(), 0.0)
    (refused,) = node.handle(aggregated(impostor, rnd), 1.0)
    assert isinstance(refused, Rejected) and not refused.blame
    (far,) = node.handle(aggregated(role(10**6, 0), 10**6), 1.0)
    assert isinstance(far, Rejected) and not far.blame
    (again,) = node.handle(aggregated(impostor, rnd), CONFIG.watch_timeout + 1.0)  # however long we wait
    assert isinstance(again, Rejected) and node.round == 0


def test_a_trained_model_only_from_a_plausible_trainer_to_a_plausible_aggregator():
    limit = CONFIG.aggregators + CONFIG.role_slack
    rnd = next(r for r in range(2, 500) if role(r, 0) not in order(PEERS, r - 1)[: CONFIG.sample_size])
    me, trainer, stranger = role(rnd, 0), role(rnd - 1, 0), role(rnd - 1, 8)
    trained = TrainedModel(rnd, 1, layers(0.6))
    (action,) = modest(me).handle(MessageIn(stranger, trained), 1.0)
    assert isinstance(action, Rejected) and "no plausible trainer" in action.reason
    (deadline,) = modest(me).handle(MessageIn(trainer, trained), 1.0)
    assert deadline == StartTimer(Timer.AGGREGATE, CONFIG.aggregation_timeout)
    bystander = order(PEERS, rnd)[limit + 1]
    if bystander != trainer:
        (action,) = modest(bystander).handle(MessageIn(trainer, trained), 1.0)
        assert isinstance(action, Rejected) and "no plausible aggregator" in action.reason


def test_a_fresh_joiner_joins_a_swarm_far_ahead_then_applies_the_window():
    rnd, aggregator = find_round("p00", want_trainer=True, lo=500)
    node = modest(joining=True)
    node.handle(Started(), 0.0)
    node.handle(aggregated(aggregator, rnd), 1.0)  # no round heard yet: no window
    assert node.round == rnd
    (action,) = node.handle(aggregated(role(rnd + 1000, 0), rnd + 1000), 2.0)
    assert isinstance(action, Rejected) and "ahead of our round" in action.reason


def test_config_bounds():
    with pytest.raises(ValueError, match="max_round_jump"):
        ModestConfig(max_round_jump=0)
    with pytest.raises(ValueError, match="role_slack"):
        ModestConfig(role_slack=-1)
    with pytest.raises(ValueError, match="max_norm_ratio"):
        ModestConfig(max_norm_ratio=0.5)
