"""Does variance-corrected averaging matter? Gossip learning from independent initialisations, plain vs VCA.

N nodes hold IID shards of a dataset and start from independently initialised models, as in a swarm
with no shared starting point. Each round every node trains a few local steps, then averages its model
with those of ``--fanout`` peers drawn at random (synchronous rounds, like D-PSGD on a random graph).
The same run is done twice from the same seed: once with the plain mean, once with VCA
(learning/averaging.py), and the script prints the rounds each needs to reach ``--target`` mean test
accuracy over the nodes.

    python -m simulations.vca_demo --nodes 16 --target 0.9
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from learning.averaging import Model, mean, variance_corrected
from learning.datasets import Dataset, load_dataset
from learning.models import ParameterLayout, build_model
from learning.partition import partition
from learning.training import evaluate, train_local

Integrator = Callable[[Sequence[Model]], dict[str, torch.Tensor]]
INTEGRATORS: dict[str, Integrator] = {"mean": mean, "vca": variance_corrected}


def run(
    integrator: str, data: Dataset, args: argparse.Namespace, report: Callable[[int, float], None]
) -> list[float]:
    """Mean test accuracy over the nodes after each round."""
    shards = partition(data.y_train.numpy(), args.nodes, "iid", args.seed)
    models = [
        build_model(args.model, data.input_shape, data.num_classes, seed=args.seed * 1000 + i)
        for i in range(args.nodes)
    ]
    layout = ParameterLayout.of(models[0])
    rng = np.random.default_rng(args.seed)
    history = []
    for rnd in range(1, args.rounds + 1):
        for i, (model, shard) in enumerate(zip(models, shards)):
            train_local(
                model,
                data.x_train[shard],
                data.y_train[shard],
                batch_size=args.batch_size,
                lr=args.lr,
                steps=args.local_steps,
                seed=args.seed * 100_003 + rnd * 1009 + i,
            )
        states = [layout.state(m) for m in models]
        for i, model in enumerate(models):
            peers = rng.choice([j for j in range(args.nodes) if j != i], size=args.fanout, replace=False)
            layout.load(model, INTEGRATORS[integrator]([states[i], *(states[j] for j in peers)]))
        acc = float(
            np.mean([evaluate(m, data.x_test, data.y_test, data.num_classes).accuracy for m in models])
        )
        history.append(acc)
        report(rnd, acc)
        if acc >= args.target and rnd >= args.min_rounds:
            break
    return history


def rounds_to(history: list[float], target: float) -> int | None:
    return next((r for r, acc in enumerate(history, 1) if acc >= target), None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simulations.vca_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=16, help="number of nodes (default 16)")
    p.add_argument("--seed", type=int, default=1, help="seed for data split, initialisations and peer choice")
    p.add_argument("--dataset", default="digits", help="dataset name or .npz path (default digits)")
    p.add_argument("--model", default="mlp", help="model name or module:factory (default mlp)")
    p.add_argument("--fanout", type=int, default=2, help="peers averaged with per round (default 2)")
    p.add_argument("--local-steps", type=int, default=10, help="SGD steps per round (default 10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=150, help="most rounds to run (default 150)")
    p.add_argument("--target", type=float, default=0.9, help="mean test accuracy to reach (default 0.9)")
    p.add_argument("--min-rounds", type=int, default=0, help="keep running to at least this many rounds")
    p.add_argument("--out", type=Path, help="write summary.json here")
    args = p.parse_args(argv)
    if args.nodes < 2 or not 1 <= args.fanout < args.nodes:
        p.error("need --nodes >= 2 and 1 <= --fanout < --nodes")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
    data = load_dataset(args.dataset, seed=args.seed)
    print(
        f"{args.nodes} nodes, {args.dataset} ({len(data.x_train)} train / {len(data.x_test)} test), "
        f"model {args.model}, "
        f"{args.local_steps} local steps per round, averaging with {args.fanout} random peers; "
        f"target {args.target:.0%} mean test accuracy",
        flush=True,
    )
    results = {}
    for name in INTEGRATORS:
        start = time.perf_counter()

        def report(rnd: int, acc: float, name: str = name) -> None:
            if rnd == 1 or rnd % 5 == 0 or acc >= args.target:
                print(f"  [{name:>4}] round {rnd:3d}  mean accuracy {acc:.3f}", flush=True)

        history = run(name, data, args, report)
        results[name] = {
            "rounds_to_target": rounds_to(history, args.target),
            "final_accuracy": history[-1],
            "seconds": round(time.perf_counter() - start, 1),
            "accuracy_per_round": [round(a, 4) for a in history],
        }
    print(f"\nrounds to reach {args.target:.0%}:")
    for name, r in results.items():
        reached = r["rounds_to_target"] or f"not within {args.rounds}"
        print(f"  {name:>4}: {reached}  (final {r['final_accuracy']:.3f}, {r['seconds']} s)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "summary.json.tmp"
        tmp.write_text(
            json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1)
        )
        tmp.replace(args.out / "summary.json")
    return 0 if all(r["rounds_to_target"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
