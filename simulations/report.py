"""What every scenario script shares: its command-line flags, and its outputs.

Outputs in ``--out DIR``, each written atomically (temp file + rename):
- ``rounds.csv``: one row per evaluation point and run (columns of :class:`simulations.rows.Row`);
- ``summary.json``: the configuration and the headline results;
- PNG plots (matplotlib, Agg backend).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, fields
from functools import reduce
from pathlib import Path

import torch

from shoal.learning.integrators import INTEGRATORS as RULES
from shoal.node.config import NUMBERS, keys, updated
from shoal.overlay.atomic import write_atomic
from shoal.simulations.config import DAEMON_ONLY, SimConfig
from shoal.simulations.rows import Row, RunResult

# the built-in task's, the protocols' and the codec's own settings (SimConfig.task, .gossip, .modest,
# .codec): flags by their names, prefixed by their sub-table's (--task-lr, --gossip-fanout), as the
# daemon's protocol sub-tables are; not the [task] settings a simulation has its own of
NESTED = {
    name: key
    for name, key in keys(SimConfig).items()
    if len(key.path) > 1 and not (key.path[0] == "task" and key.path[1] in DAEMON_ONLY)
}
TABLES = {key.path[0] for key in NESTED.values()}  # no flags themselves (byzantine's --task is its own)
PREFIXES = tuple(sorted(f"{table}_" for table in TABLES))


class Instead(argparse.Action):
    """A flag that unsets the setting it is an alternative to (``--task-local-steps``: epochs)."""

    def __init__(self, *args: object, instead: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, self.instead, None)


def parser(prog: str, doc: str | None, **defaults: object) -> argparse.ArgumentParser:
    """A parser with the flags every scenario takes, each named as its SimConfig field, or a field of its
    sub-tables by that field's name prefixed by the sub-table's (``task_lr``, ``gossip_fanout``;
    ``config_from``); ``defaults``, named so too, override SimConfig's per scenario."""
    try:
        base = updated(SimConfig(), defaults)
    except (TypeError, ValueError) as exc:  # a scenario's own defaults
        raise SystemExit(f"error: {exc}") from None
    p = argparse.ArgumentParser(
        prog=f"python -m shoal.simulations.{prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("swarm")
    g.add_argument("--nodes", type=int, default=base.nodes, help="number of nodes (default %(default)s)")
    g.add_argument(
        "--seed", type=int, default=base.seed, help="seed of everything random (default %(default)s)"
    )
    g.add_argument("--out", type=Path, default=Path("out") / prog, help="output folder (default %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.add_argument(
        "--batched",
        action="store_true",
        default=base.batched,
        help="train the nodes' rounds of the built-in task in batches: far faster with thousands of "
        "nodes, models equal to the per-node path's to rounding",
    )
    learning = g = p.add_argument_group("learning (--task-*: the daemon's [task] settings)")
    g.add_argument(
        "--integrator",
        default=base.integrator,
        choices=("clipped", *RULES),
        help="(default %(default)s)",
    )
    g.add_argument(
        "--independent-init",
        dest="same_init",
        action="store_false",
        default=base.same_init,
        help="each node starts from its own random model instead of a shared one",
    )
    protocol = g = p.add_argument_group(
        "protocol (the daemon's [protocol.gossip], [protocol.modest], [protocol.codec])"
    )
    g.add_argument(
        "--gossip-synchronous",
        action="store_true",
        default=base.gossip.synchronous,
        help="synchronous rounds (D-PSGD)",
    )
    g.add_argument(
        "--gossip-round-timeout",
        type=float,
        default=base.gossip.round_timeout,
        help="synchronous: most seconds a round waits (default %(default)s)",
    )
    for name, key in NESTED.items():
        options = {"action": Instead, "instead": key.instead} if key.instead else {}
        (learning if key.path[0] == "task" else protocol).add_argument(
            f"--{name.replace('_', '-')}",
            type=NUMBERS.get(key.kind, str),
            default=reduce(getattr, key.path, base),
            help=key.field.metadata["help"].replace("%", "%%") + " (default %(default)s)",
            **options,
        )
    g = p.add_argument_group("network and time (virtual seconds)")
    g.add_argument(
        "--duration", type=float, default=base.duration, help="simulated seconds (default %(default)s)"
    )
    g.add_argument("--eval-every", type=float, default=base.eval_every, help="seconds between evaluations")
    g.add_argument("--latency", type=float, default=base.latency, help="per-link latency in seconds")
    g.add_argument("--bandwidth", type=float, default=base.bandwidth, help="per-node up/down Mbit/s")
    g.add_argument("--loss", type=float, default=base.loss, help="probability a message is lost")
    g.add_argument("--speed", type=float, default=base.speed, help="training samples per second per node")
    g.add_argument(
        "--speed-spread", type=float, default=base.speed_spread, help="speeds vary by up to this factor"
    )
    return p


def config_from(args: argparse.Namespace, **overrides: object) -> SimConfig:
    """The SimConfig of the parsed flags (every flag named as a field, or as a sub-table's field, is
    one), then ``overrides``, named so too (``gossip_period=1.0``, ``task_lr=0.05``)."""
    own = {f.name for f in fields(SimConfig)} - TABLES
    given = {n: v for n, v in vars(args).items() if n in own or n.startswith(PREFIXES)}
    try:
        return updated(SimConfig(), {**given, **overrides})
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def prepare(args: argparse.Namespace) -> None:
    """Settings every scenario run wants before it starts."""
    torch.set_num_threads(1)  # models this small lose more to thread hand-offs than they gain
    # a node's warnings (a poisoned model rolled back) are for a daemon's operator: a simulated swarm
    # under attack writes thousands, and the results say what they did
    logging.getLogger("shoal.learner").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)


def write_rounds(out: Path, results: Sequence[RunResult]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = [f.name for f in fields(Row) if f.name != "metrics"]
    metrics = list(dict.fromkeys(name for r in results for row in r.rows for name in row.metrics))
    writer.writerow(columns + metrics)
    for result in results:
        for row in result.rows:
            values = [getattr(row, c) for c in columns] + [row.metrics.get(m, math.nan) for m in metrics]
            writer.writerow([_cell(v) for v in values])
    write_atomic(out / "rounds.csv", buf.getvalue())


def _cell(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


def first_reaching(rows: Sequence[Row], target: float, column: str = "time") -> float | None:
    """``column`` (time, round, bytes_sent) of the first row whose mean accuracy reached ``target``."""
    return next((getattr(r, column) for r in rows if r.acc_mean >= target), None)


def headline(result: RunResult, target: float | None = None) -> dict:
    final = result.final
    out = {
        "final_accuracy_mean": _num(final.acc_mean),
        "final_accuracy_min": _num(final.acc_min),
        "final_alive": final.alive,
        "final_round": _num(final.round),
        "bytes_sent": final.bytes_sent,
        "bytes_by_kind": result.bytes_by_kind,
        "node_rounds": result.node_rounds,
        "wall_seconds": round(result.wall_seconds, 2),
    }
    if target is not None:
        out["target_accuracy"] = target
        out["time_to_target"] = first_reaching(result.rows, target)
    return out


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def write_summary(out: Path, config: SimConfig, scenario: dict, results: dict) -> None:
    doc = {"config": asdict(config), "scenario": scenario, "results": results}
    write_atomic(out / "summary.json", json.dumps(doc, indent=2, default=str) + "\n")


def figure(*args: object, **kwargs: object):
    """``plt.subplots`` on the Agg backend: plots are files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path


def plot_runs(
    out: Path, name: str, results: Sequence[RunResult], title: str, marks: Sequence[float] = ()
) -> Path:
    """Mean accuracy (band: min to max over live nodes) and live nodes over virtual time, one line per run."""
    fig, (acc_ax, alive_ax) = figure(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(3, 1))
    for result in results:
        t = [r.time for r in result.rows]
        (line,) = acc_ax.plot(t, [r.acc_mean for r in result.rows], label=result.label)
        acc_ax.fill_between(
            t,
            [r.acc_min for r in result.rows],
            [r.acc_max for r in result.rows],
            color=line.get_color(),
            alpha=0.15,
        )
        alive_ax.plot(t, [r.alive for r in result.rows], color=line.get_color())
    for x in marks:
        for ax in (acc_ax, alive_ax):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    acc_ax.set_ylabel("test accuracy (mean; band min–max)")
    acc_ax.set_title(title)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize="small")
    alive_ax.set_ylabel("live nodes")
    alive_ax.set_xlabel("virtual time (s)")
    alive_ax.grid(alpha=0.3)
    return save_figure(fig, out / name)


def plot_xy(
    out: Path,
    name: str,
    results: Sequence[RunResult],
    x: str,
    xlabel: str,
    title: str,
    y: str = "accuracy_mean",
    ylabel: str = "test accuracy",
) -> Path:
    """``y`` (a metric column) against ``x`` (a :class:`Row` field, or a metric column), one line per run;
    bytes in MB on a log scale."""
    fig, ax = figure(figsize=(7.5, 4.5))
    for r in results:
        xs = [row.metrics[x] if x in row.metrics else getattr(row, x) for row in r.rows]
        if x == "bytes_sent":
            xs = [v / 1e6 for v in xs]
        ax.plot(xs, [row.metrics.get(y, math.nan) for row in r.rows], label=r.label, marker=".")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if x == "bytes_sent":
        ax.set_xscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, out / name)
