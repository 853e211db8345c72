"""Local training and evaluation: the compute a node does on its own data.

Pure functions of (model, data, hyperparameters, seed): the same inputs give the same parameters on CPU.
Callers run them off the event loop (``overlay.offloop``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def pick_device() -> torch.device:
    """The local GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _place(model: nn.Module, device: torch.device | None) -> torch.device:
    """Move the model to ``device`` (default: :func:`pick_device`) unless it is there already."""
    device = device or pick_device()
    if next(model.parameters()).device != device:
        model.to(device)
    return device


@dataclass(frozen=True)
class TrainStats:
    steps: int
    samples: int
    mean_loss: float
    last_loss: float


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    per_class_accuracy: tuple[float, ...]  # NaN for classes absent from the evaluation set
    samples: int


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    steps: int | None = None,
    epochs: float | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | None = None,
) -> TrainStats:
    """Train ``model`` in place with SGD for ``steps`` mini-batches or ``epochs`` passes over (x, y).

    Batches are drawn from a shuffled order seeded by ``seed``, reshuffled at each pass.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if batch_size < 1 or lr <= 0:
        raise ValueError(f"batch_size must be >= 1 and lr > 0, got {batch_size} and {lr}")
    if len(x) == 0:
        return TrainStats(0, 0, math.nan, math.nan)
    steps = step_count(len(x), batch_size, steps, epochs)
    device = _place(model, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    velocity: list[torch.Tensor | None] = [None] * len(params)
    total, loss_value = 0.0, math.nan
    for idx in batches(len(x), batch_size, steps, seed):
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        loss.backward()
        sgd_step(params, [p.grad for p in params], velocity, lr, momentum, weight_decay)
        loss_value = loss.item()
        total += loss_value
    return TrainStats(steps, steps * min(batch_size, len(x)), total / steps, loss_value)


def step_count(samples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    """How many mini-batches a round of ``steps`` or ``epochs`` passes over ``samples`` takes."""
    return steps if steps is not None else max(1, math.ceil(epochs * samples / batch_size))


def batches(samples: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """The indices of each of ``steps`` mini-batches: a shuffled order seeded by ``seed``, reshuffled
    at each pass (the last batch of a pass may be short)."""
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(samples, generator=generator), 0
    for _ in range(steps):
        if cursor >= len(order):
            order, cursor = torch.randperm(samples, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


@torch.no_grad()
def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    velocity: list[torch.Tensor | None],
    lr: float,
    momentum: float,
    decay: float,
) -> None:
    """One step of ``torch.optim.SGD`` (no dampening, no Nesterov), the same arithmetic.

    Written out because constructing ``torch.optim.SGD`` imports ``torch._dynamo`` and with it sympy:
    1.45 s of CPU and 72 MB of memory per process (torch 2.13), paid in a daemon's first round. At 24
    daemons on 2 cores that first round took 50-120 s (the testbed, docs/measurements.md).
    """
    for i, (p, grad) in enumerate(zip(params, grads)):
        if grad is None:
            continue
        step = grad.add(p, alpha=decay) if decay else grad
        if momentum:
            buf = velocity[i]
            if buf is None:
                buf = velocity[i] = step.clone()
            else:
                buf.mul_(momentum).add_(step)
            step = buf
        p.add_(step, alpha=-lr)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    batch_size: int = 2048,
    device: torch.device | None = None,
) -> Evaluation:
    """Accuracy, mean cross-entropy and per-class accuracy of ``model`` on (x, y)."""
    device = _place(model, device)
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64)
    seen = torch.zeros(num_classes, dtype=torch.int64)
    loss_sum = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        hits = (logits.argmax(1) == yb).cpu()
        yb = yb.cpu()
        seen += torch.bincount(yb, minlength=num_classes)
        correct += torch.bincount(yb[hits], minlength=num_classes)
    n = int(seen.sum())
    if n == 0:
        return Evaluation(math.nan, math.nan, (math.nan,) * num_classes, 0)
    per_class = tuple(float(c / s) if s else math.nan for c, s in zip(correct.tolist(), seen.tolist()))
    return Evaluation(int(correct.sum()) / n, loss_sum / n, per_class, n)
