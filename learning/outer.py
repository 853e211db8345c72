"""DiLoCo's outer step over a swarm: how a node moves from where its round began towards the average.

DiLoCo (Douillard et al., 2023) trains ``H`` inner steps on each worker (the task's ``train``: a round's
local steps with its own optimizer, AdamW in ``learning.language``), then treats *start − average of the
workers' models* as a gradient, the pseudo-gradient, for an outer optimizer: SGD with Nesterov momentum.
Over gossip there is no global average: the average is the node's integration of its own trained model
with its neighbours' (``learning.gossip``), so the pseudo-gradient is ``start − integrated``, and each
node keeps its own momentum. ``lr`` 1 with no momentum is plain averaging (what gossip does without
DiLoCo), and takes the integrated model as it is, bit for bit.

Streaming DiLoCo (Douillard et al., 2025) in synchronous gossip: ``fragments`` P > 1 cuts the model into P
parts of about equal size (:func:`partition`, tensors in order); round ``r`` exchanges and steps fragment
``r mod P`` only, so a node sends 1/P of the model at a time, and each fragment's outer step starts from
where that fragment's last one ended. ``overlap``: the round's exchange is integrated at the end of the
*next* round, so the neighbours' fragments travel while the node trains; the outer update then lands on
the fragment as trained since (:func:`applied_late`).

Hostile input reaches the outer step only through the integrator (clipped, by default), which bounds
how far any peer moves the integrated model; the momentum is the node's own and is checkpointed with
its model (``node.checkpoint``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from shoal.learning.protocol import State

MAX_FRAGMENTS = 64


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
    # Streaming DiLoCo, in synchronous gossip (simulations): the model's parts exchanged in turn, one a
    # round; overlap: each exchange integrated a round late
    fragments: int = 1
    overlap: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.fragments <= MAX_FRAGMENTS:
            raise ValueError(f"fragments must be in 1..{MAX_FRAGMENTS}, got {self.fragments!r}")
        if not (0 < self.lr <= 10 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be in (0, 10], got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")

    @property
    def averaging(self) -> bool:
        """Whether the outer step is the identity on the integrated model (no outer optimizer)."""
        return self.lr == 1 and self.momentum == 0

    @property
    def streaming(self) -> bool:
        """Whether rounds exchange fragments or integrate late (synchronous gossip only)."""
        return self.fragments > 1 or self.overlap


def partition(model: State, count: int) -> list[tuple[str, ...]]:
    """``model``'s tensor names in ``count`` fragments of consecutive tensors, each about 1/count of the
    values: cut where the running count of values comes closest to each k/count of them, every
    fragment keeping at least one tensor."""
    names = list(model)
    if not 1 <= count <= max(1, len(names)):
        raise ValueError(f"cannot cut {len(names)} tensors into {count} fragments")
    ends = [0, *itertools.accumulate(model[n].numel() for n in names)]
    cuts = [0]
    for k in range(1, count):
        target = k * ends[-1] / count
        cuts.append(min(range(cuts[-1] + 1, len(names) - count + k + 1), key=lambda i: abs(ends[i] - target)))
    cuts.append(len(names))
    return [tuple(names[a:b]) for a, b in itertools.pairwise(cuts)]


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
        self.momentum = {**self.momentum, **momentum}  # a fragment's step keeps the others' momentum
        return new


def applied_late(stepped: State, trained: State, sent: State) -> State:
    """Overlap's merge: the outer step's result plus what each part trained since it was ``sent``, i.e.
    the outer update applied a round late. Streaming DiLoCo mixes ``α · trained + (1 − α) · stepped``
    instead; at 16 nodes that ended worse (docs/measurements.md, "Streaming DiLoCo")."""
    return {k: v + (trained[k] - sent[k]) if v.is_floating_point() else v for k, v in stepped.items()}
