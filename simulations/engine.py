"""The simulation engine: the daemon's own protocol, learner and driver on a simulated network.

A :class:`Simulation` builds one node per graph vertex, as the daemon builds its own
(``learning.node.build_node``): its task (the built-in one on its data shard, or the user's, from a
task factory: ``shoal.simulate``), a learning protocol (the one the :class:`SimConfig` names;
attackers or other integrators through a protocol factory), a :class:`~node.driver.Driver` and a
:class:`~overlay.sim.SimOverlay`;
runs them all on one trio loop in virtual time (``overlay.sim.run_virtual``), applies a schedule of
crashes, leaves, joins and partitions, and evaluates every live node's model at fixed virtual times.
Everything random derives from the seed, so a seed reproduces a run bit for bit on CPU.

The built-in task's nodes share one ``nn.Module`` for compute (they train one at a time on the loop's
thread, or with ``SimConfig.batched`` together: ``simulations.batching``); what each node owns is its
parameters, so memory per node is a few copies of the model. A user's task factory decides: returning
one module for every node shares it too.
"""

from __future__ import annotations

import functools
import gc
import math
import random
import time
from collections.abc import Callable, Sequence

import networkx as nx
import numpy as np
import torch
import trio

from shoal.learning.datasets import Dataset, load_dataset
from shoal.learning.models import ParameterLayout, build_model
from shoal.learning.node import LearningNode, build_node
from shoal.learning.partition import partition
from shoal.learning.protocol import LearningProtocol, State
from shoal.learning.task import Task, TaskFactory, make
from shoal.node.driver import Driver, VirtualCompute
from shoal.overlay.sim import SimNetwork, run_virtual
from shoal.simulations.batching import BatchedTraining
from shoal.simulations.config import ScheduledEvent, SimConfig
from shoal.simulations.rows import Row, RunResult

# Python's garbage collector is off during a run, collecting once per COLLECT_ROUNDS rounds per node:
# the automatic collections walked millions of live objects over and over (docs/measurements.md,
# "Simulator speed"); counted in rounds, not by a timer task, which would reorder trio's scheduling.
COLLECT_ROUNDS = 10


def node_name(i: int) -> str:
    return f"n{i:04d}"


ProtocolFactory = Callable[["Simulation", int, LearningNode, bool], LearningProtocol]


def configured_protocol(sim: Simulation, i: int, node: LearningNode, joining: bool) -> LearningProtocol:
    """The default factory: the protocol the SimConfig names. Gossip learns its neighbours from the
    overlay; MoDeST's initial nodes know each other, and a late joiner knows three live nodes."""
    c, me = sim.config, node_name(i)
    peers: list[str] = []
    if c.protocol == "modest" and joining:
        alive = [p for p in sim.network.alive() if p != me]
        peers = sim.rng(i).sample(alive, min(3, len(alive)))
    elif c.protocol == "modest":
        peers = [node_name(j) for j in range(c.nodes) if j != i and j not in sim.offline]
    return node.protocol(me, peers, joining=joining)


class Simulation:
    def __init__(
        self,
        config: SimConfig,
        graph: nx.Graph,
        *,
        label: str = "run",
        data: Dataset | None = None,
        data_nodes: Sequence[int] | None = None,
        schedule: Sequence[ScheduledEvent] = (),
        offline: Sequence[int] = (),
        make_protocol: ProtocolFactory | None = None,
        make_task: TaskFactory | None = None,
        evaluate: str = "all",
        settled: bool = False,
        observed: Sequence[int] | None = None,
        speeds: Sequence[float] | None = None,
        progress: Callable[[str], None] | None = print,
        until: Callable[[Row], bool] | None = None,
    ):
        """``graph`` has vertices 0..nodes-1; ``data_nodes`` hold the training data (default all);
        ``offline`` nodes exist but start down (they can ``join`` later); ``make_protocol`` builds each
        node's protocol (default: :func:`configured_protocol`); ``evaluate`` is ``all`` live nodes'
        models or only the ``freshest`` (the nodes at the highest round, e.g. MoDeST's current sample);
        ``settled``: evaluate each node's model as of its last finished round (what a daemon evaluates:
        DiLoCo's outer model, MoDeST's aggregate) rather than the one it holds at the time (mid-round,
        its own trained model, which local steps on a small batch can leave far worse than the average);
        ``observed`` limits evaluation to some nodes (e.g. the honest ones when others attack);
        ``speeds`` gives each node's samples/s (e.g. measured on daemons) instead of drawing them;
        ``make_task(i, nodes)`` gives node ``i``'s task (default: the built-in one the config names, on
        the node's shard of ``data``); ``until(row)``: the run ends at the first evaluation it holds for
        (else after ``duration``)."""
        if evaluate not in {"all", "freshest"}:
            raise ValueError(f"evaluate must be 'all' or 'freshest', got {evaluate!r}")
        if sorted(graph.nodes) != list(range(config.nodes)):
            raise ValueError(f"graph must have vertices 0..{config.nodes - 1}")
        self.config = config
        self.graph = graph
        self.label = label
        self.make_task = make_task
        if make_task is None:
            data = data or load_dataset(config.task.dataset, seed=config.seed, samples=config.dataset_samples)
        self.data = data  # the built-in task's (None: the user's tasks hold their own)
        self.schedule = sorted(schedule, key=lambda e: e.time)
        self.offline = set(offline)
        self.progress = progress
        self.make_protocol = make_protocol
        self.evaluate = evaluate
        self.settled: dict[int, tuple[int, State]] | None = {} if settled else None  # node -> (round, model)
        self.until = until
        self.observed = None if observed is None else set(observed)
        if speeds is not None and (len(speeds) != config.nodes or min(speeds) <= 0):
            raise ValueError(f"speeds must be {config.nodes} positive numbers")
        self.given_speeds = speeds
        self.shards = {i: np.empty(0, dtype=np.int64) for i in range(config.nodes)}
        if data is not None:
            holders = list(range(config.nodes)) if data_nodes is None else sorted(data_nodes)
            shards = partition(data.y_train.numpy(), len(holders), config.task.partition, config.seed)
            self.shards.update(zip(holders, shards))
        self.rows: list[Row] = []
        self.node_rounds = 0
        self._final_accuracy: dict[str, float] = {}

    # --- building nodes ---------------------------------------------------------------------

    def _setup(self) -> None:
        c = self.config
        rng = np.random.default_rng(c.seed)
        spread = math.log(c.speed_spread)
        self.speeds = (
            dict(enumerate(self.given_speeds))
            if self.given_speeds is not None
            else {i: c.speed * math.exp(rng.uniform(-spread, spread)) for i in range(c.nodes)}
        )
        self.network = SimNetwork(
            seed=c.seed, latency=c.latency, bandwidth=c.bandwidth * 1e6 / 8, loss=c.loss, dial_any=c.dial_any
        )
        self.drivers: dict[int, Driver] = {}
        self.batching = BatchedTraining()
        self.scopes: dict[int, trio.CancelScope] = {}
        self.tasks = {i: self._user_task(i) for i in range(c.nodes)} if self.make_task else self._builtin()
        self.modules = {i: task.module() for i, task in self.tasks.items()}
        layout = ParameterLayout.of(self.modules[0])
        if not c.same_init:
            self.initial = {i: layout.state(self._own_model(i)) for i in range(c.nodes)}  # node -> model
        else:
            shared = layout.state(self.modules[0])  # protocols never change a model in place: one serves all
            self.initial = dict.fromkeys(range(c.nodes), shared)

    def _user_task(self, i: int) -> Task:
        task = make(self.make_task, i, self.config.nodes, "make_task")
        if task.train is None:
            raise ValueError("a simulated node trains with its task's train: make_task gave none")
        return task

    def _own_model(self, i: int) -> torch.nn.Module:
        """Node ``i``'s own initial model: from the user's factory, or the built-in one's seeded by ``i``."""
        if self.make_task:
            return self.modules[i]
        c, data = self.config, self.data
        return build_model(c.task.model, data.input_shape, data.num_classes, seed=c.seed * 100_003 + i)

    def _builtin(self) -> dict[int, Task]:
        """The built-in task of every node: the config's model (one module computes for all) on the
        node's shard, evaluated on the same ``eval_samples`` test samples."""
        c, data = self.config, self.data
        pick = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(c.seed))
        test = (data.x_test[pick[: c.eval_samples]], data.y_test[pick[: c.eval_samples]])
        model = build_model(c.task.model, data.input_shape, data.num_classes, seed=c.seed)
        x, y = data.x_train, data.y_train
        return {
            i: c.task.builtin(model, x[s], y[s], test, data.num_classes, seed=c.seed, node=i)
            for i, s in self.shards.items()
        }

    def rng(self, i: int) -> random.Random:
        """Node ``i``'s own generator for its protocol's choices."""
        return random.Random(self.config.seed * 31337 + i)

    def _start_node(self, nursery: trio.Nursery, i: int, *, joining: bool) -> None:
        c = self.config
        name = node_name(i)
        live_neighbours = [node_name(j) for j in self.graph.neighbors(i)]
        overlay = self.network.add_node(name, neighbours=live_neighbours)
        # the nodes run one at a time on this thread: a node's module serves its anchor too
        node = build_node(
            self.tasks[i], c, self.rng(i), module=self.modules[i], shared=True, initial=self.initial[i]
        )
        protocol = (self.make_protocol or configured_protocol)(self, i, node, joining)
        compute = self.batching.compute(self.speeds[i]) if c.batched else VirtualCompute(self.speeds[i])
        driver = Driver(
            protocol,
            overlay,
            node.learner,
            compute,
            on_round=functools.partial(self._round_done, i),
            codec=c.codec,
            fragments=c.outer.fragments,
        )
        self.drivers[i] = driver
        if self.settled is not None:
            self.settled[i] = (protocol.round, protocol.model)
        scope = trio.CancelScope()
        self.scopes[i] = scope

        async def run() -> None:
            with scope:
                await driver.run()

        nursery.start_soon(run)

    def _round_done(self, i: int, rnd: int) -> None:
        if self.settled is not None:
            self.settled[i] = (rnd, self.drivers[i].protocol.model)
        self.node_rounds += 1
        if self.node_rounds % (COLLECT_ROUNDS * self.config.nodes) == 0:
            gc.collect()

    def _stop_node(self, i: int, action: str) -> None:
        name = node_name(i)
        if not self.network.is_alive(name):
            return
        self.network.crash(name) if action == "crash" else self.network.leave(name)
        self.scopes[i].cancel()
        self.drivers.pop(i)

    # --- running ----------------------------------------------------------------------------

    def run(self) -> RunResult:
        start = time.perf_counter()
        state = random.getstate()
        # what a user's task draws from torch's and Python's global generators derives from the seed too
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            random.seed(self.config.seed)
            collecting = gc.isenabled()
            gc.disable()
            gc.freeze()  # what lived before the run (torch, the data): collections need not walk it
            try:
                run_virtual(self._main, seed=self.config.seed)
            finally:
                gc.unfreeze()
                if collecting:
                    gc.enable()
                random.setstate(state)
        self.wall_seconds = time.perf_counter() - start
        traffic = self.network.traffic
        per_node = {
            node_name(i): traffic.total_sent(node_name(i)) + sum(traffic.received[node_name(i)].values())
            for i in range(self.config.nodes)
        }
        return RunResult(
            self.label,
            self.rows,
            self.wall_seconds,
            self.node_rounds,
            traffic.by_kind(),
            self._final_accuracy,
            per_node,
        )

    async def _main(self) -> None:
        self._setup()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.network.run)
            # The nodes stop before the network that carries their messages: a send started as the
            # run ends must not find the network's nursery closed.
            async with trio.open_nursery() as nodes:
                for i in range(self.config.nodes):
                    if i not in self.offline:
                        self._start_node(nodes, i, joining=False)
                nodes.start_soon(self._apply_schedule, nodes)
                await self._observe()
                nodes.cancel_scope.cancel()
            nursery.cancel_scope.cancel()

    async def _apply_schedule(self, nursery: trio.Nursery) -> None:
        t0 = trio.current_time()
        for event in self.schedule:
            await trio.sleep_until(t0 + event.time)
            if event.action == "crash":
                for i in event.nodes:
                    self._stop_node(i, "crash")
            elif event.action == "leave":
                for i in event.nodes:
                    if i in self.drivers:
                        nursery.start_soon(self._leave, i)
            elif event.action == "join":
                for i in event.nodes:
                    if not self.network.is_alive(node_name(i)):
                        self._start_node(nursery, i, joining=True)
            elif event.action == "partition":
                self.network.partition([[node_name(i) for i in event.nodes]])
            else:
                self.network.heal()
            if self.progress:
                self.progress(
                    f"  [{self.label}] t={event.time:.0f}s {event.action} {len(event.nodes)} node(s)"
                )

    async def _leave(self, i: int) -> None:
        driver = self.drivers.get(i)
        if driver is not None:
            await driver.leave()
            self._stop_node(i, "leave")

    async def _observe(self) -> None:
        c = self.config
        t0 = trio.current_time()
        steps = int(c.duration // c.eval_every)
        for k in range(steps + 1):
            await trio.sleep_until(t0 + k * c.eval_every)
            self.rows.append(self._evaluate(k * c.eval_every))
            if self.progress and (k % max(1, steps // 10) == 0 or k == steps):
                self.progress(self._describe(self.rows[-1]))
            if self.until and self.until(self.rows[-1]):
                return

    def _evaluate(self, now: float) -> Row:
        live = sorted(self.drivers)
        alive = len(live)
        if self.observed is not None:
            live = [i for i in live if i in self.observed]
        at = self.settled
        if at is None:  # the model each node holds now
            at = {i: (d.protocol.round, d.protocol.model) for i, d in self.drivers.items()}
        if live and self.evaluate == "freshest":
            newest = max(at[i][0] for i in live)
            live = [i for i in live if at[i][0] == newest]
        if not live:
            return Row(self.label, now, math.nan, alive, math.nan, self._bytes())
        states = {i: at[i][1] for i in live}
        evaluated = {i: self.drivers[i].learner.evaluate(s) for i, s in states.items()}
        self._final_accuracy = {
            node_name(i): m["accuracy"] for i, m in evaluated.items() if m.get("accuracy") is not None
        }
        metrics: dict[str, float] = {}
        for name in dict.fromkeys(name for m in evaluated.values() for name in m):
            values = [v for m in evaluated.values() if (v := m.get(name)) is not None]
            for stat, value in zip(("mean", "min", "max"), (np.mean, min, max)):
                metrics[f"{name}_{stat}"] = float(value(values)) if values else math.nan
        layout = self.drivers[live[0]].learner.layout
        flat = torch.stack([layout.flatten(s) for s in states.values()])
        distance = (flat - flat.mean(0)).norm(dim=1).mean().item()
        rounds = float(np.mean([at[i][0] for i in live]))
        return Row(self.label, now, rounds, alive, distance, self._bytes(), metrics)

    def _bytes(self) -> int:
        return self.network.traffic.total_sent()

    def _describe(self, row: Row) -> str:
        m = row.metrics
        text = "  ".join(
            f"{n} {m[n + '_mean']:.3f} (min {m[n + '_min']:.3f}, max {m[n + '_max']:.3f})"
            for n in (key.removesuffix("_mean") for key in m if key.endswith("_mean"))
        )
        return (
            f"  [{self.label}] t={row.time:6.0f}s  round {row.round:6.1f}  alive {row.alive:4d}  {text}  "
            f"sent {row.bytes_sent / 1e6:8.1f} MB"
        )
