"""The learning layer's settings (``learning.node`` builds a node from them).

:class:`TaskSettings` is what a node learns and from which data; :class:`ProtocolSettings` how it learns
with its peers. They are the ``[task]`` and ``[protocol]`` sections of a daemon's ``config.toml``, and
what every simulated node learns and runs too (``simulations.config.SimConfig`` nests the one and
extends the other), so the daemon and the simulations build their nodes the same way: ``learning.node``.

A field whose metadata has a ``help`` is a setting: ``node.config`` writes it into the commented template
(after the ``group`` line, if any) and reads it from the file, from ``SHOAL_<KEY>`` and, with ``flag``,
from ``shoal run --<key>`` (``metavar`` names the flag's value); ``instead`` names the setting it is
an alternative to, which giving it unsets (``node.config.updated``: TOML has no null). Fields without
``help`` are knobs for tests and simulations. A setting whose type is a dataclass is a sub-table:
:class:`ProtocolSettings` nests the protocols' and the codec's own configurations, whose fields carry
their metadata, so each rule is written and checked once, by the dataclass that owns the field (a
``ValueError`` naming it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from shoal.learning import integrators
from shoal.learning.compression import CodecConfig
from shoal.learning.datasets import BUILTIN
from shoal.learning.gossip import GossipConfig
from shoal.learning.models import MODELS
from shoal.learning.modest import ModestConfig
from shoal.learning.outer import OuterConfig
from shoal.learning.task import Labelled, Task, classification

PROTOCOLS = ("gossip", "modest")
# clipped needs its node's anchor (build_integrator), bristle its node's data (learning.bristle)
INTEGRATORS = ("clipped", *integrators.INTEGRATORS, "bristle")
SEED_STRIDE = 7919  # a prime: node i of a run seeded s trains with seed s * SEED_STRIDE + i


def learner_seed(seed: int, node: int) -> int:
    """The training seed of ``node`` (an index, or the daemon's shard) in a run seeded ``seed``."""
    return seed * SEED_STRIDE + node


def _choices(names: Sequence[str]) -> str:
    return " | ".join(names)


@dataclass(frozen=True)
class TaskSettings:
    """What a node learns and from which data. Peers whose model, input shape, classes, protocol or
    codec differ are another task (``node.daemon.task_id``); the other fields are each node's own."""

    task: str = field(
        default="",
        metadata={
            "group": "Nodes train the same task only if model, input shape, classes, protocol and codec "
            "match.",
            "help": "your own task: package.module:function, called with (shard, shards), returning a "
            'shoal.Task (README, "Python API"); the settings below are then unused, but shard and shards',
            "flag": True,
            "metavar": "MODULE:FUNCTION",
        },
    )
    dataset: str = field(
        default="digits",
        metadata={
            "help": f"{_choices(BUILTIN)} | path to a .npz file",
            "flag": True,
        },
    )
    data: str = field(
        default="",
        metadata={
            "help": "this node's own data (.npz: arrays x, y, optional x_test, y_test)",
            "flag": True,
            "metavar": "FILE.npz",
        },
    )
    shard: int = field(
        default=0,
        metadata={"help": "without `data`: which part of `dataset` this node holds ...", "flag": True},
    )
    shards: int = field(default=1, metadata={"help": "... out of how many parts", "flag": True})
    partition: str = field(
        default="iid",
        metadata={"help": "how the parts are cut: iid | dirichlet:<alpha> | shards:<k>", "flag": True},
    )
    model: str = field(
        default="mlp", metadata={"help": f"{_choices(MODELS)} | <module>:<factory>", "flag": True}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the model's initialisation, the split and training"}
    )
    batch_size: int = field(default=32, metadata={"help": "samples per SGD step"})
    lr: float = field(default=0.05, metadata={"help": "learning rate", "flag": True})
    local_steps: int | None = field(
        default=20, metadata={"help": "SGD steps per round", "flag": True, "instead": "local_epochs"}
    )
    local_epochs: float | None = field(
        default=None,
        metadata={
            "help": "passes over this node's samples per round, instead of local_steps",
            "flag": True,
            "instead": "local_steps",
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard must be in 0..shards-1 (shards = {self.shards}), got {self.shard}")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError(
                f"set exactly one of local_steps and local_epochs, got {self.local_steps} and "
                f"{self.local_epochs}"
            )
        for name in ("batch_size", "local_steps"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in ("lr", "local_epochs"):
            if (value := getattr(self, name)) is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def builtin(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        test: Labelled,
        classes: int,
        *,
        seed: int,
        node: int,
    ) -> Task:
        """Node ``node``'s built-in task on its samples ``(x, y)``, evaluated on ``test``, training with
        its seed in a run seeded ``seed``: a daemon's are its own ``seed`` and ``shard``, a simulated
        node's the run's seed and its index (``simulations.config.SimConfig`` leaves those fields
        unset)."""
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
            seed=learner_seed(seed, node),
        )


@dataclass(frozen=True)
class ProtocolSettings:
    """How a node learns with its peers: the protocol, how it folds models in, and the protocols' and
    the codec's own configurations, nested (``[protocol.gossip]`` ...). Defaults are the daemon's;
    simulations override some."""

    protocol: str = field(default="gossip", metadata={"help": _choices(PROTOCOLS), "flag": True})
    integrator: str = field(
        default="clipped",
        metadata={
            "help": f"How received models are folded into ours: {_choices(INTEGRATORS)} (clipped: "
            "Byzantine-robust for every model, peers' models clipped to a radius set by our own training, "
            "then VCA; bristle: Byzantine-robust on non-IID data, needs model frozen-cnn or head)",
            "flag": True,
        },
    )
    gossip: GossipConfig = field(
        default_factory=GossipConfig,
        metadata={
            "help": "protocol gossip: each round a node trains, sends its model to a few peers and "
            "folds in theirs"
        },
    )
    modest: ModestConfig = field(
        default_factory=ModestConfig,
        metadata={
            "help": "protocol modest: each round a sample of trainers sends its models to a few aggregators"
        },
    )
    outer: OuterConfig = field(
        default_factory=OuterConfig,
        metadata={
            "help": "DiLoCo over gossip: after a round's local steps, an outer SGD step with Nesterov "
            "momentum along where the round began minus the integrated model"
        },
    )
    codec: CodecConfig = field(
        default_factory=CodecConfig,
        metadata={
            "help": "How models travel (part of the task: peers with another codec are another swarm; "
            "docs/protocols.md)"
        },
    )

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.integrator not in INTEGRATORS:
            raise ValueError(f"integrator: {self.integrator!r} is not one of {', '.join(INTEGRATORS)}")
        if self.protocol == "modest" and not self.outer.averaging:
            # a round's trainers are a new sample: none holds the last round's start and momentum
            raise ValueError("outer: MoDeST averages (outer lr 1, momentum 0); the outer step is gossip's")
        if self.outer.streaming and not (self.protocol == "gossip" and self.gossip.synchronous):
            raise ValueError("outer: fragments and overlap need gossip in synchronous rounds")
