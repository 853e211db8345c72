"""The testbed's prediction grid and what its prediction takes from a MoDeST run: the cells, the table,
resuming a grid, and predicting a recorded run anew (no daemon runs here: tests/test_testbed.py runs
real ones)."""

import dataclasses
import json
from pathlib import Path

import pytest

from shoal.node.home import Home
from shoal.simulations import testbed_grid
from shoal.simulations.prediction import Start, starts, training_seconds
from shoal.simulations.testbed_network import Plan, Site
from shoal.simulations.testbed_record import Measurement, Member, read_measurement, summarize, write_rounds


def test_the_grid_covers_every_combination_with_valid_plans():
    plans = testbed_grid.cells(Plan())
    names = {testbed_grid.cell_name(p) for p in plans}
    assert len(plans) == len(names) == 3 * 2 * 2 * 2 * 2
    small = next(p for p in plans if p.nodes == 6 and p.churn and p.protocol == "modest")
    assert (small.nat_nodes, small.homes, small.random_nats) == (2, 1, 1)
    assert small.workload.protocol["modest_sample_size"] == 3  # half the swarm
    assert Plan(protocol="modest").workload.protocol["modest_sample_size"] == 10  # the daemon's default
    assert Plan().workload.protocol["protocol"] == "gossip"
    with pytest.raises(ValueError, match="modest runs the digits task"):
        Plan(protocol="modest", task="language")


def summary(measured: float | None, predicted: float | None, final: float = 0.92) -> dict:
    model = {"degree": 3, "speeds_samples_per_s": {"median": 300}, "joiners_from_scratch": 0}
    return {
        "testbed": {"time_to_target": measured, "final_accuracy_mean": 0.92, "duration": 60.0},
        "simulator": {
            "time_to_target": predicted,
            "ratio": predicted / measured if predicted and measured else None,
            "final_accuracy_mean": final,
            "model": model,
        },
    }


def test_a_run_agrees_within_a_quarter_and_two_points_or_when_neither_side_reaches():
    row = lambda *args: testbed_grid.run_row("c", 1, summary(*args))  # noqa: E731
    assert testbed_grid.agrees(row(40.0, 49.0))
    assert not testbed_grid.agrees(row(40.0, 51.0))  # 27.5% late
    assert not testbed_grid.agrees(row(40.0, 40.0, 0.95))  # 3 points apart
    assert testbed_grid.agrees(row(None, None))
    assert not testbed_grid.agrees(row(40.0, None)) and not testbed_grid.agrees(row(None, 40.0))


def test_the_grid_resumes_its_runs_and_writes_one_table(tmp_path, monkeypatch):
    monkeypatch.setattr(testbed_grid, "NODES", (6,))
    monkeypatch.setattr(testbed_grid, "MBIT", (10.0,))
    monkeypatch.setattr(testbed_grid, "LOSS", (0.0,))
    ran, calls = [], []

    def fake_run(plan: Plan, where: Path, simulate: bool) -> dict:
        ran.append((testbed_grid.cell_name(plan), where.name))
        calls.append(where)
        if len(calls) == 3:  # the third run is interrupted
            raise RuntimeError("interrupted")
        doc = summary(40.0, 44.0 if plan.protocol == "gossip" else None)
        where.mkdir(parents=True)
        (where / "summary.json").write_text(json.dumps(doc))
        return doc

    with pytest.raises(RuntimeError, match="interrupted"):
        testbed_grid.run_grid(Plan(), tmp_path, 2, fake_run)
    assert ran == [  # repeat by repeat: every cell once before any twice
        ("6n-steady-10mbit-loss0-gossip", "run1"),
        ("6n-steady-10mbit-loss0-modest", "run1"),
        ("6n-churn-10mbit-loss0-gossip", "run1"),
    ]
    ran.clear()
    assert testbed_grid.run_grid(Plan(), tmp_path, 2, fake_run) == 1  # the modest cells never agree
    assert ran[0] == ("6n-churn-10mbit-loss0-gossip", "run1") and len(ran) == 6  # only what was missing
    *_, header, _, steady, churn = (tmp_path / "grid.md").read_text().splitlines()
    assert header == "| nodes | 10 Mbit/s, 0% loss, gossip | 10 Mbit/s, 0% loss, modest |"
    assert steady == "| 6 | 40 / 44, 40 / 44 | 40 / never ✗, 40 / never ✗ |"
    assert churn == "| 6, churn | 40 / 44, 40 / 44 | 40 / never ✗, 40 / never ✗ |"
    assert len((tmp_path / "grid.csv").read_text().splitlines()) == 1 + 4 * 2


def test_a_recorded_run_reads_back_as_it_was_measured(tmp_path):
    plan = Plan(nodes=2, nat_nodes=0, random_nats=0, relays=1, protocol="modest")
    sites = [Site(0, "198.51.100.10", relay=True), Site(1, "198.51.100.11")]
    members = [
        Member(site, Home(tmp_path / f"node{site.index}"), "p", launches=[0.0], up=[2.0], learning=[2.5])
        for site in sites
    ]
    rows = [
        {"time": 4.0, "node": n, "round": 2, "accuracy": acc, "peers": 1, "direct": 1, "relayed": 0,
         "bytes_out": 9, "bytes_in": 8, "trainings": 2, "training_s": 0.5, "rss_mb": 300.0, "loop_lag_s": lag}
        for n, acc, lag in ((0, 0.5, 0.01), (1, None, 0.3))
    ]  # fmt: skip
    measured = Measurement(plan, members, [], rows, end=6.0, live_at_end=2, first_reach=None)
    write_rounds(tmp_path, rows)
    doc = {"plan": dataclasses.asdict(plan), "events": [], "testbed": summarize(measured)}
    assert doc["testbed"]["loop_lag_s"] == {"median": 0.155, "p90": 0.3}
    (tmp_path / "summary.json").write_text(json.dumps(doc))
    again = read_measurement(tmp_path)
    assert again.rows == rows and again.plan == plan and again.end == 6.0
    assert [(m.launches, m.up, m.learning) for m in again.members] == [([0.0], [2.0], [2.5])] * 2


def test_modest_joiners_start_with_their_protocol_at_their_training_speed():
    """A MoDeST node's round moves with the sample's rounds: it joins the prediction when its protocol
    started, at the speed its own trainings took (summed over a restart)."""
    member = Member(Site(1, "x"), Home(Path("unused")), "a", launches=[0.0, 30.0], learning=[4.0, 33.0])
    rows = [
        {"time": t, "node": 1, "round": r, "trainings": n, "training_s": s}
        for t, r, n, s in ((6, 0, 0, 0.0), (20, 7, 4, 2.0), (35, 9, 1, 1.0), (40, 12, 3, 2.0))
    ]
    plan = Plan(nodes=2, nat_nodes=0, random_nats=0, relays=0, protocol="modest")
    assert starts(Measurement(plan, [member], [], rows)) == {1: [Start(4.0, True), Start(33.0, True)]}
    assert training_seconds(rows) == {1: (2.0 + 2.0) / (4 + 3)}
