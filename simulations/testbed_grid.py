"""The prediction grid: the testbed and the simulator's prediction of it across scenarios, not the one
the prediction was developed on.

    sudo python -m shoal.simulations.testbed --grid --out out/grid              # 48 cells x 3 runs
    sudo python -m shoal.simulations.testbed --grid --repeats 1 --out out/grid  # each cell once

A cell is one combination of :data:`NODES` daemons (a third of them behind NATs), churn or not, links
capped at each of :data:`MBIT` Mbit/s, each :data:`LOSS` and both protocols; what the testbed's other
options set (target, timeout, churn times, seed) the cells share. The grid runs repeat by repeat (every
cell once before any cell twice), so a grid cut short still covers the scenarios. Run ``k`` of a cell
lives in ``--out/<cell>/run<k>``; a run whose ``summary.json`` exists is not run again, so the same
command resumes an interrupted grid, and ``--repredict`` predicts its runs anew from what they recorded.
After every run ``grid.csv`` (a row per run: measured and predicted times to target and final
accuracies, the prediction's inputs, the daemons' median loop lag) and ``grid.md`` (the times, a row
per swarm, a column per network and protocol, each run marked where it does not agree within
:data:`TOLERANCE` and :data:`POINTS`) are rewritten.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from shoal.learning.settings import PROTOCOLS
from shoal.overlay.atomic import write_atomic
from shoal.simulations import prediction
from shoal.simulations.testbed_network import Plan
from shoal.simulations.testbed_record import read_measurement, write_csv

NODES = (6, 12, 24)
MBIT = (10.0, 2.0)
LOSS = (0.0, 0.02)
TOLERANCE = 0.25  # the predicted time to target within this share of the measured one ...
POINTS = 0.02  # ... and the final mean accuracy within this many points
COLUMNS = (
    "cell",
    "run",
    "measured_s",
    "predicted_s",
    "ratio",
    "measured_final",
    "predicted_final",
    "degree",
    "speed_median",
    "joiners_from_scratch",
    "duration_s",
    "loop_lag_s",
)


def cell_plan(base: Plan, nodes: int, churn: bool, mbit: float, loss: float, protocol: str) -> Plan:
    """``base`` as one cell: a third of the nodes behind NATs, two to a home, at most ``base``'s
    port-randomising NATs."""
    nat = nodes // 3
    homes = -(-nat // base.per_home)
    return dataclasses.replace(
        base,
        nodes=nodes,
        nat_nodes=nat,
        random_nats=min(base.random_nats, homes),
        churn=churn,
        mbit=mbit,
        loss=loss,
        protocol=protocol,
    )


def cells(base: Plan) -> list[Plan]:
    return [
        cell_plan(base, *combination)
        for combination in itertools.product(NODES, (False, True), MBIT, LOSS, PROTOCOLS)
    ]


def cell_name(plan: Plan) -> str:
    churn = "churn" if plan.churn else "steady"
    return f"{plan.nodes}n-{churn}-{plan.mbit:g}mbit-loss{plan.loss:g}-{plan.protocol}"


def run_dirs(out: Path, plans: list[Plan], repeats: int) -> Iterator[tuple[Plan, int, Path]]:
    """Each run's plan, number and folder, repeat by repeat (every cell once before any cell twice)."""
    for k, plan in itertools.product(range(1, repeats + 1), plans):
        yield plan, k, out / cell_name(plan) / f"run{k}"


def run_row(cell: str, run: int, summary: dict) -> dict:
    """A finished run's figures (``summary.json``'s)."""
    measured, predicted = summary["testbed"], summary["simulator"]
    model = predicted["model"]
    return {
        "cell": cell,
        "run": run,
        "measured_s": measured["time_to_target"],
        "predicted_s": predicted["time_to_target"],
        "ratio": predicted["ratio"],
        "measured_final": measured["final_accuracy_mean"],
        "predicted_final": predicted["final_accuracy_mean"],
        "degree": model["degree"],
        "speed_median": model["speeds_samples_per_s"]["median"],
        "joiners_from_scratch": model["joiners_from_scratch"],
        "duration_s": measured["duration"],
        "loop_lag_s": (measured.get("loop_lag_s") or {}).get("median"),  # runs before it was recorded: none
    }


def agrees(row: dict) -> bool:
    """Both sides reach the target within TOLERANCE of each other, or neither does; final accuracies
    within POINTS."""
    measured, predicted = row["measured_s"], row["predicted_s"]
    final = (
        row["measured_final"] is not None and abs(row["measured_final"] - row["predicted_final"]) <= POINTS
    )
    if measured is None or predicted is None:
        return final and measured is predicted
    return final and abs(predicted / measured - 1) <= TOLERANCE


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}"


def table(rows: list[dict], repeats: int) -> str:
    """``grid.md``: a row per swarm (nodes, churn), a column per network and protocol; in each cell every
    run's measured / predicted time to target, marked where the run does not agree."""
    runs = {r["cell"]: [] for r in rows}
    for r in rows:
        runs[r["cell"]].append(r)
    columns = list(itertools.product(MBIT, LOSS, PROTOCOLS))
    lines = [
        f"Seconds to the target, measured / predicted, each run (of {repeats}); ✗: the prediction is not "
        f"within {TOLERANCE:.0%} of the measured time, or its final accuracy not within {POINTS * 100:g} "
        "points (never / never agrees: neither side reached the target). Final accuracies: grid.csv.",
        "",
        "| nodes | " + " | ".join(f"{m:g} Mbit/s, {x:.0%} loss, {p}" for m, x, p in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for nodes, churn in itertools.product(NODES, (False, True)):
        cells = []
        for mbit, loss, protocol in columns:
            name = cell_name(cell_plan(Plan(), nodes, churn, mbit, loss, protocol))
            done = runs.get(name, [])
            cells.append(
                ", ".join(
                    f"{seconds(r['measured_s'])} / {seconds(r['predicted_s'])}" + ("" if agrees(r) else " ✗")
                    for r in done
                )
                or "not run"
            )
        lines.append(f"| {nodes}{', churn' if churn else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, plans: list[Plan], repeats: int) -> list[dict]:
    """``grid.csv`` and ``grid.md`` from every finished run in ``out``; the rows."""
    rows = [
        run_row(cell_name(plan), k, json.loads((where / "summary.json").read_text()))
        for plan, k, where in sorted(run_dirs(out, plans, repeats), key=lambda run: plans.index(run[0]))
        if (where / "summary.json").exists()
    ]
    write_csv(out / "grid.csv", COLUMNS, rows)
    write_atomic(out / "grid.md", table(rows, repeats))
    return rows


def repredict(base: Plan, out: Path, repeats: int) -> int:
    """Predict every finished run of the grid anew from what it recorded (after a change to the
    simulator), rewriting its ``summary.json``'s prediction and the tables; no daemon runs."""
    plans = cells(base)
    for plan, k, where in run_dirs(out, plans, repeats):
        if (where / "summary.json").exists():
            print(f"grid: predicting {cell_name(plan)}, run {k} again", flush=True)
            doc = json.loads((where / "summary.json").read_text())
            doc["simulator"] = prediction.predict_and_compare(read_measurement(where), where)
            write_atomic(where / "summary.json", json.dumps(doc, indent=2) + "\n")
    rows = write_tables(out, plans, repeats)
    return 0 if rows and all(map(agrees, rows)) else 1


def run_grid(base: Plan, out: Path, repeats: int, run: Callable[[Plan, Path, bool], dict]) -> int:
    """Every cell ``repeats`` times with ``run`` (the testbed's), skipping finished runs; 0 when every cell
    agrees."""
    if repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    plans = cells(base)
    for plan, k, where in run_dirs(out, plans, repeats):
        if not (where / "summary.json").exists():
            print(f"grid: {cell_name(plan)}, run {k} of {repeats}", flush=True)
            run(plan, where, True)
            write_tables(out, plans, repeats)
    rows = write_tables(out, plans, repeats)
    print(f"wrote {out}/grid.md and grid.csv", flush=True)
    return 0 if len(rows) == len(plans) * repeats and all(map(agrees, rows)) else 1
