"""The same task, unchanged, on 50 simulated nodes with 20% churn, in virtual time.

`make_task` is examples/cnn_adamw.py's: your CNN, AdamW, cosine schedule and data pipeline. Every 10
virtual seconds each live node crashes with probability 0.2 and each crashed one comes back with
probability 1/2, having lost its model (it fetches the swarm's).

    python examples/simulate_cnn.py          # prints progress, ends with the live nodes' accuracy
"""

from __future__ import annotations

import argparse

import torch
from cnn_adamw import make_task

import shoal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--churn", type=float, default=0.2)
    parser.add_argument("--duration", type=float, default=60, help="virtual seconds")
    parser.add_argument("--out", help="directory to write rounds.csv to")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = shoal.simulate(
        make_task, nodes=args.nodes, churn=args.churn, duration=args.duration, eval_every=10, out=args.out
    )
    final = result.final
    print(f"{final.alive} live nodes at {final.time:.0f} s: mean accuracy {final.acc_mean:.3f}")


if __name__ == "__main__":
    main()
