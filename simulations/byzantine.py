"""Byzantine peers: honest-node accuracy per attacker fraction, data setting and integrator.

Transfer-learning set-up of Bristle (learning/bristle.py): a conv extractor is pre-trained on a
*source* part of `digits` (a seeded 40% of its training samples, never given to any node) and frozen;
the nodes share only a bias-free linear head over its 128 features. The other 60% is split over the
nodes, IID or non-IID (``shards:K``, K classes per node). Every honest node holds out up to 10 of its
samples per class as the small local test set Bristle scores peers on.

Nodes gossip asynchronously on a complete graph (one-second cycles: one local epoch, then send to
every peer, or --fanout random ones, and integrate what arrived). Attackers (a fraction of the nodes,
chosen at random) run the same protocol but send forged models (--attack: label-flip, noise,
sign-flip, alie).
The sweep runs every attacker fraction x data setting x integrator, --jobs at a time, and reports the
final mean test accuracy of the honest nodes. Writes rounds.csv, summary.json and one PNG per data
setting to --out.

    python -m shoal.simulations.byzantine --nodes 30 --attack sign-flip
"""

from __future__ import annotations

import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import networkx as nx
import torch

from shoal.learning.attacks import ATTACKS, Forging, flip_labels, forge
from shoal.learning.bristle import bristle_node, hold_out
from shoal.learning.datasets import Dataset, load_dataset
from shoal.learning.integrators import Integrator, Mean, make_integrator
from shoal.learning.learner import Learner
from shoal.learning.pretrain import extract, extractor_bytes, load_extractor, pretrain_extractor
from shoal.learning.protocol import LearningProtocol
from shoal.learning.settings import build_protocol
from shoal.overlay.atomic import write_atomic
from shoal.simulations import report
from shoal.simulations.engine import RunResult, Simulation, node_name

INTEGRATORS = ("bristle", "mean", "median", "trimmed", "krum")


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
    """Gossip nodes: attackers forge (or train on flipped labels); the honest use ``integrator``."""

    def make(sim: Simulation, i: int, learner: Learner, joining: bool):
        rng = sim.rng(i)

        def gossip(rule: Integrator, labels: list[int] | None = None) -> LearningProtocol:
            return build_protocol(
                sim.config,
                node_name(i),
                [],
                sim.initial[i],
                learner.samples,
                rng,
                integrator=rule,
                labels=labels,
                joining=joining,
            )

        if i in attackers:
            if attack == "label-flip":
                learner.y = flip_labels(learner.y, num_classes)
                return gossip(Mean())
            return Forging(gossip(Mean()), forge(attack, rng))
        if integrator == "bristle":
            bristle = bristle_node(learner.model, learner.x, learner.y, rng)
            learner.x, learner.y, learner.only_rows = bristle.x_train, bristle.y_train, bristle.only_rows
            chosen = bristle.integrator
        else:  # every honest node keeps the same share back as Bristle's, for fairness
            learner.x, learner.y, _, _ = hold_out(learner.x, learner.y)
            chosen = make_integrator(integrator)
        return gossip(chosen, labels=learner.y.unique().tolist())

    return make


def run_cell(job: tuple) -> RunResult:
    """One cell of the sweep, in a worker process."""
    config, data, attackers, name, attack, label = job
    honest = [i for i in range(config.nodes) if i not in attackers]
    return Simulation(
        config,
        nx.complete_graph(config.nodes),
        label=label,
        data=data,
        observed=honest,
        progress=None,
        make_protocol=protocol_factory(name, set(attackers), attack, data.num_classes),
    ).run()


def plot_sweep(out: Path, setting: str, cells: dict, fractions: list[float], integrators: list[str]) -> None:
    fig, ax = report.figure(figsize=(7, 4.5))
    for name in integrators:
        ax.plot(
            [100 * f for f in fractions], [cells[setting][name][str(f)] for f in fractions], "o-", label=name
        )
    ax.set_xlabel("attackers (% of nodes)")
    ax.set_ylabel("final test accuracy of honest nodes")
    ax.set_title(f"Byzantine peers, {setting} data")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    report.save_figure(fig, out / f"byzantine_{setting.replace(':', '')}.png")


def main(argv: list[str] | None = None) -> int:
    p = report.parser(
        "byzantine",
        __doc__,
        nodes=30,
        duration=60.0,
        eval_every=10.0,
        dataset="digits",
        model="head",
        lr=0.2,
        fanout=None,
    )
    g = p.add_argument_group("byzantine")
    g.add_argument(
        "--attack", default="sign-flip", choices=ATTACKS, help="what attackers do (default sign-flip)"
    )
    g.add_argument(
        "--fractions", default="0,0.1,0.2,0.3,0.4,0.5", help="attacker fractions (default %(default)s)"
    )
    g.add_argument("--settings", default="iid,shards:4", help="data settings (default %(default)s)")
    g.add_argument("--integrators", default=",".join(INTEGRATORS), help="(default %(default)s)")
    g.add_argument(
        "--jobs", type=int, default=os.cpu_count(), help="runs in parallel (default: one per core)"
    )
    g.add_argument(
        "--features", type=Path, help="frozen extractor (safetensors); pre-trained and saved if absent"
    )
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    integrators = args.integrators.split(",")
    if unknown := set(integrators) - set(INTEGRATORS):
        p.error(f"unknown integrator(s) {sorted(unknown)}: use {', '.join(INTEGRATORS)}")
    if any(not 0 <= f < 1 for f in fractions):
        p.error("--fractions must be in [0, 1)")
    report.prepare(args)
    data, how = transfer_data(args.seed, args.features, args.out)
    print(f"frozen extractor {how}; {len(data.y_train)} target samples over {args.nodes} nodes", flush=True)
    jobs = []
    for setting in args.settings.split(","):
        config = report.config_from(args, partition=setting, dataset="digits-features")
        for fraction in fractions:
            attackers = frozenset(
                random.Random(args.seed).sample(range(args.nodes), round(fraction * args.nodes))
            )
            jobs += [
                (config, data, attackers, name, args.attack, f"{setting}/{int(100 * fraction)}%/{name}")
                for name in integrators
            ]
    done: dict[str, RunResult] = {}
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for result in pool.map(run_cell, jobs):
            done[result.label] = result
            if not args.quiet:
                print(
                    f"  {result.label:>24}: honest accuracy {result.final.acc_mean:.3f}  "
                    f"({result.wall_seconds:.1f} s)",
                    flush=True,
                )
    results = [done[job[-1]] for job in jobs]
    cells: dict[str, dict[str, dict[str, float]]] = {}
    for (config, _, attackers, name, _, _), result in zip(jobs, results):
        fraction = round(len(attackers) / args.nodes, 2)
        cells.setdefault(config.partition, {}).setdefault(name, {})[str(fraction)] = round(
            result.final.acc_mean, 4
        )
    fractions = [round(round(f * args.nodes) / args.nodes, 2) for f in fractions]
    for setting in cells:
        plot_sweep(args.out, setting, cells, fractions, integrators)
    report.write_rounds(args.out, results)
    report.write_summary(
        args.out,
        config,
        {
            "name": "byzantine",
            "attack": args.attack,
            "extractor": how,
            "fractions": fractions,
            "settings": args.settings,
        },
        {"honest_accuracy": cells},
    )
    print(f"wrote {args.out}: rounds.csv, summary.json and plots")
    header = "".join(f"{int(100 * f):>7}%" for f in fractions)
    for setting, by_name in cells.items():
        print(f"\n{setting:<10}{header}")
        for name, row in by_name.items():
            print(f"{name:<10}" + "".join(f"{row[str(f)]:8.3f}" for f in fractions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
