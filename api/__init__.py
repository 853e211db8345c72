"""Shoal as a library: your model, your data and your training code on a swarm without coordinator.

    import shoal

    task = shoal.Task(model=my_model, train=my_train, evaluate=my_evaluate, samples=len(my_data))
    with shoal.Node(task, home="node-a", bootstrap=["/ip4/.../p2p/..."]) as node:
        node.wait(round=100, timeout=600)          # real daemons on libp2p
    shoal.simulate(lambda i, n: make_task(i, n), nodes=50, churn=0.2)   # the same code, simulated

A :class:`Task` is the model and the functions the node calls: ``train(model, round)`` (your loop,
optimizer, loss and steps) and ``evaluate(model)`` (any named numbers); without ``train`` your own
loop trains and calls :meth:`Node.step`. :func:`classification` is Shoal's built-in task on your
tensors. :func:`simulate` runs a task factory on a simulated swarm in virtual time; ``shoal run
--task package.module:function`` runs the same factory as a daemon. README, "Python API".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal.learning.anchor import ClassificationProbe, Probe, Score
    from shoal.learning.task import Metrics, Task, TaskFactory, classification
    from shoal.node.library import Node
    from shoal.simulations.rows import Row, RunResult
    from shoal.simulations.simulate import simulate

# Imported on first use: the `shoal` command imports this package too, and `shoal status` should not
# wait for torch and libp2p to load.
_WHERE = {
    "ClassificationProbe": "shoal.learning.anchor",
    "Probe": "shoal.learning.anchor",
    "Score": "shoal.learning.anchor",
    "Metrics": "shoal.learning.task",
    "Task": "shoal.learning.task",
    "TaskFactory": "shoal.learning.task",
    "classification": "shoal.learning.task",
    "Node": "shoal.node.library",
    "Row": "shoal.simulations.rows",
    "RunResult": "shoal.simulations.rows",
    "simulate": "shoal.simulations.simulate",
}
__all__ = [
    "ClassificationProbe",
    "Metrics",
    "Node",
    "Probe",
    "Row",
    "RunResult",
    "Score",
    "Task",
    "TaskFactory",
    "classification",
    "simulate",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'shoal' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]
