"""The gossip protocol as a pure state machine: events in, actions out; no network, no clock."""

import random
from dataclasses import replace

import pytest
import torch

from shoal.learning.gossip import Gossip, GossipConfig, Timer
from shoal.learning.integrators import Contribution, Mean, Weighted, make_integrator
from shoal.learning.messages import Fetch, GossipModel, Ping
from shoal.learning.protocol import (
    CancelTimer,
    MessageIn,
    PeerDown,
    PeerUp,
    Rejected,
    RoundDone,
    Send,
    SendFailed,
    Started,
    StartTimer,
    TimerFired,
    Train,
    Trained,
)


def model(value: float) -> dict:
    return {"w": torch.full((2, 3), value), "b": torch.full((3,), value)}


def unpaced(**given) -> GossipConfig:
    """The state machine's tests run unpaced, with every neighbour unless they say otherwise (the
    defaults are a daemon's)."""
    return GossipConfig(**{"fanout": None, "period": 0.0, "round_timeout": 60.0, **given})


def node(config=None, peers=("p1", "p2", "p3"), samples=10, integrator=None) -> Gossip:
    """A node holding model(0.0); the toy models here are far apart in scale, so the norm bound (tested
    on its own below) is opened wide."""
    config = replace(config or unpaced(), max_norm_ratio=1e9)
    g = Gossip(model(0.0), samples, integrator or Mean(), config, random.Random(0))
    for p in peers:
        g.handle(PeerUp(p), 0.0)
    return g


def kinds(actions):
    return [type(a).__name__ for a in actions]


def model_msg(peer, value, rnd=0, samples=10, **extra):
    return MessageIn(peer, GossipModel(rnd, samples, model(value), **extra))


def test_async_cycle_trains_sends_integrates_and_trains_again():
    g = node(unpaced(fanout=2))
    assert g.handle(Started(), 0.0) == [Train(0, g.model)]
    assert g.handle(model_msg("p1", 3.0), 0.1) == []  # buffered until the next cycle
    actions = g.handle(Trained(0, model(1.0)), 0.5)
    sends = [a for a in actions if isinstance(a, Send)]
    assert len(sends) == 2 and {s.peer for s in sends} <= {"p1", "p2", "p3"}
    assert all(torch.equal(s.message.state["w"], model(1.0)["w"]) and s.message.round == 0 for s in sends)
    assert kinds(actions)[-2:] == ["RoundDone", "Train"]
    assert torch.allclose(g.model["w"], torch.full((2, 3), 2.0))  # mean of own 1.0 and received 3.0
    assert g.round == 1


def test_the_fanout_goes_to_neighbours_whose_models_we_took_and_a_lone_node_sends_nothing():
    g = node(unpaced(fanout=1), peers=("good", "sybil1", "sybil2", "sybil3"))
    lone = node(unpaced(fanout=2), peers=())
    lone.handle(Started(), 0.0)
    assert kinds(lone.handle(Trained(0, model(1.0)), 0.5)) == ["RoundDone", "Train"]
    g.handle(Started(), 0.0)
    targets = []
    for rnd in range(40):
        g.handle(model_msg("good", float(rnd)), rnd + 0.1)  # only "good" ever sends us a model
        actions = g.handle(Trained(rnd, model(float(rnd))), rnd + 0.5)
        targets += [a.peer for a in actions if isinstance(a, Send)]
    assert targets.count("good") > 0.6 * len(targets)  # uniform: a quarter; explored now and then
    assert {"sybil1", "sybil2", "sybil3"} & set(targets)


def test_answers_one_fetch_per_peer_per_interval():
    g = node()
    (reply,) = g.handle(MessageIn("p1", Fetch()), 1.0)
    assert isinstance(reply, Send) and isinstance(reply.message, GossipModel)
    assert g.handle(MessageIn("p1", Fetch()), 1.5) == []  # each answer is a whole model
    assert isinstance(g.handle(MessageIn("p2", Fetch()), 1.5)[0], Send)
    assert isinstance(g.handle(MessageIn("p1", Fetch()), 2.1)[0], Send)


def test_async_keeps_only_the_newest_model_per_peer():
    g = node(unpaced(fanout=1))
    g.handle(Started(), 0.0)
    g.handle(model_msg("p1", 10.0), 0.1)
    g.handle(model_msg("p1", 4.0, rnd=1), 0.2)
    g.handle(Trained(0, model(0.0)), 0.5)
    assert torch.allclose(g.model["w"], torch.full((2, 3), 2.0))


def test_async_period_rests_between_cycles():
    g = node(unpaced(fanout=1, period=5.0))
    g.handle(Started(), 0.0)
    actions = g.handle(Trained(0, model(1.0)), 1.0)
    assert actions[-1] == StartTimer(Timer.CYCLE, 4.0)
    assert g.handle(Trained(0, model(1.0)), 1.5) == []  # stale: not training now
    assert g.handle(TimerFired(Timer.CYCLE), 5.0) == [Train(1, g.model)]


def test_sync_round_waits_for_every_neighbour():
    g = node(unpaced(synchronous=True))
    g.handle(Started(), 0.0)
    actions = g.handle(Trained(0, model(3.0)), 1.0)
    assert kinds(actions) == ["Send", "Send", "Send", "StartTimer"]
    assert actions[-1] == StartTimer(Timer.ROUND, 60.0)
    assert g.handle(model_msg("p1", 0.0), 1.1) == []
    assert g.handle(model_msg("p2", 0.0, rnd=1), 1.2) == []  # next round's model is kept for later
    assert g.handle(model_msg("p2", 6.0), 1.3) == []
    actions = g.handle(model_msg("p3", 3.0), 1.4)
    assert actions[:2] == [CancelTimer(Timer.ROUND), RoundDone(1)] and g.round == 1  # done before its timer
    assert torch.allclose(g.model["w"], torch.full((2, 3), 3.0))
    g.handle(Trained(1, model(0.0)), 2.0)
    assert g.handle(model_msg("p1", 0.0, rnd=1), 2.1) == []
    assert kinds(g.handle(model_msg("p3", 0.0, rnd=1), 2.2)) == [
        "CancelTimer",
        "RoundDone",
        "Train",
    ]  # p2's came early


def test_sync_round_does_not_wait_for_crashed_or_unreachable_peers():
    g = node(unpaced(synchronous=True))
    g.handle(Started(), 0.0)
    g.handle(Trained(0, model(1.0)), 1.0)
    g.handle(model_msg("p1", 1.0), 1.1)
    assert g.handle(PeerDown("p2"), 1.2) == []
    failed = SendFailed("p3", GossipModel(0, 10, model(1.0)))
    assert kinds(g.handle(failed, 1.3)) == ["CancelTimer", "RoundDone", "Train"]
    assert g.neighbours == ["p1", "p3"]  # a failed send skips p3 this round; only PeerDown removes it


def test_sync_round_times_out_when_fewer_models_arrive():
    g = node(unpaced(synchronous=True, round_timeout=5.0))
    g.handle(Started(), 0.0)
    g.handle(Trained(0, model(2.0)), 1.0)
    g.handle(model_msg("p1", 4.0), 2.0)
    assert g.handle(TimerFired(Timer.CYCLE), 6.0) == []  # not the waiting phase's timer
    assert kinds(g.handle(TimerFired(Timer.ROUND), 6.0)) == ["RoundDone", "Train"]
    assert torch.allclose(g.model["w"], torch.full((2, 3), 3.0))
    assert g.handle(model_msg("p2", 9.0, rnd=0), 6.5) == []  # too late for round 0: ignored


def test_isolated_sync_node_keeps_training_alone():
    g = node(unpaced(synchronous=True), peers=())
    g.handle(Started(), 0.0)
    assert kinds(g.handle(Trained(0, model(1.0)), 1.0)) == ["RoundDone", "Train"]  # no one to wait for


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (GossipModel(0, 1, {"w": torch.zeros(2, 3)}), "names"),
        (GossipModel(0, 1, {**model(0), "w": torch.zeros(3, 2)}), "expected"),
        # NaN is refused at the wire; what reaches a protocol otherwise (the simulated overlay) fails the
        # norm bound
        (GossipModel(0, 1, model(float("nan"))), "NaN or infinite"),
        (Ping(0, 0), "ping is not a gossip message"),  # MoDeST's
    ],
)
def test_bad_models_and_other_protocols_messages_are_rejected_with_a_reason(message, reason):
    """What passed the driver's bounds (tests/test_driver.py) but not this node's."""
    g = node()
    g.handle(Started(), 0.0)
    (action,) = g.handle(MessageIn("p1", message), 0.1)
    assert isinstance(action, Rejected) and action.peer == "p1" and action.blame and reason in action.reason
    g.handle(Trained(0, model(5.0)), 1.0)
    assert torch.equal(g.model["w"], model(5.0)["w"])  # nothing of the bad input was integrated


def test_answers_fetch_with_its_current_model():
    g = node()
    g.handle(Started(), 0.0)
    (reply,) = g.handle(MessageIn("p2", Fetch()), 0.1)
    assert reply == Send("p2", GossipModel(0, 10, g.model, reply=True))
    assert reply.message.body() == {"round": 0, "samples": 10, "reply": True}


def test_joining_node_adopts_a_neighbours_model_and_round():
    g = node(unpaced(join_by_fetch=True, fetch_timeout=3.0))
    send, timer = g.handle(Started(), 0.0)
    assert send.message == Fetch() and timer == StartTimer(Timer.FETCH, 3.0)
    assert g.handle(model_msg("nobody-asked", 9.0, rnd=40, reply=True), 0.1) == []  # not the one we asked
    actions = g.handle(model_msg(send.peer, 7.0, rnd=41, reply=True), 0.2)
    assert actions == [CancelTimer(Timer.FETCH), Train(41, g.model)] and g.round == 41
    assert torch.equal(g.model["w"], model(7.0)["w"])


def test_a_joiner_passes_over_replies_no_further_than_itself():
    g = node(unpaced(join_by_fetch=True), peers=("p1", "p2", "p3"))
    first, _ = g.handle(Started(), 0.0)
    second, timer = g.handle(model_msg(first.peer, 3.0, rnd=0, reply=True), 0.1)  # joined with us
    assert second.message == Fetch() and second.peer != first.peer and timer.key is Timer.FETCH
    actions = g.handle(model_msg(second.peer, 7.0, rnd=30, reply=True), 0.2)
    assert actions == [CancelTimer(Timer.FETCH), Train(30, g.model)]
    assert torch.equal(g.model["w"], model(7.0)["w"])


def test_a_joiner_asks_at_most_fetch_attempts_neighbours():
    g = node(unpaced(join_by_fetch=True, fetch_attempts=2), peers=("p1", "p2", "p3"))
    ask, _ = g.handle(Started(), 0.0)
    ask, _ = g.handle(model_msg(ask.peer, 3.0, rnd=0, reply=True), 0.1)
    actions = g.handle(model_msg(ask.peer, 3.0, rnd=0, reply=True), 0.2)
    assert actions == [CancelTimer(Timer.FETCH), Train(0, g.model)]  # its own model: none was ahead
    assert torch.equal(g.model["w"], model(0.0)["w"])
    with pytest.raises(ValueError, match="fetch_attempts"):
        GossipConfig(fetch_attempts=0)


def test_joining_node_asks_again_when_its_peer_dies_then_gives_up_on_timeout():
    g = node(unpaced(join_by_fetch=True), peers=("p1", "p2"))
    first, _ = g.handle(Started(), 0.0)
    second, timer = g.handle(PeerDown(first.peer), 0.5)
    assert second.message == Fetch() and second.peer != first.peer
    assert timer == StartTimer(Timer.FETCH, 10.0)  # replaces the first attempt's, which cannot cut it short
    assert g.handle(TimerFired(Timer.FETCH), 10.5) == [Train(0, g.model)]


def test_weighted_integration_and_nodes_without_data():
    own = Contribution(model(0.0), 0)
    got = Weighted().integrate(own, [Contribution(model(3.0), 30), Contribution(model(6.0), 10)])
    assert torch.allclose(got["w"], torch.full((2, 3), 3.75))
    nobody = Weighted().integrate(own, [Contribution(model(3.0), 0)])  # no data anywhere: plain mean
    assert torch.allclose(nobody["w"], torch.full((2, 3), 1.5))
    with pytest.raises(ValueError, match="needs a period"):
        node(samples=0)
    with pytest.raises(ValueError, match="unknown integrator"):
        make_integrator("median-of-medians")


def test_config_is_checked():
    assert GossipConfig(synchronous=True, fanout=2).fanout is None  # synchronous: every neighbour
    with pytest.raises(ValueError, match="fanout"):
        GossipConfig(fanout=0)
    with pytest.raises(ValueError, match="timeouts"):
        GossipConfig(round_timeout=0)


def test_round_done_is_reported_each_round():
    g = node(unpaced(fanout=1))
    g.handle(Started(), 0.0)
    for r in range(3):
        assert RoundDone(r + 1) in g.handle(Trained(r, model(1.0)), float(r))


def test_label_sets_ride_along():
    """Sorted and without repeats; their bounds are the driver's (tests/test_messages.py)."""
    g = Gossip(model(0.0), 10, Mean(), unpaced(fanout=1), random.Random(0), labels=[3, 1, 3])
    g.handle(PeerUp("p1"), 0.0)
    g.handle(Started(), 0.0)
    (send, *_) = g.handle(Trained(0, model(1.0)), 1.0)
    assert send.message.labels == (1, 3) and send.message.body()["labels"] == [1, 3]
    assert g.handle(model_msg("p1", 1.0, labels=(2,)), 1.2) == []


def test_a_fetched_round_is_limited_to_the_window():
    g = node(unpaced(join_by_fetch=True, max_round_jump=50))
    send, _ = g.handle(Started(), 0.0)
    actions = g.handle(model_msg(send.peer, 1.0, rnd=2**53 - 1, reply=True), 0.1)
    assert actions == [CancelTimer(Timer.FETCH), Train(50, g.model)]


def test_huge_models_are_refused_on_receipt_for_every_integrator():
    g = Gossip(model(0.5), 10, Mean(), unpaced(fanout=1), random.Random(0))
    g.handle(PeerUp("p1"), 0.0)
    g.handle(Started(), 0.0)
    (action,) = g.handle(model_msg("p1", 1e30), 0.1)
    assert isinstance(action, Rejected) and "L2 norm" in action.reason
    assert g.handle(model_msg("p1", 4.0), 0.2) == []  # within 10x: taken


class Refusing(Mean):
    def integrate(self, own, received):
        if any(c.peer == "p2" for c in received):
            raise ValueError("p2's model overflows")
        return super().integrate(own, received)


@pytest.mark.parametrize("synchronous", [False, True])
def test_a_model_the_integrator_refuses_is_dropped_and_reported_once(synchronous):
    config = unpaced(synchronous=synchronous) if synchronous else unpaced(fanout=1)
    g = node(config, peers=("p1", "p2"), integrator=Refusing())
    g.handle(Started(), 0.0)
    g.handle(model_msg("p1", 3.0), 0.1)
    g.handle(model_msg("p2", 9.0), 0.2)
    actions = g.handle(Trained(0, model(1.0)), 1.0)
    assert [a for a in actions if isinstance(a, Rejected)] == [
        Rejected("p2", "model could not be integrated: p2's model overflows")
    ]
    assert g.round == 1 and torch.allclose(g.model["w"], torch.full((2, 3), 2.0))  # own 1.0 and p1's 3.0
