"""Churn: nodes crash, leave and (re)join while the swarm learns.

Rates (default): every --churn-every seconds each live node crashes with probability --crash-prob or
leaves gracefully with --leave-prob, and each node that is down comes back with --rejoin-prob
(a returning node has lost its model and fetches the current one from a neighbour). --late-joiners
starts a fraction of the nodes offline; they join one by one over the first half of the run. Or give
an explicit --schedule CSV with lines ``time,action,node[ node ...]`` (action: crash, leave, join).
Writes rounds.csv, summary.json and accuracy.png (accuracy and live nodes over time) to --out.

    python -m shoal.simulations.churn --nodes 40 --crash-prob 0.1 --rejoin-prob 0.3
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from shoal.simulations import report
from shoal.simulations.config import ScheduledEvent
from shoal.simulations.engine import Simulation
from shoal.simulations.topologies import build_graph


def random_schedule(
    nodes: int,
    duration: float,
    every: float,
    crash: float,
    leave: float,
    rejoin: float,
    late: float,
    seed: int,
) -> tuple[list[ScheduledEvent], list[int]]:
    """A churn schedule drawn from the seed, and the nodes that start offline."""
    rng = random.Random(seed)
    offline = sorted(rng.sample(range(nodes), round(late * nodes)))
    events = [
        ScheduledEvent(duration / 2 * (k + 1) / (len(offline) + 1), "join", (i,))
        for k, i in enumerate(offline)
    ]
    up = set(range(nodes)) - set(offline)
    t = every
    while t < duration:
        downs: dict[str, list[int]] = {"crash": [], "leave": []}
        for i in sorted(up):
            r = rng.random()
            if len(up) - len(downs["crash"]) - len(downs["leave"]) <= 2:
                break  # keep at least two nodes up
            if r < crash:
                downs["crash"].append(i)
            elif r < crash + leave:
                downs["leave"].append(i)
        returning = [i for i in range(nodes) if i not in up and i not in offline and rng.random() < rejoin]
        for action, members in downs.items():
            if members:
                events.append(ScheduledEvent(t, action, tuple(members)))
                up -= set(members)
        if returning:
            events.append(ScheduledEvent(t, "join", tuple(returning)))
            up |= set(returning)
        t += every
    return sorted(events, key=lambda e: e.time), offline


def read_schedule(path: Path, nodes: int) -> list[ScheduledEvent]:
    events = []
    try:
        with open(path, newline="") as f:
            for line_no, row in enumerate(csv.reader(f), 1):
                if not row or row[0].strip().startswith("#"):
                    continue
                try:
                    time, action, members = (
                        float(row[0]),
                        row[1].strip(),
                        tuple(int(x) for x in row[2].split()),
                    )
                    event = ScheduledEvent(time, action, members)
                except (IndexError, ValueError) as exc:
                    raise SystemExit(
                        f"error: {path}:{line_no}: expected 'time,action,node node ...' ({exc})"
                    ) from None
                if any(not 0 <= i < nodes for i in members):
                    raise SystemExit(f"error: {path}:{line_no}: node numbers must be in 0..{nodes - 1}")
                events.append(event)
    except OSError as exc:
        raise SystemExit(f"error: cannot read schedule {path}: {exc.strerror}") from None
    return events


def main(argv: list[str] | None = None) -> int:
    p = report.parser("churn", __doc__, nodes=40, duration=300.0)
    g = p.add_argument_group("churn")
    g.add_argument("--churn-every", type=float, default=20.0, help="seconds between churn draws (default 20)")
    g.add_argument("--crash-prob", type=float, default=0.08, help="per draw and live node (default 0.08)")
    g.add_argument("--leave-prob", type=float, default=0.02, help="per draw and live node (default 0.02)")
    g.add_argument("--rejoin-prob", type=float, default=0.3, help="per draw and down node (default 0.3)")
    g.add_argument("--late-joiners", type=float, default=0.1, help="fraction starting offline (default 0.1)")
    g.add_argument("--schedule", type=Path, help="CSV schedule instead of rates")
    g.add_argument("--topology", default="ba", help="ba, er, regular, ring or complete (default ba)")
    p.add_argument("--target", type=float, default=0.85, help="accuracy for time-to-target (default 0.85)")
    args = p.parse_args(argv)
    config = report.config_from(args)
    for name in ("crash_prob", "leave_prob", "rejoin_prob", "late_joiners"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    report.prepare(args)
    if args.schedule:
        schedule, offline = read_schedule(args.schedule, config.nodes), []
    else:
        schedule, offline = random_schedule(
            config.nodes,
            config.duration,
            args.churn_every,
            args.crash_prob,
            args.leave_prob,
            args.rejoin_prob,
            args.late_joiners,
            config.seed,
        )
    graph = build_graph(args.topology, config.nodes, config.seed)
    steady = Simulation(config, graph, label="no churn", progress=None if args.quiet else print).run()
    churned = Simulation(
        config,
        graph,
        label="churn",
        schedule=schedule,
        offline=offline,
        progress=None if args.quiet else print,
    ).run()
    results = [steady, churned]
    report.write_rounds(args.out, results)
    counts = {a: sum(len(e.nodes) for e in schedule if e.action == a) for a in ("crash", "leave", "join")}
    report.write_summary(
        args.out,
        config,
        {"name": "churn", "topology": args.topology, "events": counts, "started_offline": len(offline)},
        {r.label: report.headline(r, args.target) for r in results},
    )
    plot = report.plot_runs(
        args.out,
        "accuracy.png",
        results,
        f"Churn on {config.nodes} nodes: {counts['crash']} crashes, {counts['leave']} leaves, "
        f"{counts['join']} joins",
    )
    print(f"wrote {args.out}/rounds.csv, summary.json, {plot.name}")
    for r in results:
        print(f"  {r.label:>9}: final accuracy {r.final.acc_mean:.3f} over {r.final.alive} live nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
