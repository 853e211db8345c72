"""Many nodes' rounds of the built-in training as one computation: the simulator's way to 10,000 nodes.

A simulated node's round of :class:`~learning.task.SupervisedTraining` is a few SGD steps of a small
model on a few samples: thousands of tiny tensor operations, each dominated by Python and dispatch
overhead. Nodes that train in one module (the simulator's built-in task shares one among all nodes)
with the same hyperparameters train together here: their parameters stacked, each step's gradients of
every node from one ``torch.func.vmap`` over ``functional_call``, each node on its own mini-batches
(the indices :func:`~learning.training.batches` draws from its seed, as the per-node path does; short
batches padded and masked out of the loss). The probe scores a round's start point gets from the
node's anchor and the step its training made are computed for all at once too; what the node does with
them (roll back, refuse non-finite weights, record the step) is the learner's, per node. The arithmetic
is the per-node path's, so results agree with it to floating-point rounding (tested).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from shoal.learning.anchor import ClassificationProbe, Score
from shoal.learning.learner import Learner
from shoal.learning.protocol import State
from shoal.learning.task import SupervisedTraining
from shoal.learning.training import batches, pick_device, sgd_step, step_count


@dataclass(frozen=True)
class Job:
    """One node's round: its learner, the model it was asked to train from, the round, and the
    learner's :func:`batch_key` (which its caller computed once)."""

    learner: Learner
    state: State
    round: int
    key: Hashable


def batch_key(learner: Learner) -> Hashable | None:
    """What the learners that can train together share (None: this one trains alone): the built-in
    training's hyperparameters and one module without buffers (batch norm's running statistics are
    per node and updated in place)."""
    t = learner.task.train
    if not isinstance(t, SupervisedTraining) or any(True for _ in learner.model.buffers()):
        return None
    return id(learner.model), t.batch_size, t.lr, t.steps, t.epochs, t.momentum, t.weight_decay


def samples(learner: Learner) -> int:
    """How many samples a round of ``learner``'s built-in training goes through (what the per-node
    path's ``train`` reports, and a simulation charges in virtual time)."""
    t = _training(learner)
    return _steps(t) * min(t.batch_size, len(t.y))


def train_together(jobs: Sequence[Job]) -> list[State]:
    """What ``job.learner.train(job.state, job.round)`` returns for each job; the jobs of one
    :func:`batch_key` (and one number of steps) are trained at once."""
    results: dict[int, State] = {}
    groups: dict[Hashable, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.key is None:
            raise ValueError("train_together: a job's learner cannot be batched (see batch_key)")
        groups.setdefault((job.key, _steps(_training(job.learner))), []).append(i)
    for (_, steps), members in groups.items():
        group = [jobs[i] for i in members]
        scores = _scores(group)
        starts = [job.learner.start(job.state, job.round, score) for job, score in zip(group, scores)]
        trained, moved = _sgd(group, starts, steps) if steps else (starts, [0.0] * len(group))
        for i, job, start, new, step in zip(members, group, starts, trained, moved):
            results[i] = job.learner.trained(start, new, job.round, step)
    return [results[i] for i in range(len(jobs))]


def _training(learner: Learner) -> SupervisedTraining:
    training = learner.task.train
    if not isinstance(training, SupervisedTraining):
        raise ValueError("only the built-in training (shoal.classification) trains in batches")
    return training


def _steps(t: SupervisedTraining) -> int:
    """The mini-batches of one round (0 without samples: the per-node path does not train then)."""
    return step_count(len(t.y), t.batch_size, t.steps, t.epochs) if len(t.y) else 0


def _scores(jobs: Sequence[Job]) -> list[Score | None]:
    """Each job's model's score on its anchor's probe (``Anchor.score``), computed at once for the
    anchors that probe with the built-in probe in the jobs' module; None for the others (their
    anchor scores them itself)."""
    module, names = jobs[0].learner.model, jobs[0].learner.layout.names
    scored = [
        k
        for k, job in enumerate(jobs)
        if (a := job.learner.anchor) is not None
        and a.module is module
        and type(a.probe) is ClassificationProbe
        and len(a.probe.y)
    ]
    out: list[Score | None] = [None] * len(jobs)
    if not scored:
        return out
    probes = [jobs[k].learner.anchor.probe for k in scored]  # type: ignore[union-attr]
    x, y, mask = _padded([(p.x, p.y, torch.arange(len(p.y))) for p in probes], max(len(p.y) for p in probes))
    device = next(module.parameters()).device
    params = tuple(torch.stack([jobs[k].state[n] for k in scored]).to(device) for n in names)
    module.eval()
    try:
        with torch.no_grad():
            logits = vmap(lambda p, x: functional_call(module, dict(zip(names, p)), (x,)))(
                params, x.to(device)
            )
    finally:
        module.train()
    logits, real = logits.cpu(), mask.bool()
    classes = logits.shape[-1]
    chance = Score(1.0 - 1.0 / classes, math.log(classes))
    losses = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none").view(y.shape)
    counts = mask.sum(1)
    errors = ((logits.argmax(-1) != y) & real).sum(1).double() / counts
    loss = torch.where(real, losses, 0.0).sum(1) / counts
    broken = ((~torch.isfinite(logits)).any(-1) & real).any(1)
    for k, p, e, lo, bad in zip(scored, probes, errors.tolist(), loss.tolist(), broken.tolist()):
        p.chance = chance
        out[k] = Score(math.inf, math.inf) if bad else Score(e, lo)
    return out


def _sgd(jobs: Sequence[Job], starts: Sequence[State], steps: int) -> tuple[list[State], list[float]]:
    """``steps`` SGD steps of every job's model from its start, each on its own mini-batches; the
    models, and how far (L2) each moved (``anchor.distance``'s arithmetic, per node)."""
    learner = jobs[0].learner
    module, names, dtypes = learner.model, learner.layout.names, learner.layout.dtypes
    trainings = [_training(job.learner) for job in jobs]
    first = trainings[0]
    device = pick_device()
    module.to(device).train()
    before = [torch.stack([s[n] for s in starts]).to(device) for n in names]
    params = [p.clone() for p in before]
    velocity: list[torch.Tensor | None] = [None] * len(names)
    orders = [
        list(batches(len(t.y), t.batch_size, steps, t.seed_of(j.round))) for t, j in zip(trainings, jobs)
    ]

    def loss(
        p: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(module, dict(zip(names, p)), (x,))
        return (F.cross_entropy(out, y, reduction="none") * mask).sum() / mask.sum()

    gradients = vmap(grad(loss))
    for step in range(steps):
        x, y, mask = _padded(
            [(t.x, t.y, order[step]) for t, order in zip(trainings, orders)], first.batch_size
        )
        grads = gradients(tuple(params), x.to(device), y.to(device), mask.to(device))
        sgd_step(params, grads, velocity, first.lr, first.momentum, first.weight_decay)
    squares = sum(
        torch.linalg.vector_norm((p - b).flatten(1), dim=1, dtype=torch.float64).square()
        for p, b in zip(params, before)
    )
    assert isinstance(squares, torch.Tensor)
    on_cpu = [p.to("cpu", d) for p, d in zip(params, dtypes)]  # one copy from a GPU, not one per node
    models = [{n: p[k].clone() for n, p in zip(names, on_cpu)} for k in range(len(jobs))]
    return models, squares.sqrt().tolist()


def _padded(
    picks: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each node's mini-batch ``x[idx], y[idx]`` stacked into ``size`` rows, short ones padded with
    zeros that the mask (1 for a real sample) keeps out of the loss."""
    x0, y0, _ = picks[0]
    xs = torch.zeros(len(picks), size, *x0.shape[1:], dtype=x0.dtype)
    ys = torch.zeros(len(picks), size, dtype=y0.dtype)
    mask = torch.zeros(len(picks), size)
    for k, (x, y, idx) in enumerate(picks):
        n = len(idx)
        xs[k, :n], ys[k, :n], mask[k, :n] = x[idx], y[idx], 1.0
    return xs, ys, mask
