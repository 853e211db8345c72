"""Language models across a swarm: DiLoCo over gossip and MoDeST against data parallelism, at equal compute.

Every node trains the byte-level transformer of ``learning.language`` (the Python standard library's
source as its corpus, split --split) on its share, with AdamW; every run has the same data, initial
model and seed. The arms, each one its own run (--arms):

- ``dp``: synchronous data parallelism, the ideal reference: one model, each step's gradient the mean of
  every node's (a batch of --task-batch windows from each share). Computed, not simulated: its bytes and
  time are a ring all-reduce's (each node sends 2 (n-1)/n models a step) on the same links;
- ``dpsgd``: D-PSGD in fp32, synchronous gossip exchanging with every neighbour after every step;
- ``diloco``: DiLoCo over gossip, fp32: --inner steps, then the models are exchanged with every
  neighbour, integrated, and the outer step (--outer-lr, --outer-momentum: Nesterov) applied
  (``learning.outer``);
- ``diloco-topk``: the same with the top-k codec (--codec-topk-fraction, --codec-topk-grid, error feedback);
- ``streaming``: Streaming DiLoCo over gossip with the top-k codec: the model in --fragments parts, one
  exchanged a round in turn, rounds of --inner / --fragments steps (each part still exchanged every
  --inner steps, a node sending 1/--fragments of the model at a time);
- ``streaming-overlap``: the same, each exchange integrated a round late (it travels while the node
  trains), the outer update landing on the part as trained since;
- ``modest-diloco``: MoDeST with --inner steps a round and the top-k codec (its outer step is averaging);
- ``modest-crash``: the same, with --crash of the nodes crashing half way.

--warmup W: every arm starts from one model trained W data-parallel steps and that run's AdamW state
on every node (DiLoCo's own experiments start from a pretrained model; default 300; fresh moments cost
every arm its first rounds: ``learning.language.adamw``); 0 starts from scratch. Gossip runs on a
random --degree-regular graph. Compute is counted in inner steps per node: for gossip, the nodes' mean
round times --inner; for MoDeST, the newest round times --inner times sample/nodes (a round trains
--modest-sample-size nodes: a round that trained fewer counts as full, and after a crash the count is
over the nodes at the start). Each run ends at the first evaluation at which that count reaches
--steps; bytes are what all nodes sent. A node is evaluated on its model as of its last finished round
(DiLoCo's outer model, MoDeST's aggregate), not on the one it is training. Writes rounds.csv (with a
``steps`` column), summary.json (per arm: bits per byte, bytes and virtual seconds at exactly --steps,
interpolated between evaluations; bytes, virtual seconds and steps to --target bits per byte; bytes per
node per second at the peak, and per node per round: what a node sends at once) and
bits_per_byte_by_steps.png and bits_per_byte_by_bytes.png to --out.

The --task-* flags (the built-in classifier's), --duration and --eval-every do not apply here: the task is
the language model (--lm-*), and runs end at --steps with --evals evaluations on the way.

    python -m shoal.simulations.language --nodes 16 --seed 1 --out out/language
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import networkx as nx
import torch

from shoal.learning.language import adamw, corpus, make_task, shard, windows
from shoal.learning.language import step as step_on
from shoal.learning.models import ParameterLayout
from shoal.learning.protocol import State
from shoal.learning.task import Task
from shoal.simulations import report
from shoal.simulations.config import ScheduledEvent
from shoal.simulations.engine import Simulation
from shoal.simulations.rows import Row, RunResult
from shoal.simulations.topologies import build_graph

ARMS = (
    *("dp", "dpsgd", "diloco", "diloco-topk", "streaming", "streaming-overlap"),
    *("modest-diloco", "modest-crash"),
)
METRIC = "bits_per_byte_mean"
Progress = Callable[[str], None] | None
RECOVERY = 120.0  # virtual seconds: a few of MoDeST's watch (20 s) and ping (5 s) time-outs


def main(argv: list[str] | None = None) -> int:
    p = report.parser(
        "language",
        __doc__,
        nodes=16,
        speed=20_000.0,  # bytes of text a node trains on per virtual second
        gossip_synchronous=True,
        gossip_round_timeout=120.0,
        gossip_period=0.0,
        outer_lr=0.7,
        outer_momentum=0.9,
        codec_topk_fraction=1.0,  # every value, on one grid 2.4 mean magnitudes apart: 0.17 B a weight
        codec_topk_grid=2.4,
        codec_max_lag=1000.0,  # a round of --inner steps moves every weight (learning.compression)
        modest_period=0.0,
    )
    g = p.add_argument_group("language model")
    g.add_argument("--arms", default=",".join(ARMS), help="comma-separated (default %(default)s)")
    g.add_argument("--steps", type=int, default=300, help="inner steps per node (default %(default)s)")
    g.add_argument(
        "--inner", type=int, default=10, help="DiLoCo's H: inner steps a round (default %(default)s)"
    )
    g.add_argument(
        "--target",
        type=float,
        default=2.5,
        help="bits per byte of the to-target figures (default %(default)s)",
    )
    g.add_argument(
        "--degree", type=int, help="gossip's neighbours per node, every arm (default 8, or every other node)"
    )
    g.add_argument(
        "--fragments", type=int, default=10, help="streaming: parts of the model (default %(default)s)"
    )
    g.add_argument("--crash", type=float, default=0.5, help="modest-crash: share of nodes crashing")
    g.add_argument("--split", default="iid", choices=("iid", "files"), help="how the corpus is shared")
    g.add_argument("--lm-lr", type=float, default=3e-3, help="AdamW's learning rate (default %(default)s)")
    g.add_argument("--lm-batch", type=int, default=16, help="windows per step per node")
    g.add_argument("--lm-width", type=int, default=64, help="model width (default %(default)s)")
    g.add_argument("--lm-layers", type=int, default=2, help="transformer blocks (default %(default)s)")
    g.add_argument("--lm-context", type=int, default=64, help="bytes per window (default %(default)s)")
    g.add_argument("--lm-max-bytes", type=int, default=1_000_000, help="corpus bytes (default %(default)s)")
    g.add_argument(
        "--warmup",
        type=int,
        default=300,
        help="data-parallel steps every arm starts from (default %(default)s)",
    )
    g.add_argument("--evals", type=int, default=12, help="evaluations per run (default %(default)s)")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(ARMS)):
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if args.steps < args.inner or args.inner < 1:
        p.error("--inner must be at least 1 and at most --steps")
    if any(a.startswith("streaming") for a in arms) and (args.fragments < 1 or args.inner % args.fragments):
        p.error("--fragments must divide --inner: each part is exchanged every --inner steps")
    if not 0 <= args.crash < 1:
        p.error("--crash must be in [0, 1): some nodes must be left")
    report.prepare(args)
    base = report.config_from(args, eval_every=1.0)
    make = functools.partial(
        make_task,
        split=args.split,
        context=args.lm_context,
        width=args.lm_width,
        layers=args.lm_layers,
        batch=args.lm_batch,
        lr=args.lm_lr,
        max_bytes=args.lm_max_bytes,
        seed=args.seed,
    )
    progress = None if args.quiet else print
    first = make(0, args.nodes)
    weights = ParameterLayout.of(first.model).numel
    moments = None
    if args.warmup:  # every arm starts from one model trained so, and its AdamW's state (as pretrained)
        warm = adamw(first.model, args.lm_lr)
        data_parallel(args, first, warm, None, args.warmup)
        moments = warm.state_dict()
        make = functools.partial(warmed, make, first.model.state_dict(), moments=moments)
    runs = {arm: _run(arm, args, make, weights, progress, moments) for arm in arms}
    report.write_rounds(args.out, list(runs.values()))
    results = {arm: _summary(r, args.target, args.steps) for arm, r in runs.items()}
    scenario = {"name": "language", "arms": arms, **{k: str(v) for k, v in vars(args).items() if k != "out"}}
    report.write_summary(args.out, base, scenario, results)
    _plot(args.out, list(runs.values()))
    _print(args.out, results, args.target)
    return 0


def _run(
    arm: str,
    args: argparse.Namespace,
    make: Callable[..., Task],
    weights: int,
    progress: Progress,
    moments: Mapping[str, object] | None,
) -> RunResult:
    """One arm's run; ``weights``: the model's parameter count; ``moments``: the warm start's AdamW state."""
    step = _step_seconds(args)
    if arm == "dp":
        task = make(0, args.nodes)
        return data_parallel(args, task, adamw(task.model, args.lm_lr, moments), progress, args.steps)
    streaming = arm.startswith("streaming")
    h = 1 if arm == "dpsgd" else args.inner // (args.fragments if streaming else 1)
    modest = arm.startswith("modest")
    per_round = h * (args.modest_sample_size / args.nodes if modest else 1)  # steps per node per round
    rounds = math.ceil(args.steps / per_round)
    overrides: dict = {}
    if arm == "dpsgd" or modest:  # no outer optimizer: D-PSGD averages, and so does MoDeST
        overrides |= {"outer_lr": 1.0, "outer_momentum": 0.0}
    if arm == "diloco-topk" or streaming or modest:
        overrides["codec_name"] = "topk"
    if streaming:
        overrides |= {"outer_fragments": args.fragments, "outer_overlap": arm == "streaming-overlap"}
    if modest:
        overrides |= {"protocol": "modest", "dial_any": True}
    sent = weights / (args.fragments if streaming else 1)  # values a node sends a round, to each peer
    talk = (args.modest_sample_size if modest else 4) * 4 * sent * 8 / (args.bandwidth * 1e6)
    # virtual seconds, if nothing waits (overlap: a round's exchange travels during the next one's steps)
    expected = rounds * (h * step + (0 if arm == "streaming-overlap" else talk + 4 * args.latency))
    # ends once the nodes trained --steps each; MoDeST's time-outs route around crashed nodes in absolute time
    duration = expected * 4 + (RECOVERY if arm == "modest-crash" else 0.0)
    config = report.config_from(args, **overrides, duration=duration, eval_every=expected / args.evals)
    schedule = []
    if arm == "modest-crash":
        victims = random.Random(args.seed).sample(range(args.nodes), int(args.crash * args.nodes))
        schedule = [ScheduledEvent(expected / 2, "crash", tuple(sorted(victims)))]
    graph = (
        nx.empty_graph(args.nodes)
        if modest
        else build_graph("regular", args.nodes, args.seed, degree=args.degree or min(8, args.nodes - 1))
    )
    task = functools.partial(make, steps=h)
    result = Simulation(
        config,
        graph,
        label=arm,
        make_task=task,
        schedule=schedule,
        evaluate="freshest" if modest else "all",
        settled=True,
        progress=progress,
        until=lambda row: row.round * per_round >= args.steps,  # equal compute
    ).run()
    for row in result.rows:
        row.metrics["steps"] = row.round * per_round
    return result


def data_parallel(
    args: argparse.Namespace, task: Task, optimizer: torch.optim.Optimizer, progress: Progress, steps: int
) -> RunResult:
    """The ideal reference: ``task``'s model trained ``steps`` steps, each step's batch one from every
    node's share (the mean of their gradients); evaluated at as many points as the simulated runs; bytes
    and seconds of a ring all-reduce over links of --bandwidth and --latency."""
    start = time.perf_counter()
    _, files = corpus(args.lm_max_bytes)
    texts = [shard(files, i, args.nodes, args.split, args.seed) for i in range(args.nodes)]
    model = task.model
    draw = torch.Generator().manual_seed(args.seed)
    n = args.nodes
    sent = 2 * (n - 1) / n * 4 * ParameterLayout.of(model).numel  # bytes per node per step
    per_step = _step_seconds(args) + sent * 8 / (args.bandwidth * 1e6) + 2 * (n - 1) * args.latency
    every = max(1, steps // args.evals)
    rows = []
    for k in range(steps + 1):
        if k % every == 0 or k == steps:
            bpb = task.evaluate(model)["bits_per_byte"]
            metrics = {f"bits_per_byte_{s}": bpb for s in ("mean", "min", "max")} | {"steps": float(k)}
            rows.append(Row("dp", k * per_step, float(k), n, 0.0, int(k * n * sent), metrics))
            if progress:
                progress(f"  [dp] step {k:5d}  bits_per_byte {bpb:.3f}")
        if k == steps:
            break
        x, y = (torch.cat(t) for t in zip(*(windows(t, args.lm_context, args.lm_batch, draw) for t in texts)))
        model.train()
        step_on(model, optimizer, x, y)
    return RunResult("dp", rows, time.perf_counter() - start, steps, {"all-reduce": rows[-1].bytes_sent})


def _step_seconds(args: argparse.Namespace) -> float:
    """Virtual seconds of one inner step: its bytes of text at --speed."""
    return args.lm_batch * args.lm_context / args.speed


def warmed(make: Callable[..., Task], state: State, node: int, nodes: int, **kwargs: object) -> Task:
    """``make``'s task for ``node``, its model set to ``state`` (``kwargs``' ``moments``: its AdamW's)."""
    task = make(node, nodes, **kwargs)
    task.model.load_state_dict(state)
    return task


def _summary(result: RunResult, target: float, steps: int) -> dict[str, float | int | None]:
    rows = result.rows
    final = rows[-1]
    reached = next((r for r in rows if r.metrics.get(METRIC, math.inf) <= target), None)
    rates = [
        (b.bytes_sent - a.bytes_sent) / (b.time - a.time) / max(1, b.alive)
        for a, b in itertools.pairwise(rows)
        if b.time > a.time
    ]
    return {
        "final_bits_per_byte": _interpolated(rows, steps),  # at equal compute
        "final_steps": round(final.metrics["steps"], 1),
        "final_alive": final.alive,
        "bytes_sent": _interpolated(rows, steps, "bytes_sent"),
        "virtual_seconds": _interpolated(rows, steps, "time"),
        "bytes_to_target": reached and reached.bytes_sent,
        "seconds_to_target": reached and round(reached.time, 1),
        "steps_to_target": reached and round(reached.metrics["steps"], 1),
        "peak_bytes_per_second_per_node": round(max(rates, default=0.0)),
        # what a node sends at once: a round's exchange (a step's for dp and dpsgd)
        "bytes_per_round_per_node": round(final.bytes_sent / max(1.0, final.round * final.alive)),
        "wall_seconds": round(result.wall_seconds, 1),
    }


def _interpolated(rows: list[Row], steps: float, column: str = METRIC) -> float | None:
    """``column`` (a metric, ``bytes_sent`` or ``time``) at exactly ``steps`` steps per node, between
    the evaluations around it (None if the run fell short of it): evaluations fall on virtual times, not
    on step counts."""

    def value(row: Row) -> float:
        return getattr(row, column) if column in ("bytes_sent", "time") else row.metrics[column]

    for a, b in itertools.pairwise(rows):
        if a.metrics["steps"] <= steps <= b.metrics["steps"] and b.metrics["steps"] > a.metrics["steps"]:
            w = (steps - a.metrics["steps"]) / (b.metrics["steps"] - a.metrics["steps"])
            return round((1 - w) * value(a) + w * value(b), 4)
    return None


def _plot(out: Path, runs: list[RunResult]) -> None:
    for x, name, label in (
        ("steps", "bits_per_byte_by_steps.png", "inner steps per node"),
        ("bytes_sent", "bits_per_byte_by_bytes.png", "MB sent by all nodes (log)"),
    ):
        title, ylabel = "Language model across a swarm", "held-out bits per byte (mean over nodes)"
        report.plot_xy(out, name, runs, x, label, title, y=METRIC, ylabel=ylabel)


def _print(out: Path, results: dict[str, dict], target: float) -> None:
    """The table, its figures at --steps but the to-target ones and KB a node sends a round."""
    print(f"wrote {out}: rounds.csv, summary.json and plots")
    head = f"{'final bpb':>9} {f'MB to {target}':>10} {'s to target':>11} {'MB':>9} {'s':>7} {'KB/round':>9}"
    print(f"  {'arm':<17} {head}")
    for arm, r in results.items():
        b = r["bytes_to_target"]
        print(
            f"  {arm:<17} {r['final_bits_per_byte'] or math.nan:>9.3f} "
            f"{'-' if b is None else f'{b / 1e6:.2f}':>10} {r['seconds_to_target'] or '-'!s:>11} "
            f"{(r['bytes_sent'] or math.nan) / 1e6:>9.1f} {r['virtual_seconds'] or math.nan:>7.1f} "
            f"{r['bytes_per_round_per_node'] / 1e3:>9.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
