"""A real swarm on an emulated network: one ``shoal run`` daemon per network namespace, some behind NATs,
every link capped, optional churn; and the simulator's prediction of the same run beside it.

    sudo python -m shoal.simulations.testbed --out out/testbed            # 24 daemons, 8 behind NATs
    sudo python -m shoal.simulations.testbed --churn --out out/testbed-churn
    sudo python -m shoal.simulations.testbed --task language --out out/testbed-language
    sudo python -m shoal.simulations.testbed --grid --out out/grid        # 48 scenarios, 3 runs each

The network (a public bridge, homes behind NAT routers, every link capped, optional loss) is
``testbed_network.py``'s; what a run records, ``testbed_record.py``'s.
The daemons learn --task, a workload of ``shoal demo`` (``node/demo.py``): digits (test accuracy) or
language (a byte-level transformer, DiLoCo over gossip, 2-bit top-k; held-out bits per byte, lower is
better). Each daemon has its own home (identity, shard ``i`` of the task's data, checkpoint, log) in
``--out/node<i>``; the harness reads every daemon's ``/status`` from inside its namespace and writes
``rounds.csv`` (time, node, round, the task's metric, peers, direct, relayed, bytes out/in, RSS),
``summary.json`` and ``testbed_vs_simulator.png``. With --churn, at --churn-at seconds a quarter of
the nodes (not the bootstrap or relays) are SIGKILLed and a twelfth SIGTERMed; half of the killed
restart --restart-after seconds later from their homes, so from their checkpoints. The run ends when
the mean metric of every live daemon reaches --target after the last churn event (and
--hold seconds more), or at --timeout. Ctrl-C or SIGTERM tears everything down: daemons, namespaces
and with them their links, qdiscs and iptables rules. Unless --no-simulate, the simulator then runs
the same scenario (``simulations/prediction.py``) and its time to target is written beside the
measured one; its model is the digits task's, so --task language skips it. --grid runs the
scenarios of ``testbed_grid.py`` one after the other and tabulates measured against predicted.
Needs root, iproute2 and iptables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from shoal.learning.settings import PROTOCOLS
from shoal.node.demo import WORKLOADS, node_config
from shoal.node.home import Home
from shoal.overlay.atomic import write_atomic
from shoal.overlay.identity import load_or_create_identity, peer_id
from shoal.simulations import prediction, testbed_grid
from shoal.simulations.config import ScheduledEvent
from shoal.simulations.netlab import built, has_netem, unavailable_reason
from shoal.simulations.testbed_network import API_PORT, P2P_PORT, Plan, Testbed, churn_schedule
from shoal.simulations.testbed_record import (
    Measurement,
    Member,
    read_status,
    row,
    rss_mb,
    summarize,
    write_rounds,
)

POLL = 2.0  # seconds between two reads of every daemon's /status
TICK = 0.25  # seconds between checks for daemons that have not served yet (start-up times)
START_TIMEOUT = 120.0  # for the bootstrap daemon to serve
STOP_TIMEOUT, STOP_PER_NODE = 20.0, 1.0  # SIGTERM to SIGKILL at the end (they share the cores)
SAVE_EVERY = 10.0  # seconds between rewrites of rounds.csv (little is lost if the harness dies)


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
                    workload=plan.workload,
                ),
            )
        self.measured = Measurement(plan, self.members, churn_schedule(plan))
        self.relayed_seen = False  # a live daemon reported a relayed link (``until_relayed``)
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
        done_at = math.inf
        while (now := self.now()) < min(plan.timeout, done_at + plan.hold):
            if plan.until_relayed and done_at < math.inf and self.relayed_seen:
                break
            time.sleep(TICK)
            self.starting(now)
            while events and events[0].time <= now:
                self.apply(events.pop(0))
            if now >= next_poll:
                next_poll = now + POLL
                if self.poll(now, churn_done=not events):
                    done_at = min(done_at, now)
            if now >= next_save:
                next_save = now + SAVE_EVERY
                write_rounds(self.out, self.measured.rows, plan.workload.metric)
        self.measured.end = self.now()
        self.measured.live_at_end = sum(m.alive for m in self.members)
        self.stop()
        write_rounds(self.out, self.measured.rows, plan.workload.metric)
        return self.measured

    def starting(self, now: float) -> None:
        """Time the start-up of launches that have not begun learning: the API serving, then the protocol
        running (at its first task peer)."""
        for m in self.members:
            if not m.alive or len(m.learning) == len(m.launches):
                continue
            if len(m.up) < len(m.launches) and m.home.running() is not None:
                m.up.append(now)
            if len(m.up) == len(m.launches):
                m.saw(read_status(self.bed.ns(m.site)), now)

    def apply(self, event: ScheduledEvent) -> None:
        """Launch, or signal every node of ``event`` and then reap the killed, so they go down together.
        The measurement keeps when it happened: a poll of 24 loaded daemons takes seconds, so an event
        may come that much after its planned time."""
        events = self.measured.events
        events[events.index(event)] = dataclasses.replace(event, time=round(self.now(), 2))
        members = [self.members[i] for i in event.nodes]
        if event.action == "join":
            for m in members:
                if not m.alive:
                    self.launch(m)
        else:
            hit = [m for m in members if m.alive]
            for m in hit:
                os.killpg(m.proc.pid, signal.SIGKILL if event.action == "crash" else signal.SIGTERM)
                m.status = None
            if event.action == "crash":
                for m in hit:
                    m.exits.append(("SIGKILL", m.proc.wait()))
        names = {"crash": "SIGKILLed", "leave": "SIGTERMed", "join": "restarted"}
        self.progress(f"{self.now():5.1f} s  churn: {names[event.action]} nodes {list(event.nodes)}")

    def poll(self, now: float, churn_done: bool) -> bool:
        """Read every live daemon's status, record rows; whether the run is done."""
        plan, workload = self.bed.plan, self.bed.plan.workload
        live = [m for m in self.members if m.alive]
        for m in self.members:
            if m.proc is not None and not m.alive and m.status is not None:
                self.progress(f"node {m.site.index} exited with {m.proc.returncode}:\n  {m.tail()}")
                m.status = None
        for m in live:
            s, rss = read_status(self.bed.ns(m.site)), rss_mb(m.proc.pid)
            m.rss_mb = max(m.rss_mb, rss)
            m.saw(s, now)  # the run may end at this poll, before the next look of ``starting``
            if s is None:
                continue
            m.status = s
            self.measured.rows.append(row(now, m.site.index, s, rss, workload.metric, workload.value(s)))
        values = [v for m in live if m.status and (v := workload.value(m.status)) is not None]
        if not values:
            self.progress(f"{now:5.1f} s  {sum(m.status is not None for m in live)}/{len(live)} daemons up")
            return False
        mean = statistics.fmean(values)
        statuses = [m.status for m in live if m.status]
        relayed = sum(p["connection"] == "relayed" for s in statuses for p in s["peers"])
        self.relayed_seen = self.relayed_seen or relayed > 0
        peers = statistics.fmean(len(s["peers"]) for s in statuses)
        self.progress(
            f"{now:5.1f} s  {len(live)} live, rounds {min(s['round'] for s in statuses)}-"
            f"{max(s['round'] for s in statuses)}, peers {peers:.1f}"
            f" ({relayed} relayed links), {workload.metric} mean {mean:.3f} ({len(values)}/{len(live)} nodes)"
        )
        at_target = len(values) == len(live) and workload.reached(mean, plan.target)
        m = self.measured
        if at_target and m.first_reach is None:
            m.first_reach = now
            self.progress(f"{now:5.1f} s  the live daemons reached {workload.goal(plan.target)}")
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
    p.add_argument(
        "--task", choices=tuple(WORKLOADS), default=d.task, help="what the swarm learns (default %(default)s)"
    )
    p.add_argument(
        "--target",
        type=float,
        help="mean metric to reach (default the task's: digits test accuracy at least "
        f"{WORKLOADS['digits'].target:g}, language held-out bits per byte at most "
        f"{WORKLOADS['language'].target:g})",
    )
    p.add_argument(
        "--timeout", type=float, default=d.timeout, help="seconds before giving up (default %(default)s)"
    )
    p.add_argument(
        "--hold",
        type=float,
        default=d.hold,
        help="seconds to go on after the target is reached, to see the settled swarm (default %(default)s)",
    )
    p.add_argument(
        "--until-relayed",
        action="store_true",
        help="end --hold early once a daemon reports a relayed link (what a short run waits to see)",
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
        "--protocol", choices=PROTOCOLS, default=d.protocol, help="how they learn (default %(default)s)"
    )
    p.add_argument(
        "--no-simulate", dest="simulate", action="store_false", help="skip the simulator's prediction"
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help="run the prediction grid instead (nodes x churn x link caps x loss x protocol, see "
        "testbed_grid.py); the other options set what its cells share; resumes what is in --out",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each grid cell (default %(default)s)")
    p.add_argument(
        "--repredict", action="store_true", help="predict the grid's finished runs anew; no daemon runs"
    )
    return p


def interrupt(*_: object) -> None:
    """SIGTERM and SIGINT as Ctrl-C: the same teardown runs."""
    raise KeyboardInterrupt


def plan_of(args: argparse.Namespace) -> Plan:
    """The parsed arguments' plan, or exit with what is wrong with them."""
    fields = {k: v for k, v in vars(args).items() if k in Plan.__dataclass_fields__}
    try:
        return Plan(**fields)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def run(plan: Plan, out: Path, simulate: bool) -> dict:
    """One run of ``plan`` in ``out``: build, measure, tear down, then the prediction (unless not
    ``simulate``); ``summary.json``'s document, written last (a run without one did not finish)."""
    netem = has_netem()
    if plan.delay_ms and not netem:
        raise SystemExit(
            "error: --delay needs the netem qdisc, which this kernel lacks (links can only be capped)"
        )
    out.mkdir(parents=True, exist_ok=True)
    bed = Testbed(plan)
    print(
        f"building {plan.nodes} nodes ({plan.nat_nodes} behind {plan.homes} NATs, {plan.random_nats} of them "
        f"port-randomising) on {plan.mbit:g} Mbit/s links, {plan.loss:.0%} loss, {plan.protocol}"
        + (", churn" if plan.churn else "")
        + f"; namespaces {bed.prefix}*; homes in {out}",
        flush=True,
    )
    with built(bed, bed.build):
        measured = Harness(bed, out, progress=lambda line: print(line, flush=True)).run()
    doc = {
        "plan": asdict(plan),
        "links": f"{plan.mbit:g} Mbit/s each way, {plan.loss:.1%} loss, "
        + (f"{plan.delay_ms:g} ms added delay (netem)" if plan.delay_ms else "no added delay")
        + ("" if netem else " (this kernel has no netem)"),
        "events": [asdict(e) for e in measured.events],
        "testbed": summarize(measured),
    }
    if simulate:
        doc["simulator"] = prediction.predict_and_compare(measured, out)
    write_atomic(out / "summary.json", json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["testbed"], indent=1))
    if "simulator" in doc:
        print(json.dumps({k: v for k, v in doc["simulator"].items() if k != "model"}, indent=1))
    print(f"wrote {out}/rounds.csv, summary.json" + (", testbed_vs_simulator.png" if simulate else ""))
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    plan = plan_of(args)
    if args.simulate and plan.task != "digits":
        print(f"no simulator prediction: it models the digits task, not {plan.task}", flush=True)
        args.simulate = False
    if (args.grid or args.repredict) and not args.simulate:
        raise SystemExit("error: the grid compares every run with the prediction: digits, no --no-simulate")
    if args.repredict:
        return testbed_grid.repredict(plan, args.out, args.repeats)
    if reason := unavailable_reason():
        raise SystemExit(f"error: the testbed {reason}")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # even if started ignoring it (a shell's background job)
    try:
        if args.grid:
            return testbed_grid.run_grid(plan, args.out, args.repeats, run)
        doc = run(plan, args.out, args.simulate)
    except KeyboardInterrupt:
        print("interrupted: daemons stopped, namespaces removed", file=sys.stderr)
        return 130
    return 0 if doc["testbed"]["reached"] else 1


if __name__ == "__main__":
    sys.exit(main())
