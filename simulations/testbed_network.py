"""The testbed's network: its plan (swarm, links, NATs, churn), where each node sits, and the namespaces
that make it (built with ``netlab.Namespaces``).

Layout (namespaces ``stb<pid>_<hex>_<role>``; nothing touches the root namespace)::

    inet: bridge br0 198.51.100.254/24, `blackhole default` (private addresses time out)
      ├─ n00 .. : public nodes 198.51.100.10+i (n00 the bootstrap; the first --relays serve Circuit Relay v2)
      └─ rK 198.51.100.200+K: home router, MASQUERADE (the first --random-nats with --random-fully, so
         hole punching fails and its nodes' links to other homes stay relayed), stateful firewall
           └─ bridge lan 192.168.K+1.1/24 ─ nodes 192.168.K+1.10+j (--per-home of them)

Every node's link is capped at --mbit both ways (token bucket on each end of its veth) with optional
--loss (random drop of incoming packets). The kernel may have no netem: links then have no added delay,
and --delay is refused rather than ignored (summary.json says which).

"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from shoal.learning.modest_config import ModestConfig
from shoal.learning.settings import PROTOCOLS
from shoal.node.demo import WORKLOADS, Workload
from shoal.simulations.config import ScheduledEvent
from shoal.simulations.netlab import Namespaces, home_router_rules, new_prefix

P2P_PORT, API_PORT = 4001, 5001  # the same in every namespace: each has its own ports
PUBLIC, HOMES = "198.51.100", "192.168"


@dataclass(frozen=True)
class Plan:
    """The scenario: workload, swarm, network and churn. ``target`` is in the workload's metric (None: the
    workload's default)."""

    nodes: int = 24
    nat_nodes: int = 8
    per_home: int = 2
    random_nats: int = 2
    relays: int = 2
    mbit: float = 10.0
    loss: float = 0.0
    delay_ms: float = 0.0
    task: str = "digits"  # a key of node.demo.WORKLOADS
    protocol: str = "gossip"  # or modest: trainers sampled per round, models to a few aggregators
    target: float | None = None
    timeout: float = 600.0
    hold: float = 0.0  # seconds to go on after the target is reached: a settled swarm's links and bytes
    until_relayed: bool = False  # end the hold once a live daemon reports a relayed link
    churn: bool = False
    churn_at: float = 90.0  # 24 daemons on 2 cores have all begun learning by ~50 s, and checkpointed
    restart_after: float = 30.0
    seed: int = 1

    def __post_init__(self) -> None:
        if self.task not in WORKLOADS:
            raise ValueError(f"task must be one of {', '.join(WORKLOADS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if self.protocol == "modest" and self.task != "digits":
            raise ValueError(
                "protocol modest runs the digits task (the language task's outer step is gossip's)"
            )
        if self.target is None:
            object.__setattr__(self, "target", self.workload.target)
        bound = self.workload.bound
        homes = self.homes if self.per_home >= 1 else 0
        checks = {
            "nodes must be at least 2": self.nodes >= 2,
            "per-home must be at least 1": self.per_home >= 1,
            "relays must be at least 1 (nodes behind NAT need one)": self.relays >= 1 or not self.nat_nodes,
            "nodes must exceed nat-nodes, by at least relays (the bootstrap and relays are public)": (
                self.nat_nodes >= 0 and self.nodes - self.nat_nodes >= max(1, self.relays)
            ),
            f"random-nats must be in 0..{homes} (homes of per-home nodes)": 0 <= self.random_nats <= homes,
            "mbit must be positive": self.mbit > 0,
            "loss must be in [0, 1)": 0 <= self.loss < 1,
            "delay must not be negative": self.delay_ms >= 0,
            f"target must be in (0, {bound:g}] for {self.task}": 0 < self.target <= bound,
            "hold must not be negative": self.hold >= 0,
            "timeout, churn-at and restart-after must be positive": min(
                self.timeout, self.churn_at, self.restart_after
            )
            > 0,
            "homes: at most 250": homes <= 250,
        }
        for message, ok in checks.items():
            if not ok:
                raise ValueError(message)

    @property
    def homes(self) -> int:
        return -(-self.nat_nodes // self.per_home)

    @property
    def workload(self) -> Workload:
        """The task's workload on ``protocol``: MoDeST samples half the swarm as trainers, at most its
        default (a sample larger than the live swarm waits out every round's aggregation timeout)."""
        workload = WORKLOADS[self.task]
        if self.protocol == "gossip":
            return workload
        sample = min(ModestConfig().sample_size, self.nodes // 2)
        return dataclasses.replace(
            workload, protocol={**workload.protocol, "protocol": "modest", "modest_sample_size": sample}
        )


@dataclass
class Site:
    """Where node ``index`` runs: its namespace role, address, and home router (None: public)."""

    index: int
    ip: str
    router: int | None = None
    relay: bool = False

    @property
    def role(self) -> str:
        return f"n{self.index:02d}"


def sites(plan: Plan) -> list[Site]:
    """Public nodes first (node 0 the bootstrap, then the relays), the last ``nat_nodes`` in homes."""
    public = plan.nodes - plan.nat_nodes
    out = [Site(i, f"{PUBLIC}.{10 + i}", relay=i < plan.relays) for i in range(public)]
    for k in range(plan.nat_nodes):
        home, j = divmod(k, plan.per_home)
        out.append(Site(public + k, f"{HOMES}.{home + 1}.{10 + j}", router=home))
    return out


class Testbed(Namespaces):
    """The namespaces, links, caps and NATs of a :class:`Plan`."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(new_prefix("stb"))
        self.plan = plan
        self.sites = sites(plan)

    def ns(self, site: Site) -> str:
        return self.prefix + site.role

    def build(self) -> None:
        plan = self.plan
        inet = self.add("inet")
        self.bridge(inet, "br0", f"{PUBLIC}.254/24")
        self.link(inet, "route", "add", "blackhole", "default")
        for k in range(plan.homes):
            router = self.add(f"r{k}")
            self.veth(inet, f"p_r{k}", router, "wan")
            self.link(inet, "link", "set", f"p_r{k}", "master", "br0", "up")
            self._address(router, "wan", f"{PUBLIC}.{200 + k}/24", f"{PUBLIC}.254")
            self.bridge(router, "lan", f"{HOMES}.{k + 1}.1/24")
            self.sysctl(router, {"net/ipv4/ip_forward": 1})
            self.firewall(router, home_router_rules(random_ports=k < plan.random_nats))
        for site in self.sites:
            ns = self.add(site.role)
            if site.router is None:
                upstream, bridge, gateway = inet, "br0", f"{PUBLIC}.254"
            else:
                upstream, bridge, gateway = (
                    self.prefix + f"r{site.router}",
                    "lan",
                    f"{HOMES}.{site.router + 1}.1",
                )
            port = f"p_{site.role}"
            self.veth(upstream, port, ns, "eth0")
            self.link(upstream, "link", "set", port, "master", bridge, "up")
            self._address(ns, "eth0", f"{site.ip}/24", gateway)
            self.shape(ns, "eth0", plan.mbit, plan.delay_ms)  # upload
            self.shape(upstream, port, plan.mbit, plan.delay_ms)  # download
            if plan.loss:
                self.firewall(
                    ns,
                    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                    f"-A INPUT -i eth0 -m statistic --mode random --probability {plan.loss} -j DROP\n"
                    "COMMIT\n",
                )

    def _address(self, ns: str, dev: str, cidr: str, gateway: str) -> None:
        self.link(ns, "addr", "add", cidr, "dev", dev)
        self.link(ns, "link", "set", dev, "up")
        self.link(ns, "route", "add", "default", "via", gateway)


def churn_schedule(plan: Plan) -> list[ScheduledEvent]:
    """SIGKILL (``crash``) a quarter of the nodes and SIGTERM (``leave``) a twelfth at ``churn_at``, never
    the bootstrap or a relay; half of the killed restart (``join``) ``restart_after`` later."""
    if not plan.churn:
        return []
    rng = random.Random(plan.seed)
    victims = rng.sample(range(plan.relays, plan.nodes), plan.nodes // 4 + plan.nodes // 12)
    killed, left = sorted(victims[: plan.nodes // 4]), sorted(victims[plan.nodes // 4 :])
    back = sorted(rng.sample(killed, len(killed) // 2))
    return [
        event
        for event in (
            ScheduledEvent(plan.churn_at, "crash", tuple(killed)),
            ScheduledEvent(plan.churn_at, "leave", tuple(left)),
            ScheduledEvent(plan.churn_at + plan.restart_after, "join", tuple(back)),
        )
        if event.nodes
    ]
