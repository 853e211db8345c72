"""The simulator's prediction of a testbed run: the same scenario on ``SimConfig``, beside the measurement.

What the prediction takes from the testbed, term by term (nothing is fitted to the outcome):
- the protocol, integrator, period, codec, dataset, shard split, model initialisation, learning rate,
  batch size and local steps: the daemons' own settings (the plan's workload: ``node.demo``'s, with
  MoDeST's sample size where the plan runs MoDeST), so with the task's seed the simulator trains each
  node on the same samples;
- link capacity: the testbed's caps (``bandwidth`` per node up and down);
- loss: none. The testbed drops packets and TCP resends them, so every message arrives; the
  simulator's ``loss`` drops whole messages, which MoDeST pays for with an aggregation timeout
  (5 s) where TCP pays a retransmission (an earlier prediction that took the loss as the
  simulator's never reached 90% in two of the 6-node MoDeST cells the daemons reached in 36-38 s);
- latency: the added delay (0 without netem; veth and loopback add well under a millisecond);
- start-up: each daemon joins the simulated swarm when its first round began (:func:`starts`: after
  its imports, the API, its first task peer and its fetch of a peer's model; the bootstrap daemon's
  protocol start is the simulator's time 0), a restarted one when its first round began again; and it
  fetches a neighbour's model only where the daemon began from a peer's model, not from its own
  initialisation. Both are measured, not simulated: at 24 daemons the fetch waits 2-20 s on peers
  whose loops are busy with 23 joiners at once, and finds a model ahead of its own or not depending on
  which peers a joiner met first (19-22 of 23 joiners began from scratch in the runs measured for
  docs/measurements.md), where the simulator's fetch is one message on an idle link to a neighbour fixed in
  advance. A MoDeST daemon joins when its protocol started: its round moves when a round's models
  reach it, which the simulator plays out;
- per-node speed: each daemon's measured rounds per second, as samples per second of a round's
  training (``local_steps * batch_size``); this folds in the CPU contention of many daemons on few
  cores, and every per-round cost (evaluation, sending, the metadata document) as compute time. MoDeST
  rounds are the sample's, not the node's: its speed is the time its own trainings took (``/status``
  ``trained``), contention included, the per-round costs not;
- neighbours: a random regular graph whose degree is the median number of task peers the daemons had;
- churn: the testbed's SIGKILLs as crashes, SIGTERMs as leaves, restarts as joins.
- horizon: the simulation ends as the testbed's run does, ``hold`` seconds after the target (or at its
  timeout), so a prediction a few seconds late is late, not "never" (a run ends as soon as the daemons
  reach the target: cut there, the prediction of a 12-daemon run 3 s behind them never got there); each
  side's final accuracy is at its own end.
What it does not model: a restarted daemon resumes from its checkpoint, a simulated joiner fetches a
neighbour's model; contention varies over a run (start-up imports, fewer daemons after churn) while each
node's speed is its mean over the run; relayed links are as fast as direct ones; connection set-up and
discovery are folded into the start-up times; what a lost packet costs TCP (a retransmission, a smaller
window); the caps' token-bucket burst (64 KiB leave an idle link at once: a digits model is 26 KB).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from shoal.learning.node import LearningNode
from shoal.learning.protocol import LearningProtocol
from shoal.learning.settings import ProtocolSettings, TaskSettings
from shoal.node.config import updated
from shoal.node.daemon import EVAL_SAMPLES
from shoal.simulations import report
from shoal.simulations.config import ScheduledEvent, SimConfig
from shoal.simulations.engine import Simulation, configured_protocol
from shoal.simulations.rows import Row, RunResult
from shoal.simulations.testbed_record import Measurement, cumulative, lives_total

EVAL_EVERY = 2.0  # virtual seconds between evaluations: the testbed's poll interval


def round_seconds(rows: list[dict]) -> dict[int, float]:
    """Each node's mean seconds per round, over its launches (a restart may resume at a lower round)."""
    spans: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for row in rows:
        if row["accuracy"] is not None:
            spans[row["node"]].append((row["time"], row["round"]))
    out = {}
    for node, points in spans.items():
        rounds = seconds = 0.0
        for (t0, r0), (t1, r1) in itertools.pairwise(points):
            if r1 >= r0 and t1 - t0 < 3 * EVAL_EVERY:  # the same launch, polled in a row
                rounds, seconds = rounds + r1 - r0, seconds + t1 - t0
        if rounds:
            out[node] = seconds / rounds
    return out


def training_seconds(rows: list[dict]) -> dict[int, float]:
    """Each node's mean seconds per training, over its launches (its ``/status`` ``trained``): MoDeST's
    speed, where a node's round moves with the sample's rounds, whether it trained or not."""
    out = {}
    for node in {row["node"] for row in rows}:
        own = [row for row in rows if row["node"] == node]
        if trainings := lives_total(own, "trainings"):
            out[node] = lives_total(own, "training_s") / trainings
    return out


@dataclass(frozen=True)
class Start:
    """When a daemon's launch began its first round, and whether it began from a peer's model."""

    time: float
    fetched: bool


def starts(measured: Measurement) -> dict[int, list[Start]]:
    """Per node, per launch that began learning: the first poll at which its round had moved from the
    one its status showed first (at most a poll late; its protocol start where it never moved). A fresh
    launch whose round moved by at most the rounds it can train alone within a poll started from its
    own initialisation: its fetches found only peers no further than itself. A resumed launch counts
    as fetched: the simulated joiner's fetch stands in for its checkpoint. A MoDeST launch starts at its
    protocol's start: its round moves when a round's models reach it, which the simulator plays out."""
    if measured.plan.protocol == "modest":
        return {m.site.index: [Start(learning, True) for learning in m.learning] for m in measured.members}
    period = updated(ProtocolSettings(), measured.plan.workload.protocol).gossip.period
    alone = math.ceil(EVAL_EVERY / period) + 1
    out: dict[int, list[Start]] = {}
    for m in measured.members:
        rows = [r for r in measured.rows if r["node"] == m.site.index]
        out[m.site.index] = []
        for k, learning in enumerate(m.learning):
            end = m.launches[k + 1] if k + 1 < len(m.launches) else math.inf
            launch = [r for r in rows if m.launches[k] <= r["time"] < end]
            first = launch[0]["round"] if launch else 0
            moved = next((r for r in launch if r["time"] >= learning and r["round"] != first), None)
            fetched = first > 0 or moved is None or moved["round"] > alone
            out[m.site.index].append(Start(learning if moved is None else moved["time"], fetched))
    return out


def neighbours(measured: Measurement) -> int:
    """The median of every node's median number of task peers, after its first round."""
    per_node = defaultdict(list)
    for row in measured.rows:
        if row["accuracy"] is not None:
            per_node[row["node"]].append(row["peers"])
    return max(1, round(statistics.median(statistics.median(v) for v in per_node.values())))


@dataclass
class Scenario:
    """The measured run as the simulator takes it: config, graph, per-node speeds, schedule, the launches'
    starts, and ``origin``, the testbed time of the simulator's time 0 (the bootstrap's protocol start)."""

    config: SimConfig
    graph: nx.Graph
    speeds: list[float]
    events: list[ScheduledEvent]
    starts: dict[int, list[Start]]
    origin: float
    _launched: Counter[int] = field(default_factory=Counter)

    def protocol(self, sim: Simulation, i: int, node: LearningNode, joining: bool) -> LearningProtocol:
        """Node ``i``'s protocol at its next launch: a joiner fetches a neighbour's model only where the
        daemon's launch began from a peer's model."""
        launch, self._launched[i] = self._launched[i], self._launched[i] + 1
        fetched = launch >= len(self.starts[i]) or self.starts[i][launch].fetched
        return configured_protocol(sim, i, node, joining and fetched)


def scenario(measured: Measurement) -> Scenario:
    """The measured run's :class:`Scenario`: every term from the measurement (module docstring)."""
    plan = measured.plan
    workload = plan.workload
    task = updated(TaskSettings(), workload.task)  # the daemons' keys, by name
    launches = starts(measured)
    origin = measured.members[0].learning[0]
    samples = task.batch_size * task.local_steps
    seconds = (round_seconds if plan.protocol == "gossip" else training_seconds)(measured.rows)
    typical = statistics.median(seconds.values())
    speeds = [samples / seconds.get(i, typical) for i in range(plan.nodes)]
    config = SimConfig(
        task=task,
        nodes=plan.nodes,
        seed=task.seed,
        duration=math.ceil((plan.timeout - origin) / EVAL_EVERY) * EVAL_EVERY,
        eval_every=EVAL_EVERY,
        eval_samples=EVAL_SAMPLES,
        latency=plan.delay_ms / 1000,
        bandwidth=plan.mbit,
        speed=samples / typical,
    )
    config = updated(config, workload.protocol)  # the daemons' keys, by name
    degree = min(neighbours(measured), plan.nodes - 1)
    if degree * plan.nodes % 2:
        degree -= 1
    graph = (
        nx.complete_graph(plan.nodes)
        if degree >= plan.nodes - 1
        else nx.random_regular_graph(degree, plan.nodes, seed=plan.seed)
    )
    events = [
        ScheduledEvent(start.time - origin, "join", (node,))
        for node, times in launches.items()
        for start in times[0 if node else 1 :]
    ]
    events += [
        ScheduledEvent(e.time - origin, e.action, e.nodes) for e in measured.events if e.action != "join"
    ]
    return Scenario(config, graph, speeds, sorted(events, key=lambda e: e.time), launches, origin)


def predict_and_compare(measured: Measurement, out: Path) -> dict:
    """Run the prediction, plot it beside the measurement, and return the figures for summary.json."""
    sc = scenario(measured)
    config, origin = sc.config, sc.origin
    print(
        f"simulating the same scenario: {config.nodes} nodes, degree {sc.graph.degree(0)}, "
        f"{statistics.median(sc.speeds):.0f} samples/s median",
        flush=True,
    )
    # as the testbed counts: every node that should be up is, after the last churn event
    target, last_event = measured.plan.target, max((e.time for e in measured.events), default=0.0)
    gone = {i for e in measured.events if e.action != "join" for i in e.nodes}
    back = {i for e in measured.events if e.action == "join" for i in e.nodes}
    expected, reach = config.nodes - len(gone - back), []

    def until(r: Row) -> bool:
        """Reached, as the testbed counts it, ``hold`` seconds ago (the testbed's end)."""
        if not reach and r.acc_mean >= target and r.alive == expected and r.time + origin > last_event:
            reach.append(r.time)
        return bool(reach) and r.time >= reach[0] + measured.plan.hold

    result = Simulation(  # for as long as the testbed would have run: to its timeout at most
        config,
        sc.graph,
        label="simulator",
        schedule=sc.events,
        offline=range(1, config.nodes),
        speeds=sc.speeds,
        make_protocol=sc.protocol,
        progress=None,
        until=until,
    ).run()
    predicted = reach[0] + origin if reach else None
    measured_time = measured.time_to_target()
    waits = [
        start.time - learning
        for m in measured.members
        for learning, start in zip(m.learning, sc.starts[m.site.index])
    ]
    fresh = [launch[0] for node, launch in sc.starts.items() if node and launch]
    plot(out, measured, result, origin)
    return {
        "time_to_target": None if predicted is None else round(predicted, 1),
        "measured_time_to_target": None if measured_time is None else round(measured_time, 1),
        "ratio": None if not predicted or not measured_time else round(predicted / measured_time, 3),
        "final_accuracy_mean": round(result.final.acc_mean, 4),
        "bytes_sent": result.final.bytes_sent,
        "model": {
            "degree": sc.graph.degree(0),
            "speeds_samples_per_s": {
                "median": round(statistics.median(sc.speeds)),
                "min": round(min(sc.speeds)),
                "max": round(max(sc.speeds)),
            },
            "origin": round(origin, 2),
            "first_round_after_protocol_start_s": {
                "median": round(statistics.median(waits), 1),
                "max": round(max(waits), 1),
            },
            "joiners_from_scratch": sum(not s.fetched for s in fresh),
            "wall_seconds": round(result.wall_seconds, 1),
        },
    }


def plot(out: Path, measured: Measurement, result: RunResult, origin: float) -> Path:
    """Mean accuracy and bytes sent over time, testbed and simulator on one time axis."""
    by_time: dict[float, list[dict]] = defaultdict(list)
    for row in measured.rows:
        by_time[row["time"]].append(row)
    times = sorted(by_time)
    accuracy = [
        statistics.fmean(accs)
        if (accs := [r["accuracy"] for r in by_time[t] if r["accuracy"] is not None])
        else math.nan
        for t in times
    ]
    sent = [total / 1e6 for total in dict(cumulative(measured.rows, "bytes_out")).values()]  # per poll
    fig, (acc_ax, bytes_ax) = report.figure(2, 1, figsize=(8, 6.5), sharex=True)
    sim_t = [r.time + origin for r in result.rows]
    acc_ax.plot(times, accuracy, label="testbed (daemons)")
    acc_ax.plot(sim_t, [r.acc_mean for r in result.rows], label="simulator", linestyle="--")
    acc_ax.axhline(measured.plan.target, color="grey", linewidth=0.8)
    for e in measured.events:
        for ax in (acc_ax, bytes_ax):
            ax.axvline(e.time, color="grey", linestyle=":", linewidth=1)
    acc_ax.set_ylabel("mean test accuracy")
    acc_ax.set_ylim(0, 1)
    acc_ax.legend(loc="lower right")
    acc_ax.grid(alpha=0.3)
    acc_ax.set_title(
        f"{measured.plan.nodes} daemons, {measured.plan.nat_nodes} behind NATs, "
        f"{measured.plan.mbit:g} Mbit/s" + (", churn" if measured.events else "")
    )
    bytes_ax.plot(times, sent, label="testbed")
    bytes_ax.plot(sim_t, [r.bytes_sent / 1e6 for r in result.rows], label="simulator", linestyle="--")
    bytes_ax.set_ylabel("MB sent (all nodes)")
    bytes_ax.set_xlabel("seconds since the first daemon started")
    bytes_ax.grid(alpha=0.3)
    return report.save_figure(fig, out / "testbed_vs_simulator.png")
