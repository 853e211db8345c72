"""How fast does the simulator run? Wall-clock per simulated node-round, and memory per node.

Asynchronous gossip (fanout 2; per 1-second round two local SGD steps of batch 16, so that a node-round
costs the same at every scale) with the MLP on MNIST-1D (20,000 generated samples, IID over the
nodes) on a 4-regular graph, for 100 and 1,000 nodes.
Prints wall time, node-rounds per second and the growth of resident memory per node (after a warm-up
run, so one-off allocations are not counted); run it on a quiet machine and repeat (a shared VM's speed
varies from run to run).

    python benchmarks/sim_speed.py                      # 100 and 1,000 nodes, 100 rounds each
    python benchmarks/sim_speed.py --nodes 100 --rounds 20
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

from shoal.learning.datasets import load_dataset
from shoal.simulations.config import TASK, SimConfig
from shoal.simulations.engine import Simulation


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--samples", type=int, default=20_000, help="MNIST-1D samples to generate")
    args = p.parse_args()
    torch.set_num_threads(1)
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    print(f"{platform.machine()}, {os.cpu_count()} cores, {versions}")
    data = load_dataset("mnist1d", seed=1, samples=args.samples)
    task = replace(TASK, dataset="mnist1d")
    warm_up = SimConfig(nodes=10, task=task, duration=2.0, eval_every=1.0)
    Simulation(warm_up, nx.cycle_graph(10), data=data, progress=None).run()  # one-off allocations
    for n in args.nodes:
        rounds = float(args.rounds)
        config = SimConfig(
            nodes=n,
            task=replace(task, local_steps=2, local_epochs=None),
            duration=rounds,
            eval_every=rounds,
            eval_samples=500,
        )
        before = rss_mb()
        sim = Simulation(config, nx.random_regular_graph(4, n, seed=1), data=data, progress=None)
        start = time.perf_counter()
        result = sim.run()
        wall = time.perf_counter() - start
        print(
            f"{n:5d} nodes x {args.rounds} rounds: {wall:7.1f} s wall, "
            f"{result.node_rounds / wall:6.0f} node-rounds/s, "
            f"{(rss_mb() - before) * 1024 / n:6.0f} KiB per node, final accuracy {result.final.acc_mean:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
