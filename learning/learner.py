"""A node's learner: its task (the user's model and functions, or the built-in one) behind two calls.

``train(state, round)`` and ``evaluate(state)`` take and return named tensors, so a protocol never
touches an ``nn.Module``: the learner loads the state into the task's module and calls the task's
functions on it. In a simulation many learners may share one module (they run one at a time on the
event loop's thread); a daemon gives its learner its own.

Training is contained: a ``train`` that raises, leaves a weight NaN or infinite, or changes the
model's tensors (names, shapes, dtypes) does not reach peers. The node logs why (with the user's
traceback), keeps the model it started from and says so in :attr:`Learner.error` (``/status``).

With an :class:`~learning.anchor.Anchor`, a model far worse on the node's own data than the ones it
recently trained from is not trained on: training starts from the known-good model instead (the
node's way back from a poisoning), and each round's start point and step are recorded in the anchor.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Mapping

import torch
from torch import nn

from shoal.learning.anchor import Anchor, Score, distance
from shoal.learning.models import ModelError, ParameterLayout
from shoal.learning.protocol import State
from shoal.learning.task import Metrics, Task, shown

log = logging.getLogger("shoal.learner")


class Learner:
    def __init__(
        self,
        task: Task,
        module: nn.Module | None = None,
        *,
        only_rows: tuple[str, list[int]] | None = None,
        anchor: Anchor | None = None,
    ):
        """``module``: the one to train in (default: the task's). ``only_rows`` (tensor, rows):
        training's change to that tensor is kept on those rows only, the others stay as they came in.
        Bristle's local step: a node updates the output rows of the classes it holds and leaves the rest
        of the consensus layer as its peers made it."""
        self.task = task
        self.model = task.module() if module is None else module
        self.layout = ParameterLayout.of(self.model)
        if only_rows is not None and only_rows[0] not in self.layout.names:
            raise ValueError(f"no shared tensor {only_rows[0]!r} in this model")
        self.only_rows = only_rows
        self.anchor = anchor
        self.error: str | None = None  # why the last round's training was dropped, if it was

    @property
    def samples(self) -> int:
        return self.task.samples

    def initial_state(self) -> State:
        return self.layout.state(self.model)

    def train(self, state: State, round: int) -> tuple[State, Metrics]:
        """Train a copy of ``state`` with the task's ``train``; what it returned (``samples``: how many
        samples it went through, the task's whole shard unless it says).

        Starts from the anchor's known-good model instead when ``state`` is far worse than it; returns
        the model it started from when training failed (logged as a warning)."""
        if self.task.train is None:
            raise RuntimeError("this task has no train function: its own loop trains (shoal.Node.step)")
        state = self.start(state, round)
        try:
            self.layout.load(self.model, state)
            result = self.task.train(self.model, round)
            new = self.snapshot()
        except ModelError as exc:
            return state, self.failed(round, str(exc))
        except Exception:
            return state, self.failed(round, f"training raised:\n{traceback.format_exc().rstrip()}")
        stats = dict(result) if isinstance(result, Mapping) else {}
        samples = stats.get("samples")
        if not (isinstance(samples, int | float) and 0 <= samples < math.inf):  # what a simulation charges
            stats["samples"] = self.samples
        return self.trained(state, new, round), stats

    def start(self, state: State, round: int, score: Score | None = None) -> State:
        """What round ``round`` trains from: ``state``, or the anchor's known-good model if ``state`` is
        far worse (``Anchor.recover``; ``score``: ``state``'s probe score, if computed already)."""
        return self.anchor.recover(state, round, score) if self.anchor is not None else state

    def snapshot(self) -> State:
        """The module's shared tensors as trained, on the CPU (the wire and the averaging read them
        there, whatever trained them); ModelError if training changed their names, shapes or dtypes."""
        if ParameterLayout.of(self.model) != self.layout:
            raise ModelError("training changed the model's parameters (names, shapes or dtypes)")
        return {name: t.cpu() for name, t in self.layout.state(self.model).items()}

    def trained(self, start: State, new: State, round: int, step: float | None = None) -> State:
        """``new``, trained from ``start``, as the node keeps it: ``only_rows`` applied, refused (``start``
        kept) if a weight is not finite, its step recorded in the anchor. ``step``: the L2 distance
        from ``start`` to ``new`` when the caller computed it (``learning.batched``, for many nodes at
        once); it is not finite when a weight is not."""
        if self.only_rows is not None:
            name, rows = self.only_rows
            others = torch.ones(len(new[name]), dtype=torch.bool)
            others[rows] = False
            new[name][others] = start[name][others]
            step = None
        step = distance(start, new) if step is None else step
        if not math.isfinite(step):
            bad = [n for n, t in new.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            self.failed(round, f"training made {bad[:3]} non-finite")
            return start
        self.error = None
        if self.anchor is not None:
            self.anchor.stepped(step)
        return new

    def failed(self, round: int, why: str) -> dict[str, float]:
        """Record why round ``round``'s training was dropped (``/status``), and log it."""
        self.error = f"round {round}: {why}"
        log.warning("%s: kept the model from before", self.error)
        return {"samples": 0}

    def evaluate(self, state: State) -> dict[str, float | None]:
        """The task's metrics of ``state`` as ``/status`` shows them (none without an ``evaluate``, or
        when it raises: logged)."""
        if self.task.evaluate is None:
            return {}
        self.layout.load(self.model, state)
        self.model.eval()
        try:
            with torch.no_grad():
                return shown(self.task.evaluate(self.model))
        except Exception:
            log.warning("evaluation raised (metrics left out):\n%s", traceback.format_exc().rstrip())
            return {}
        finally:
            self.model.train()
