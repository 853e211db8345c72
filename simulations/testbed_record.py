"""What a testbed run records: each daemon across its launches, every poll's reading of it, the run's
measurement, ``rounds.csv`` and the figures of ``summary.json``."""

from __future__ import annotations

import csv
import http.client
import io
import json
import statistics
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoal.node.home import Home
from shoal.overlay.atomic import write_atomic
from shoal.simulations.config import ScheduledEvent
from shoal.simulations.netlab import connect
from shoal.simulations.testbed_network import API_PORT, P2P_PORT, Plan, Site, sites


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

    def saw(self, status: dict | None, now: float) -> None:
        """Take note of a status read at ``now``: the running launch began learning if it says so."""
        if status and status["learning"] and len(self.learning) < len(self.launches):
            self.learning.append(now)

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


@dataclass
class Measurement:
    """What a testbed run saw: every poll's rows, every member, the churn applied, and the outcome."""

    plan: Plan
    members: list[Member]
    events: list[ScheduledEvent]
    rows: list[dict] = field(default_factory=list)
    end: float = 0.0
    live_at_end: int = 0  # daemons running when the run ended (the last poll may miss a slow one)
    first_reach: float | None = None  # every live daemon's mean metric at the target
    reach_after_churn: float | None = None

    def time_to_target(self) -> float | None:
        """The headline: the first reach, or with churn the first after the last churn event."""
        return self.reach_after_churn if self.events else self.first_reach


def row_fields(metric: str) -> tuple[str, ...]:
    """``rounds.csv``'s columns: the fourth is the workload's metric (``accuracy`` for digits)."""
    return (
        "time",
        "node",
        "round",
        metric,
        "peers",
        "direct",
        "relayed",
        "bytes_out",
        "bytes_in",
        "trainings",
        "training_s",
        "rss_mb",
        "loop_lag_s",
    )


def row(now: float, node: int, status: dict, rss: float, metric: str, value: float | None) -> dict:
    """A poll's row of one daemon: its round, metric, links, traffic and memory."""
    kinds = [p["connection"] for p in status["peers"]]
    return {
        "time": round(now, 2),
        "node": node,
        "round": status["round"],
        metric: value,
        "peers": len(kinds),
        "direct": kinds.count("direct"),
        "relayed": kinds.count("relayed"),
        "bytes_out": sum(status["bytes_out"].values()),
        "bytes_in": sum(status["bytes_in"].values()),
        "trainings": status["trained"]["rounds"],
        "training_s": status["trained"]["seconds"],
        "rss_mb": round(rss, 1),
        "loop_lag_s": status["liveness"]["loop_lag_s"],
    }


def write_csv(path: Path, fields: Sequence[str], rows: list[dict]) -> None:
    """``rows`` as a CSV file, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


def write_rounds(out: Path, rows: list[dict], metric: str = "accuracy") -> None:
    write_csv(out / "rounds.csv", row_fields(metric), rows)


def read_rounds(out: Path, metric: str) -> list[dict]:
    """``rounds.csv``'s rows as :func:`row` made them (numbers; an empty metric is None)."""
    with open(out / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    floats = {"time", metric, "training_s", "rss_mb", "loop_lag_s"}
    return [
        {k: (None if v == "" else float(v) if k in floats else int(v)) for k, v in r.items()} for r in rows
    ]


def read_measurement(out: Path) -> Measurement:
    """A finished run's measurement again, from its ``summary.json`` and ``rounds.csv``: what the
    prediction needs, to predict the run anew after a change to the simulator."""
    doc = json.loads((out / "summary.json").read_text())
    plan, measured = Plan(**doc["plan"]), doc["testbed"]
    members = [
        Member(site, Home(out / f"node{site.index}"), "", **times)
        for site, times in zip(sites(plan), measured["launch_times"], strict=True)
    ]
    return Measurement(
        plan,
        members,
        [ScheduledEvent(e["time"], e["action"], tuple(e["nodes"])) for e in doc["events"]],
        read_rounds(out, plan.workload.metric),
        end=measured["duration"],
        live_at_end=measured["final_live"],
        first_reach=measured["first_reach"],
        reach_after_churn=measured["reach_after_churn"],
    )


def cumulative(rows: list[dict], column: str) -> Iterator[tuple[float, int]]:
    """(time, total so far) after each row of a counter summed over nodes and launches (a restarted
    daemon counts from 0 again); rows in time order."""
    done, last = 0, {}
    for row in rows:
        node, value = row["node"], row[column]
        if value < last.get(node, 0):
            done += last[node]
        last[node] = value
        yield row["time"], done + sum(last.values())


def lives_total(rows: list[dict], column: str) -> int:
    """The counter's total over the whole run (``cumulative``'s last)."""
    return next(reversed([total for _, total in cumulative(rows, column)]), 0)


def spread(seconds: list[float]) -> dict:
    """The bootstrap daemon's figure (it starts alone), and the others' median and most (all at once)."""
    return {
        "bootstrap_alone": round(seconds[0], 2) if seconds else None,
        "others_median": round(statistics.median(seconds[1:]), 2) if len(seconds) > 1 else None,
        "others_max": round(max(seconds[1:]), 2) if len(seconds) > 1 else None,
    }


def summarize(measured: Measurement) -> dict:
    members, rows, metric = measured.members, measured.rows, measured.plan.workload.metric
    final_time = max((r["time"] for r in rows), default=None)
    final = [r for r in rows if r["time"] == final_time]
    first_up = [m.up[0] - m.launches[0] for m in members if m.up]
    first_learning = [m.learning[0] - m.launches[0] for m in members if m.learning]
    restarts = [m.learning[k] - m.launches[k] for m in members for k in range(1, len(m.learning))]
    stopped = [(m.site.index, how, code) for m in members for how, code in m.exits if how != "SIGKILL"]
    logs = {m.site.index: m.log().read_text(errors="replace") for m in members if m.log().exists()}
    churn_at = measured.events[0].time if measured.events else None
    resumed = {
        m.site.index: [
            int(line.rsplit(" ", 1)[-1])
            for line in logs[m.site.index].splitlines()
            if "resuming from checkpoint at round" in line
        ]
        for m in members
        if len(m.launches) > 1
    }
    lags = sorted(r["loop_lag_s"] for r in rows)
    relayed_per_poll = Counter()
    for r in rows:
        relayed_per_poll[r["time"]] += r["relayed"]
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
        f"final_{metric}_mean": round(statistics.fmean(r[metric] for r in final if r[metric] is not None), 4)
        if any(r[metric] is not None for r in final)
        else None,
        "final_live": measured.live_at_end,
        "links_at_end": {kind: sum(r[kind] for r in final) for kind in ("direct", "relayed")},
        "peers_at_end_median": statistics.median(r["peers"] for r in final) if final else None,
        "relayed_links_most": max(relayed_per_poll.values(), default=0),
        "bytes_sent": lives_total(rows, "bytes_out"),
        "startup_seconds": {  # from launch to the API serving, and to learning (its first task peer)
            "api": spread(first_up),
            "learning": spread(first_learning),
            "restarts_to_learning": [round(t, 2) for t in restarts],
        },
        "rss_mb": {
            "median": round(statistics.median(m.rss_mb for m in members), 1),
            "max": round(max(m.rss_mb for m in members), 1),
        },
        # how late the daemons' loops woke (their /status loop_lag_s, every poll): the 2 cores they share
        "loop_lag_s": {
            "median": round(statistics.median(lags), 3),
            "p90": round(lags[(len(lags) * 9) // 10], 3),
        }
        if lags
        else None,
        "exits": {
            "stopped": len(stopped),
            "exit_0": sum(code == 0 for _, _, code in stopped),
            "other": [f"node {i} ({how}): {code}" for i, how, code in stopped if code != 0],
        },
        "nursery_closed_errors": sum(log.count("Nursery is closed to new arrivals") for log in logs.values()),
        "resumed_from_checkpoint_round": resumed,
        # run times of every launch, its API serving and its protocol starting (read_measurement)
        "launch_times": [{"launches": m.launches, "up": m.up, "learning": m.learning} for m in members],
        "survivors_rounds_after_churn_min": survivors_progress,
    }
