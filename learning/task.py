"""What a node learns, as the user's own objects: a model, a training function and an evaluation.

A :class:`Task` is the door into Shoal for a user's code (``import shoal``): the protocols never see
it; they exchange named tensors, and the node's :class:`~learning.learner.Learner` loads them into the
task's model before it calls the user's functions. Shoal's built-in task (``shoal run`` with
``[task]`` settings, ``shoal demo``, the simulations) is one such task, built by
:func:`classification`; nothing in the node treats it apart, except Bristle (below).

The user's ``train(model, round)`` is their loop, their optimizer, their loss and their number of
local steps; it returns what it wants logged (``samples``: how many samples it went through, which
the simulator charges in virtual time). ``evaluate(model)`` returns any named numbers (accuracy,
loss, perplexity, F1): they are what ``/status``, ``/metrics`` and a simulation's ``rounds.csv`` show.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from shoal.learning.anchor import ClassificationProbe, Probe
from shoal.learning.models import ModelError, import_callable
from shoal.learning.training import evaluate as evaluate_classifier
from shoal.learning.training import train_local

Metrics = Mapping[str, float]
Labelled = tuple[torch.Tensor, torch.Tensor]  # inputs and their labels
TrainFn = Callable[[nn.Module, int], Metrics | None]
EvaluateFn = Callable[[nn.Module], Metrics]


@dataclass(frozen=True)
class Task:
    """A node's task.

    ``model``: an ``nn.Module``, or a function of no argument building one (peers exchange its
    trainable parameters: every node of a swarm must build the same architecture). ``train(model,
    round)``: train ``model`` in place on this node's data; ``None`` when the user's own loop trains and
    calls :meth:`shoal.Node.step` (gossip only). ``evaluate(model)``: named metrics, optional.
    ``samples``: how many training samples the node holds (VCA weighs models by it). ``probe``: judges
    peers' models on this node's own data, the base of the defences against poisoned models
    (``learning.anchor``); without one, models are judged by their distance to ours only.
    """

    model: nn.Module | Callable[[], nn.Module]
    train: TrainFn | None = None
    evaluate: EvaluateFn | None = None
    samples: int = 1
    probe: Probe | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.model, nn.Module) or callable(self.model)):
            raise TypeError(f"model must be an nn.Module or a function building one, got {self.model!r}")
        if self.samples < 0:
            raise ValueError(f"samples must not be negative, got {self.samples}")

    def module(self) -> nn.Module:
        """The task's model: the one given, or a new one from its factory."""
        if isinstance(self.model, nn.Module):
            return self.model
        module = self.model()
        if not isinstance(module, nn.Module):
            raise TypeError(f"the task's model factory returned {type(module).__name__}, not an nn.Module")
        return module


@dataclass(frozen=True)
class SupervisedTraining:
    """The built-in training: SGD on (x, y) with cross-entropy, ``steps`` mini-batches or ``epochs``
    passes per round, shuffled by a seed of (node seed, round) so that a run replays bit for bit.
    A dataclass so that Bristle can train it on its share of the samples (``learning.bristle``)."""

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int = 32
    lr: float = 0.05
    steps: int | None = None
    epochs: float | None = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        if self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size} and {self.lr}")
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")

    def __call__(self, model: nn.Module, round: int) -> Metrics:
        stats = train_local(
            model,
            self.x,
            self.y,
            batch_size=self.batch_size,
            lr=self.lr,
            steps=self.steps,
            epochs=self.epochs,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            seed=self.seed_of(round),
        )
        return {"samples": stats.samples, "loss": stats.mean_loss}

    def seed_of(self, round: int) -> int:
        """The seed of round ``round``'s mini-batches."""
        return self.seed * 1_000_003 + round


@dataclass(frozen=True)
class Accuracy:
    """The built-in evaluation: accuracy and mean cross-entropy on (x, y)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __call__(self, model: nn.Module) -> Metrics:
        result = evaluate_classifier(model, self.x, self.y, self.num_classes)
        return {"accuracy": result.accuracy, "loss": result.loss}


def classification(
    model: nn.Module | Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    test: Labelled | None = None,
    num_classes: int | None = None,
    batch_size: int = 32,
    lr: float = 0.05,
    steps: int | None = 20,
    epochs: float | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> Task:
    """A classifier trained with SGD on this node's ``(x, y)`` and evaluated on ``test``: Shoal's
    built-in task, and the shortest way to run a model of one's own on labelled tensors. Each round is
    ``steps`` mini-batches (or ``epochs`` passes); peers' models are probed on 128 of the node's own
    samples. The only kind of task Bristle can integrate (it scores peers per class)."""
    training = SupervisedTraining(x, y, batch_size, lr, steps, epochs, momentum, weight_decay, seed)
    labels = torch.cat([y, *(test[1:] if test else ())])
    if num_classes is None and not len(labels):
        raise ValueError("no labels to count the classes from: give num_classes")
    classes = num_classes or int(labels.max()) + 1
    return Task(
        model,
        training,
        None if test is None else Accuracy(*test, classes),
        samples=len(y),
        probe=ClassificationProbe(x, y, seed=seed),
    )


def retrained(task: Task, x: torch.Tensor, y: torch.Tensor) -> Task:
    """A classification task (:func:`classification`) trained on other samples: Bristle's share of
    them, an attacker's flipped labels."""
    if not isinstance(task.train, SupervisedTraining):
        raise ValueError("only a classification task (shoal.classification) can be trained on other samples")
    return replace(task, train=replace(task.train, x=x, y=y), samples=len(y))


TaskFactory = Callable[[int, int], Task]


def load_task(spec: str, node: int, nodes: int) -> Task:
    """The task ``package.module:function`` returns for node ``node`` of ``nodes``: the one way a
    user's code is named from a command line."""
    factory = import_callable(spec, "task", "use 'package.module:function' returning a shoal.Task")
    return make(factory, node, nodes, repr(spec))


def make(factory: TaskFactory, node: int, nodes: int, name: str) -> Task:
    """Node ``node``'s task of ``nodes`` (the daemon's shard of shards, or a simulated node's index),
    from the user's ``factory`` (called ``name`` in errors); a ModelError in one line when it raises
    or returns something else."""
    try:
        task = factory(node, nodes)
    except Exception as exc:
        raise ModelError(f"task {name}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise ModelError(f"task {name} returned {type(task).__name__}, not a shoal.Task")
    return task


def shown(metrics: Metrics | None) -> dict[str, float | None]:
    """A user's metrics as ``/status`` (JSON) shows them: numbers only, NaN and infinities as None."""
    out: dict[str, float | None] = {}
    for name, value in metrics.items() if isinstance(metrics, Mapping) else ():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[str(name)] = float(value) if math.isfinite(value) else None
    return out
