r"""What a simulated swarm is: its :class:`SimConfig` (the daemon's protocol and task settings, the
simulated network and time) and the :class:`ScheduledEvent`\ s that crash, stop, start or cut its nodes
(``simulations.engine`` runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.learning.settings import ProtocolSettings, TaskSettings

# the simulations' built-in task: the daemon's, with smaller batches, a larger rate and an epoch a round
TASK = TaskSettings(batch_size=16, lr=0.1, local_steps=None, local_epochs=1.0)
# [task] settings a simulation has its own of: the user's tasks (make_task), the nodes (one shard each,
# of the dataset) and the seed (``SimConfig.seed``, the run's); they keep their defaults
DAEMON_ONLY = ("task", "data", "shard", "shards", "seed")


@dataclass(frozen=True)
class SimConfig(ProtocolSettings):
    """One simulated swarm: the protocol every node runs (the daemon's settings, checked there, with the
    protocols' own configurations nested: ``SimConfig(gossip=GossipConfig(fanout=None))``), the built-in
    task it learns (the daemon's ``[task]`` settings, nested: ``task_lr`` names ``task.lr``), and the
    swarm's data, network and time. Times are virtual seconds; bandwidth in Mbit/s; speed in samples/s."""

    integrator: str = "weighted"  # the simulations' reference: plain averaging, weighted by samples
    task: TaskSettings = field(
        default_factory=lambda: TASK,
        metadata={"help": "the built-in task every node learns, on its own shard of the dataset"},
    )
    nodes: int = 20
    seed: int = 1  # of everything random: the data, its split, the models, training, the network
    dataset_samples: int = 5000  # size of generated datasets (mnist1d)
    same_init: bool = True  # all nodes start from one model (as FL would) or each from its own
    duration: float = 300.0
    eval_every: float = 10.0
    eval_samples: int = 500  # test samples each evaluation uses (the same subset every time)
    latency: float = 0.05
    bandwidth: float = 100.0
    speed: float = 2000.0
    speed_spread: float = 1.0  # node speeds are log-uniform in [speed/spread, speed*spread]
    loss: float = 0.0
    dial_any: bool = False  # True: any node may message any other, not only graph neighbours
    # train the nodes that share a model and hyperparameters in one computation (simulations.batching):
    # far faster with thousands of nodes; the models agree with the per-node path to rounding
    batched: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "nodes must be at least 2": self.nodes >= 2,
            "duration, eval_every, speed and bandwidth must be positive": min(
                self.duration, self.eval_every, self.speed, self.bandwidth
            )
            > 0,
            "speed_spread must be at least 1": self.speed_spread >= 1,
            "loss must be in [0, 1)": 0 <= self.loss < 1,
            "latency must not be negative": self.latency >= 0,
            "eval_samples must be at least 1": self.eval_samples >= 1,
            f"task: {', '.join(DAEMON_ONLY)} are the daemon's (a simulation's seed is SimConfig.seed)": all(
                getattr(self.task, name) == getattr(TASK, name) for name in DAEMON_ONLY
            ),
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class ScheduledEvent:
    """At virtual ``time``: ``crash``, ``leave`` or ``join`` nodes (indices), or ``partition`` / ``heal``."""

    time: float
    action: str
    nodes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.action not in {"crash", "leave", "join", "partition", "heal"}:
            raise ValueError(f"unknown scheduled action {self.action!r}")
