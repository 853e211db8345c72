"""Your own training loop, unchanged but for one call: `node.step()` after each optimizer step.

The task has a model and an evaluation but no `train`: your loop trains. Every `every` steps the node
takes a copy of your model for its next gossip round (sends it to its peers and folds theirs in on its
own thread); a later `node.step()` adds what that integration changed to your model. Your loop never
waits for the network. Here two loops run side by side in one process, one per node, each on its own
half of the data.

    python examples/own_loop.py             # both loops until their mean accuracy reaches 90%
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch
from cnn_adamw import CNN, load, until_accurate
from torch.nn import functional as F

import shoal


def evaluation(x_test: torch.Tensor, y_test: torch.Tensor) -> shoal.Metrics:
    def evaluate(model: torch.nn.Module) -> shoal.Metrics:
        return {"accuracy": (model(x_test).argmax(1) == y_test).float().mean().item()}

    return evaluate


def your_loop(node: shoal.Node, model: CNN, x: torch.Tensor, y: torch.Tensor, stop: threading.Event) -> None:
    """An ordinary PyTorch loop; the only Shoal line is `node.step()`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    while not stop.is_set():
        for batch in torch.randperm(len(y)).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            node.step()
            time.sleep(0.01)  # a real loop would be busier; two loops share this machine's cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.9, help="mean test accuracy to reach")
    parser.add_argument("--timeout", type=float, default=180, help="seconds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, stop, loops, nodes = tempfile.mkdtemp(prefix="shoal-example-"), threading.Event(), [], []
    try:
        for i in range(2):
            (x, y), test = load(i, 2)
            torch.manual_seed(0)
            model = CNN()
            task = shoal.Task(model, evaluate=evaluation(*test), samples=len(y))
            bootstrap = nodes[0].addresses if nodes else []
            node = shoal.Node(task, home=f"{base}/node{i}", bootstrap=bootstrap, every=20)
            node.start()
            nodes.append(node)
            loops.append(threading.Thread(target=your_loop, args=(node, model, x, y, stop)))
            loops[-1].start()
        until_accurate(nodes, args.target, args.timeout)
        received = [n.status()["bytes_in"].get("msg:model", 0) for n in nodes]
        print(f"model bytes each node received from the other: {received}")
    finally:
        stop.set()
        for loop in loops:
            loop.join()
        for node in nodes:
            node.close()


if __name__ == "__main__":
    main()
