"""Byzantine peers: honest-node accuracy per attack, attacker fraction, data setting and integrator.

Two tasks:

- ``mlp`` (default): the daemon's own task: `digits` over the nodes (IID, or ``--settings``), the MLP, its
  hyperparameters; the honest nodes use the robust default ``clipped`` or a baseline (``vca``, the
  earlier default; ``median``, ``trimmed``, ``krum``).
- ``head``: Bristle's transfer-learning set-up (learning/bristle.py): a conv extractor pre-trained on a
  *source* part of `digits` (a seeded 40% of its training samples, never given to any node) and frozen;
  the nodes share only a bias-free linear head over its 128 features and split the other 60%, IID or
  non-IID (``shards:K``, K classes per node). Every honest node holds out up to 10 of its samples per
  class, the small local test set Bristle scores peers on.

Protocols: ``gossip`` (asynchronous, one-second cycles on a complete graph: one round of local training,
then send to every peer, or ``--gossip-fanout`` random ones, and integrate what arrived) or ``modest``
(unpaced: sample ``--modest-sample-size`` nodes per round, one aggregator, messages to whoever is
sampled). Attackers (a fraction of the nodes, chosen at random) run the same protocol but send forged
models (``--attacks``, any of label-flip, noise, sign-flip, alie, stale: learning/attacks.py): in MoDeST
both the models they aggregate and the ones they train. The sweep runs every attack x setting x fraction
x integrator, ``--jobs`` at a time, and reports the final mean test accuracy of the honest nodes
(MoDeST: of the honest nodes at the newest round). Writes rounds.csv, summary.json and one PNG per
attack and setting.

    python -m shoal.simulations.byzantine --attacks sign-flip,alie --protocol modest
"""

from __future__ import annotations

import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import networkx as nx
import torch

from shoal.learning.attacks import ATTACKS, Forging, flip_labels, forge
from shoal.learning.bristle import bristle_node, hold_out
from shoal.learning.datasets import Dataset, load_dataset
from shoal.learning.integrators import Mean
from shoal.learning.node import LearningNode, build_integrator, build_protocol
from shoal.learning.pretrain import extract, extractor_bytes, load_extractor, pretrain_extractor
from shoal.learning.protocol import LearningProtocol
from shoal.learning.task import retrained
from shoal.node.config import updated
from shoal.overlay.atomic import write_atomic
from shoal.simulations import report
from shoal.simulations.config import SimConfig
from shoal.simulations.engine import Simulation, node_name
from shoal.simulations.rows import RunResult

TASKS = ("mlp", "head")
INTEGRATORS = {"mlp": ("clipped", "vca", "median", "trimmed", "krum"), "head": ("bristle", "clipped", "mean")}


def transfer_data(seed: int, features_file: Path | None, out: Path) -> tuple[Dataset, str]:
    """Split digits into source and target, get the frozen extractor, return the target as features."""
    data = load_dataset("digits", seed=seed)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    source, target = order[: int(0.4 * len(order))], order[int(0.4 * len(order)) :]
    if features_file is not None and features_file.exists():
        extractor = load_extractor(features_file, data.input_shape)
        how = f"loaded from {features_file}"
    else:
        extractor, accuracy = pretrain_extractor(
            data.x_train[source], data.y_train[source], data.num_classes, seed=seed
        )
        features_file = features_file or out / "extractor.safetensors"
        write_atomic(features_file, extractor_bytes(extractor))
        how = f"pre-trained on {len(source)} source samples (source accuracy {accuracy:.3f})"
        how += f"; saved: {features_file}"
    target_data = Dataset(
        "digits-features",
        extract(extractor, data.x_train[target]),
        data.y_train[target],
        extract(extractor, data.x_test),
        data.y_test,
        data.num_classes,
    )
    return target_data, how


def protocol_factory(integrator: str, attackers: set[int], attack: str, num_classes: int):
    """Attackers forge (or train on flipped labels) behind a plain mean; the honest use ``integrator``."""

    def make(sim: Simulation, i: int, node: LearningNode, joining: bool):
        rng, learner = sim.rng(i), node.learner
        peers = [node_name(j) for j in range(sim.config.nodes) if j != i]  # MoDeST's members
        x, y = learner.task.train.x, learner.task.train.y

        def build(rule=None, labels: list[int] | None = None) -> LearningProtocol:
            return build_protocol(
                sim.config,
                node_name(i),
                peers,
                node.initial,
                learner.samples,
                rng,
                anchor=None if i in attackers else node.anchor,  # attackers judge nothing
                integrator=rule,
                labels=labels,
                joining=joining,
            )

        if i in attackers:
            if attack == "label-flip":
                learner.task = retrained(learner.task, x, flip_labels(y, num_classes))
                return build(Mean())
            return Forging(build(Mean()), forge(attack, rng))
        if integrator == "bristle":
            bristle = bristle_node(learner.model, x, y, rng)
            learner.task = retrained(learner.task, bristle.x_train, bristle.y_train)
            learner.only_rows = bristle.only_rows
            return build(bristle.integrator, labels=bristle.labels)
        if sim.config.task.model == "head":  # every honest node keeps the same share back as Bristle's
            x, y, _, _ = hold_out(x, y)
            learner.task = retrained(learner.task, x, y)
        config = replace(sim.config, integrator=integrator)
        return build(build_integrator(config, node.anchor, rng), labels=y.unique().tolist())

    return make


def run_cell(job: tuple) -> RunResult:
    """One cell of the sweep, in a worker process."""
    config, data, attackers, name, attack, label = job
    honest = [i for i in range(config.nodes) if i not in attackers]
    modest = config.protocol == "modest"
    return Simulation(
        config,
        nx.empty_graph(config.nodes) if modest else nx.complete_graph(config.nodes),
        label=label,
        data=data,
        observed=honest,
        evaluate="freshest" if modest else "all",
        progress=None,
        make_protocol=protocol_factory(name, set(attackers), attack, data.num_classes),
    ).run()


def plot_sweep(out: Path, what: str, attack: str, setting: str, cells: dict, fractions: list[float]) -> None:
    """``what``: the protocol swept (or ``head``, Bristle's set-up), first in the file's name."""
    fig, ax = report.figure(figsize=(7, 4.5))
    for name, row in cells.items():
        ax.plot([100 * f for f in fractions], [row[str(f)] for f in fractions], "o-", label=name)
    ax.set_xlabel("attackers (% of nodes)")
    ax.set_ylabel("final test accuracy of honest nodes")
    ax.set_title(f"Byzantine peers: {attack}, {setting} data")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    report.save_figure(fig, out / f"byzantine_{what}_{attack}_{setting.replace(':', '')}.png")


def main(argv: list[str] | None = None) -> int:
    # mlp: the daemon's own learning settings (learning.settings.TaskSettings)
    p = report.parser(
        "byzantine",
        __doc__,
        nodes=20,
        duration=60.0,
        eval_every=10.0,
        gossip_fanout=None,
        modest_period=0.0,  # unpaced, as simulations/modest.py
        task_lr=0.05,
        task_batch_size=32,
        task_local_steps=20,
    )
    g = p.add_argument_group("byzantine")
    g.add_argument("--task", default="mlp", choices=TASKS, help="(default %(default)s)")
    g.add_argument("--protocol", default="gossip", choices=("gossip", "modest"), help="(default %(default)s)")
    g.add_argument(
        "--attacks",
        default="sign-flip",
        help=f"comma-separated, of {', '.join(ATTACKS)} (default %(default)s)",
    )
    g.add_argument(
        "--fractions", default="0,0.1,0.2,0.3,0.4", help="attacker fractions (default %(default)s)"
    )
    g.add_argument("--settings", help="data settings (default: iid for mlp, iid,shards:4 for head)")
    g.add_argument(
        "--integrators", help="(default: clipped,vca,median,trimmed,krum; head: bristle,clipped,mean)"
    )
    g.add_argument(
        "--jobs", type=int, default=os.cpu_count(), help="runs in parallel (default: one per core)"
    )
    g.add_argument(
        "--features", type=Path, help="head: frozen extractor (safetensors); pre-trained and saved if absent"
    )
    if p.parse_known_args(argv)[0].task == "head":  # the set-up of Bristle's sweeps
        p.set_defaults(
            nodes=30, task_lr=0.2, task_batch_size=16, task_local_epochs=1.0, task_local_steps=None
        )
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    attacks = args.attacks.split(",")
    integrators = (args.integrators or ",".join(INTEGRATORS[args.task])).split(",")
    settings = (args.settings or ("iid" if args.task == "mlp" else "iid,shards:4")).split(",")
    if unknown := set(attacks) - set(ATTACKS):
        p.error(f"unknown attack(s) {sorted(unknown)}: use {', '.join(ATTACKS)}")
    if unknown := set(integrators) - {*INTEGRATORS["mlp"], *INTEGRATORS["head"]}:
        p.error(f"unknown integrator(s) {sorted(unknown)}")
    if "bristle" in integrators and args.task != "head":
        p.error("bristle shares only a frozen extractor's head: use --task head")
    if any(not 0 <= f < 1 for f in fractions):
        p.error("--fractions must be in [0, 1)")
    report.prepare(args)
    base = report.config_from(args, dial_any=args.protocol == "modest")  # MoDeST dials whoever it samples
    if args.task == "head":
        data, how = transfer_data(args.seed, args.features, args.out)
        print(
            f"frozen extractor {how}; {len(data.y_train)} target samples over {args.nodes} nodes", flush=True
        )
        base = updated(base, {"task_dataset": "digits-features", "task_model": "head"})
    else:
        data = load_dataset(base.task.dataset, seed=args.seed, samples=base.dataset_samples)
    jobs = []
    for attack in attacks:
        for setting in settings:
            config: SimConfig = updated(base, {"task_partition": setting})
            for fraction in fractions:
                attackers = frozenset(
                    random.Random(args.seed).sample(range(args.nodes), round(fraction * args.nodes))
                )
                jobs += [
                    (
                        config,
                        data,
                        attackers,
                        name,
                        attack,
                        f"{attack}/{setting}/{int(100 * fraction)}%/{name}",
                    )
                    for name in integrators
                ]
    done: dict[str, RunResult] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for result in pool.map(run_cell, jobs):
            done[result.label] = result
            if not args.quiet:
                print(
                    f"  {result.label:>32}: honest accuracy {result.final.acc_mean:.3f}  "
                    f"({result.wall_seconds:.1f} s)",
                    flush=True,
                )
    results = [done[job[-1]] for job in jobs]
    cells: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (config, _, attackers, name, attack, _), result in zip(jobs, results):
        fraction = round(len(attackers) / args.nodes, 2)
        by_setting = cells.setdefault(attack, {}).setdefault(config.task.partition, {})
        by_setting.setdefault(name, {})[str(fraction)] = round(result.final.acc_mean, 4)
    fractions = [round(round(f * args.nodes) / args.nodes, 2) for f in fractions]
    for attack, by_setting in cells.items():
        for setting, by_name in by_setting.items():
            plot_sweep(
                args.out, args.protocol if args.task == "mlp" else "head", attack, setting, by_name, fractions
            )
    report.write_rounds(args.out, results)
    report.write_summary(
        args.out,
        base,
        {
            "name": "byzantine",
            "task": args.task,
            "attacks": attacks,
            "fractions": fractions,
            "settings": settings,
        },
        {"honest_accuracy": cells},
    )
    print(f"wrote {args.out}: rounds.csv, summary.json and plots")
    header = "".join(f"{int(100 * f):>7}%" for f in fractions)
    for attack, by_setting in cells.items():
        for setting, by_name in by_setting.items():
            print(f"\n{attack}, {setting}:{' ' * 3}{header}")
            for name, row in by_name.items():
                print(f"{name:<20}" + "".join(f"{row[str(f)]:8.3f}" for f in fractions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
