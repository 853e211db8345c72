"""MoDeST as a pure state machine, several nodes on the in-memory bench (tests/bench.py)."""

import hashlib
import random

import pytest
import torch

from shoal.learning.integrators import Mean
from shoal.learning.messages import Entry, parse_view, view_body
from shoal.learning.modest import Modest, ModestConfig, View, order
from shoal.learning.protocol import MessageIn, Rejected, Started, Stopping
from tests.bench import Bench, constant_model, value_of

# The bench's toy models grow by 1 per round from 0: far apart in scale, so the norm bound (tested on its
# own below) is opened wide here.
LOOSE = 1e9
CONFIG = ModestConfig(
    sample_size=4, aggregators=1, ping_timeout=2.0, aggregation_timeout=3.0, max_norm_ratio=LOOSE
)


def swarm(n: int, config: ModestConfig = CONFIG, joiners: dict[str, list[str]] | None = None) -> Bench:
    names = [f"p{i:02d}" for i in range(n)]
    protocols = {
        name: Modest(
            name, [p for p in names if p != name], constant_model(), 10, Mean(), config, random.Random(i)
        )
        for i, name in enumerate(names)
    }
    for i, (name, knows) in enumerate((joiners or {}).items()):
        protocols[name] = Modest(
            name, knows, constant_model(), 10, Mean(), config, random.Random(100 + i), joining=True
        )
    bench = Bench(protocols)
    for name in names:
        bench.at(0.0, name, Started())
    return bench


def aggregated_sends(bench: Bench, rnd: int) -> list[tuple[str, str]]:
    return [(src, s.peer) for _, src, s in bench.sent if s.kind == "aggregated" and s.body["round"] == rnd]


def test_order_is_md5_of_peer_and_round():
    peers = ["a", "b", "c", "d", "e"]
    expected = sorted(peers, key=lambda p: hashlib.md5(f"{p}-7".encode()).digest())
    assert order(peers, 7) == expected == order(list(reversed(peers)), 7)
    assert order(peers, 7) != order(peers, 8)


def test_same_view_gives_the_same_sample_on_every_node():
    bench = swarm(12)
    samples = {
        name: order(p.view.active(5, CONFIG.inactivity_threshold, name), 5)[: CONFIG.sample_size]
        for name, p in bench.protocols.items()
    }
    assert len({tuple(s) for s in samples.values()}) == 1


def test_rounds_advance_and_each_round_trains_its_sample():
    bench = swarm(12)
    bench.run(until=20.0)
    rounds = sorted({rnd for _, _, rnd in bench.rounds_done})
    assert rounds[:5] == [2, 3, 4, 5, 6] and len(rounds) >= 8
    for rnd in rounds[:5]:
        everyone = list(bench.protocols)
        candidates = order(everyone, rnd)
        ((aggregator, _),) = {(src, None) for src, _ in aggregated_sends(bench, rnd)}
        assert aggregator == candidates[0]  # the first available candidate aggregates
        trainers = {peer for _, peer in aggregated_sends(bench, rnd)}
        assert trainers == set(candidates[1 : CONFIG.sample_size])  # and trains with the next s-1
    # every round trains once more: the aggregated model grows by one per round
    newest = max(bench.protocols.values(), key=lambda p: p.round)
    assert value_of(newest.model) == pytest.approx(newest.round - 1, abs=1)
    assert not bench.rejected


def test_a_crashed_trainer_is_replaced_and_the_round_completes():
    bench = swarm(12)
    everyone = list(bench.protocols)
    victim = order(everyone, 6)[2]  # a trainer of round 6
    bench.crashed.add(victim)
    bench.run(until=40.0)
    trainers = {peer for _, peer in aggregated_sends(bench, 6)}
    assert victim not in trainers and len(trainers) == CONFIG.sample_size - 1  # the aggregator trains too
    assert order(everyone, 6)[CONFIG.sample_size] in trainers  # the next candidate stepped in
    assert any(rnd > 6 for _, _, rnd in bench.rounds_done)


def test_a_crashed_aggregator_is_replaced():
    bench = swarm(12)
    everyone = list(bench.protocols)
    victim = order(everyone, 5)[0]  # would aggregate round 5
    bench.crashed.add(victim)
    bench.run(until=40.0)
    aggregators = {src for src, _ in aggregated_sends(bench, 5)}
    assert aggregators == {order(everyone, 5)[1]}
    assert any(rnd > 5 for _, _, rnd in bench.rounds_done)


def test_an_aggregator_that_dies_holding_the_models_is_replaced():
    config = ModestConfig(
        sample_size=4, ping_timeout=1.0, aggregation_timeout=2.0, watch_timeout=3.0, max_norm_ratio=LOOSE
    )
    bench = swarm(12, config)
    everyone = list(bench.protocols)
    aggregator = order(everyone, 6)[0]

    def trained_sent_to_aggregator():
        return [
            1
            for _, _, s in bench.sent
            if s.kind == "trained" and s.body["round"] == 6 and s.peer == aggregator
        ]

    while not trained_sent_to_aggregator():
        bench.run(until=bench.now + 0.01)
    bench.crashed.add(aggregator)  # it dies with round 6's models on the way to it
    bench.run(until=60.0)
    done = {rnd: node for _, node, rnd in bench.rounds_done}
    assert done[6] == order(everyone, 6)[1]  # the next candidate aggregated round 6
    assert max(done) >= 12


def test_no_deadlock_when_too_few_trainers_survive():
    config = ModestConfig(sample_size=6, ping_timeout=1.0, aggregation_timeout=3.0, max_norm_ratio=LOOSE)
    bench = swarm(14, config)
    while not aggregated_sends(bench, 5):
        bench.run(until=bench.now + 0.05)
    trainers = [peer for _, peer in aggregated_sends(bench, 5)]
    assert len(trainers) == 5  # and the aggregator trains too
    bench.crashed.update(trainers[:-1])  # while they train: 2 of 6 models will come back, quorum is 6
    bench.run(until=bench.now + 2.9)
    assert 6 not in [rnd for _, _, rnd in bench.rounds_done]
    bench.run(until=60.0)
    done = [rnd for _, _, rnd in bench.rounds_done]
    assert 6 in done and max(done) >= 10  # round 6 aggregated on the timeout, and rounds went on


def test_a_joining_node_is_sampled_only_after_its_join_spread():
    bench = swarm(10, joiners={"newcomer": ["p00", "p01", "p02"]})
    bench.at(5.0, "newcomer", Started())
    bench.run(until=4.9)
    assert all("newcomer" not in p.view.entries for n, p in bench.protocols.items() if n != "newcomer")
    bench.run(until=120.0)
    adverts = [(t, s.peer) for t, src, s in bench.sent if s.kind == "advert" and src == "newcomer"]
    assert {peer for _, peer in adverts} == {"p00", "p01", "p02"}
    sampled = [(t, s) for t, _, s in bench.sent if s.kind == "aggregated" and s.peer == "newcomer"]
    assert sampled, "the newcomer was never sampled"
    assert sampled[0][0] > adverts[0][0]
    knows_it = [n for n, p in bench.protocols.items() if "newcomer" in p.view.entries]
    assert len(knows_it) == len(bench.protocols)  # the JOIN spread through piggybacked views


def test_a_leaving_node_drops_out_at_once():
    bench = swarm(8)
    bench.run(until=3.0)
    leaver = bench.protocols["p03"]
    for action in leaver.handle(Stopping(), bench.now):
        bench._act("p03", action)
    bench.crashed.add("p03")  # gone after its goodbye
    bench.run(until=3.1)
    informed = [n for n, p in bench.protocols.items() if n != "p03" and not p.view.entries["p03"].joined]
    assert len(informed) == CONFIG.sample_size
    bench.run(until=40.0)
    later = max(rnd for _, _, rnd in bench.rounds_done)
    assert later > 6 and not bench.rejected


@pytest.mark.parametrize(
    ("kind", "body", "tensors", "reason"),
    [
        ("aggregated", {"round": 3, "samples": 1, "view": {}}, {"w": torch.zeros(4)}, "does not fit"),
        (
            "aggregated",
            {"round": 3, "samples": 1, "view": {}},
            {"w": torch.full((3,), float("nan"))},
            "norm nan",
        ),
        ("aggregated", {"round": 3, "samples": 1, "view": {"x": [1, 2]}}, constant_model(), "view entry"),
        (
            "aggregated",
            {"round": 3, "samples": 1, "view": {"x": [1, -2, True]}},
            constant_model(),
            "bad values",
        ),
        ("trained", {"round": 3, "view": {}}, constant_model(), "samples"),
        ("ping", {"sel": 0, "round": -1}, {}, "round must be an integer"),
        ("advert", {"round": 1, "index": 1}, {}, "joined must be true or false"),
        ("vote", {"round": 1}, {}, "unknown message kind"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(kind, body, tensors, reason):
    node = Modest("me", ["a"], constant_model(), 10, Mean(), CONFIG, random.Random(0))
    (action,) = node.handle(MessageIn("a", kind, body, tensors), 1.0)
    assert isinstance(action, Rejected) and reason in action.reason
    assert node.estimate() == 0  # bad input does not move our round estimate


def test_view_merge_rule():
    view = View()
    view.merge({"a": Entry(3, 1, True)})
    view.merge({"a": Entry(1, 2, False)})  # newer advertisement wins the status; activity keeps the max
    assert (view.entries["a"].last_active, view.entries["a"].index, view.entries["a"].joined) == (3, 2, False)
    view.merge({"a": Entry(9, 1, True)})  # an older advertisement cannot undo a LEAVE
    assert (view.entries["a"].last_active, view.entries["a"].joined) == (9, False)
    assert view.active(10, 5, "me") == []
    view.merge({"b": Entry(2, 0, True), "me": Entry(0, 0, True)})
    assert view.active(10, 5, "me") == ["me"] and view.active(6, 5, "me") == ["b", "me"]
    assert parse_view(view_body(view.entries))["a"] == view.entries["a"]


def test_config_is_checked():
    with pytest.raises(ValueError, match="success_fraction"):
        ModestConfig(success_fraction=0)
    with pytest.raises(ValueError, match="at least 1"):
        ModestConfig(sample_size=0)
    with pytest.raises(ValueError, match="positive"):
        ModestConfig(watch_timeout=0)
    assert ModestConfig(sample_size=10, success_fraction=0.9).quorum == 9
