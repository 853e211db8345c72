"""What a simulation run yields: its evaluation points (the rows of rounds.csv) and its totals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Row:
    """One evaluation point: the columns of rounds.csv, ``metrics`` spread as ``<name>_mean``,
    ``<name>_min`` and ``<name>_max`` of each metric the task's evaluate returns, over the nodes
    evaluated."""

    run: str
    time: float
    round: float
    alive: int
    consensus_distance: float
    bytes_sent: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def acc_mean(self) -> float:
        """The built-in task's mean accuracy (NaN for a task without one)."""
        return self.metrics.get("accuracy_mean", math.nan)

    @property
    def acc_min(self) -> float:
        return self.metrics.get("accuracy_min", math.nan)

    @property
    def acc_max(self) -> float:
        return self.metrics.get("accuracy_max", math.nan)


@dataclass
class RunResult:
    label: str
    rows: list[Row]
    wall_seconds: float
    node_rounds: int
    bytes_by_kind: dict[str, int]
    per_node_accuracy: dict[str, float] = field(default_factory=dict)  # at the end, live nodes (if any)
    bytes_per_node: dict[str, int] = field(default_factory=dict)  # sent + received over the run

    @property
    def final(self) -> Row:
        return self.rows[-1]
