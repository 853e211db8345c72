"""Disaster: a share of the nodes drops at once; does losing connectivity hurt more than losing data?

Reproduces the setting of Palmieri et al., "Exploring the Impact of Disrupted Peer-to-Peer Communications
on Fully Decentralized Learning in Disaster Scenarios" (arXiv 2310.02986):
a Barabási–Albert graph (m=2), IID data held by half of the nodes (the others only relay), synchronous
rounds of one second (D-PSGD: 3 local epochs, then average with every neighbour). At --drop-at seconds
a --fraction of the nodes crashes at once, chosen four ways, each its own run from the same seed:

- ``none``: nobody drops (the reference);
- ``data``: random data-holding nodes (lost knowledge);
- ``relay``: random connectivity-only nodes (lost paths, no data lost);
- ``hubs``: the highest-degree nodes, whatever they hold.

Models are averaged uniformly (``--integrator mean``): weighting by sample counts, the paper's usual
rule, would give relays weight 0 and so cut every path through them. Reported per run: accuracy of the
surviving nodes, the largest connected component after the drop, and the accuracy of nodes cut off
from it. Writes rounds.csv, summary.json and accuracy.png to --out.

    python -m shoal.simulations.disaster --nodes 100 --seed 1 --out out/disaster
"""

from __future__ import annotations

import random
import sys

import networkx as nx
import numpy as np

from shoal.simulations import report
from shoal.simulations.config import ScheduledEvent
from shoal.simulations.engine import Simulation, node_name

STRATEGIES = ("none", "data", "relay", "hubs")


def victims(strategy: str, graph: nx.Graph, data_nodes: list[int], count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    if strategy == "none":
        return []
    if strategy == "data":
        return sorted(rng.sample(data_nodes, min(count, len(data_nodes))))
    if strategy == "relay":
        relays = sorted(set(graph.nodes) - set(data_nodes))
        return sorted(rng.sample(relays, min(count, len(relays))))
    by_degree = sorted(graph.nodes, key=lambda v: (-graph.degree[v], v))
    return sorted(by_degree[:count])


def main(argv: list[str] | None = None) -> int:
    p = report.parser(
        "disaster",
        __doc__,
        nodes=100,
        duration=100.0,
        eval_every=2.0,
        gossip_synchronous=True,
        integrator="mean",
        gossip_round_timeout=10.0,
        task_local_epochs=3.0,
    )
    g = p.add_argument_group("disaster")
    g.add_argument("--m", type=int, default=2, help="Barabási–Albert edges per new node (default 2)")
    g.add_argument(
        "--data-fraction", type=float, default=0.5, help="share of nodes holding data (default 0.5)"
    )
    g.add_argument(
        "--fraction", type=float, default=0.25, help="share of all nodes that drops (default 0.25)"
    )
    g.add_argument("--drop-at", type=float, default=30.0, help="virtual second of the drop (default 30)")
    g.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default %(default)s)")
    args = p.parse_args(argv)
    config = report.config_from(args)
    if not 0 < args.data_fraction <= 1 or not 0 <= args.fraction < 1:
        p.error("--data-fraction must be in (0, 1] and --fraction in [0, 1)")
    report.prepare(args)
    graph = nx.barabasi_albert_graph(config.nodes, args.m, seed=config.seed)
    data_nodes = sorted(
        random.Random(config.seed).sample(range(config.nodes), round(args.data_fraction * config.nodes))
    )
    count = round(args.fraction * config.nodes)
    results, scenario = [], {}
    for strategy in args.strategies.split(","):
        if strategy not in STRATEGIES:
            p.error(f"unknown strategy {strategy!r}: use {', '.join(STRATEGIES)}")
        dropped = victims(strategy, graph, data_nodes, count, config.seed)
        sim = Simulation(
            config,
            graph,
            label=strategy,
            data_nodes=data_nodes,
            schedule=[ScheduledEvent(args.drop_at, "crash", tuple(dropped))] if dropped else [],
            progress=None if args.quiet else print,
        )
        result = sim.run()
        results.append(result)
        survivors = graph.subgraph(set(graph.nodes) - set(dropped))
        giant = max(nx.connected_components(survivors), key=len)
        cut_off = [node_name(v) for v in survivors if v not in giant]
        acc = result.per_node_accuracy
        scenario[strategy] = {
            "dropped": len(dropped),
            "dropped_data_nodes": len(set(dropped) & set(data_nodes)),
            "surviving_data_nodes": len(set(data_nodes) - set(dropped)),
            "largest_component_share": round(len(giant) / max(1, len(survivors)), 3),  # of the survivors
            "cut_off_nodes": len(cut_off),
            "cut_off_accuracy": round(float(np.mean([acc[n] for n in cut_off])), 4) if cut_off else None,
            "giant_component_accuracy": round(float(np.mean([acc[node_name(v)] for v in giant])), 4),
        }
    report.write_rounds(args.out, results)
    report.write_summary(
        args.out,
        config,
        {
            "name": "disaster",
            "m": args.m,
            "data_fraction": args.data_fraction,
            "fraction": args.fraction,
            "drop_at": args.drop_at,
            "runs": scenario,
        },
        {r.label: report.headline(r) for r in results},
    )
    plot = report.plot_runs(
        args.out,
        "accuracy.png",
        results,
        f"Disaster on {config.nodes} nodes (BA m={args.m}): {count} nodes drop at t={args.drop_at:.0f}s",
        marks=[args.drop_at],
    )
    print(f"wrote {args.out}/rounds.csv, summary.json, {plot.name}")
    print(f"{'dropped':>8}  {'final acc':>9}  {'largest comp.':>13}  {'cut off':>7}  {'cut-off acc':>11}")
    for r in results:
        s = scenario[r.label]
        cut_acc = "-" if s["cut_off_accuracy"] is None else f"{s['cut_off_accuracy']:.3f}"
        print(
            f"{r.label:>8}  {r.final.acc_mean:9.3f}  {s['largest_component_share']:13.2f}  "
            f"{s['cut_off_nodes']:7d}  {cut_acc:>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
