r"""What a simulated swarm is: its :class:`SimConfig` (the daemon's protocol settings, the built-in
task's data and hyperparameters, the simulated network and time) and the :class:`ScheduledEvent`\ s
that crash, stop, start or cut its nodes (``simulations.engine`` runs them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shoal.learning.settings import ProtocolSettings, learner_seed
from shoal.learning.task import Labelled, Task, classification


@dataclass(frozen=True)
class SimConfig(ProtocolSettings):
    """One simulated swarm: the protocol every node runs (the daemon's settings, checked there, with the
    protocols' own configurations nested: ``SimConfig(gossip=GossipConfig(fanout=None))``) and the
    swarm's data, learning, network and time. Times are virtual seconds; bandwidth in Mbit/s; speed in
    samples/s."""

    integrator: str = "weighted"  # the simulations' reference: plain averaging, weighted by samples
    nodes: int = 20
    seed: int = 1
    dataset: str = "digits"
    dataset_samples: int = 5000  # size of generated datasets (mnist1d)
    model: str = "mlp"
    partition: str = "iid"
    same_init: bool = True  # all nodes start from one model (as FL would) or each from its own
    batch_size: int = 16
    lr: float = 0.1
    local_steps: int | None = None
    local_epochs: float | None = 1.0
    duration: float = 300.0
    eval_every: float = 10.0
    eval_samples: int = 500  # test samples each evaluation uses (the same subset every time)
    latency: float = 0.05
    bandwidth: float = 100.0
    speed: float = 2000.0
    speed_spread: float = 1.0  # node speeds are log-uniform in [speed/spread, speed*spread]
    loss: float = 0.0
    dial_any: bool = False  # True: any node may message any other, not only graph neighbours

    def builtin(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        test: Labelled,
        classes: int,
        node: int,
    ) -> Task:
        """Node ``node``'s built-in task on its samples ``(x, y)``, evaluated on ``test``."""
        return classification(
            model,
            x,
            y,
            test=test,
            num_classes=classes,
            batch_size=self.batch_size,
            lr=self.lr,
            steps=self.local_steps,
            epochs=self.local_epochs,
            seed=learner_seed(self.seed, node),
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "nodes must be at least 2": self.nodes >= 2,
            "duration, eval_every, speed and bandwidth must be positive": min(
                self.duration, self.eval_every, self.speed, self.bandwidth
            )
            > 0,
            "speed_spread must be at least 1": self.speed_spread >= 1,
            "loss must be in [0, 1)": 0 <= self.loss < 1,
            "latency must not be negative": self.latency >= 0,
            "eval_samples must be at least 1": self.eval_samples >= 1,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class ScheduledEvent:
    """At virtual ``time``: ``crash``, ``leave`` or ``join`` nodes (indices), or ``partition`` / ``heal``."""

    time: float
    action: str
    nodes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in {"crash", "leave", "join", "partition", "heal"}:
            raise ValueError(f"unknown scheduled action {self.action!r}")
