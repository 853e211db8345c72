"""Bristle: Byzantine-robust integration of peers' output layers on non-IID data.

Verbraeken, de Vos and Pouwelse, "Bristle: Decentralized Federated Learning in Byzantine, Non-i.i.d.
Environments" (arXiv 2110.11006); the steps and constants follow the authors' code. Nodes share only a
bias-free output layer W (one row per class, on top of a frozen feature extractor:
``learning.models.FrozenFeaturesHead``).

1. :func:`prioritize`: keep the ``nearest`` received layers closest (L2) to our own, plus ``explore``
   others at random.
2. Score each candidate per *familiar* class (a class of our small local test set) by its F1 there
   against our own F1: Δ = 10·|f_s − f_p|, s = Δ^(3+f_s) if the peer is better, else −Δ^(4+f_s).
3. Certainty cert_p = max(0, mean f_p − std f_p); per-class weight ω_p(c) = max(0, 10·σ(max(−100, s)/100)
   − 4)·cert_p; per-peer weight Ω_p from the sum of the unbounded scores, for the foreign classes.
4. Each familiar row is averaged with our own row (weight 1) by ω, each foreign row by Ω.
5. Re-centre: we subtract from every class row the mean row over the classes, which leaves the softmax
   (and so the predictions) unchanged while keeping the layer from drifting. The spec's wording
   ("centre every column by its mean") could also mean each class vector's own mean; that variant
   shifts each class's logit by a different amount, so we did not take it.

Our addition: before anything else, candidates whose layer is more than ``max_norm_ratio`` times
larger (L2) than ours are dropped. F1 cannot see scale, so a scaled-up copy of a good layer passes the
per-class tests and then dominates the weighted average; in our sign-flip runs the attackers' layers
grew to ~200x ours and, the few times one got through, undid the honest nodes' progress.

Departure, stated: Bristle learns how many classes a peer shares with it (k_p) by private set
intersection; here peers announce their label set with their model (``Contribution.labels``), which is
simpler and less private. A peer that announces nothing is judged on all our familiar classes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shoal.learning.averaging import check_models
from shoal.learning.integrators import Contribution
from shoal.learning.models import ParameterLayout
from shoal.learning.pretrain import extract
from shoal.learning.protocol import State

Scorer = Callable[[State], np.ndarray]  # a model -> F1 per class on the node's local test set
LOCAL_TEST_PER_CLASS = 10  # samples per class a node keeps back to score its peers' layers on


@dataclass(frozen=True)
class BristleConfig:
    nearest: int = 20
    explore: int = 5
    head: str = "head.weight"  # the shared (classes x features) layer
    max_norm_ratio: float = 3.0  # our addition: drop candidates this many times larger than our own layer


def prioritize(
    own: State, received: Sequence[Contribution], nearest: int, explore: int, rng: random.Random
) -> list[Contribution]:
    """The ``nearest`` models closest to ``own`` in L2 distance, then ``explore`` of the rest at random."""
    flat_own = torch.cat([t.reshape(-1).double() for t in own.values()])
    distance = [
        (torch.cat([t.reshape(-1).double() for t in c.state.values()]) - flat_own).norm().item()
        for c in received
    ]
    ranked = [received[i] for i in np.argsort(distance, kind="stable")]
    rest = ranked[nearest:]
    return ranked[:nearest] + rng.sample(rest, min(explore, len(rest)))


def f1_per_class(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """F1 of each class (0 where a class is never right), from one confusion matrix."""
    pred = logits.argmax(dim=1)
    confusion = torch.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    tp = confusion.diagonal().double()
    denominator = confusion.sum(0) + confusion.sum(1)  # 2tp + fp + fn
    return torch.where(tp > 0, 2 * tp / denominator.clamp(min=1), 0.0).numpy()


def linear_scorer(features: torch.Tensor, y: torch.Tensor, num_classes: int) -> Scorer:
    """F1 per class of a bias-free linear head on precomputed features of the local test set."""
    return lambda state: f1_per_class(features @ state["head.weight"].T.to(features.dtype), y, num_classes)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= -700 else 0.0


class Bristle:
    def __init__(
        self, scorer: Scorer, familiar: Sequence[int], rng: random.Random, config: BristleConfig | None = None
    ):
        if not familiar:
            raise ValueError("Bristle needs at least one familiar class (a local test set)")
        self.scorer = scorer
        self.familiar = sorted(set(familiar))
        self.rng = rng
        self.config = config or BristleConfig()

    def weights(
        self, f_own: np.ndarray, f_peer: np.ndarray, overlap: int | None = None
    ) -> tuple[np.ndarray, float]:
        """Per-familiar-class weights ω and the per-peer weight Ω of one candidate.

        With ``overlap`` k (how many of our classes the peer holds) the peer is judged on the k familiar
        classes where it does best, and gets no per-class weight on the others.
        """
        fs, fp = f_own[self.familiar], f_peer[self.familiar]
        k = len(self.familiar) if overlap is None else overlap
        selected = np.zeros(len(self.familiar), dtype=bool)
        selected[np.argsort(-fp, kind="stable")[:k]] = True
        delta = 10 * np.abs(fs - fp)
        score = np.where(fp > fs, delta ** (3 + fs), -(delta ** (4 + fs)))
        certainty = max(0.0, float(fp[selected].mean() - fp[selected].std()))
        omega = np.array([max(0.0, 10 * _sigmoid(max(-100.0, s) / 100) - 4) for s in score]) * certainty
        big_omega = max(0.0, 10 * _sigmoid(float(score[selected].sum()) / 100) - 4) * certainty
        return np.where(selected, omega, 0.0), big_omega

    def integrate(self, own: Contribution, received: Sequence[Contribution]) -> State:
        check_models([own.state, *(c.state for c in received)])
        head = self.config.head
        theta = own.state[head].double()
        bound = self.config.max_norm_ratio * max(theta.norm().item(), 1e-12)
        plausible = [c for c in received if c.state[head].double().norm().item() <= bound]
        candidates = prioritize(own.state, plausible, self.config.nearest, self.config.explore, self.rng)
        f_own = self.scorer(own.state)
        numerator, denominator = theta.clone(), torch.ones(theta.shape[0], dtype=torch.float64)
        for c in candidates:
            overlap = None if c.labels is None else len(set(c.labels) & set(self.familiar))
            if overlap == 0:
                continue  # Bristle only listens to peers that share at least one class with us
            omega, big_omega = self.weights(f_own, self.scorer(c.state), overlap)
            w = torch.full((theta.shape[0],), big_omega, dtype=torch.float64)
            w[self.familiar] = torch.as_tensor(omega)
            numerator += w[:, None] * c.state[head].double()
            denominator += w
        merged = numerator / denominator[:, None]
        merged -= merged.mean(dim=0, keepdim=True)  # re-centre across classes: predictions unchanged
        return {**own.state, head: merged.to(own.state[head].dtype)}


def hold_out(
    x: torch.Tensor, y: torch.Tensor, per_class: int = LOCAL_TEST_PER_CLASS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: up to ``per_class`` samples of each class set aside as the
    small local test set Bristle scores peers on. A node that would keep nothing trains on all of it."""
    held = torch.zeros(len(y), dtype=torch.bool)
    for c in y.unique():
        held[torch.nonzero(y == c).flatten()[:per_class]] = True
    if not (~held).any():
        return x, y, x[held], y[held]
    return x[~held], y[~held], x[held], y[held]


@dataclass(frozen=True)
class BristleNode:
    """What a node running Bristle is made of: its integrator, the data it trains on (its local test set
    taken out), the head rows its training may change (``Learner(only_rows=...)``), and the label set it
    announces with its models."""

    integrator: Bristle
    x_train: torch.Tensor
    y_train: torch.Tensor
    only_rows: tuple[str, list[int]]
    labels: list[int]


def bristle_node(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rng: random.Random,
    config: BristleConfig | None = None,
) -> BristleNode:
    """Bristle for a node whose model is a frozen extractor + bias-free head (``FrozenFeaturesHead``) and
    whose shard is ``x, y``: peers are scored on the extractor's features of the local test set
    (computed once). The daemon and the simulations build their learners from what this returns."""
    config = config or BristleConfig()
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if features is None or head is None or ParameterLayout.of(model).names != (config.head,):
        raise ValueError(
            f"Bristle shares only a bias-free output layer {config.head!r}: use the frozen-cnn or head model"
        )
    x_train, y_train, x_test, y_test = hold_out(x, y)
    scorer = linear_scorer(extract(features, x_test), y_test, head.out_features)
    labels = y_train.unique().tolist()
    integrator = Bristle(scorer, y_test.unique().tolist(), rng, config)
    return BristleNode(integrator, x_train, y_train, (config.head, labels), labels)
