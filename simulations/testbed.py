"""A real swarm on an emulated network: one ``shoal run`` daemon per network namespace, some behind NATs,
every link capped, optional churn; and the simulator's prediction of the same run beside it.

    sudo python -m shoal.simulations.testbed --out out/testbed            # 24 daemons, 8 behind NATs
    sudo python -m shoal.simulations.testbed --churn --out out/testbed-churn

Layout (namespaces ``stb<pid>_<hex>_<role>``, built by ``netlab.Namespaces``; nothing touches the root
namespace)::

    inet: bridge br0 198.51.100.254/24, `blackhole default` (private addresses time out)
      ├─ n00 .. : public nodes 198.51.100.10+i (n00 the bootstrap; the first --relays serve Circuit Relay v2)
      └─ rK 198.51.100.200+K: home router, MASQUERADE (the first --random-nats with --random-fully, so
         hole punching fails and its nodes' links to other homes stay relayed), stateful firewall
           └─ bridge lan 192.168.K+1.1/24 ─ nodes 192.168.K+1.10+j (--per-home of them)

Every node's link is capped at --mbit both ways (token bucket on each end of its veth) with optional
--loss (random drop of incoming packets). The kernel may have no netem: links then have no added delay,
and --delay is refused rather than ignored (summary.json says which).

Each daemon has its own home (identity, shard ``i`` of the digits data, checkpoint, log) in
``--out/node<i>``; the harness reads every daemon's ``/status`` from inside its namespace and writes
``rounds.csv`` (time, node, round, accuracy, peers, direct, relayed, bytes out/in, RSS),
``summary.json`` and ``testbed_vs_simulator.png``. With --churn, at --churn-at seconds a quarter of
the nodes (not the bootstrap or relays) are SIGKILLed and a twelfth SIGTERMed; half of the killed
restart --restart-after seconds later from their homes, so from their checkpoints. The run ends when
the mean test accuracy of every live daemon reaches --target after the last churn event, or at
--timeout. Ctrl-C or SIGTERM tears everything down: daemons, namespaces and with them their links,
qdiscs and iptables rules. Unless --no-simulate, the simulator then runs the same scenario
(``simulations/prediction.py``) and its time to target is written beside the measured one.
Needs root, iproute2 and iptables.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.node.demo import node_config
from shoal.node.home import Home
from shoal.overlay.atomic import write_atomic
from shoal.overlay.identity import load_or_create_identity, peer_id
from shoal.simulations.engine import ScheduledEvent
from shoal.simulations.netlab import (
    Namespaces,
    built,
    connect,
    has_netem,
    home_router_rules,
    new_prefix,
    unavailable_reason,
)

P2P_PORT, API_PORT = 4001, 5001  # the same in every namespace: each has its own ports
POLL = 2.0  # seconds between two reads of every daemon's /status
TICK = 0.25  # seconds between checks for daemons that have not served yet (start-up times)
START_TIMEOUT = 120.0  # for the bootstrap daemon to serve
STOP_TIMEOUT, STOP_PER_NODE = 20.0, 1.0  # SIGTERM to SIGKILL at the end (they share the cores)
SAVE_EVERY = 10.0  # seconds between rewrites of rounds.csv (little is lost if the harness dies)
PUBLIC, HOMES = "198.51.100", "192.168"


@dataclass(frozen=True)
class Plan:
    """The scenario: swarm, network and churn."""

    nodes: int = 24
    nat_nodes: int = 8
    per_home: int = 2
    random_nats: int = 2
    relays: int = 2
    mbit: float = 10.0
    loss: float = 0.0
    delay_ms: float = 0.0
    target: float = 0.9
    timeout: float = 600.0
    churn: bool = False
    churn_at: float = 60.0
    restart_after: float = 30.0
    seed: int = 1

    def __post_init__(self) -> None:
        homes = -(-self.nat_nodes // self.per_home) if self.nat_nodes else 0
        checks = {
            "nodes must be at least 2": self.nodes >= 2,
            "per-home must be at least 1": self.per_home >= 1,
            "relays must be at least 1 (nodes behind NAT need one)": self.relays >= 1 or not self.nat_nodes,
            "nodes must exceed nat-nodes + relays": self.nodes > self.nat_nodes + self.relays - 1
            and self.nodes - self.nat_nodes >= self.relays,
            f"random-nats must be in 0..{homes} (homes of per-home nodes)": 0 <= self.random_nats <= homes,
            "mbit must be positive": self.mbit > 0,
            "loss must be in [0, 1)": 0 <= self.loss < 1,
            "delay must not be negative": self.delay_ms >= 0,
            "target must be in (0, 1]": 0 < self.target <= 1,
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


@dataclass
class Member:
    """One node's daemon across its launches: process, start-up times, latest status, exits."""

    site: Site
    home: Home
    peer: str
    proc: subprocess.Popen | None = None
    launches: list[float] = field(default_factory=list)  # run times (s) it was started at
    up: list[float] = field(default_factory=list)  # run times its API first served, per launch
    learning: list[float] = field(default_factory=list)  # run times its protocol had started, per launch
    status: dict | None = None  # the latest /status of the running launch
    rss_mb: float = 0.0  # the most resident memory seen
    exits: list[tuple[str, int]] = field(default_factory=list)  # (how it was stopped, exit code)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def address(self) -> str:
        return f"/ip4/{self.site.ip}/tcp/{P2P_PORT}/p2p/{self.peer}"

    def log(self) -> Path:
        return self.home.path / "daemon.log"

    def tail(self, lines: int = 12) -> str:
        return "\n  ".join(self.log().read_text(errors="replace").splitlines()[-lines:])


def read_status(ns: str) -> dict | None:
    """A daemon's /status read from inside its namespace, or None if it does not answer."""
    try:
        sock = connect(ns, "127.0.0.1", API_PORT, timeout=2.0)
    except OSError:
        return None
    conn = http.client.HTTPConnection("127.0.0.1", API_PORT, timeout=2.0)
    conn.sock = sock
    try:
        conn.request("GET", "/status")
        response = conn.getresponse()
        return json.loads(response.read()) if response.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


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


@dataclass
class Measurement:
    """What a testbed run saw: every poll's rows, every member, the churn applied, and the outcome."""

    plan: Plan
    members: list[Member]
    events: list[ScheduledEvent]
    rows: list[dict] = field(default_factory=list)
    end: float = 0.0
    first_reach: float | None = None  # every live daemon's mean accuracy at the target
    reach_after_churn: float | None = None

    def time_to_target(self) -> float | None:
        """The headline: the first reach, or with churn the first after the last churn event."""
        return self.reach_after_churn if self.events else self.first_reach


class Harness:
    """Starts, polls, churns and stops the daemons of a built :class:`Testbed`."""

    def __init__(self, bed: Testbed, out: Path, progress=print) -> None:
        self.bed, self.out, self.progress = bed, out, progress
        plan = bed.plan
        self.members = []
        for site in bed.sites:
            home = Home(out / f"node{site.index}")
            self.members.append(Member(site, home, peer_id(load_or_create_identity(home.identity)[0])))
        relays = [m.address for m in self.members[: plan.relays]]
        for m in self.members:
            write_atomic(
                m.home.config,
                node_config(
                    m.site.index,
                    plan.nodes,
                    relays[: m.site.index],  # the bootstrap and relays started before it
                    listen=f"/ip4/{m.site.ip}/tcp/{P2P_PORT}",
                    api=f"127.0.0.1:{API_PORT}",
                    relay_service=m.site.relay,
                ),
            )
        self.measured = Measurement(plan, self.members, churn_schedule(plan))
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def launch(self, m: Member) -> None:
        m.home.api.unlink(missing_ok=True)  # its appearance is how start-up is timed
        with open(m.log(), "ab") as logfile:
            m.proc = self.bed.popen(
                self.bed.ns(m.site),
                [sys.executable, "-m", "shoal.node.cli", "run", "--home", str(m.home.path)],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
        m.launches.append(self.now())
        m.status = None

    def run(self) -> Measurement:
        plan, first = self.bed.plan, self.members[0]
        self.t0 = time.monotonic()
        self.launch(first)
        while first.home.running() is None:
            if not first.alive or self.now() > START_TIMEOUT:
                raise SystemExit(f"the bootstrap daemon did not start; its last log lines:\n  {first.tail()}")
            time.sleep(TICK)
        first.up.append(self.now())
        self.progress(f"{self.now():5.1f} s  bootstrap daemon up at {first.address}")
        for m in self.members[1:]:
            self.launch(m)
        events, next_poll, next_save = list(self.measured.events), 0.0, SAVE_EVERY
        while (now := self.now()) < plan.timeout:
            time.sleep(TICK)
            self.starting(now)
            while events and events[0].time <= now:
                self.apply(events.pop(0))
            if now >= next_poll:
                next_poll = now + POLL
                if self.poll(now, churn_done=not events):
                    break
            if now >= next_save:
                next_save = now + SAVE_EVERY
                write_rounds(self.out, self.measured.rows)
        self.measured.end = self.now()
        self.stop()
        write_rounds(self.out, self.measured.rows)
        return self.measured

    def starting(self, now: float) -> None:
        """Time the start-up of launches that have not begun learning: the API serving, then the protocol
        running (after discovery)."""
        for m in self.members:
            if not m.alive or len(m.learning) == len(m.launches):
                continue
            if len(m.up) < len(m.launches) and m.home.running() is not None:
                m.up.append(now)
            if len(m.up) == len(m.launches) and (s := read_status(self.bed.ns(m.site))) and s["learning"]:
                m.learning.append(now)

    def apply(self, event: ScheduledEvent) -> None:
        for i in event.nodes:
            m = self.members[i]
            if event.action == "join":
                if not m.alive:
                    self.launch(m)
            elif m.alive:
                sig = signal.SIGKILL if event.action == "crash" else signal.SIGTERM
                os.killpg(m.proc.pid, sig)
                m.status = None
                if event.action == "crash":
                    m.exits.append(("SIGKILL", m.proc.wait()))
        names = {"crash": "SIGKILLed", "leave": "SIGTERMed", "join": "restarted"}
        self.progress(f"{self.now():5.1f} s  churn: {names[event.action]} nodes {list(event.nodes)}")

    def poll(self, now: float, churn_done: bool) -> bool:
        """Read every live daemon's status, record rows; whether the run is done."""
        live = [m for m in self.members if m.alive]
        for m in self.members:
            if m.proc is not None and not m.alive and m.status is not None:
                self.progress(f"node {m.site.index} exited with {m.proc.returncode}:\n  {m.tail()}")
                m.status = None
        for m in live:
            s = read_status(self.bed.ns(m.site))
            m.rss_mb = max(m.rss_mb, rss_mb(m.proc.pid))
            if s is None:
                continue
            m.status = s
            kinds = [p["connection"] for p in s["peers"]]
            self.measured.rows.append(
                {
                    "time": round(now, 2),
                    "node": m.site.index,
                    "round": s["round"],
                    "accuracy": s["accuracy"],
                    "peers": len(kinds),
                    "direct": kinds.count("direct"),
                    "relayed": kinds.count("relayed"),
                    "bytes_out": sum(s["bytes_out"].values()),
                    "bytes_in": sum(s["bytes_in"].values()),
                    "rss_mb": round(rss_mb(m.proc.pid), 1),
                }
            )
        accs = [m.status["accuracy"] for m in live if m.status and m.status["accuracy"] is not None]
        if not accs:
            self.progress(f"{now:5.1f} s  {sum(m.status is not None for m in live)}/{len(live)} daemons up")
            return False
        mean = statistics.fmean(accs)
        statuses = [m.status for m in live if m.status]
        relayed = sum(p["connection"] == "relayed" for s in statuses for p in s["peers"])
        peers = statistics.fmean(len(s["peers"]) for s in statuses)
        self.progress(
            f"{now:5.1f} s  {len(live)} live, rounds {min(s['round'] for s in statuses)}-"
            f"{max(s['round'] for s in statuses)}, peers {peers:.1f}"
            f" ({relayed} relayed links), accuracy mean {mean:.3f} ({len(accs)}/{len(live)} nodes)"
        )
        at_target = len(accs) == len(live) and mean >= self.bed.plan.target
        m = self.measured
        if at_target and m.first_reach is None:
            m.first_reach = now
            self.progress(
                f"{now:5.1f} s  every live daemon's mean accuracy reached {self.bed.plan.target:.0%}"
            )
        if at_target and churn_done and m.events and m.reach_after_churn is None:
            m.reach_after_churn = now
            self.progress(f"{now:5.1f} s  ... and again after the churn")
        return at_target and churn_done

    def stop(self) -> None:
        """SIGTERM every live daemon (graceful leave, final checkpoint); SIGKILL after a bound."""
        live = [m for m in self.members if m.alive]
        for m in live:
            os.killpg(m.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT + STOP_PER_NODE * len(live)
        for m in self.members:
            if m.proc is None or len(m.exits) == len(m.launches):  # its last launch's exit is known
                continue
            try:
                m.exits.append(("SIGTERM", m.proc.wait(timeout=max(0.1, deadline - time.monotonic()))))
            except subprocess.TimeoutExpired:
                os.killpg(m.proc.pid, signal.SIGKILL)
                m.exits.append(("SIGTERM, then SIGKILL after the bound", m.proc.wait()))


ROW_FIELDS = (
    "time",
    "node",
    "round",
    "accuracy",
    "peers",
    "direct",
    "relayed",
    "bytes_out",
    "bytes_in",
    "rss_mb",
)


def write_rounds(out: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "rounds.csv", buf.getvalue())


def lives_total(rows: list[dict], column: str) -> int:
    """A counter summed over nodes and launches (a restarted daemon counts from 0 again)."""
    total, last = 0, {}
    for row in rows:
        node, value = row["node"], row[column]
        if value < last.get(node, 0):
            total += last[node]
        last[node] = value
    return total + sum(last.values())


def spread(seconds: list[float]) -> dict:
    """The bootstrap daemon's figure (it starts alone), and the others' median and most (all at once)."""
    return {
        "bootstrap_alone": round(seconds[0], 2) if seconds else None,
        "others_median": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
        "others_max": round(max(seconds[1:]), 2) if len(seconds) > 1 else None,
    }


def summarize(measured: Measurement) -> dict:
    members, rows = measured.members, measured.rows
    final_time = max((r["time"] for r in rows), default=None)
    final = [r for r in rows if r["time"] == final_time]
    first_up = [m.up[0] - m.launches[0] for m in members if m.up]
    first_learning = [m.learning[0] - m.launches[0] for m in members if m.learning]
    restarts = [m.learning[k] - m.launches[k] for m in members for k in range(1, len(m.learning))]
    stopped = [(m.site.index, how, code) for m in members for how, code in m.exits if how != "SIGKILL"]
    logs = [m.log().read_text(errors="replace") for m in members if m.log().exists()]
    churn_at = measured.events[0].time if measured.events else None
    resumed = {
        m.site.index: [
            int(line.rsplit(" ", 1)[-1])
            for line in m.log().read_text().splitlines()
            if "resuming from checkpoint at round" in line
        ]
        for m in members
        if len(m.launches) > 1
    }
    down = {i for e in measured.events if e.action in ("crash", "leave") for i in e.nodes}
    survivors_progress = None
    if churn_at is not None:
        before = {r["node"]: r["round"] for r in rows if r["time"] <= churn_at}
        after = {r["node"]: r["round"] for r in rows}
        survivors_progress = min(after[i] - before[i] for i in before if i not in down and i in after)
    return {
        "time_to_target": measured.time_to_target(),
        "first_reach": measured.first_reach,
        "reach_after_churn": measured.reach_after_churn,
        "reached": measured.time_to_target() is not None,
        "duration": round(measured.end, 1),
        "final_accuracy_mean": round(
            statistics.fmean(r["accuracy"] for r in final if r["accuracy"] is not None), 4
        )
        if any(r["accuracy"] is not None for r in final)
        else None,
        "final_live": len(final),
        "links_at_end": {kind: sum(r[kind] for r in final) for kind in ("direct", "relayed")},
        "peers_at_end_median": statistics.median(r["peers"] for r in final) if final else None,
        "relayed_links_most": max(
            (sum(r["relayed"] for r in rows if r["time"] == t) for t in {r["time"] for r in rows}), default=0
        ),
        "bytes_sent": lives_total(rows, "bytes_out"),
        "startup_seconds": {  # from launch to the API serving, and to learning (after discovery)
            "api": spread(first_up),
            "learning": spread(first_learning),
            "restarts_to_learning": [round(t, 2) for t in restarts],
        },
        "rss_mb": {
            "median": round(statistics.median(m.rss_mb for m in members), 1),
            "max": round(max(m.rss_mb for m in members), 1),
        },
        "exits": {
            "stopped": len(stopped),
            "exit_0": sum(code == 0 for _, _, code in stopped),
            "other": [f"node {i} ({how}): {code}" for i, how, code in stopped if code != 0],
        },
        "nursery_closed_errors": sum(log.count("Nursery is closed to new arrivals") for log in logs),
        "resumed_from_checkpoint_round": resumed,
        "survivors_rounds_after_churn_min": survivors_progress,
    }


def parser() -> argparse.ArgumentParser:
    d = Plan()
    p = argparse.ArgumentParser(
        prog="python -m shoal.simulations.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", type=Path, default=Path("out") / "testbed", help="output folder (default %(default)s)"
    )
    p.add_argument("--nodes", type=int, default=d.nodes, help="daemons (default %(default)s)")
    p.add_argument(
        "--nat-nodes", type=int, default=d.nat_nodes, help="of them behind NATs (default %(default)s)"
    )
    p.add_argument("--per-home", type=int, default=d.per_home, help="nodes per NAT (default %(default)s)")
    p.add_argument(
        "--random-nats",
        type=int,
        default=d.random_nats,
        help="NATs that randomise ports (default %(default)s)",
    )
    p.add_argument(
        "--relays", type=int, default=d.relays, help="public nodes serving as relays (default %(default)s)"
    )
    p.add_argument(
        "--mbit", type=float, default=d.mbit, help="every link's cap, up and down (default %(default)s)"
    )
    p.add_argument(
        "--loss", type=float, default=d.loss, help="share of packets dropped (default %(default)s)"
    )
    p.add_argument(
        "--delay", dest="delay_ms", type=float, default=d.delay_ms, help="ms added per link (netem)"
    )
    p.add_argument("--target", type=float, default=d.target, help="mean test accuracy (default %(default)s)")
    p.add_argument(
        "--timeout", type=float, default=d.timeout, help="seconds before giving up (default %(default)s)"
    )
    p.add_argument("--churn", action="store_true", help="kill, stop and restart nodes mid-run (see above)")
    p.add_argument(
        "--churn-at", type=float, default=d.churn_at, help="seconds after the start (default %(default)s)"
    )
    p.add_argument(
        "--restart-after",
        type=float,
        default=d.restart_after,
        help="seconds after the kill (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="which nodes churn (default %(default)s)")
    p.add_argument(
        "--no-simulate", dest="simulate", action="store_false", help="skip the simulator's prediction"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k in Plan.__dataclass_fields__}
    try:
        plan = Plan(**fields)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if reason := unavailable_reason():
        raise SystemExit(f"error: the testbed {reason}")
    netem = has_netem()
    if plan.delay_ms and not netem:
        raise SystemExit(
            "error: --delay needs the netem qdisc, which this kernel lacks (links can only be capped)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    bed = Testbed(plan)
    print(
        f"building {plan.nodes} nodes ({plan.nat_nodes} behind {plan.homes} NATs, {plan.random_nats} of them "
        f"port-randomising) on {plan.mbit:g} Mbit/s links; namespaces {bed.prefix}*; homes in {args.out}",
        flush=True,
    )
    try:
        with built(bed, bed.build):
            measured = Harness(bed, args.out, progress=lambda line: print(line, flush=True)).run()
    except KeyboardInterrupt:
        print("interrupted: daemons stopped, namespaces removed", file=sys.stderr)
        return 130
    results = summarize(measured)
    doc = {
        "plan": asdict(plan),
        "links": f"{plan.mbit:g} Mbit/s each way, {plan.loss:.1%} loss, "
        + (f"{plan.delay_ms:g} ms added delay (netem)" if plan.delay_ms else "no added delay")
        + ("" if netem else " (this kernel has no netem)"),
        "events": [asdict(e) for e in measured.events],
        "testbed": results,
    }
    if args.simulate:
        from shoal.simulations import prediction  # which builds on this module's Measurement

        doc["simulator"] = prediction.predict_and_compare(measured, args.out)
    write_atomic(args.out / "summary.json", json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["testbed"], indent=1))
    if "simulator" in doc:
        print(json.dumps({k: v for k, v in doc["simulator"].items() if k != "model"}, indent=1))
    print(
        f"wrote {args.out}/rounds.csv, summary.json" + (", testbed_vs_simulator.png" if args.simulate else "")
    )
    return 0 if results["reached"] else 1


if __name__ == "__main__":
    sys.exit(main())
