"""Byzantine behaviours for simulations: what a malicious node sends instead of its honest model.

An attacker runs the honest protocol (it trains, it receives) behind :class:`Forging`, which swaps
the tensors of every model it sends for forged ones. Data poisoning (label flipping) needs no wrapper:
the attacker trains honestly on flipped labels.

- ``label-flip``: y -> (y + 1) mod classes (Bristle's "label-flip-all");
- ``noise``: Gaussian noise with the spread of the honest model (Gaussian attack);
- ``sign-flip``: the own model negated and scaled by 4 (sign-flipping / scaled update);
- ``stale``: the model the attacker first sent, again and again (an identity that joined, fetched or
  built a model once and never trains: what a crowd of sybils costs nothing to send);
- ``alie``: "A little is enough" (Baruch et al., NeurIPS 2019): per coordinate, the mean of the models
  the attacker received (honest and forged alike: it cannot tell) minus z standard deviations, small
  enough to pass robust statistics.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Callable

import torch

from shoal.learning.averaging import incompatibility
from shoal.learning.messages import MODELS
from shoal.learning.protocol import Action, Event, LearningProtocol, MessageIn, Send, State

Forge = Callable[[State, list[State]], State]
ATTACKS = ("label-flip", "noise", "sign-flip", "alie", "stale")
SIGN_FLIP_SCALE = 4.0
ALIE_Z = 1.0
MEMORY = 20  # models an attacker remembers


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return (y + 1) % num_classes


def forge(attack: str, rng: random.Random) -> Forge | None:
    """The forging function of a model-poisoning attack (None for data poisoning)."""
    if attack == "label-flip":
        return None
    if attack == "noise":
        gen = torch.Generator().manual_seed(rng.randrange(2**31))

        def noise(own: State, seen: list[State]) -> State:
            return {k: torch.randn(v.shape, generator=gen).to(v.dtype) * v.std() for k, v in own.items()}

        return noise
    if attack == "sign-flip":
        return lambda own, seen: {k: -SIGN_FLIP_SCALE * v for k, v in own.items()}
    if attack == "stale":
        first: list[State] = []

        def stale(own: State, seen: list[State]) -> State:
            if not first:
                first.append(own)
            return first[0]

        return stale
    if attack == "alie":

        def alie(own: State, seen: list[State]) -> State:
            if len(seen) < 2:
                return own
            return {
                k: (
                    torch.stack([s[k] for s in seen]).mean(0)
                    - ALIE_Z * torch.stack([s[k] for s in seen]).std(0)
                )
                for k in own
            }

        return alie
    raise ValueError(f"unknown attack {attack!r}: use one of {', '.join(ATTACKS)}")


class Forging:
    """Wraps an honest protocol (gossip or MoDeST); every model it sends is replaced by
    ``forge(own, recently seen)``."""

    def __init__(self, inner: LearningProtocol, forge: Forge):
        self.inner = inner
        self.forge = forge
        self.seen: deque[State] = deque(maxlen=MEMORY)
        self.forged = 0  # models sent forged

    @property
    def model(self) -> State:
        return self.inner.model

    @property
    def round(self) -> int:
        return self.inner.round

    def handle(self, event: Event, now: float) -> list[Action]:
        if (
            isinstance(event, MessageIn)
            and isinstance(event.message, MODELS)
            and not incompatibility(self.model, event.message.state)
        ):
            self.seen.append(dict(event.message.state))
        actions = self.inner.handle(event, now)
        out = [self._forged(a) for a in actions]
        self.forged += sum(1 for a, b in zip(actions, out) if a is not b)
        return out

    def _forged(self, action: Action) -> Action:
        if not (isinstance(action, Send) and isinstance(action.message, MODELS)):
            return action
        forged = self.forge(dict(action.message.state), list(self.seen))
        return Send(action.peer, dataclasses.replace(action.message, state=forged))
