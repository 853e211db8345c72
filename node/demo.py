"""``shoal demo``: a real swarm on 127.0.0.1, each node a separate ``shoal run`` process.

Each node gets a home with its own identity and its shard of the workload's data (:data:`WORKLOADS`:
the offline digits, or a byte-level language model on the Python standard library's source); ports
are the kernel's choice, read back from each daemon's ``api.json``, and the others start once the
bootstrap node serves. Progress comes from each daemon's ``/status``; the demo stops the swarm with
SIGTERM (the daemons' graceful exit) when the workload's mean metric reaches the target or time runs out.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shoal.node.config import document
from shoal.node.home import Home
from shoal.overlay.atomic import write_atomic
from shoal.overlay.identity import load_or_create_identity, peer_id

POLL = 2.0
STOP_TIMEOUT = 20.0
START_TIMEOUT = 120.0
STOP_PER_NODE = 1.0


# What every digits demo and testbed daemon learns with (keys by name, node.config); the testbed's
# simulator prediction reads the same.
TASK = {"dataset": "digits", "lr": 0.1, "local_steps": 20}
PROTOCOL = {"protocol": "gossip", "integrator": "clipped", "gossip_period": 0.5}


@dataclass(frozen=True)
class Workload:
    """What a demo swarm learns (``[task]`` and ``[protocol]`` keys by name) and how its progress reads:
    the metric every daemon's ``/status`` reports, whether lower is better, the default target."""

    task: dict[str, object]
    protocol: dict[str, object]
    metric: str
    lower_is_better: bool
    target: float
    label: str  # the metric in sentences

    def value(self, status: dict) -> float | None:
        """The metric a daemon reports (None before its first evaluation)."""
        return (status.get("metrics") or {}).get(self.metric)

    @property
    def bound(self) -> float:
        """The largest target that means anything: accuracy 1; 8 bits per byte, a uniform guess."""
        return 8.0 if self.lower_is_better else 1.0

    def reached(self, mean: float, target: float) -> bool:
        return mean <= target if self.lower_is_better else mean >= target

    def goal(self, target: float) -> str:
        """``target`` as the demo states it ("90% mean test accuracy")."""
        return f"{target:g} {self.label}" if self.lower_is_better else f"{target:.0%} {self.label}"


DIGITS = Workload(
    TASK, PROTOCOL, metric="accuracy", lower_is_better=False, target=0.9, label="mean test accuracy"
)
# DiLoCo (an AdamW inner loop, then an outer Nesterov step along start - gossip average: lr 0.7,
# momentum 0.9), sending the largest 20% of each model difference's values at 2 bits each (top-k;
# keyframes only when a peer holds no reference: a round moves every weight).
LANGUAGE = Workload(
    {"task": "shoal.learning.language:make_task"},
    {
        **PROTOCOL,
        "outer_lr": 0.7,
        "outer_momentum": 0.9,
        "codec_name": "topk",
        "codec_topk_fraction": 0.2,
        "codec_max_lag": 1000.0,
        "codec_topk_bits": 2,
    },
    metric="bits_per_byte",
    lower_is_better=True,
    target=2.6,
    label="mean held-out bits per byte",
)
WORKLOADS = {"digits": DIGITS, "language": LANGUAGE}


def node_config(
    i: int,
    nodes: int,
    bootstrap: Sequence[str] = (),
    *,
    listen: str = "/ip4/127.0.0.1/tcp/0",
    api: str = "127.0.0.1:0",
    relay_service: bool = False,
    workload: Workload = DIGITS,
) -> str:
    """``config.toml`` of node ``i`` of ``nodes`` (shard ``i``). On 127.0.0.1 (the default) its ports are
    left to the kernel: any port chosen here and released could be taken before the daemon binds it
    (measured, by another daemon's outgoing connection)."""
    network = {"listen": (listen,), "bootstrap": tuple(bootstrap)}
    if relay_service:
        network["relay_service"] = True
    return document(**network, **workload.task, shard=i, shards=nodes, **workload.protocol, api=api)


def accuracy(status: dict) -> float | None:
    """The test accuracy a daemon of the built-in task reports (None before its first evaluation)."""
    return DIGITS.value(status)


def status(home: Home) -> dict | None:
    """The /status of the daemon running in ``home``, or None if it does not serve (yet)."""
    running = home.running()
    if running is None:
        return None
    try:
        with urllib.request.urlopen(f"http://{running['api']}/status", timeout=2) as response:
            return json.load(response)
    except (OSError, ValueError, http.client.HTTPException):  # not up yet, or not a daemon's API
        return None


def run_demo(
    nodes: int, target: float | None, timeout: float, keep: Path | None, workload: Workload = DIGITS
) -> bool:
    """Run the demo swarm; whether its mean metric reached ``target`` (default: the workload's) within
    ``timeout`` seconds."""
    target = workload.target if target is None else target
    base = keep or Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    homes = [Home(base / f"node{i}") for i in range(nodes)]
    ids = [peer_id(load_or_create_identity(h.identity)[0]) for h in homes]
    procs: list[subprocess.Popen] = []
    peer_counts: dict[int, list[int]] = {}  # each node's task peers at every poll after its first round
    print(f"starting {nodes} daemons on 127.0.0.1 (homes and logs in {base})")
    seen: dict[int, dict] = {}  # each node's latest /status
    reached, start_time = False, time.monotonic()  # times count from the first launch
    try:
        write_atomic(homes[0].config, node_config(0, nodes, workload=workload))
        procs.append(start(homes[0]))
        bootstrap = first_address(procs[0], homes[0])
        if bootstrap is not None:
            print(f"bootstrap node up: {bootstrap}")
            for i, home in enumerate(homes[1:], 1):
                write_atomic(home.config, node_config(i, nodes, [bootstrap], workload=workload))
                procs.append(start(home))
            reached = watch(procs, homes, start_time, workload, target, timeout, seen, peer_counts)
    finally:
        codes = stop(procs)
    print(summary(ids[: len(procs)], seen, codes, peer_counts, workload))
    failed = [f"node {i}: {c}" for i, c in enumerate(codes) if c != 0]
    print(
        f"{len(procs) - len(failed)}/{len(procs)} daemons exited 0"
        + (f"; not: {', '.join(failed)}" if failed else "")
    )
    if keep is None and reached and all(c == 0 for c in codes):
        shutil.rmtree(base, ignore_errors=True)
    if not reached:
        print(f"the swarm did not reach {workload.goal(target)} within {timeout:.0f} s; logs in {base}")
    return reached


def start(home: Home) -> subprocess.Popen:
    """``shoal run`` for ``home``, logging to its ``daemon.log``; one torch thread each, since N daemons
    share this machine's cores."""
    with open(home.path / "daemon.log", "wb") as logfile:
        return subprocess.Popen(
            [sys.executable, "-m", "shoal.node.cli", "run", "--home", str(home.path)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )


def first_address(proc: subprocess.Popen, home: Home) -> str | None:
    """The address others bootstrap from, once the daemon in ``home`` serves; None (with its log) if it
    exits or does not serve within START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        running = home.running()
        if running and running.get("addresses"):
            return running["addresses"][0]
        time.sleep(0.2)
    print(f"the bootstrap node did not start; its last log lines:\n  {tail(home)}")
    return None


def tail(home: Home, lines: int = 15) -> str:
    return "\n  ".join((home.path / "daemon.log").read_text(errors="replace").splitlines()[-lines:])


def watch(
    procs: list[subprocess.Popen],
    homes: list[Home],
    start: float,
    workload: Workload,
    target: float,
    timeout: float,
    seen: dict[int, dict],
    peer_counts: dict[int, list[int]],
) -> bool:
    while time.monotonic() - start < timeout:
        time.sleep(POLL)
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                print(f"node {i} exited with code {proc.returncode}; its last log lines:\n  {tail(homes[i])}")
                return False
            s = status(homes[i])
            if s is not None:
                seen[i] = s
                if workload.value(s) is not None:
                    peer_counts.setdefault(i, []).append(len(s["peers"]))
        rows = [seen.get(i) for i in range(len(procs))]
        values = [v for r in rows if r and (v := workload.value(r)) is not None]
        rounds = [r["round"] for r in rows if r]
        peers = [len(r["peers"]) for r in rows if r]
        if not values:
            print(
                f"{time.monotonic() - start:5.0f} s  {len(rows) - rows.count(None)}/{len(procs)} daemons up, "
                "no round finished yet",
                flush=True,
            )
            continue
        mean = statistics.fmean(values)
        worst, which = (max(values), "max") if workload.lower_is_better else (min(values), "min")
        print(
            f"{time.monotonic() - start:5.0f} s  rounds {min(rounds)}-{max(rounds)}  "
            f"peers {statistics.fmean(peers):.1f}  {workload.metric} mean {mean:.3f} ({which} {worst:.3f}, "
            f"{len(values)}/{len(procs)} nodes)",
            flush=True,
        )
        if len(values) == len(procs) and workload.reached(mean, target):
            print(f"reached {workload.goal(target)} in {time.monotonic() - start:.0f} s")
            return True
    return False


def stop(procs: list[subprocess.Popen]) -> list[int]:
    """SIGTERM (graceful leave + final checkpoint), then SIGKILL what is still running after a bound
    (longer for more daemons: they share the machine's cores while they leave and checkpoint)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT + STOP_PER_NODE * len(procs)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


def summary(
    ids: list[str],
    seen: dict[int, dict],
    codes: list[int],
    peer_counts: dict[int, list[int]],
    workload: Workload = DIGITS,
) -> str:
    """One line per node; "peers" is the median number of task peers over the polls after the node's
    first round, "down" how many peers its failure detector cut off."""
    width = max(8, len(workload.metric))
    lines = [
        f"{'node':>4}  {'peer id':<14} {'round':>5} {workload.metric:>{width}} {'peers':>5} {'down':>4} "
        f"{'MB out':>7} {'exit':>4}"
    ]
    for i, pid in enumerate(ids):
        s = seen.get(i, {})
        shown = workload.value(s)
        counts = peer_counts.get(i)
        peers = f"{statistics.median(counts):g}" if counts else "-"  # 3 or 3.5, never 3.0
        lines.append(
            f"{i:>4}  {'…' + pid[-12:]:<14} {s.get('round', '-'):>5} "
            f"{'-' if shown is None else f'{shown:.3f}':>{width}} "
            f"{peers:>5} {s.get('liveness', {}).get('down', '-'):>4} "
            f"{sum(s.get('bytes_out', {}).values()) / 1e6:>7.1f} {codes[i]:>4}"
        )
    return "\n".join(lines)
