"""Simulated nodes' training in batches: every round asked for is computed when the first is due.

In virtual time a node's round of training costs ``samples / speed`` seconds and its result is needed
only when they have passed. :class:`BatchedTraining` lets each node queue its round (the model it
trains from is a snapshot nobody changes) and sleep; the first node whose result is due computes every
round queued by then in one :func:`~learning.batched.train_together`. With thousands of nodes that is
one computation per moment instead of thousands (``benchmarks/sim_speed.py``).

What moves: a node's anchor (``learning.anchor``) records its round's start point and step when the
batch is computed, at most one round's duration later than the per-node path (``VirtualCompute``),
which records them when the round is asked for; a model a peer offers in between is judged on the
anchor as it was. The models trained are the per-node path's to floating-point rounding (tested).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import trio

from shoal.learning.batched import Job, batch_key, samples, train_together
from shoal.learning.learner import Learner
from shoal.learning.protocol import State
from shoal.node.driver import VirtualCompute


@dataclass(eq=False)  # a queued round is itself, whatever its tensors
class _Queued:
    job: Job
    result: State | None = None


@dataclass
class BatchedTraining:
    """The queue the nodes of one simulation share; :meth:`compute` is each node's ``Compute``."""

    queue: list[_Queued] = field(default_factory=list)
    batches: int = 0  # computations run (rounds trained / batches: the mean batch)

    def compute(self, samples_per_second: float) -> NodeCompute:
        return NodeCompute(self, samples_per_second)

    def run(self) -> None:
        """Train every queued round."""
        queued, self.queue = self.queue, []
        for q, state in zip(queued, train_together([q.job for q in queued])):
            q.result = state
        self.batches += 1


class NodeCompute(VirtualCompute):
    """A node's rounds through the shared queue; a learner that cannot train in batches (a user's own
    training, a model with buffers) trains alone as :class:`VirtualCompute` does."""

    def __init__(self, batching: BatchedTraining, samples_per_second: float):
        super().__init__(samples_per_second)
        self.batching = batching
        self.keys: dict[Learner, Hashable] = {}  # the node's learner's batch_key, computed once

    async def train(self, learner: Learner, state: State, round: int) -> State:
        if learner not in self.keys:
            self.keys[learner] = batch_key(learner)
        key = self.keys[learner]
        if key is None:
            return await super().train(learner, state, round)
        queued = _Queued(Job(learner, state, round, key))
        self.batching.queue.append(queued)
        try:
            await trio.sleep(samples(learner) / self.samples_per_second)
        except trio.Cancelled:  # the node went down: its round is not trained
            if queued in self.batching.queue:
                self.batching.queue.remove(queued)
            raise
        if queued.result is None:
            self.batching.run()
        assert queued.result is not None
        return queued.result
