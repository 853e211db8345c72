"""The scenario scripts (simulations/*): their outputs, arguments and help, reproducibility, and what each
shows (MoDeST against its baselines, compression, Byzantine sweeps)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from shoal.simulations import byzantine, churn, compression, disaster, modest, topologies


def start_script(module: str, out, *args: str, hashseed: str = "0") -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    return subprocess.Popen(
        [sys.executable, "-m", module, "--out", str(out), "--quiet", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen) -> None:
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]


@pytest.mark.slow
def test_same_seed_same_csv_bit_for_bit_and_other_seeds_differ(tmp_path):
    """The three runs are separate processes, started together (CI has two cores)."""
    small = ["--nodes", "8", "--duration", "20", "--eval-every", "5", "--topologies", "ba", "--loss", "0.1"]
    runs = [
        start_script("shoal.simulations.topologies", tmp_path / "a", *small, "--seed", "4", hashseed="1"),
        start_script("shoal.simulations.topologies", tmp_path / "b", *small, "--seed", "4", hashseed="2"),
        start_script("shoal.simulations.topologies", tmp_path / "c", *small, "--seed", "5", hashseed="1"),
    ]
    try:
        for proc in runs:
            finish(proc)
    finally:
        for proc in runs:
            proc.kill()
    a, b, c = ((tmp_path / d / "rounds.csv").read_bytes() for d in "abc")
    assert a == b
    assert a != c


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_scenario_scripts_write_their_three_outputs(tmp_path, capsys):
    tiny = ["--nodes", "12", "--duration", "20", "--eval-every", "5", "--quiet", "--seed", "3"]
    assert topologies.main([*tiny, "--out", str(tmp_path / "t"), "--topologies", "ring,complete"]) == 0
    assert churn.main([*tiny, "--out", str(tmp_path / "c"), "--churn-every", "5", "--crash-prob", "0.2"]) == 0
    assert disaster.main([*tiny, "--out", str(tmp_path / "d"), "--drop-at", "10", "--fraction", "0.25"]) == 0
    for name in "tcd":
        out = tmp_path / name
        assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
        rows = read_rows(out / "rounds.csv")
        assert list(rows[0]) == [
            "run",
            "time",
            "round",
            "alive",
            "consensus_distance",
            "bytes_sent",
            "accuracy_mean",
            "accuracy_min",
            "accuracy_max",
            "loss_mean",
            "loss_min",
            "loss_max",
        ]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["config"]["nodes"] == 12 and summary["results"]
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert set(summary["results"]) == {"none", "data", "relay", "hubs"}
    assert summary["scenario"]["runs"]["hubs"]["dropped"] == 3
    assert int(read_rows(tmp_path / "d" / "rounds.csv")[-1]["alive"]) == 9
    churned = [r for r in read_rows(tmp_path / "c" / "rounds.csv") if r["run"] == "churn"]
    assert min(int(r["alive"]) for r in churned) < 12
    assert "wrote" in capsys.readouterr().out


def test_bad_scenario_arguments_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="unknown topology"):
        topologies.main(["--topologies", "torus", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="nodes must be at least 2"):
        churn.main(["--nodes", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="fanout must be at least 1"):
        topologies.main(["--gossip-fanout", "0", "--out", str(tmp_path)])
    (tmp_path / "s.csv").write_text("10,crash,0 1\n20,explode,2\n")
    with pytest.raises(SystemExit, match=r"s\.csv:2"):
        churn.main(["--schedule", str(tmp_path / "s.csv"), "--out", str(tmp_path), "--quiet"])


@pytest.mark.parametrize(
    "module", ["topologies", "churn", "disaster", "vca_demo", "modest", "byzantine", "compression"]
)
def test_every_scenario_explains_itself(module, capsys):
    script = __import__(f"simulations.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--nodes", "--seed", "--out"))


def test_modest_scenario_compares_methods_and_survives_the_crash(tmp_path):
    out = tmp_path / "m"
    args = [
        "--nodes",
        "20",
        "--duration",
        "24",
        "--rounds",
        "20",
        "--modest-sample-size",
        "5",
        "--quiet",
        "--out",
        str(out),
    ]
    assert modest.main([*args, "--target", "0.3"]) == 0
    summary = json.loads((out / "summary.json").read_text())["results"]
    assert set(summary) == {"modest", "d-psgd", "fedavg", "modest-crash"}
    for method in ("modest", "d-psgd", "fedavg"):
        assert summary[method]["bytes_to_target"] > 0, method
    # MoDeST moves a sample per round, D-PSGD every node: fewer bytes to the same accuracy
    assert summary["modest"]["bytes_to_target"] < summary["d-psgd"]["bytes_to_target"]
    crash = [r for r in read_rows(out / "rounds.csv") if r["run"] == "modest-crash"]
    assert int(crash[-1]["alive"]) == 4 and float(crash[-1]["round"]) > float(crash[len(crash) // 2]["round"])
    for name in ("accuracy_by_round", "accuracy_by_bytes", "bytes_per_node", "crash"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_compression_scenario_reports_bytes_to_target_per_protocol_and_codec(tmp_path):
    out = tmp_path / "z"
    tiny = [
        "--nodes",
        "6",
        "--duration",
        "30",
        "--eval-every",
        "5",
        "--modest-sample-size",
        "3",
        "--target",
        "0.5",
    ]
    assert compression.main([*tiny, "--codecs", "int8,topk", "--quiet", "--out", str(out)]) == 0
    results = json.loads((out / "summary.json").read_text())["results"]
    assert set(results) == {"gossip", "modest"}
    for table in results.values():
        assert set(table) == {"fp32", "int8", "topk"}  # fp32 always runs: the reference
        assert table["fp32"]["bytes_to_target"] > 0 and table["fp32"]["bytes_to_target_vs_fp32"] == 1
        assert 0 < table["int8"]["bytes_to_target_vs_fp32"] < 0.3  # int8: about a quarter of the bytes
        assert all({"rounds_to_target", "final_accuracy_mean"} <= set(row) for row in table.values())
    for name in ("gossip", "modest"):
        assert (out / f"accuracy_by_bytes_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_byzantine_sweep_reports_honest_accuracy_per_cell(tmp_path):
    out = tmp_path / "b"
    args = ["--nodes", "10", "--duration", "6", "--eval-every", "3", "--fractions", "0,0.3", "--quiet"]
    sweep = [*args, "--task", "head", "--settings", "iid", "--integrators", "bristle,mean", "--out", str(out)]
    assert byzantine.main(sweep) == 0
    cells = json.loads((out / "summary.json").read_text())["results"]["honest_accuracy"]["sign-flip"]["iid"]
    assert set(cells) == {"bristle", "mean"} and set(cells["mean"]) == {"0.0", "0.3"}
    assert cells["mean"]["0.3"] < cells["mean"]["0.0"]  # sign-flipping attackers hurt plain averaging
    assert (out / "extractor.safetensors").exists() and (out / "byzantine_head_sign-flip_iid.png").exists()
    rows = read_rows(out / "rounds.csv")
    runs = {"sign-flip/iid/0%/bristle", "sign-flip/iid/0%/mean", "sign-flip/iid/30%/bristle"}
    assert runs | {"sign-flip/iid/30%/mean"} == {r["run"] for r in rows}


@pytest.mark.parametrize("protocol", ["gossip", "modest"])
def test_the_robust_default_holds_where_the_mean_falls(tmp_path, protocol):
    """The daemon's own task under sign-flipping peers (3 of 10, each also aggregating MoDeST's rounds
    when sampled), on either protocol: the clipped default keeps the honest nodes learning, VCA (the
    earlier default) does not."""
    out = tmp_path / protocol
    args = ["--nodes", "10", "--duration", "60", "--eval-every", "20", "--fractions", "0.3", "--quiet"]
    sweep = [
        *args,
        "--protocol",
        protocol,
        "--modest-sample-size",
        "5",
        "--integrators",
        "clipped,vca",
        "--out",
        str(out),
    ]
    assert byzantine.main(sweep) == 0
    cells = json.loads((out / "summary.json").read_text())["results"]["honest_accuracy"]["sign-flip"]["iid"]
    assert cells["clipped"]["0.3"] > 0.7 and cells["clipped"]["0.3"] > cells["vca"]["0.3"] + 0.3


@pytest.mark.parametrize("attack", ["label-flip", "noise", "alie", "stale"])
def test_every_attack_runs_in_the_sweep(tmp_path, attack):
    out = tmp_path / attack
    args = ["--nodes", "8", "--duration", "4", "--eval-every", "2", "--fractions", "0.25", "--quiet"]
    sweep = [*args, "--integrators", "clipped", "--attacks", attack, "--out", str(out)]
    assert byzantine.main(sweep) == 0
    cells = json.loads((out / "summary.json").read_text())["results"]["honest_accuracy"][attack]["iid"]
    assert 0.0 <= cells["clipped"]["0.25"] <= 1.0
