"""One way to build a node's learning: the daemon, ``shoal demo``, the simulations and ``import shoal``
all call :func:`build_node`, with the built-in task or the user's.

A :class:`LearningNode` is what a node learns with: the :class:`~learning.learner.Learner` over its
task, the :class:`~learning.anchor.Anchor` that judges peers' models on its own data, the integrator
the settings name (Bristle's is built from the task's samples), and the protocol built from them once
the node knows its name and first peers (:meth:`LearningNode.protocol`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from shoal.learning.anchor import Anchor, ClassificationProbe
from shoal.learning.bristle import bristle_node
from shoal.learning.clipping import Clipped
from shoal.learning.gossip import Gossip
from shoal.learning.integrators import Integrator, make_integrator
from shoal.learning.learner import Learner
from shoal.learning.modest import Modest
from shoal.learning.outer import Outer
from shoal.learning.protocol import LearningProtocol, State
from shoal.learning.settings import ProtocolSettings
from shoal.learning.task import SupervisedTraining, Task, retrained


@dataclass
class LearningNode:
    settings: ProtocolSettings
    learner: Learner
    anchor: Anchor
    integrator: Integrator
    labels: list[int] | None  # the classes announced with our models (Bristle's only)
    initial: State
    rng: random.Random
    outer: Outer  # gossip's outer optimizer; its momentum is checkpointed with the model

    def protocol(
        self, me: str, peers: Sequence[str], *, joining: bool = False, round: int = 0
    ) -> LearningProtocol:
        """The protocol the settings name, for node ``me`` starting from :attr:`initial` at ``round``."""
        return build_protocol(
            self.settings,
            me,
            peers,
            self.initial,
            self.learner.samples,
            self.rng,
            anchor=self.anchor,
            integrator=self.integrator,
            labels=self.labels,
            joining=joining,
            round=round,
            outer=self.outer,
        )


def build_node(
    task: Task,
    settings: ProtocolSettings,
    rng: random.Random,
    *,
    module: nn.Module | None = None,
    shared: bool = False,
    initial: State | None = None,
    momentum: State | None = None,
) -> LearningNode:
    """A node learning ``task`` as ``settings`` say, from ``initial`` (default: the model as built) and
    the outer optimizer's ``momentum`` (a checkpoint's; default none).

    ``module``: the one to compute in (default: the task's). ``shared``: the anchor probes in it too
    (a simulation's nodes run one at a time on one thread); otherwise in a copy of its own, since a
    daemon trains in a worker thread while its loop judges peers' models. Raises ValueError when the
    task cannot run with these settings (Bristle needs a classification task on its own samples)."""
    module = task.module() if module is None else module
    only_rows, labels, bristle = None, None, None
    if settings.integrator == "bristle":
        if not isinstance(task.train, SupervisedTraining):
            raise ValueError(
                "Bristle scores peers per class on samples the node holds back: it needs a "
                "classification task (shoal.classification)"
            )
        bristle = bristle_node(module, task.train.x, task.train.y, rng)
        x, y = bristle.x_train, bristle.y_train
        task = replace(retrained(task, x, y), probe=ClassificationProbe(x, y, seed=task.train.seed))
        only_rows, labels = bristle.only_rows, bristle.labels
    anchor = Anchor(module if shared else copy.deepcopy(module), task.probe)
    learner = Learner(task, module, only_rows=only_rows, anchor=anchor)
    initial = learner.initial_state() if initial is None else initial
    anchor.start(initial)
    integrator = bristle.integrator if bristle else build_integrator(settings, anchor, rng)
    outer = Outer(settings.outer, momentum)
    return LearningNode(settings, learner, anchor, integrator, labels, initial, rng, outer)


def build_integrator(settings: ProtocolSettings, anchor: Anchor | None, rng: random.Random) -> Integrator:
    """The integrator ``settings`` name (not bristle: ``learning.bristle.bristle_node``). ``clipped``
    needs the node's anchor; on MoDeST it centres on the medoid of a round's models, as an aggregator's
    own model is none of them."""
    if settings.integrator != "clipped":
        return make_integrator(settings.integrator)
    if anchor is None:
        raise ValueError("the clipped integrator needs the node's anchor (learning.anchor)")
    return Clipped(anchor, rng, self_centred=settings.protocol != "modest")


def build_protocol(
    settings: ProtocolSettings,
    me: str,
    peers: Sequence[str],
    model: State,
    samples: int,
    rng: random.Random,
    *,
    anchor: Anchor | None = None,
    integrator: Integrator | None = None,
    labels: Sequence[int] | None = None,
    joining: bool = False,
    round: int = 0,
    outer: Outer | None = None,
) -> LearningProtocol:
    """The protocol ``settings`` name for node ``me``, starting from ``model`` at ``round``.

    ``peers``: whom MoDeST knows at the start (gossip learns its neighbours from the overlay).
    ``anchor``: what the node knows of its own training, which judges models that would replace ours
    (and the clipped integrator's radius). The integrator is the one ``settings`` name unless given
    (Bristle, or an attacker's plain mean); ``labels`` are announced with gossip's models. A ``joining``
    node enters a running swarm: gossip fetches a peer's model first unless it resumes from a round of
    its own; MoDeST always joins anew when it joins or resumes, as its checkpoint's round is far behind
    the swarm's. ``outer``: gossip's outer optimizer (default: a new one as ``settings`` say).
    """
    if integrator is None:
        integrator = build_integrator(settings, anchor, rng)
    if settings.protocol == "modest":
        return Modest(
            me,
            list(peers),
            model,
            samples,
            integrator,
            settings.modest,
            joining=joining or round > 0,
            anchor=anchor,
        )
    config = replace(settings.gossip, join_by_fetch=joining and round == 0)
    outer = Outer(settings.outer) if outer is None else outer
    return Gossip(
        model, samples, integrator, config, rng, labels=labels, round=round, anchor=anchor, outer=outer
    )
