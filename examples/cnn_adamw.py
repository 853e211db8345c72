"""Your own CNN, optimizer (AdamW), schedule (cosine) and data pipeline, as a Shoal task.

`make_task(node, nodes)` is all Shoal needs: it returns node `node`'s task out of `nodes`. The same
function runs on real daemons (this file: three `shoal.Node`s on 127.0.0.1 in one process; or, from
this folder, one `shoal run --task cnn_adamw:make_task --shard I --shards N` per device) and in the
simulator (`examples/simulate_cnn.py`).

    python examples/cnn_adamw.py            # three daemons until their mean accuracy reaches 90%
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import shoal

TEST = 400  # samples every node evaluates on; the rest is split among the nodes
STEPS, BATCH = 10, 32  # per round


Labelled = tuple[torch.Tensor, torch.Tensor]


def load(node: int, nodes: int) -> tuple[Labelled, Labelled]:
    """Your data pipeline: 8x8 digit images; node `node`'s share of the training part, the test part."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:TEST], order[TEST:]
    mine = train[node::nodes]
    return (x[mine], y[mine]), (x[test], y[test])


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def make_task(node: int, nodes: int) -> shoal.Task:
    (x, y), (x_test, y_test) = load(node, nodes)
    torch.manual_seed(0)  # every node starts from the same model (a joiner takes the swarm's anyway)
    model = CNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=300, eta_min=1e-3)
    shuffle = torch.Generator().manual_seed(node)

    def train(model: nn.Module, round: int) -> shoal.Metrics:
        """One round: STEPS steps of AdamW. Shoal has put the swarm's model into `model`."""
        model.train()
        for _ in range(STEPS):
            batch = torch.randint(len(y), (BATCH,), generator=shuffle)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
        schedule.step()
        return {"loss": loss.item(), "samples": STEPS * BATCH}

    def evaluate(model: nn.Module) -> shoal.Metrics:
        logits = model(x_test)
        return {
            "accuracy": (logits.argmax(1) == y_test).float().mean().item(),
            "loss": F.cross_entropy(logits, y_test).item(),
        }

    # the probe: how the node judges peers' models on its own samples (its defence against poisoning)
    return shoal.Task(model, train, evaluate, samples=len(y), probe=shoal.ClassificationProbe(x, y))


def until_accurate(nodes: list[shoal.Node], target: float, timeout: float) -> None:
    """Show the nodes' progress every 2 s until their mean test accuracy reaches ``target``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        time.sleep(2)
        accuracy = [round(n.metrics.get("accuracy") or 0.0, 3) for n in nodes]
        print(f"{time.monotonic() - start:5.0f} s  rounds {[n.round for n in nodes]}  accuracy {accuracy}")
        if statistics.fmean(accuracy) >= target:
            print(f"reached {target:.0%} mean test accuracy")
            return
    raise SystemExit(f"did not reach {target:.0%} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.9, help="mean test accuracy to reach")
    parser.add_argument("--timeout", type=float, default=180, help="seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, start = tempfile.mkdtemp(prefix="shoal-example-"), time.monotonic()
    first = shoal.Node(make_task(0, args.nodes), home=f"{base}/node0")
    nodes = [first]
    with first:
        for i in range(1, args.nodes):
            node = shoal.Node(make_task(i, args.nodes), home=f"{base}/node{i}", bootstrap=first.addresses)
            node.start()
            nodes.append(node)
        try:
            until_accurate(nodes, args.target, args.timeout - (time.monotonic() - start))
        finally:
            for node in nodes[1:]:
                node.close()


if __name__ == "__main__":
    main()
