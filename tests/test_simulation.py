"""The engine end to end: the daemon's protocol, learner and driver on the simulated network."""

import csv
import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import networkx as nx
import pytest
import torch
import trio

from shoal.learning.compression import CodecConfig, Compression
from shoal.learning.gossip import Gossip, GossipConfig
from shoal.learning.integrators import Mean
from shoal.learning.learner import Learner
from shoal.learning.models import build_model
from shoal.learning.modest import ModestConfig
from shoal.learning.task import classification
from shoal.node.driver import Driver, ThreadCompute, VirtualCompute
from shoal.overlay.sim import SimNetwork
from shoal.overlay.wire import Message
from shoal.simulations import byzantine, churn, compression, disaster, modest, topologies
from shoal.simulations.config import TASK, ScheduledEvent, SimConfig
from shoal.simulations.engine import Simulation, configured_protocol, node_name


def test_survivors_keep_learning_after_a_third_crash_mid_round():
    config = SimConfig(nodes=20, duration=150.0, eval_every=10.0, seed=2)
    graph = nx.barabasi_albert_graph(20, 2, seed=2)
    crashed = tuple(range(0, 20, 3))  # 7 nodes, hubs 0 and 3 among them
    sim = Simulation(config, graph, schedule=[ScheduledEvent(60.3, "crash", crashed)], progress=None)
    result = sim.run()
    rows = {r.time: r for r in result.rows}
    assert rows[60.0].alive == 20 and rows[70.0].alive == 13
    assert rows[150.0].acc_mean > rows[60.0].acc_mean + 0.05
    assert rows[150.0].acc_mean > 0.85
    # no task hangs: every survivor finished rounds after the crash (1 s period: ~90 more)
    assert min(d.protocol.round for d in sim.drivers.values()) >= 140
    assert set(result.per_node_accuracy) == {node_name(i) for i in range(20) if i not in crashed}


def test_synchronous_rounds_survive_crashes_and_loss():
    config = SimConfig(
        nodes=12,
        duration=60.0,
        eval_every=10.0,
        gossip=GossipConfig(synchronous=True, round_timeout=5.0),
        loss=0.05,
    )
    graph = nx.random_regular_graph(3, 12, seed=1)
    sim = Simulation(config, graph, schedule=[ScheduledEvent(20.5, "crash", (0, 1, 2, 3))], progress=None)
    result = sim.run()
    assert result.final.alive == 8
    assert min(d.protocol.round for d in sim.drivers.values()) > result.rows[3].round


def test_a_late_joiner_fetches_the_current_model():
    config = SimConfig(nodes=10, duration=150.0, eval_every=50.0)
    graph = nx.cycle_graph(10)
    sim = Simulation(
        config, graph, offline=[4], schedule=[ScheduledEvent(100.0, "join", (4,))], progress=None
    )
    result = sim.run()
    rounds = {i: d.protocol.round for i, d in sim.drivers.items()}
    assert rounds[4] >= 0.9 * rounds[3]  # continued from a neighbour's round ~100, not from 0
    assert result.per_node_accuracy[node_name(4)] > 0.8
    assert result.rows[1].alive == 9 and result.rows[-1].alive == 10


@pytest.mark.parametrize("codec", ["fp32", "int8", "topk"])
async def test_the_driver_rejects_a_bad_model_and_keeps_going(nursery, autojump_clock, codec):
    net = SimNetwork(latency=0.01)
    await nursery.start(net.run)
    model = build_model("mlp", (4,), 3, seed=0)
    learner = Learner(classification(model, torch.randn(20, 4), torch.randint(0, 3, (20,)), steps=2))
    protocol = Gossip(
        learner.initial_state(),
        learner.samples,
        Mean(),
        GossipConfig(fanout=None, period=1.0),
        __import__("random").Random(0),
    )
    attacker = net.add_node("evil")
    good = net.add_node("good", neighbours=["evil"])
    driver = Driver(protocol, good, learner, VirtualCompute(1000), codec=CodecConfig(codec))
    nursery.start_soon(driver.run)
    await trio.sleep(2.5)
    bad = {n: torch.full_like(t, float("inf")) for n, t in protocol.model.items()}
    await attacker.send("good", Message("model", {"round": 0, "samples": 5}, bad))
    await attacker.send("good", Message("model", {"round": 0}, {}))
    if codec == "topk":  # a difference to a reference we never held: dropped, a keyframe asked for, no blame
        _, wire = Compression(CodecConfig("topk"), protocol.model).encode("good", {}, protocol.model)
        await attacker.send(
            "good", Message("model", {"round": 0, "samples": 5, "z": {"seq": 8, "base": 7, "ref": 1}}, wire)
        )
    await trio.sleep(3)
    assert good.penalties["evil"] == 2
    assert protocol.round >= 5 and all(torch.isfinite(t).all() for t in protocol.model.values())


def _nowait(channel):
    try:
        return channel.receive_nowait()
    except trio.WouldBlock:
        return None


def run_script(module: str, out, *args: str, hashseed: str = "0") -> None:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    subprocess.run(
        [sys.executable, "-m", module, "--out", str(out), "--quiet", *args],
        check=True,
        timeout=300,
        env=env,
        capture_output=True,
    )


@pytest.mark.slow
def test_same_seed_same_csv_bit_for_bit_and_other_seeds_differ(tmp_path):
    small = ["--nodes", "8", "--duration", "20", "--eval-every", "5", "--topologies", "ba", "--loss", "0.1"]
    run_script("shoal.simulations.topologies", tmp_path / "a", *small, "--seed", "4", hashseed="1")
    run_script("shoal.simulations.topologies", tmp_path / "b", *small, "--seed", "4", hashseed="2")
    run_script("shoal.simulations.topologies", tmp_path / "c", *small, "--seed", "5", hashseed="1")
    a, b, c = ((tmp_path / d / "rounds.csv").read_bytes() for d in "abc")
    assert a == b
    assert a != c


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_scenario_scripts_write_their_three_outputs(tmp_path, capsys):
    tiny = ["--nodes", "12", "--duration", "20", "--eval-every", "5", "--quiet", "--seed", "3"]
    assert topologies.main([*tiny, "--out", str(tmp_path / "t"), "--topologies", "ring,complete"]) == 0
    assert churn.main([*tiny, "--out", str(tmp_path / "c"), "--churn-every", "5", "--crash-prob", "0.2"]) == 0
    assert disaster.main([*tiny, "--out", str(tmp_path / "d"), "--drop-at", "10", "--fraction", "0.25"]) == 0
    for name in "tcd":
        out = tmp_path / name
        assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
        rows = read_rows(out / "rounds.csv")
        assert list(rows[0]) == [
            "run",
            "time",
            "round",
            "alive",
            "consensus_distance",
            "bytes_sent",
            "accuracy_mean",
            "accuracy_min",
            "accuracy_max",
            "loss_mean",
            "loss_min",
            "loss_max",
        ]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["config"]["nodes"] == 12 and summary["results"]
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert set(summary["results"]) == {"none", "data", "relay", "hubs"}
    assert summary["scenario"]["runs"]["hubs"]["dropped"] == 3
    assert int(read_rows(tmp_path / "d" / "rounds.csv")[-1]["alive"]) == 9
    churned = [r for r in read_rows(tmp_path / "c" / "rounds.csv") if r["run"] == "churn"]
    assert min(int(r["alive"]) for r in churned) < 12
    assert "wrote" in capsys.readouterr().out


def test_bad_scenario_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="unknown topology"):
        topologies.main(["--topologies", "torus", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="nodes must be at least 2"):
        churn.main(["--nodes", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="fanout must be at least 1"):
        topologies.main(["--gossip-fanout", "0", "--out", str(tmp_path)])
    (tmp_path / "s.csv").write_text("10,crash,0 1\n20,explode,2\n")
    with pytest.raises(SystemExit, match=r"s\.csv:2"):
        churn.main(["--schedule", str(tmp_path / "s.csv"), "--out", str(tmp_path), "--quiet"])


async def test_thread_compute_trains_off_the_event_loop(nursery):
    """The daemon's set-up: real clock, training in a worker thread while the loop keeps running."""
    import threading

    net = SimNetwork(latency=0.001)
    await nursery.start(net.run)
    loop_thread = threading.get_ident()
    threads = set()

    class Recording(Learner):
        def train(self, state, round):
            threads.add(threading.get_ident())
            return super().train(state, round)

    drivers = []
    for name, peers in (("a", []), ("b", ["a"])):
        learner = Recording(
            classification(
                build_model("mlp", (4,), 3, seed=0), torch.randn(40, 4), torch.randint(0, 3, (40,)), steps=3
            )
        )
        protocol = Gossip(
            learner.initial_state(), 40, Mean(), GossipConfig(fanout=None, period=0.05), random.Random(0)
        )
        drivers.append(Driver(protocol, net.add_node(name, neighbours=peers), learner, ThreadCompute()))
        nursery.start_soon(drivers[-1].run)
    with trio.fail_after(30):
        while min(d.protocol.round for d in drivers) < 5:
            await trio.sleep(0.05)
    assert threads and loop_thread not in threads
    assert net.traffic.messages["model"] >= 8


@pytest.mark.parametrize(
    "module", ["topologies", "churn", "disaster", "vca_demo", "modest", "byzantine", "compression"]
)
def test_every_scenario_explains_itself(module, capsys):
    script = __import__(f"simulations.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--nodes", "--seed", "--out"))


def test_modest_scenario_compares_methods_and_survives_the_crash(tmp_path):
    out = tmp_path / "m"
    args = [
        "--nodes",
        "20",
        "--duration",
        "24",
        "--rounds",
        "20",
        "--modest-sample-size",
        "5",
        "--quiet",
        "--out",
        str(out),
    ]
    assert modest.main([*args, "--target", "0.3"]) == 0
    summary = json.loads((out / "summary.json").read_text())["results"]
    assert set(summary) == {"modest", "d-psgd", "fedavg", "modest-crash"}
    for method in ("modest", "d-psgd", "fedavg"):
        assert summary[method]["bytes_to_target"] > 0, method
    # MoDeST moves a sample per round, D-PSGD every node: fewer bytes to the same accuracy
    assert summary["modest"]["bytes_to_target"] < summary["d-psgd"]["bytes_to_target"]
    crash = [r for r in read_rows(out / "rounds.csv") if r["run"] == "modest-crash"]
    assert int(crash[-1]["alive"]) == 4 and float(crash[-1]["round"]) > float(crash[len(crash) // 2]["round"])
    for name in ("accuracy_by_round", "accuracy_by_bytes", "bytes_per_node", "crash"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_compression_scenario_reports_bytes_to_target_per_protocol_and_codec(tmp_path):
    out = tmp_path / "z"
    tiny = [
        "--nodes",
        "6",
        "--duration",
        "30",
        "--eval-every",
        "5",
        "--modest-sample-size",
        "3",
        "--target",
        "0.5",
    ]
    assert compression.main([*tiny, "--codecs", "int8,topk", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "summary.json").read_text())["results"]
    assert set(results) == {"gossip", "modest"}
    for table in results.values():
        assert set(table) == {"fp32", "int8", "topk"}  # fp32 always runs: the reference
        assert table["fp32"]["bytes_to_target"] > 0 and table["fp32"]["bytes_to_target_vs_fp32"] == 1
        assert 0 < table["int8"]["bytes_to_target_vs_fp32"] < 0.3  # int8: about a quarter of the bytes
        assert all({"rounds_to_target", "final_accuracy_mean"} <= set(row) for row in table.values())
    for name in ("gossip", "modest"):
        assert (out / f"accuracy_by_bytes_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_byzantine_sweep_reports_honest_accuracy_per_cell(tmp_path):
    out = tmp_path / "b"
    args = ["--nodes", "10", "--duration", "6", "--eval-every", "3", "--fractions", "0,0.3", "--quiet"]
    sweep = [*args, "--task", "head", "--settings", "iid", "--integrators", "bristle,mean", "--out", str(out)]
    assert byzantine.main(sweep) == 0
    cells = json.loads((out / "summary.json").read_text())["results"]["honest_accuracy"]["sign-flip"]["iid"]
    assert set(cells) == {"bristle", "mean"} and set(cells["mean"]) == {"0.0", "0.3"}
    assert cells["mean"]["0.3"] < cells["mean"]["0.0"]  # sign-flipping attackers hurt plain averaging
    assert (out / "extractor.safetensors").exists() and (out / "byzantine_head_sign-flip_iid.png").exists()
    rows = read_rows(out / "rounds.csv")
    runs = {"sign-flip/iid/0%/bristle", "sign-flip/iid/0%/mean", "sign-flip/iid/30%/bristle"}
    assert runs | {"sign-flip/iid/30%/mean"} == {r["run"] for r in rows}


@pytest.mark.parametrize("protocol", ["gossip", "modest"])
def test_the_robust_default_holds_where_the_mean_falls(tmp_path, protocol):
    """The daemon's own task under sign-flipping peers (3 of 10, each also aggregating MoDeST's rounds
    when sampled), on either protocol: the clipped default keeps the honest nodes learning, VCA (the
    earlier default) does not."""
    out = tmp_path / protocol
    args = ["--nodes", "10", "--duration", "60", "--eval-every", "20", "--fractions", "0.3", "--quiet"]
    sweep = [
        *args,
        "--protocol",
        protocol,
        "--modest-sample-size",
        "5",
        "--integrators",
        "clipped,vca",
        "--out",
        str(out),
    ]
    assert byzantine.main(sweep) == 0
    cells = json.loads((out / "summary.json").read_text())["results"]["honest_accuracy"]["sign-flip"]["iid"]
    assert cells["clipped"]["0.3"] > 0.7 and cells["clipped"]["0.3"] > cells["vca"]["0.3"] + 0.3


@pytest.mark.parametrize("attack", ["label-flip", "noise", "alie", "stale"])
def test_every_attack_runs_in_the_sweep(tmp_path, attack):
    out = tmp_path / attack
    args = ["--nodes", "8", "--duration", "4", "--eval-every", "2", "--fractions", "0.25", "--quiet"]
    sweep = [*args, "--integrators", "clipped", "--attacks", attack, "--out", str(out)]
    assert byzantine.main(sweep) == 0
    cells = json.loads((out / "summary.json").read_text())["results"]["honest_accuracy"][attack]["iid"]
    assert 0.0 <= cells["clipped"]["0.25"] <= 1.0


def hostile_swarm(protocol: str, hostile: set[int]):
    """A small swarm in which the ``hostile`` nodes run every attack of simulations/hostile.py."""
    from shoal.simulations.hostile import ATTACKS, with_hostile

    nodes = 12
    common = dict(nodes=nodes, duration=24.0, eval_every=12.0, seed=3)
    if protocol == "gossip":
        config, graph, modest_config = SimConfig(**common), nx.random_regular_graph(4, nodes, seed=3), None
        attacks, evaluate = [a for a in ATTACKS if a != "hijack"], "all"
    else:
        # no crashes here, so a small role slack: rounds where an attacker is no plausible aggregator exist
        config = SimConfig(
            **common,
            dial_any=True,
            integrator="mean",
            task=replace(TASK, local_steps=4, local_epochs=None),
            protocol="modest",
            modest=ModestConfig(
                sample_size=4,
                ping_timeout=2.0,
                aggregation_timeout=2.0,
                watch_timeout=6.0,
                role_slack=4,
                period=0.0,  # unpaced, as the scenarios run MoDeST
            ),
        )
        graph, modest_config = nx.empty_graph(nodes), config.modest
        attacks, evaluate = list(ATTACKS), "freshest"
    honest = [i for i in range(nodes) if i not in hostile]
    sim = Simulation(
        config,
        graph,
        make_protocol=with_hostile(configured_protocol, hostile, protocol, attacks, config=modest_config),
        observed=honest,
        evaluate=evaluate,
        progress=None,
    )
    return sim, sim.run(), honest


@pytest.mark.parametrize("protocol", ["gossip", "modest"])
def test_honest_nodes_withstand_a_quarter_of_hostile_peers(protocol):
    from shoal.learning.messages import MAX_ROUND

    clean, clean_result, _ = hostile_swarm(protocol, set())
    sim, result, honest = hostile_swarm(protocol, {1, 5, 9})  # 25%: huge, far rounds, hijack, garbage
    rounds = {i: sim.drivers[i].protocol.round for i in honest}
    clean_rounds = [d.protocol.round for d in clean.drivers.values()]
    window = 100
    assert max(rounds.values()) <= max(clean_rounds) + window < MAX_ROUND  # never led away by a liar
    assert result.final.round > result.rows[1].round  # and still finishing rounds at the end
    for i in honest:
        assert all(torch.isfinite(t).all() for t in sim.drivers[i].protocol.model.values())
    assert result.final.acc_mean > clean_result.final.acc_mean - 0.05
    penalties = [sim.network.nodes[node_name(i)].overlay.penalties for i in honest]
    assert sum(p[node_name(h)] for p in penalties for h in (1, 5, 9)) > 0
    assert not any(p[node_name(h)] for p in penalties for h in honest)  # no honest peer was blamed
    if protocol == "modest":
        for i in honest:
            node = sim.drivers[i].protocol
            assert node.estimate() <= node._own_round() + window


class Raising:
    """A protocol that raises ``error`` on every message: a slip past its own parsing."""

    def __init__(self, error: Exception):
        self.error, self.model, self.round, self.messages = error, {}, 0, 0

    def handle(self, event, now):
        if type(event).__name__ == "MessageIn":
            self.messages += 1
            raise self.error
        return []


async def test_the_driver_contains_value_errors_on_messages_but_not_our_bugs(nursery, autojump_clock):
    net = SimNetwork(latency=0.01)
    await nursery.start(net.run)
    learner = Learner(
        classification(
            build_model("mlp", (4,), 3), torch.randn(4, 4), torch.randint(0, 3, (4,)), steps=None, epochs=1.0
        )
    )
    sender, good = net.add_node("evil"), net.add_node("good", neighbours=["evil"])
    protocol = Raising(ValueError("implausible"))
    nursery.start_soon(Driver(protocol, good, learner, VirtualCompute(1000)).run)
    await sender.send("good", Message("model", {}, {}))
    await sender.send("good", Message("model", {}, {}))
    await trio.sleep(1)
    assert protocol.messages == 2 and good.penalties["evil"] == 2  # both seen: the node went on

    bug = net.add_node("buggy", neighbours=["evil"])
    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as inner:
            inner.start_soon(Driver(Raising(KeyError("our bug")), bug, learner, VirtualCompute(1000)).run)
            await sender.send("buggy", Message("model", {}, {}))
            await trio.sleep(1)

    def leaves(exc):
        return (
            [e for sub in exc.exceptions for e in leaves(sub)]
            if isinstance(exc, BaseExceptionGroup)
            else [exc]
        )

    assert any(isinstance(e, KeyError) for e in leaves(info.value))  # not swallowed
