"""MoDeST's settings (:class:`ModestConfig`), also the daemon's ``[protocol.modest]`` (``learning.settings``).

Checked when built: a ValueError names the first setting out of range. What each setting bounds is
said in ``learning.modest`` (rounds, hand-overs) and ``learning.modest_view`` (roles, sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModestConfig:
    """The defaults are a daemon's, paced (the scenarios run MoDeST unpaced, as the paper does:
    ``period`` 0)."""

    sample_size: int = field(  # s
        default=10, metadata={"help": "trainers per round; keep it at most the swarm's size, or rounds wait"}
    )
    aggregators: int = field(default=1, metadata={"help": "aggregators per round"})  # a
    success_fraction: float = field(  # sf
        default=1.0, metadata={"help": "share of the sample's models an aggregator waits for ..."}
    )
    ping_timeout: float = 5.0
    ping_interval: float = 1.0
    aggregation_timeout: float = field(default=5.0, metadata={"help": "... or at most this many seconds"})
    watch_timeout: float = 20.0  # most seconds a hand-over may come to nothing (see Modest._watch)
    period: float = field(
        default=1.0,
        metadata={"help": "least seconds between the starts of two of this node's trainings", "flag": True},
    )
    max_round_jump: int = field(  # window: most rounds a peer's message may lie beyond our own round
        default=100,
        metadata={
            "group": 'every peer is a possible adversary (docs/security.md):',
            "help": "most rounds a peer's message may move this node's round ahead",
        },
    )
    role_slack: int = field(  # candidates beyond a (or s) still plausible in a role (modest_view)
        default=2,
        metadata={"help": "how far past the first a (or s) candidates a sender may rank in its role"},
    )
    max_norm_ratio: float = field(  # learning.messages
        default=10.0, metadata={"help": "models with a layer's L2 norm over this many times ours are refused"}
    )

    def __post_init__(self) -> None:
        for name in ("sample_size", "aggregators", "max_round_jump"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.success_fraction <= 1:
            raise ValueError(f"success_fraction must be in (0, 1], got {self.success_fraction}")
        for name in ("ping_timeout", "ping_interval", "aggregation_timeout", "watch_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"timeouts and intervals must be positive: {name} = {getattr(self, name)}")
        if self.role_slack < 0 or not self.period >= 0:
            raise ValueError(f"role_slack and period must not be negative: {self.role_slack}, {self.period}")
        if not self.max_norm_ratio >= 1:
            raise ValueError(f"max_norm_ratio must be at least 1, got {self.max_norm_ratio}")

    @property
    def quorum(self) -> int:
        """The models of its round an aggregator waits for: ceil(sf·s)."""
        return max(1, math.ceil(self.sample_size * self.success_fraction - 1e-9))
