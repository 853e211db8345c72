"""MoDeST as a pure state machine, several nodes on the in-memory bench (tests/bench.py)."""

import hashlib
import itertools
from dataclasses import replace

import pytest
import torch

from shoal.learning.integrators import Mean
from shoal.learning.messages import AggregatedModel, Fetch, GossipModel, Ping, Pong, TrainedModel
from shoal.learning.modest import Modest, ModestConfig, Timer
from shoal.learning.protocol import Credited, Members, MessageIn, Rejected, Send, Started, TimerFired, Train
from shoal.learning.sampling import MUTE, PROBE_MUTE, Sampler, order
from tests.bench import Bench, constant_model, value_of

# The bench's toy models grow by 1 per round from 0: far apart in scale, so the norm bound (tested on its
# own below) is opened wide here.
LOOSE = 1e9
CONFIG = ModestConfig(  # unpaced, as the scenarios run MoDeST (the defaults are a daemon's)
    sample_size=4, aggregators=1, ping_timeout=2.0, aggregation_timeout=3.0, period=0.0, max_norm_ratio=LOOSE
)


def swarm(n: int, config: ModestConfig = CONFIG, joiners: dict[str, list[str]] | None = None) -> Bench:
    names = [f"p{i:02d}" for i in range(n)]
    protocols = {
        name: Modest(name, [p for p in names if p != name], constant_model(), 10, Mean(), config)
        for name in names
    }
    for name, knows in (joiners or {}).items():
        protocols[name] = Modest(name, knows, constant_model(), 10, Mean(), config, joining=True)
    bench = Bench(protocols)
    for name in names:
        bench.at(0.0, name, Started())
    return bench


def aggregated_sends(bench: Bench, rnd: int) -> list[tuple[str, str]]:
    return [
        (src, s.peer)
        for _, src, s in bench.sent
        if isinstance(s.message, AggregatedModel) and s.message.round == rnd
    ]


def test_order_is_md5_of_peer_and_round():
    peers = ["a", "b", "c", "d", "e"]
    expected = sorted(peers, key=lambda p: hashlib.md5(f"{p}-7".encode()).digest())
    assert order(peers, 7) == expected == order(list(reversed(peers)), 7)
    assert order(peers, 7) != order(peers, 8)


def test_the_same_members_give_the_same_sample_on_every_node():
    bench = swarm(12)
    bench.run(until=0.1)  # the members answered each node's first pings
    samples = {
        name: order(p.view.candidates(), 5)[: CONFIG.sample_size] for name, p in bench.protocols.items()
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
        done = [node for _, node, r in bench.rounds_done if r == rnd]
        assert done[0] == aggregator and set(done[1:]) == trainers  # each holds the round's model
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
        sample_size=4,
        ping_timeout=1.0,
        aggregation_timeout=2.0,
        watch_timeout=3.0,
        period=0.0,
        max_norm_ratio=LOOSE,
    )
    bench = swarm(12, config)
    everyone = list(bench.protocols)
    aggregator = order(everyone, 6)[0]

    def trained_sent_to_aggregator():
        return [
            1
            for _, _, s in bench.sent
            if isinstance(s.message, TrainedModel) and s.message.round == 6 and s.peer == aggregator
        ]

    while not trained_sent_to_aggregator():
        bench.run(until=bench.now + 0.01)
    bench.crashed.add(aggregator)  # it dies with round 6's models on the way to it
    bench.run(until=60.0)
    sixth = [node for _, node, rnd in bench.rounds_done if rnd == 6]
    assert sixth[0] == order(everyone, 6)[1]  # the next candidate aggregated round 6
    assert max(rnd for _, _, rnd in bench.rounds_done) >= 12


def test_no_deadlock_when_too_few_trainers_survive():
    config = ModestConfig(
        sample_size=6, ping_timeout=1.0, aggregation_timeout=3.0, period=0.0, max_norm_ratio=LOOSE
    )
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


def test_a_new_member_is_sampled_only_after_the_next_model_send():
    """The overlay vouches for a newcomer (its signed record spread); each node takes it in after its
    next model send, as the paper applies a JOIN, so it never lands in the sample being formed."""
    bench = swarm(10, joiners={"newcomer": [f"p{i:02d}" for i in range(10)]})
    everyone = frozenset(bench.protocols)
    for name in bench.protocols:
        bench.at(5.0, name, Members(everyone))
    bench.at(5.0, "newcomer", Started())
    bench.run(until=5.0)
    assert all("newcomer" not in p.view.members for n, p in bench.protocols.items() if n != "newcomer")
    bench.run(until=120.0)
    sampled = [t for t, _, s in bench.sent if isinstance(s.message, AggregatedModel) and s.peer == "newcomer"]
    assert sampled, "the newcomer was never sampled"
    assert all("newcomer" in p.view.members for p in bench.protocols.values())
    assert not bench.rejected


def test_a_member_that_disappears_drops_out_at_once():
    bench = swarm(8)
    bench.run(until=3.0)
    bench.crashed.add("p03")
    rest = frozenset(n for n in bench.protocols if n != "p03")
    for name in rest:
        bench.at(3.0, name, Members(rest))
    bench.run(until=3.01)
    assert all("p03" not in bench.protocols[n].view.candidates() for n in rest)
    bench.run(until=40.0)
    later = max(rnd for _, _, rnd in bench.rounds_done)
    assert later > 6 and not bench.rejected
    assert not [s for t, _, s in bench.sent if t > 3.01 and s.peer == "p03"]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (AggregatedModel(3, 1, {"w": torch.zeros(4)}), "does not fit"),
        (AggregatedModel(3, 1, {"w": torch.full((3,), float("nan"))}), "NaN or infinite"),
        (GossipModel(3, 1, constant_model()), "model is not a MoDeST message"),
        (Fetch(), "fetch is not a MoDeST message"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(message, reason):
    """What passed the driver's bounds (tests/test_driver.py) but not this node's: another protocol's
    message, a model that does not fit ours."""
    node = Modest("me", ["a"], constant_model(), 10, Mean(), CONFIG)
    (action,) = node.handle(MessageIn("a", message), 1.0)
    assert isinstance(action, Rejected) and action.blame and reason in action.reason
    assert node.estimate() == 0  # bad input does not move our round estimate


class Sceptic:
    """An anchor that admits no model whose values exceed ``limit`` (a poisoned one, here)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def admits(self, state, own=None, rounds=1) -> bool:
        return value_of(state) < self.limit

    sane = admits


class Poisoner(Modest):
    """An honest MoDeST node in every way, except that each aggregated model it sends is poison."""

    def handle(self, event, now):
        return [
            Send(a.peer, replace(a.message, state=constant_model(1e6)))
            if isinstance(a, Send) and isinstance(a.message, AggregatedModel)
            else a
            for a in super().handle(event, now)
        ]


def test_a_poisoned_aggregate_is_refused_and_the_rounds_go_on_without_its_sender():
    bench = swarm(12)
    evil = order(bench.protocols, 4)[0]  # the aggregator of round 4
    names = list(bench.protocols)
    for name in names:
        others = [p for p in names if p != name]
        cls = Poisoner if name == evil else Modest
        bench.protocols[name] = cls(name, others, constant_model(), 10, Mean(), CONFIG, anchor=Sceptic(1e5))
    bench.run(until=60.0)
    poisoned = [p for n, p in bench.protocols.items() if n != evil and value_of(p.model) >= 1e5]
    assert not poisoned
    refusals = {n: a for n, a in bench.rejected if a.peer == evil}
    assert refusals and all(not a.blame and "not admitted" in a.reason for a in refusals.values())
    assert max(rnd for _, _, rnd in bench.rounds_done) >= 12  # rounds went on past round 4


def test_a_refused_aggregate_moves_nothing_of_ours_and_an_aggregator_sends_no_poison():
    """A plausible aggregator of a round far ahead whose model is refused must not move our round (we
    would ignore the swarm's rounds behind it); an aggregator whose round brought only poison sends
    nothing."""
    names = [f"p{i:02d}" for i in range(12)]
    node = Modest("p00", names[1:], constant_model(), 10, Mean(), CONFIG, anchor=Sceptic(1e5))
    node.handle(Started(), 0.0)
    far = next(r for r in range(50, 99) if "p00" in order(names, r)[:4] and order(names, r)[0] != "p00")
    poison = MessageIn(order(names, far)[0], AggregatedModel(far, 1, constant_model(1e6)))
    refused, credit = node.handle(poison, 1.0)
    assert isinstance(refused, Rejected) and credit == Credited(order(names, far)[0], 0.0)
    assert node.round == 0 and node.estimate() == far  # heard of, not taken part in
    near = next(r for r in range(2, 50) if "p00" in order(names, r)[:4] and order(names, r)[0] != "p00")
    honest = MessageIn(order(names, near)[0], AggregatedModel(near, 1, constant_model(1.0)))
    assert any(type(a).__name__ == "Train" for a in node.handle(honest, 2.0)) and node.round == near
    aggregator = Modest("p00", names[1:], constant_model(), 10, Mean(), CONFIG, anchor=Sceptic(1e5))
    k = next(r for r in range(2, 99) if order(names, r)[0] == "p00")
    trainer = next(p for p in order(names, k - 1)[:4] if p != "p00")
    sent = aggregator.handle(MessageIn(trainer, TrainedModel(k, 1, constant_model(1e6))), 1.0)
    sent += aggregator.handle(TimerFired(Timer.AGGREGATE), 4.0)
    assert not [a for a in sent if isinstance(a, Send) and isinstance(a.message, AggregatedModel)]
    assert aggregator.round == 0


class Idle(Modest):
    """Answers pings like a live node, takes models in, and never aggregates or sends anything on."""

    def handle(self, event, now):
        return [a for a in super().handle(event, now) if isinstance(a, Send) and isinstance(a.message, Pong)]


def test_an_aggregator_that_answers_pings_but_never_aggregates_is_bypassed_within_ten_rounds():
    config = ModestConfig(
        sample_size=4, ping_timeout=1.0, period=0.0, max_norm_ratio=LOOSE
    )  # watch_timeout 20 s
    bench = swarm(12, config)
    idle = order(bench.protocols, 12)[0]
    names = list(bench.protocols)
    bench.protocols[idle] = Idle(idle, [p for p in names if p != idle], constant_model(), 10, Mean(), config)
    bench.run(until=60.0)
    done = {rnd: (at, node) for at, node, rnd in reversed(bench.rounds_done)}  # the first of each round
    assert done[12][1] == order(names, 12)[1]  # the watch handed round 12's models to the next candidate
    # ten of the swarm's rounds as the trainers measured them (0.56 s clean, 5.5 s when the idle node
    # trains and its aggregator waits out aggregation_timeout): 11 s here, not watch_timeout's 20 s
    assert done[12][0] - done[11][0] < 0.75 * config.watch_timeout
    assert max(done) >= 15


def test_members_that_never_answer_cost_no_round_anything():
    """Connected members that never answer (no PeerDown ever comes), a fresh one every 5 s, as an
    attacker with free identities would add them. Pinged through every selection they ranked in, they
    left nodes 30-54 s without a round; probed in the background, they cost nothing."""
    config = ModestConfig(sample_size=2, period=1.0, max_norm_ratio=LOOSE)  # as three daemons run it
    clean, attacked = swarm(3, config), swarm(3, config)
    names = list(attacked.protocols)
    silent: set[str] = set()
    for i in range(6):
        silent.add(f"s{i}")
        attacked.crashed.add(f"s{i}")
        for name in names:
            attacked.at(20.0 + 5 * i, name, Members(frozenset(set(names) - {name} | silent)))
    clean.run(until=90.0)
    seen = {name: [] for name in names}  # the rounds each node held, every 0.25 s
    for step in range(360):
        attacked.run(until=(step + 1) / 4)
        for name, protocol in attacked.protocols.items():
            seen[name].append(protocol.round)
    for rounds in seen.values():  # no node held one round for more than 8 s (32 looks)
        assert max(len(list(run)) for _, run in itertools.groupby(rounds)) <= 32
    pingers = [src for _, src, s in attacked.sent if isinstance(s.message, Ping) and s.peer in silent]
    # each node pings each silent member through a time-out (every ping_interval), then again after a
    # mute doubling from PROBE_MUTE: within its at most 70 s, at 0 s, after 15 s and after 40 s
    assert PROBE_MUTE == 10.0
    assert len(pingers) <= 3 * len(silent) * 3 * (config.ping_timeout / config.ping_interval + 1)
    done = max(rnd for _, _, rnd in attacked.rounds_done)
    assert done >= 0.9 * max(rnd for _, _, rnd in clean.rounds_done)


def test_a_silent_member_is_never_sampled_and_cannot_unmute_itself_with_pongs_nobody_asked_for():
    sampler = Sampler("me", ping_interval=1.0, ping_timeout=2.0)

    def pinged(actions) -> list[str]:
        return [a.peer for a in actions if isinstance(a, Send) and isinstance(a.message, Ping)]

    assert pinged(sampler.probe(1, ["mute", "b"], 0.0)) == ["b", "mute"]  # in the background, in order
    assert not sampler.usable("b")
    sampler.on_pong("b", 0, 0.1)
    assert sampler.usable("b") and not sampler.usable("mute")
    sampler.on_timer(0, 2.0)  # the probe's time-out: muted
    for sel in range(1, 6):  # pings never sent to it (an answer to probe 0 would count: below)
        sampler.on_pong("mute", sel, 3.0)
    assert not sampler.usable("mute")
    assert pinged(sampler.probe(2, ["mute", "b"], 3.0)) == []  # muted, and b is heard
    # a probe's time-out mutes for PROBE_MUTE (a newcomer may still be starting), doubling
    assert pinged(sampler.probe(3, ["mute", "b"], 2.0 + PROBE_MUTE)) == ["mute"]
    timed_out = 2.0 + PROBE_MUTE + 2.0
    sampler.on_timer(1, timed_out)
    assert pinged(sampler.probe(4, ["mute"], timed_out + 2 * PROBE_MUTE - 0.1)) == []
    assert pinged(sampler.probe(4, ["mute"], timed_out + 2 * PROBE_MUTE)) == ["mute"]


def test_a_late_answer_to_a_background_probe_counts():
    """A newcomer still starting answers our probe after its time-out: heard at once, not after a mute;
    an answer to another ping (or none we sent) still counts for nothing."""
    sampler = Sampler("me", ping_interval=1.0, ping_timeout=2.0)
    sampler.probe(1, ["slow", "other"], 0.0)  # selection 0
    sampler.on_timer(0, 2.0)  # both time out
    sampler.on_pong("other", 7, 3.0)
    assert not sampler.usable("other")
    sampler.on_pong("slow", 0, 3.0)
    assert sampler.usable("slow") and not sampler.usable("other")


def test_a_heard_peer_silent_in_a_rounds_selection_is_muted_for_longer():
    """A time-out in a round's selection cost that round a ping time-out: MUTE, not PROBE_MUTE."""
    sampler = Sampler("me", ping_interval=1.0, ping_timeout=2.0)
    sampler.probe(1, ["a"], 0.0)
    sampler.on_pong("a", 0, 0.1)
    sampler.select(2, 1, ["a"], lambda chosen: [], 1.0)  # selection 1: a is pinged and never answers
    sampler.on_timer(1, 3.0)
    assert not sampler.usable("a")
    assert sampler.probe(3, ["a"], 3.0 + PROBE_MUTE) == []
    assert [a.peer for a in sampler.probe(3, ["a"], 3.0 + MUTE) if isinstance(a, Send)] == ["a"]


def test_credits_tell_whose_models_were_taken():
    node = Modest("me", ["a", "b"], constant_model(), 10, Mean(), CONFIG)
    rnd = next(r for r in range(2, 200) if order(["me", "a", "b"], r)[0] == "a")
    actions = node.handle(MessageIn("a", AggregatedModel(rnd, 1, constant_model(1.0))), 1.0)
    assert Credited("a", 1.0) in actions


def test_config_is_checked():
    with pytest.raises(ValueError, match="success_fraction"):
        ModestConfig(success_fraction=0)
    with pytest.raises(ValueError, match="at least 1"):
        ModestConfig(sample_size=0)
    with pytest.raises(ValueError, match="positive"):
        ModestConfig(watch_timeout=0)
    assert ModestConfig(sample_size=10, success_fraction=0.9).quorum == 9


def test_a_swarm_of_joiners_goes_on_when_the_founders_models_are_refused():
    """A founder trains alone; 15 joiners arrive at once and hear every member at once (as in the
    simulator, where pings are answered at once). Each judges the founder's hand-over against the
    sample of its round computed from all 16 members, where the founder (then alone) may rank too
    low: no plausible trainer, refused, and every node waited for ever (the testbed's prediction at 24
    daemons). A joiner that no round reached within ``watch_timeout`` starts if it is in the sample."""
    names = ["p00", *(f"j{i:02d}" for i in range(15))]
    bench = swarm(1)
    everyone = frozenset(names)
    for name in names[1:]:
        bench.protocols[name] = Modest(name, names, constant_model(), 10, Mean(), CONFIG, joining=True)
        bench.at(10.0, name, Started())
    bench.at(10.0, "p00", Members(everyone))
    bench.run(until=10.0)
    founder_round = bench.protocols["p00"].estimate()
    bench.run(until=120.0)
    implausible = [r for _, r in bench.rejected if "no plausible trainer" in r.reason]
    assert implausible  # the stall this guards against did arise
    later = {node for t, node, rnd in bench.rounds_done if t > 10.0 and rnd > founder_round}
    assert len(later) >= 12, later  # the joiners' rounds went on and reached most of them


@pytest.mark.parametrize("rounds_go_on", [True, False])
def test_a_joiner_starts_by_itself_only_when_no_round_it_hears_of_goes_on(rounds_go_on):
    """A joiner not sampled yet while rounds go on waits (they reach it in time); one that heard of no
    newer round for a whole ``watch_timeout`` trains the newest it heard of when it is in its sample."""
    config = replace(CONFIG, sample_size=8)  # every candidate is in every sample
    node = Modest("j", ["a", "b"], constant_model(), 10, Mean(), config, joining=True)
    actions = node.handle(Started(), 0.0)
    actions += node.handle(MessageIn("a", Ping(1, 5)), 1.0)
    for k in (1, 2, 3):
        if rounds_go_on:
            actions += node.handle(MessageIn("a", Ping(k + 1, 5 + 3 * k)), 20.0 * k - 5)
        actions += node.handle(TimerFired(Timer.JOIN), 20.0 * k)
    trains = [a.tag for a in actions if isinstance(a, Train)]
    assert trains == ([] if rounds_go_on else [5])
