"""How fast does the simulator run? Wall-clock per simulated node-round, and memory per node.

Asynchronous gossip (fanout 2; per 1-second round two local SGD steps of batch 16, so that a node-round
costs the same at every scale) with the MLP on MNIST-1D (``--samples-per-node`` generated samples per
node, IID) on a 4-regular graph. The nodes' rounds train in batches (``SimConfig.batched``) unless
``--per-node``. Prints, per size: wall time of the run (set-up, two evaluations of every node and the
rounds), node-rounds per second, the growth of resident memory per node (after a warm-up run, so
one-off allocations are not counted) and the process's peak; then what 100,000 nodes would take, on
paper, from the largest run's wall time per node-round and memory per node. Run it on a quiet machine
and repeat (a shared VM's speed varies from run to run).

    python benchmarks/sim_speed.py                        # 1,000 and 10,000 nodes, 100 rounds each
    python benchmarks/sim_speed.py --nodes 1000 --per-node
    python benchmarks/sim_speed.py --nodes 100 --rounds 20
    python benchmarks/sim_speed.py --compare 100         # both paths, seeded: their accuracy curves
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from dataclasses import replace

import networkx as nx
import torch

from shoal.learning.datasets import Dataset, load_dataset
from shoal.simulations.config import TASK, SimConfig
from shoal.simulations.engine import Simulation

ON_PAPER = 100_000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def swarm(nodes: int, rounds: int, batched: bool) -> SimConfig:
    """The benchmark's swarm: gossip, two local steps of batch 16 per 1-second round, MLP on MNIST-1D."""
    return SimConfig(
        nodes=nodes,
        task=replace(TASK, dataset="mnist1d", local_steps=2, local_epochs=None),
        duration=float(rounds),
        eval_every=float(rounds),
        eval_samples=500,
        batched=batched,
    )


def generated(nodes: int, per_node: int) -> Dataset:
    start = time.perf_counter()
    data = load_dataset("mnist1d", seed=1, samples=nodes * per_node)
    took = time.perf_counter() - start
    print(f"{nodes:6d} nodes: {len(data.y_train):,} training samples generated in {took:.0f} s", flush=True)
    return data


def compare(nodes: int, rounds: int, per_node: int) -> None:
    """Both paths on one seeded swarm, evaluated every 10 rounds: their accuracy curves side by side."""
    data = generated(nodes, per_node)
    curves = {}
    for batched in (False, True):
        config = replace(swarm(nodes, rounds, batched), eval_every=10.0)
        result = Simulation(config, nx.random_regular_graph(4, nodes, seed=1), data=data, progress=None).run()
        curves[batched] = [row.acc_mean for row in result.rows]
        accuracy = " ".join(f"{a:.3f}" for a in curves[batched])
        path = "batched" if batched else "per node"
        print(
            f"{path:>8}: {result.wall_seconds:6.1f} s wall; accuracy every 10 rounds {accuracy}", flush=True
        )
    gap = max(abs(a - b) for a, b in zip(curves[False], curves[True]))
    print(f"largest difference between the curves: {gap:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[1000, 10_000])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--samples-per-node", type=int, default=20, help="MNIST-1D samples generated per node")
    p.add_argument("--per-node", action="store_true", help="train each node's round alone (not batched)")
    p.add_argument(
        "--compare", type=int, metavar="NODES", help="run NODES nodes both ways and compare accuracy curves"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    print(f"{platform.machine()}, {os.cpu_count()} cores, {versions}", flush=True)
    batched = not args.per_node
    data = load_dataset("mnist1d", seed=1, samples=1000)
    warm_up = replace(swarm(10, 2, batched), eval_every=1.0)
    Simulation(warm_up, nx.cycle_graph(10), data=data, progress=None).run()  # one-off allocations
    if args.compare:
        compare(args.compare, args.rounds, args.samples_per_node)
        return
    for n in args.nodes:
        data = generated(n, args.samples_per_node)
        config = swarm(n, args.rounds, batched)
        before = rss_mb()
        sim = Simulation(config, nx.random_regular_graph(4, n, seed=1), data=data, progress=None)
        start = time.perf_counter()
        result = sim.run()
        wall = time.perf_counter() - start
        per_node_kib = (rss_mb() - before) * 1024 / n
        print(
            f"{n:6d} nodes x {args.rounds} rounds ({'batched' if batched else 'per node'}): "
            f"{wall:7.1f} s wall, {result.node_rounds / wall:6.0f} node-rounds/s, "
            f"{per_node_kib:6.0f} KiB per node, peak RSS {peak_mb():6.0f} MB, "
            f"final accuracy {result.final.acc_mean:.3f}",
            flush=True,
        )
    hours = wall / result.node_rounds * ON_PAPER * args.rounds / 3600
    print(
        f"{ON_PAPER:,} nodes x {args.rounds} rounds on paper (from the {n:,}-node run): {hours:.1f} h, "
        f"{per_node_kib * ON_PAPER / 2**20:.1f} GiB of nodes",
        flush=True,
    )


if __name__ == "__main__":
    main()
