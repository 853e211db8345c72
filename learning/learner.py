"""A node's learner: its model, its data shard and its hyperparameters, behind two calls.

``train(state, round)`` and ``evaluate(state)`` take and return named tensors, so a protocol never
touches an ``nn.Module``. In a simulation many learners may share one module (they run one at a time on
the event loop's thread); a daemon gives its learner its own.

With an :class:`~learning.anchor.Anchor`, a model far worse on the node's own data than the ones it
recently trained from is not trained on: training starts from the known-good model instead (the
node's way back from a poisoning), and each round's start point and step are recorded in the anchor.
Training that ends with NaN or infinite weights (a learning rate diverges) is dropped: the node keeps
the model it started from, which the anchor has just judged sane.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from shoal.learning.anchor import Anchor
from shoal.learning.models import ParameterLayout
from shoal.learning.protocol import State
from shoal.learning.training import Evaluation, TrainStats, evaluate, train_local

log = logging.getLogger("shoal.learner")


@dataclass(frozen=True)
class Hyperparameters:
    batch_size: int = 32
    lr: float = 0.05
    local_steps: int | None = None  # one of local_steps / local_epochs
    local_epochs: float | None = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs")


class Learner:
    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        hyper: Hyperparameters,
        *,
        seed: int = 0,
        device: torch.device | None = None,
        only_rows: tuple[str, list[int]] | None = None,
        anchor: Anchor | None = None,
    ):
        """``only_rows`` (tensor, rows): training's change to that tensor is kept on those rows only, the
        others stay as they came in. Bristle's local step: a node updates the output rows of the classes
        it holds and leaves the rest of the consensus layer as its peers made it."""
        self.model = model
        self.layout = ParameterLayout.of(model)
        self.x, self.y = x, y
        self.hyper = hyper
        self.seed = seed
        self.device = device
        if only_rows is not None and only_rows[0] not in self.layout.names:
            raise ValueError(f"no shared tensor {only_rows[0]!r} in this model")
        self.only_rows = only_rows
        self.anchor = anchor

    @property
    def samples(self) -> int:
        return len(self.y)

    def initial_state(self) -> State:
        return self.layout.state(self.model)

    def train(self, state: State, round: int) -> tuple[State, TrainStats]:
        """Train a copy of ``state`` on the shard; the seed depends on (node seed, round) only.

        Starts from the anchor's known-good model instead when ``state`` is far worse than it; returns
        the model it started from when training made any weight non-finite (logged as a warning)."""
        h = self.hyper
        if self.anchor is not None:
            state = self.anchor.recover(state, round)
        self.layout.load(self.model, state)
        stats = train_local(
            self.model,
            self.x,
            self.y,
            batch_size=h.batch_size,
            lr=h.lr,
            steps=h.local_steps,
            epochs=h.local_epochs,
            momentum=h.momentum,
            weight_decay=h.weight_decay,
            seed=self.seed * 1_000_003 + round,
            device=self.device,
        )
        # states live on the CPU (the wire and the averaging read them there), whatever trained them
        new = {name: t.cpu() for name, t in self.layout.state(self.model).items()}
        if self.only_rows is not None:
            name, rows = self.only_rows
            others = torch.ones(len(new[name]), dtype=torch.bool)
            others[rows] = False
            new[name][others] = state[name][others]
        bad = [n for n, t in new.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            log.warning("training round %d made %s non-finite: kept the model from before", round, bad[:3])
            return state, stats
        if self.anchor is not None:
            self.anchor.stepped(state, new)
        return new, stats

    def evaluate(self, state: State, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> Evaluation:
        self.layout.load(self.model, state)
        return evaluate(self.model, x, y, num_classes, device=self.device)
