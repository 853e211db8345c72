"""``shoal.simulate``: the user's task on a simulated swarm, in virtual time.

The nodes are the daemon's (``learning.node.build_node``: same task, protocol, integrator, defences),
on ``overlay.sim`` instead of libp2p (``simulations.engine``). A node's ``train`` is charged
``samples / speed`` virtual seconds (``samples``: what it returned, else the task's), so a run's
times do not depend on the machine that runs it; everything random derives from ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from shoal.learning.task import TaskFactory
from shoal.node.config import updated
from shoal.simulations.churn import random_schedule
from shoal.simulations.config import SimConfig
from shoal.simulations.engine import Simulation
from shoal.simulations.report import write_rounds
from shoal.simulations.rows import RunResult
from shoal.simulations.topologies import TOPOLOGIES, build_graph

REJOIN = 0.5  # chance per churn period that a crashed node comes back


def simulate(
    make_task: TaskFactory,
    *,
    nodes: int = 20,
    duration: float = 300.0,
    topology: str | nx.Graph = "regular",
    churn: float = 0.0,
    churn_every: float = 10.0,
    out: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    **settings: Any,
) -> RunResult:
    """Run ``nodes`` nodes, node ``i`` learning ``make_task(i, nodes)``, for ``duration`` virtual
    seconds; their metrics every ``eval_every`` seconds are the result's ``rows``.

    ``topology``: who may reach whom, one of ``ba``, ``er``, ``regular`` (degree 4), ``ring``,
    ``complete``, or a graph on 0..nodes-1. ``churn``: every ``churn_every`` seconds, each live node
    crashes with this probability, and each crashed one comes back (model lost: it fetches the
    swarm's) with probability 1/2. ``out``: a directory to write ``rounds.csv`` to. ``settings``: the
    protocol's, named as ``shoal.Node`` takes them (``protocol``, ``integrator``, ``gossip_fanout``,
    ``gossip_period``, ``codec_name``, ...), and the simulated network's (``seed``, ``eval_every``,
    ``latency`` s, ``bandwidth`` Mbit/s, ``speed`` samples/s, ``speed_spread``, ``loss``; README,
    "Python API")."""
    settings.setdefault("integrator", "clipped")  # the daemon's default, not the scenarios' reference
    if not 0 <= churn < 1:
        raise ValueError(f"churn must be in [0, 1), got {churn}")
    try:
        config = updated(SimConfig(nodes=nodes, duration=duration), settings)
    except TypeError as exc:
        raise ValueError(f"unknown setting: {exc}") from None
    if isinstance(topology, str):
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}: use {', '.join(TOPOLOGIES)} or a graph")
        try:
            topology = build_graph(topology, nodes, config.seed)
        except SystemExit as exc:  # the scenarios' command-line error: a ValueError here
            hint = "; for a few nodes use topology='complete'"
            raise ValueError(str(exc).removeprefix("error: ") + hint) from None
    schedule, _ = random_schedule(nodes, duration, churn_every, churn, 0.0, REJOIN, 0.0, config.seed)
    simulation = Simulation(
        config, topology, schedule=schedule if churn else (), make_task=make_task, progress=progress
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nodes compute one at a time: threads cost small models more than they give
    try:
        result = simulation.run()
    finally:
        torch.set_num_threads(threads)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_rounds(Path(out), [result])
    return result
