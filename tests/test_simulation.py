"""The engine end to end: the daemon's protocol, learner and driver on the simulated network, through
crashes, loss, late joiners and hostile peers."""

from dataclasses import replace

import networkx as nx
import pytest
import torch

from shoal.learning.gossip import GossipConfig
from shoal.learning.modest import ModestConfig
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


def adding_task(i: int, nodes: int):
    """Training adds 1 to the one weight; evaluation reads it: synchronous gossip averages equal
    models, so a node's model as of its round r is exactly r, and r + 1 while it waits for its peers."""
    from shoal.learning.task import Task

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)

    def train(m: torch.nn.Module, rnd: int) -> dict[str, float]:
        with torch.no_grad():
            m.weight.add_(1.0)
        return {"samples": 2000}  # a virtual second at the default speed

    return Task(model, train=train, evaluate=lambda m: {"w": m.weight.item()})


@pytest.mark.parametrize("settled", [False, True])
def test_settled_evaluation_sees_each_nodes_model_as_of_its_last_round(settled):
    config = SimConfig(
        nodes=4,
        duration=20.0,
        eval_every=0.3,
        latency=0.5,  # half a second of each round spent waiting, holding the model trained
        gossip=GossipConfig(synchronous=True, round_timeout=5.0),
    )
    sim = Simulation(config, nx.complete_graph(4), make_task=adding_task, settled=settled, progress=None)
    rows = sim.run().rows
    assert rows[-1].round >= 10
    ahead = [r for r in rows if r.metrics["w_max"] != r.round]
    if settled:
        assert not ahead and all(r.metrics["w_min"] == r.round for r in rows)
    else:
        assert len(ahead) > len(rows) // 10  # mid-round, nodes hold their own trained model
