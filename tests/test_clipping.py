"""The anchor (what a node knows of its own training) and the robust default integrator built on it."""

import logging
import random

import pytest
import torch

from shoal.learning.anchor import AHEAD, REACH, Anchor, ClassificationProbe, distance
from shoal.learning.clipping import Clipped, ClippingConfig
from shoal.learning.gossip import Gossip, GossipConfig
from shoal.learning.integrators import Contribution, integrate_contained
from shoal.learning.learner import Learner
from shoal.learning.messages import Fetch, GossipModel
from shoal.learning.models import build_model
from shoal.learning.protocol import Credited, MessageIn, PeerUp, Rejected, Send, Started, Train
from shoal.learning.task import classification


def task(seed: int = 0):
    """A small classification task and an MLP for it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return build_model("mlp", (8,), 4, seed=seed), x, y


def trained_node(rounds: int = 5):
    """A learner with an anchor after a few rounds of its own training, and its current model."""
    model, x, y = task()
    anchor = Anchor(build_model("mlp", (8,), 4, seed=0), ClassificationProbe(x, y))
    learner = Learner(classification(model, x, y, lr=0.1, steps=10), anchor=anchor)
    state = learner.initial_state()
    anchor.start(state)
    for rnd in range(rounds):
        state, _ = learner.train(state, rnd)
    return learner, anchor, state


def scaled(state, factor):
    return {k: factor * v for k, v in state.items()}


def test_the_anchor_knows_its_step_and_its_known_good_model():
    learner, anchor, state = trained_node()
    assert anchor.step() is not None and anchor.step() > 0
    start = anchor.known_good()  # the model the last round of training started from
    trained, _ = learner.train(start, 4)  # the last round again
    assert distance(trained, state) < 1e-6  # gives the same model
    assert anchor.admits(state, state)
    flipped = scaled(state, -4.0)
    assert not anchor.admits(flipped, flipped)  # a sign-flipped model is far worse on our data, wherever
    nan = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    assert anchor.score(nan).error == float("inf") and not anchor.admits(nan, nan)


def test_a_node_without_data_judges_no_model_worse_than_another():
    model, x, y = task()
    anchor = Anchor(model, ClassificationProbe(x[:0], y[:0]))
    anchor.start({n: p.detach() for n, p in model.named_parameters()})
    assert anchor.score({n: p.detach() * -100 for n, p in model.named_parameters()}) == (0.0, 0.0)


def test_training_starts_from_the_known_good_model_when_ours_went_bad(caplog):
    caplog.set_level(logging.WARNING, logger="shoal.learner")  # scenario runs in this process quiet it
    learner, anchor, state = trained_node()
    poisoned = scaled(state, -4.0)
    trained, _ = learner.train(poisoned, round=9)
    assert "rolled back to our known-good model" in caplog.text
    assert distance(trained, state) < distance(trained, poisoned)  # trained on from the good model
    assert anchor.admits(trained, trained)


def clipped(anchor, **config):
    return Clipped(anchor, random.Random(0), ClippingConfig(**config))


def honest_peers(state, anchor, n=4, spread=0.5, seed=1):
    """Models one step or so of ours away, as honest peers of the same task send."""
    gen = torch.Generator().manual_seed(seed)
    step = anchor.step()
    out = []
    for i in range(n):
        noise = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
        norm = distance(noise, {k: torch.zeros_like(v) for k, v in noise.items()})
        out.append(
            Contribution({k: v + spread * step * noise[k] / norm for k, v in state.items()}, 10, f"h{i}")
        )
    return out


def test_honest_peers_are_taken_as_sent():
    _, anchor, state = trained_node()
    rule = clipped(anchor)
    honest = honest_peers(state, anchor)
    rule.integrate(Contribution(state, 10), honest)
    assert rule.verdicts == {c.peer: 1.0 for c in honest}


def test_a_far_model_is_refused_and_a_near_one_moves_us_at_most_tau():
    _, anchor, state = trained_node()
    honest = honest_peers(state, anchor)
    clean = clipped(anchor).integrate(Contribution(state, 10), honest)
    rule = clipped(anchor)  # the same trust in the honest peers as the clean run had
    flipped = Contribution(scaled(state, -4.0), 10, "evil")  # far: no say at all
    assert distance(rule.integrate(Contribution(state, 10), [*honest, flipped]), clean) < 1e-6
    assert rule.verdicts["evil"] == 0.0
    rule = clipped(anchor)
    step = anchor.step()
    tau = ClippingConfig().clip * step
    direction = {k: torch.ones_like(v) for k, v in state.items()}
    norm = distance(direction, {k: torch.zeros_like(v) for k, v in state.items()})
    near = Contribution({k: v + 5 * step * direction[k] / norm for k, v in state.items()}, 10, "sly")
    moved = rule.integrate(Contribution(state, 10), [*honest, near])
    assert 0 < rule.verdicts["sly"] < 1  # clipped
    assert distance(moved, clean) <= tau / (len(honest) + 2) * 1.5  # its pull, plus VCA's rescaling


def test_no_number_of_rounds_of_poison_ratchets_the_model():
    """The measured attack: a norm bound relative to our model let a sign-flipper walk honest weights
    from 2.9e3 to 1.8e20 in three seconds. Clipping to a radius set by our own steps cannot be walked."""
    learner, anchor, state = trained_node()
    rule = clipped(anchor)
    start = distance(state, {k: torch.zeros_like(v) for k, v in state.items()})
    model = state
    for rnd in range(50):
        evil = Contribution(scaled(model, -4.0), 10, "evil")
        sly = Contribution(scaled(model, 1.02), 10, "sly")  # near, in a direction of its choosing
        model = rule.integrate(Contribution(model, 10), [evil, sly])
        model, _ = learner.train(model, 10 + rnd)
    assert distance(model, {k: torch.zeros_like(v) for k, v in model.items()}) < 3 * start
    assert anchor.admits(model, model)


def test_a_node_behind_its_peers_centres_on_the_best_of_them():
    """A node that resumed from an old checkpoint is the outlier, not its peers: far models that do
    clearly better on its own data pull it to them instead of being refused."""
    _, anchor, state = trained_node(rounds=20)
    old = {n: p.detach() for n, p in task()[0].named_parameters()}  # where it started
    rule = clipped(anchor)
    peers = honest_peers(state, anchor)
    result = rule.integrate(Contribution(old, 10), peers)
    assert all(v > 0 for v in rule.verdicts.values())
    assert distance(result, state) < distance(result, old)


def test_an_aggregator_centres_on_the_best_of_the_rounds_models():
    """MoDeST: the aggregator's own model is none of the round's; a poisoned trained model first in the
    buffer does not become the centre."""
    _, anchor, state = trained_node()
    rule = Clipped(anchor, random.Random(0), self_centred=False)
    honest = honest_peers(state, anchor, n=2)
    poison = Contribution(scaled(state, -4.0), 10, "evil")
    result = rule.integrate(poison, honest)
    assert rule.verdicts["evil"] == 0.0
    assert distance(result, state) < anchor.step() * ClippingConfig().clip


def test_verdicts_become_credits_and_ours_is_not_among_them():
    _, anchor, state = trained_node()
    honest = honest_peers(state, anchor, n=2)
    _, actions = integrate_contained(clipped(anchor), Contribution(state, 10, "me"), honest, "me")
    assert actions == [Credited("h0", 1.0), Credited("h1", 1.0)]


def test_config_is_checked():
    with pytest.raises(ValueError, match="clip"):
        ClippingConfig(clip=10, accept=2)
    with pytest.raises(ValueError, match="better"):
        ClippingConfig(better=0)


def test_a_joiner_refuses_a_fetched_model_far_worse_than_its_own_and_asks_another():
    _, anchor, state = trained_node()
    node = Gossip(
        state,
        10,
        clipped(anchor),
        GossipConfig(fanout=None, join_by_fetch=True, fetch_attempts=2, period=0.0),
        random.Random(0),
        anchor=anchor,
    )
    node.handle(PeerUp("liar"), 0.0)
    node.handle(PeerUp("honest"), 0.0)
    (fetch, _) = node.handle(Started(), 0.0)
    first = fetch.peer
    reply = MessageIn(first, GossipModel(9, 10, scaled(state, -4.0), reply=True))
    actions = node.handle(reply, 1.0)
    assert isinstance(actions[0], Rejected) and not actions[0].blame and "not admitted" in actions[0].reason
    (again,) = [a for a in actions if isinstance(a, Send)]
    assert again.message == Fetch() and again.peer != first
    good = MessageIn(again.peer, GossipModel(9, 10, state, reply=True))
    assert any(isinstance(a, Train) for a in node.handle(good, 2.0)) and node.round == 9


def test_a_model_far_worse_than_our_latest_start_point_replaces_nothing():
    """MoDeST's stale attackers: early in training our start points' median is near chance, so the
    initial model was no worse than it and aggregates of it were taken (20% of stale attackers: honest
    accuracy 0.48). Next to the latest start point, once the swarm has learned, it is far worse."""
    model, x, y = task()
    anchor = Anchor(build_model("mlp", (8,), 4, seed=0), ClassificationProbe(x, y))
    learner = Learner(classification(model, x, y, lr=0.1, steps=10), anchor=anchor)
    initial = learner.initial_state()
    anchor.start(initial)
    for rnd in range(5):  # every round started from the initial model again, as the attackers reset us
        learner.train(initial, rnd)
    swarm, _ = Learner(classification(task()[0], x, y, lr=0.1, steps=150)).train(
        initial, 0
    )  # the swarm's model once it has learned: our next start point
    ours, _ = learner.train(swarm, 5)
    assert anchor.score(swarm).loss < anchor.score(initial).loss - 1.0
    assert distance(initial, ours) < AHEAD * REACH * anchor.step()  # near, said to be AHEAD rounds ahead
    assert anchor.admits(swarm, ours, AHEAD) and not anchor.admits(initial, ours, AHEAD)
