"""What a node knows of its own learning that no peer can move: the anchor of its defences.

Every bound a node puts on peers' models must rest on something the peers do not control; a bound
relative to the node's current model is not one, since the models it accepts move it (measured: a
norm bound of 10x our own model let a sign-flipping attacker walk honest weights from an L2 norm of
2.9e3 to 1.8e20 in three seconds). An :class:`Anchor` keeps two such things, both from the node's own
training on its own data:

- **step**: how far one round of the node's own training moves its model (L2, the median of the last
  ``window`` rounds). Honest peers of one task disagree by a few such steps, whatever they send; robust
  integration (``learning.clipping``) clips peers' models to a multiple of it, and a model that would
  replace ours must lie within REACH steps of it per round it claims to be ahead.
- **probe score**: the error and cross-entropy of a model on a fixed probe of the node's own training
  samples. The anchor keeps the scores of the models the node started its last ``window`` rounds of
  training from (its *start points*: the integration of its peers' models and its own, or the
  aggregate MoDeST sampled it with). A model whose error, or loss, exceeds their median by more than
  half of the way to chance is *far worse*: it does not replace ours (a gossip fetch reply, a MoDeST
  aggregate: :meth:`admits`), nor does one far worse than our latest start point (early in training
  the median is near chance itself: MoDeST trainers took aggregates of the initial model from 20% of
  stale attackers and ended at 0.48; now 0.95, clean runs unchanged; our own trained model is no fair
  bar, see below: against it clean MoDeST needed 46% more rounds); a start point far worse in error
  is not trained from: the node rolls back to its *known-good* model, the latest start point that
  was kept (:meth:`recover`). The node's way back, at the cost of one model kept.

Chance is a guess among the model's outputs (error 1 - 1/their number, loss ln of it): noise of an
honest model's scale sits there, sign-flipped models above (confidently wrong: a loss far above
chance, which the error alone does not show early in training, when every model errs about as much
as chance), while models of the swarm a node should take (even on non-IID data, trained on other
classes too) are between. Our own start points are judged by error alone: a linear head trained at a
high rate grows confident, so its loss rose as its accuracy rose (Bristle's task: by loss, every
honest round was rolled back). Start points, not
trained models, set the bar: a model just trained on these samples scores far better on them than any
peer's model can, so comparing with it would refuse honest peers. The probe is training data, not
held out: it tells a poisoned or diverged model from a sane one, which needs no unseen data, and
holding data out would cost every honest node training samples.

Thread safety: the learner calls :meth:`recover` and :meth:`stepped` from a worker thread while
protocols and integrators call the rest on the event loop's thread; one lock serialises them (and the
probe's module, which they share).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from collections import deque
from collections.abc import Mapping
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from shoal.learning.models import ParameterLayout
from shoal.learning.protocol import State

log = logging.getLogger("shoal.learner")

WINDOW = 20  # rounds of own training the step and the start points' median score are taken over
PROBE_SAMPLES = 128
# Far worse: over typical + HALFWAY x (chance - typical), and at least a margin over it, typical being
# the median of our recent start points' (honest start points early in training differ by 10 points
# of error and more; their best once made honest integrations look far worse): in error by MARGIN, in
# loss by LOSS_MARGIN. A trained digits MLP errs ~0.03 (chance 0.9) at a loss of ~0.1 (chance 2.3).
HALFWAY, MARGIN, LOSS_MARGIN = 0.5, 0.2, 0.5
# Models further than REACH of our training steps from ours are far (``learning.clipping``), and a model
# said to be k rounds ahead of ours is far beyond REACH x k steps: honest peers of a task disagree by a
# few steps (measured: 1-1.5 in a 20-node IID swarm), and models move less than a step a round apart.
REACH = 8.0
# A far model is clearly better on our data when its probe error is below BETTER times our typical.
BETTER = 0.9
# Before any training of its own a node has no step: a model is near when it lies within NEAR of our
# model's own norm (a model of random noise of the same scale lies about 1.4 times it away).
NEAR = 0.5
# A model said to be k rounds ahead may lie REACH x min(k, AHEAD) steps away: further ones must be
# clearly better on our data (a peer chooses the k it claims).
AHEAD = 4


class Score(NamedTuple):
    """How a model does on the probe: the share it gets wrong, and its mean cross-entropy."""

    error: float
    loss: float


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """L2 distance between two models over their floating-point tensors."""
    total = 0.0
    for name, t in a.items():
        if t.is_floating_point():
            total += float(torch.sum((t.double() - b[name].double()) ** 2))
    return math.sqrt(total)


def norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a model over its floating-point tensors."""
    return math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in state.values() if t.is_floating_point()))


class Probe(Protocol):
    """Scores a model (loaded into a module) on a fixed sample of the node's own data."""

    def __call__(self, module: nn.Module) -> Score:
        """The module's error and loss; infinite when its outputs are not finite."""
        ...

    @property
    def chance(self) -> Score:
        """The score of a model that knows nothing (a guess among its outputs), once one was scored."""
        ...


class ClassificationProbe:
    """Error and cross-entropy of a classifier on ``samples`` of the node's ``(x, y)`` drawn with
    ``seed``; chance is a guess among the model's outputs. A sequence model (outputs (N, T, classes),
    labels (N, T), e.g. next-token prediction) is scored over every position."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, samples: int = PROBE_SAMPLES, seed: int = 0):
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:samples]
        self.x, self.y = x[pick], y[pick]
        self.chance = Score(1.0, math.inf)

    def __call__(self, module: nn.Module) -> Score:
        if not len(self.y):  # a node without data cannot tell models apart: it judges none worse
            return Score(0.0, 0.0)
        device = next(module.parameters()).device
        outputs = module(self.x.to(device)).cpu()
        self.chance = Score(1.0 - 1.0 / outputs.shape[-1], math.log(outputs.shape[-1]))
        if not torch.isfinite(outputs).all():
            return Score(math.inf, math.inf)
        outputs, y = outputs.reshape(-1, outputs.shape[-1]), self.y.reshape(-1)  # a sequence: each position
        error = float((outputs.argmax(-1) != y).double().mean())
        return Score(error, F.cross_entropy(outputs, y).item())


class Anchor:
    def __init__(self, module: nn.Module, probe: Probe | None, *, window: int = WINDOW) -> None:
        """``module`` is evaluated with peers' parameters loaded into it: give the anchor its own (a
        simulation, which runs one node at a time on one thread, may share one among its nodes).
        Without a ``probe`` every model scores the same: models are judged by distance only."""
        if window < 1:
            raise ValueError("window must be at least 1")
        self.module = module
        self.layout = ParameterLayout.of(module)
        self.probe = probe
        self._steps: deque[float] = deque(maxlen=window)
        self._scores: deque[Score] = deque(maxlen=window)  # of our start points
        self._good: State | None = None
        self._lock = threading.Lock()

    @property
    def _chance(self) -> Score:
        return self.probe.chance if self.probe is not None else Score(1.0, math.inf)

    # --- what the node's own training says ------------------------------------------------------

    def step(self) -> float | None:
        """The median distance one round of our own training moved our model; None before any."""
        with self._lock:
            return statistics.median(self._steps) if self._steps else None

    def known_good(self) -> State | None:
        """The latest start point that was not far worse than the others; None before any."""
        with self._lock:
            return self._good

    def start(self, initial: State) -> None:
        """Take the node's initial model (or its checkpoint's) as its first known-good one, so that
        even before training a node refuses to replace it with something far worse."""
        self._keep(self.score(initial), initial)

    def recover(self, state: State, round: int, score: Score | None = None) -> State:
        """What round ``round``'s training starts from: ``state``, recorded as a start point, or our
        known-good model if ``state`` is far worse than our recent start points (then it is not
        trained on, nor sent, any further). ``score``: ``state``'s, when the caller computed it
        (``learning.batched`` scores many nodes' models at once)."""
        score = self.score(state) if score is None else score
        if self._keep(score, state):
            return state
        log.warning(
            "round %d: the model is far worse on our own data than our recent ones (probe error %.2f, "
            "loss %.3g): rolled back to our known-good model",
            round,
            *score,
        )
        good = self.known_good()
        assert good is not None  # _keep takes anything before it knows a score
        return good

    def stepped(self, step: float) -> None:
        """Record how far (L2) one round of our own training moved our model (called by the learner)."""
        with self._lock:
            self._steps.append(step)

    def _keep(self, score: Score, state: State) -> bool:
        """Record a start point; whether it was kept (then it is the known-good one): not if it errs
        far more than the others. By error alone: a confident honest model's loss rises as it learns."""
        with self._lock:
            if self._far_worse(score, by_loss=False):
                return False
            self._good = state
            self._scores.append(score)
            return True

    # --- judging models -------------------------------------------------------------------------

    def score(self, state: State) -> Score:
        """How ``state`` does on the probe (0 without one: every model alike)."""
        if self.probe is None:
            return Score(0.0, 0.0)
        with self._lock, torch.no_grad():
            self.layout.load(self.module, state)
            was_training = self.module.training
            self.module.eval()
            try:
                return Score(*(float(v) for v in self.probe(self.module)))
            except Exception:  # the user's probe: its bug must not end the node nor blame a peer
                log.warning("the probe raised (model judged by distance only):", exc_info=True)
                return Score(0.0, 0.0)
            finally:
                self.module.train(was_training)

    def _far_worse(self, score: Score, *, by_loss: bool = True, than: Score | None = None) -> bool:
        """Whether ``score`` is far worse than ``than``, by default our start points' median (above)."""
        if not self._scores:
            return not math.isfinite(score.error)
        typical = self._typical() if than is None else than

        def beyond(value: float, mid: float, chance: float, margin: float) -> bool:
            return not value <= mid + max(HALFWAY * (chance - mid), margin)  # NaN included

        if beyond(score.error, typical.error, self._chance.error, MARGIN):
            return True
        return by_loss and beyond(score.loss, typical.loss, self._chance.loss, LOSS_MARGIN)

    def _typical(self) -> Score:
        return Score(*(statistics.median(s[i] for s in self._scores) for i in range(2)))

    def reach(self, own: State) -> float:
        """How far from ``own`` a model is near: REACH of our steps, or, before we trained, NEAR of
        ``own``'s norm (a node without data, whose steps are 0, too)."""
        step = self.step()
        return REACH * step if step else NEAR * norm(own)

    def admits(self, state: State, own: State, rounds: int = 1) -> bool:
        """Whether ``state``, said to be ``rounds`` rounds ahead of our model ``own``, may replace it:
        not far worse on our own data than our recent start points (their median, or the latest), and
        either near ``own`` (our reach per round it is ahead, up to AHEAD rounds) or clearly better on
        our data than our start points (a node that fell behind takes the swarm's model). Early in
        training both are needed: a model of random noise of an honest model's scale is no worse than
        ours on our data yet, but far from it and no better."""
        score = self.score(state)
        with self._lock:
            if not self._scores:
                if self._far_worse(score):
                    return False
                typical = math.inf
            else:
                median = self._typical()
                if self._far_worse(score, than=median) or self._far_worse(score, than=self._scores[-1]):
                    return False
                typical = median.error
        ahead = min(max(1, rounds), AHEAD) if self.step() else 1  # NEAR of a norm is a whole model's scale
        if distance(state, own) <= self.reach(own) * ahead:
            return True
        return score.error < BETTER * typical
