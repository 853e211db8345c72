"""DiLoCo's outer step over a swarm: how a node moves from where its round began towards the average.

DiLoCo (Douillard et al., 2023) trains ``H`` inner steps on each worker (the task's ``train``: a round's
local steps with its own optimizer, AdamW in ``learning.language``), then treats *start − average of the
workers' models* as a gradient, the pseudo-gradient, for an outer optimizer: SGD with Nesterov momentum.
Over gossip there is no global average: the average is the node's integration of its own trained model
with its neighbours' (``learning.gossip``), so the pseudo-gradient is ``start − integrated``, and each
node keeps its own momentum. ``lr`` 1 with no momentum is plain averaging (what gossip does without
DiLoCo), and takes the integrated model as it is, bit for bit.

Hostile input reaches the outer step only through the integrator (clipped, by default), which bounds
how far any peer moves the integrated model; the momentum is the node's own and is checkpointed with
its model (``node.checkpoint``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shoal.learning.protocol import State


@dataclass(frozen=True)
class OuterConfig:
    """Also the daemon's ``[protocol.outer]`` settings (``learning.settings``)."""

    lr: float = field(
        default=1.0,
        metadata={
            "help": "gossip: the outer learning rate, DiLoCo's step along start - averaged model "
            "(1 with momentum 0: take the average as it is)",
            "flag": True,
        },
    )
    momentum: float = field(
        default=0.0,
        metadata={
            "help": "gossip: the outer step's Nesterov momentum (DiLoCo: lr 0.7, momentum 0.9)",
            "flag": True,
        },
    )

    def __post_init__(self) -> None:
        if not (0 < self.lr <= 10 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be in (0, 10], got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    @property
    def averaging(self) -> bool:
        """Whether the outer step is the identity on the integrated model (no outer optimizer)."""
        return self.lr == 1 and self.momentum == 0


class Outer:
    """A node's outer optimizer; ``momentum``: its buffer as checkpointed (none: zeros at the first step)."""

    def __init__(self, config: OuterConfig, momentum: State | None = None) -> None:
        """``momentum`` is kept only if there is momentum to keep: a checkpoint's from an earlier DiLoCo
        run must not come back when it is turned on again."""
        self.config = config
        kept = momentum if config.momentum else None
        self.momentum: State = dict(kept or {})  # replaced whole, never changed in place (checkpoints)

    def step(self, start: State, averaged: State) -> State:
        """The node's next model: ``start − lr · Nesterov(start − averaged)``; ``averaged`` itself when the
        step is plain averaging. Tensors that are not floating point (counters) are taken as averaged."""
        c = self.config
        if c.averaging:
            return averaged
        new: State = {}
        momentum: State = {}
        for name, a in averaged.items():
            if not a.is_floating_point():
                new[name] = a
                continue
            g = start[name] - a
            if c.momentum:
                m = self.momentum.get(name)
                m = momentum[name] = g.clone() if m is None else m * c.momentum + g
                g = g + c.momentum * m
            new[name] = start[name] - c.lr * g
        self.momentum = momentum
        return new
