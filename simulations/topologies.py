"""Gossip learning on different topologies: Barabási–Albert, Erdős–Rényi, k-regular, ring, complete.

The same swarm (data split, initial model, protocol, seed) runs once per topology, so the curves differ
only by who can talk to whom. Writes rounds.csv, summary.json and accuracy.png to --out.

    python -m shoal.simulations.topologies --nodes 50 --topologies ba,ring,complete
"""

from __future__ import annotations

import sys

import networkx as nx

from shoal.simulations import report
from shoal.simulations.engine import Simulation

TOPOLOGIES = ("ba", "er", "regular", "ring", "complete")


def build_graph(name: str, n: int, seed: int, *, m: int = 2, degree: int = 4) -> nx.Graph:
    """A connected graph on 0..n-1 (an Erdős–Rényi draw is retried with the next seed until connected)."""
    if name == "ba":
        return nx.barabasi_albert_graph(n, m, seed=seed)
    if name == "er":
        p = min(1.0, degree / (n - 1))
        for attempt in range(100):
            g = nx.erdos_renyi_graph(n, p, seed=seed + attempt)
            if nx.is_connected(g):
                return g
        raise SystemExit(f"error: no connected Erdős–Rényi graph with mean degree {degree} in 100 draws")
    if name == "regular":
        if degree >= n or (degree * n) % 2:
            raise SystemExit(
                f"error: no {degree}-regular graph on {n} nodes (need degree < n and degree*n even)"
            )
        return nx.random_regular_graph(degree, n, seed=seed)
    if name == "ring":
        return nx.cycle_graph(n)
    if name == "complete":
        return nx.complete_graph(n)
    raise SystemExit(f"error: unknown topology {name!r}: use {', '.join(TOPOLOGIES)}")


def main(argv: list[str] | None = None) -> int:
    p = report.parser("topologies", __doc__, nodes=30, duration=200.0)
    p.add_argument("--topologies", default=",".join(TOPOLOGIES), help="comma-separated (default %(default)s)")
    p.add_argument("--m", type=int, default=2, help="Barabási–Albert: edges per new node (default 2)")
    p.add_argument(
        "--degree", type=int, default=4, help="k-regular degree and Erdős–Rényi mean degree (default 4)"
    )
    p.add_argument("--target", type=float, default=0.85, help="accuracy for time-to-target (default 0.85)")
    args = p.parse_args(argv)
    config = report.config_from(args)
    report.prepare(args)
    results = []
    for name in args.topologies.split(","):
        graph = build_graph(name, config.nodes, config.seed, m=args.m, degree=args.degree)
        progress = None if args.quiet else print
        results.append(Simulation(config, graph, label=name, progress=progress).run())
    report.write_rounds(args.out, results)
    report.write_summary(
        args.out,
        config,
        {"name": "topologies", "m": args.m, "degree": args.degree},
        {r.label: report.headline(r, args.target) for r in results},
    )
    plot = report.plot_runs(
        args.out, "accuracy.png", results, f"Gossip learning on {config.nodes} nodes by topology"
    )
    print(f"wrote {args.out}/rounds.csv, summary.json, {plot.name}")
    for r in results:
        print(
            f"  {r.label:>9}: final accuracy {r.final.acc_mean:.3f}, sent {r.final.bytes_sent / 1e6:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
