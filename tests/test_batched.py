"""Batched training (learning/batched.py, simulations/batching.py): the per-node path's results, at once."""

import math
from dataclasses import replace

import networkx as nx
import pytest
import torch
import trio

from shoal.learning.anchor import Anchor
from shoal.learning.batched import Job, batch_key, samples, train_together
from shoal.learning.datasets import load_dataset
from shoal.learning.learner import Learner
from shoal.learning.models import build_model
from shoal.learning.task import Task, classification
from shoal.overlay.sim import run_virtual
from shoal.simulations.batching import BatchedTraining
from shoal.simulations.config import ScheduledEvent, SimConfig
from shoal.simulations.engine import Simulation


def learners(data, module, **hyper) -> list[Learner]:
    """Nodes of one module with shards of 1 to 40 samples (short and padded batches), each with an anchor."""
    out = []
    for k, size in enumerate([1, 3, 7, 16, 17, 40, 2, 33]):
        x, y = data.x_train[k * 40 : k * 40 + size], data.y_train[k * 40 : k * 40 + size]
        task = classification(module, x, y, batch_size=16, seed=k, **hyper)
        learner = Learner(task, module, anchor=Anchor(module, task.probe))
        learner.anchor.start(learner.initial_state())
        out.append(learner)
    return out


@pytest.mark.parametrize(
    "hyper",
    [
        {"steps": 3, "lr": 0.1},
        {"steps": None, "epochs": 1.5, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    ],
)
def test_a_batch_trains_each_node_as_it_would_train_alone(hyper):
    data = load_dataset("digits")
    module = build_model("mlp", data.input_shape, data.num_classes, seed=3)
    alone, together = learners(data, module, **hyper), learners(data, module, **hyper)
    start = alone[0].initial_state()
    for round in (1, 2):  # the second from the first's models: anchors and rounds carry on
        expected = [learner.train(start, round) for learner in alone]
        got = train_together([Job(learner, start, round, batch_key(learner)) for learner in together])
        for (a, stats), b, ours, theirs in zip(expected, got, alone, together):
            for name in a:
                torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
            assert math.isclose(theirs.anchor.step(), ours.anchor.step(), rel_tol=1e-6)
            assert samples(theirs) == stats["samples"]  # what the simulation charges in virtual time
        start = expected[3][0]


def test_a_round_that_makes_weights_non_finite_keeps_the_start_as_alone():
    data = load_dataset("digits")
    module = build_model("mlp", data.input_shape, data.num_classes, seed=3)
    start = Learner(classification(module, data.x_train, data.y_train)).initial_state()
    (learner,) = learners(data, module, steps=2, lr=1e30)[5:6]
    (trained,) = train_together([Job(learner, start, 1, batch_key(learner))])
    assert all(torch.equal(trained[n], start[n]) for n in start)
    assert "non-finite" in learner.error


def test_only_the_built_in_training_of_a_model_without_buffers_is_batched():
    data = load_dataset("digits")
    plain = build_model("mlp", data.input_shape, data.num_classes)
    normed = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 10))
    assert batch_key(Learner(classification(plain, data.x_train, data.y_train))) is not None
    assert batch_key(Learner(classification(normed, data.x_train, data.y_train))) is None
    assert batch_key(Learner(Task(plain, train=lambda model, round: {"samples": 1}))) is None
    with pytest.raises(ValueError, match="cannot be batched"):
        learner = Learner(Task(plain, train=lambda model, round: {"samples": 1}))
        train_together([Job(learner, learner.initial_state(), 0, None)])


@pytest.mark.slow
def test_a_batched_simulation_learns_as_the_per_node_one_through_a_crash_and_a_rejoin():
    """Seeded, both paths give the same accuracy curve (the 100-node comparison: sim_speed.py --compare)."""
    config = SimConfig(nodes=20, duration=60.0, eval_every=10.0, speed_spread=2.0)
    schedule = [ScheduledEvent(12.3, "crash", (0, 3, 6, 9, 12)), ScheduledEvent(30.0, "join", (0, 3))]
    graph = nx.random_regular_graph(4, 20, seed=1)
    runs = [
        Simulation(replace(config, batched=batched), graph, schedule=schedule, progress=None).run()
        for batched in (False, True)
    ]
    alone, together = ([row.acc_mean for row in run.rows] for run in runs)
    assert alone[-1] > alone[0] + 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(alone, together)) < 0.01, (alone, together)
    assert [r.alive for r in runs[0].rows] == [r.alive for r in runs[1].rows] == [20, 20, 15, 17, 17, 17, 17]
    assert runs[1].node_rounds == pytest.approx(runs[0].node_rounds, rel=0.01)


def test_a_node_that_goes_down_while_its_round_is_queued_leaves_the_batch():
    data = load_dataset("digits")
    module = build_model("mlp", data.input_shape, data.num_classes, seed=3)
    down, up = learners(data, module, steps=2, lr=0.1)[4:6]
    batching = BatchedTraining()
    start = up.initial_state()
    results = {}

    async def go(learner, name, scope):
        with scope:
            results[name] = await batching.compute(100.0).train(learner, start, 1)

    async def run():
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(go, down, "down", scope)
            nursery.start_soon(go, up, "up", trio.CancelScope())
            await trio.sleep(0.1)  # both queued; "up" is due at 32 / 100 s
            assert len(batching.queue) == 2
            scope.cancel()  # "down" goes down before its round is due
        assert batching.batches == 1 and "down" not in results

    run_virtual(run, seed=1)
    assert not any(torch.equal(results["up"][n], start[n]) for n in start)  # trained
    assert down.anchor.step() is None and up.anchor.step() > 0  # only the live node's round was computed
