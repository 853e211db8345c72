"""Integrators: how a node folds the models it received into its own.

One interface for every protocol (gossip, MoDeST) and every rule (mean, weighted, VCA; the robust
default ``learning.clipping``, Bristle and the robust baselines plug in the same way):
``integrate(own, received) -> new model``. Protocols call it through :func:`integrate_contained`, so a
contribution that cannot be integrated costs only itself. The rules here need nothing but the models;
``clipping`` needs its node's anchor and Bristle its node's data, so their nodes build them
(``learning.node.build_integrator``, ``learning.bristle.bristle_node``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shoal.learning.averaging import check_models, mean, variance_corrected, weighted_mean
from shoal.learning.protocol import Credited, Rejected, State
from shoal.learning.robust import Krum, Median, TrimmedMean


@dataclass(frozen=True)
class Contribution:
    """A model and what it was trained on: the unit integrators work with."""

    state: State
    samples: int
    peer: str = ""
    labels: tuple[int, ...] | None = None  # the classes the sender holds, when it says


class Integrator(Protocol):
    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State: ...


@runtime_checkable
class Judging(Protocol):
    """An integrator that says, after each integration, how much of each peer's model it took: 1.0 as
    sent, 0.0 nothing (``learning.clipping``). Protocols pass the verdicts on as :class:`Credited`."""

    verdicts: Mapping[str, float]


class Mean:
    """Uniform average of the own and received models."""

    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State:
        return mean([own.state, *(c.state for c in received)])


class Weighted:
    """Average weighted by training-sample counts (uniform when nobody holds data)."""

    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State:
        everyone = [own, *received]
        weights = [max(0, c.samples) for c in everyone]
        if sum(weights) == 0:
            weights = [1] * len(everyone)
        return weighted_mean([c.state for c in everyone], weights)


class VCA:
    """Uniform average, each layer rescaled to the inputs' mean variance (learning/averaging.py)."""

    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State:
        return variance_corrected([own.state, *(c.state for c in received)])


def integrate_contained(
    integrator: Integrator, own: Contribution, received: Sequence[Contribution], me: str = ""
) -> tuple[State, list[Rejected | Credited]]:
    """``integrator.integrate(own, received)``, with any contribution it refuses dropped and reported,
    and a judging integrator's verdicts on peers other than ``me`` as :class:`Credited`.

    Received models are checked on receipt (``learning.messages.model_fault``), so this is the second
    line: when the integration raises (AveragingError or another ValueError), each contribution is
    integrated with ``own`` alone, those that fail are dropped with a :class:`Rejected` naming the peer,
    and the rest are integrated. ``own`` is trusted: if it is itself unusable, that is our bug and it
    raises; so does an integration of contributions that each passed alone, for the same reason.
    """
    if not received:
        return own.state, []
    try:
        return integrator.integrate(own, received), _credits(integrator, me)
    except ValueError:
        check_models([own.state])
    kept, rejected = [], []
    for c in received:
        try:
            integrator.integrate(own, [c])
        except ValueError as exc:
            rejected.append(Rejected(c.peer, f"model could not be integrated: {exc}"))
        else:
            kept.append(c)
    if not kept:
        return own.state, rejected
    return integrator.integrate(own, kept), [*rejected, *_credits(integrator, me)]


def _credits(integrator: Integrator, me: str) -> list[Credited]:
    if not isinstance(integrator, Judging):
        return []
    return [Credited(peer, value) for peer, value in integrator.verdicts.items() if peer != me]


# The rules built from their name alone.
INTEGRATORS: dict[str, type[Integrator]] = {
    "mean": Mean,
    "weighted": Weighted,
    "vca": VCA,
    "median": Median,
    "trimmed": TrimmedMean,
    "krum": Krum,
}


def make_integrator(name: str) -> Integrator:
    try:
        return INTEGRATORS[name]()
    except KeyError:
        raise ValueError(f"unknown integrator {name!r}: use one of {', '.join(INTEGRATORS)}") from None
