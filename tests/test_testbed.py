"""The emulated-network testbed: a small real swarm behind NATs on capped links, its simulator prediction,
and a teardown that leaves nothing behind (Ctrl-C included). Needs root and iptables; skipped otherwise."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.node.home import Home
from shoal.simulations import testbed
from shoal.simulations.netlab import Namespaces, leftovers, new_prefix, run, unavailable_reason, which
from shoal.simulations.prediction import Start, starts
from shoal.simulations.testbed_network import Plan, Site, churn_schedule
from shoal.simulations.testbed_record import (
    Measurement,
    Member,
    lives_total,
    read_measurement,
    row,
    write_rounds,
)

SMALL = ["--nodes", "6", "--nat-nodes", "2", "--per-home", "1", "--random-nats", "1", "--relays", "1"]
needs_netns = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


def start_testbed(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.simulations.testbed", *SMALL, "--out", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def daemons_of(out: Path) -> list[int]:
    """Pids of processes whose command line names a home under ``out``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(out) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_churn_never_touches_the_bootstrap_or_relays_and_restarts_half_the_killed():
    events = churn_schedule(Plan(nodes=24, relays=2, churn=True, churn_at=50, restart_after=20))
    crash, leave, join = (next(e for e in events if e.action == a) for a in ("crash", "leave", "join"))
    assert (len(crash.nodes), len(leave.nodes), len(join.nodes)) == (6, 2, 3)
    assert min(crash.nodes + leave.nodes) >= 2 and not set(crash.nodes) & set(leave.nodes)
    assert set(join.nodes) <= set(crash.nodes) and (crash.time, join.time) == (50, 70)
    assert churn_schedule(Plan()) == []


def test_counters_are_summed_over_a_daemons_restarts():
    rows = [
        {"time": 1, "node": 0, "b": 5},
        {"time": 2, "node": 1, "b": 7},
        {"time": 3, "node": 0, "b": 9},
        {"time": 4, "node": 0, "b": 2},
        {"time": 5, "node": 0, "b": 4},
    ]
    assert lives_total(rows, "b") == 9 + 4 + 7


def test_a_launch_joins_the_prediction_when_its_round_first_moves():
    """A fresh daemon that fetched round 41 6 s after its protocol started, one that trained from its
    own model, and a restart that resumed at round 15: each joins when its round moved; a launch whose
    round never moved, at its protocol start."""
    fetching = Member(
        Site(1, "x"), Home(Path("unused")), "a", launches=[0.0, 30.0, 60.0], learning=[4.0, 33.0, 62.0]
    )
    alone = Member(Site(2, "y"), Home(Path("unused")), "b", launches=[0.0], learning=[5.0])
    polls = [(1, t, r) for t, r in ((2, 0), (4, 0), (6, 0), (10, 41), (12, 42), (31, 15), (33, 15), (37, 16))]
    polls += [(1, 63, 20), (2, 4, 0), (2, 6, 0), (2, 8, 3)]
    rows = [{"time": t, "node": n, "round": r} for n, t, r in polls]
    plan = Plan(nodes=3, nat_nodes=0, random_nats=0, relays=0)
    assert starts(Measurement(plan, [fetching, alone], [], rows)) == {
        1: [Start(10, True), Start(37, True), Start(62.0, True)],
        2: [Start(8, False)],
    }


def test_bad_plans_are_refused_with_the_reason():
    for bad, words in (
        ({"nat_nodes": 24}, "exceed"),
        ({"random_nats": 9}, "random-nats"),
        ({"mbit": 0}, "mbit"),
        ({"hold": -1}, "hold"),
    ):
        with pytest.raises(ValueError, match=words):
            Plan(**bad)


def test_the_language_task_sets_the_target_direction_and_metric_column(tmp_path):
    """--task language: the workload's default target, lower is better, bits per byte in rounds.csv;
    digits keeps its accuracy target and column."""
    plan = testbed.plan_of(testbed.parser().parse_args(["--task", "language", *SMALL]))
    assert (plan.task, plan.target) == ("language", plan.workload.target)
    assert plan.workload.reached(2.5, plan.target) and not plan.workload.reached(3.0, 2.9)
    assert testbed.plan_of(testbed.parser().parse_args(SMALL)).target == 0.9
    with pytest.raises(SystemExit, match="target must be in"):
        testbed.plan_of(testbed.parser().parse_args(["--task", "language", "--target", "9"]))
    status = {
        "round": 3,
        "peers": [{"connection": "relayed"}],
        "bytes_out": {"a": 5},
        "bytes_in": {},
        "trained": {"rounds": 4, "seconds": 1.5},
        "liveness": {"loop_lag_s": 0.02},
    }
    write_rounds(tmp_path, [row(1.0, 2, status, 80.0, "bits_per_byte", 3.5)], "bits_per_byte")
    assert (tmp_path / "rounds.csv").read_text().splitlines() == [
        "time,node,round,bits_per_byte,peers,direct,relayed,bytes_out,bytes_in,trainings,training_s,rss_mb,"
        "loop_lag_s",
        "1.0,2,3,3.5,1,0,1,5,0,4,1.5,80.0,0.02",
    ]


@pytest.mark.slow
@needs_netns
def test_six_daemons_two_behind_nats_learn_and_the_simulator_predicts_the_run(tmp_path):
    # the target is reached in ~10 s (joiners fetch the bootstrap's model); the relayed link between the
    # two homes comes with the membership's next lookup (every 30 s) after the relay reservation
    proc = start_testbed(tmp_path, "--timeout", "150", "--target", "0.85", "--hold", "45", "--until-relayed")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    measured, predicted = doc["testbed"], doc["simulator"]
    assert measured["reached"] and measured["final_live"] == 6, output[-3000:]
    assert measured["exits"] == {"stopped": 6, "exit_0": 6, "other": []}
    assert measured["nursery_closed_errors"] == 0
    assert measured["relayed_links_most"] >= 1  # the port-randomising NAT's node stays relayed to the other
    assert measured["startup_seconds"]["learning"]["others_max"] > 0 and measured["rss_mb"]["max"] > 50
    assert predicted["time_to_target"] is not None and predicted["ratio"] > 0
    assert (tmp_path / "testbed_vs_simulator.png").stat().st_size > 10_000
    header, *rows = (tmp_path / "rounds.csv").read_text().splitlines()
    assert header.startswith("time,node,round,accuracy,peers,direct,relayed") and len(rows) > 12
    again = read_measurement(tmp_path)  # what --repredict reads: the run as it was measured
    assert len(again.rows) == len(rows) and all(m.learning for m in again.members)
    assert max(r["trainings"] for r in again.rows) > 0 and max(r["training_s"] for r in again.rows) > 0
    assert not leftovers(f"stb{proc.pid}_") and not daemons_of(tmp_path)


@pytest.mark.slow
@needs_netns
def test_ctrl_c_leaves_no_namespace_process_or_firewall_rule(tmp_path):
    rules_before = run([which("iptables-save")])
    proc = start_testbed(tmp_path, "--no-simulate")
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # bounded: the process is killed at the deadline below
        if "bootstrap daemon up" in line or time.monotonic() > deadline:
            break
    assert leftovers(f"stb{proc.pid}_"), "the testbed built no namespaces"
    time.sleep(3)  # the other daemons are starting
    assert daemons_of(tmp_path)
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL) if os.getpgid(proc.pid) == proc.pid else proc.kill()
    assert proc.returncode == 130, output
    assert "namespaces removed" in output
    assert not leftovers(f"stb{proc.pid}_")
    assert not daemons_of(tmp_path)
    assert run([which("iptables-save")]) == rules_before


@needs_netns
def test_teardown_also_removes_a_namespace_created_but_not_yet_recorded():
    """An interrupt between ``ip netns add`` and the lab's record of it left that namespace behind
    (seen when a grid run was stopped while building)."""
    lab = Namespaces(new_prefix("stbtest"))
    lab.add("a")
    run([which("ip"), "netns", "add", lab.prefix + "b"])  # as if interrupted before the record
    assert lab.close() == []
    assert not leftovers(lab.prefix)
