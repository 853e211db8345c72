"""Honest language daemons (DiLoCo outer step, top-k codec: tests/tiny_language.py's 2-bit values, and
every value on a grid, deflated, as the language scenario sends them) beside a hostile peer process
(tests/language_attacker.py) whose messages pass the codec's format but carry (a) an update inflated
to 1000 times an honest one's norm, then (b) NaN values in the wire tensors.

The honest daemons must stay alive, keep learning through both phases without being pushed back (no
poll shows a daemon's held-out bits per byte above where it stood when the attack began, plus a
margin), reach the target while the attacker runs or right after, and stay within a memory bound; the
NaN sender must be penalised, and no honest daemon blamed by another."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemons import ENV, Node, go, stop_all, swarm, wait_for
from tests.test_hostile import check_honest_links, rss
from tests.tiny_language import ENV as LANGUAGE_ENV
from tests.tiny_language import bits_per_byte

PHASES = ["inflate=9", "nan=6"]
TARGET = 3.0  # mean held-out bits per byte (8.2 at start)
PUSHED = 0.25  # bits per byte a daemon may stand above its level when the attack began
RSS_MARGIN = 150 * 2**20  # bytes an honest daemon's resident memory may grow during the attack


def rounds(nodes: list[Node]) -> list[int]:
    return [(n.status() or {}).get("round", -1) for n in nodes]


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "codec",
    [{}, {"SHOAL_CODEC_TOPK_BITS": "8", "SHOAL_CODEC_TOPK_GRID": "2.4", "SHOAL_CODEC_TOPK_FRACTION": "1.0"}],
    ids=["2bit-top20", "grid"],
)
def test_honest_language_daemons_outlast_inflated_and_nan_updates(tmp_path, codec):
    env = {**LANGUAGE_ENV, **codec}
    nodes = swarm(tmp_path, 3, env=env)
    attacker = None
    try:
        out = (tmp_path / "attacker.jsonl").open("w")
        attacker = subprocess.Popen(  # it imports while the swarm starts training, then waits for the go
            [sys.executable, str(Path(__file__).with_name("language_attacker.py")), "--config",
             str(nodes[0].home.config), "--bootstrap", nodes[0].address, "--phases", *PHASES,
             "--wait-for-go"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**ENV, **env},  # the same task, protocol and codec as the honest daemons'
        )  # fmt: skip
        wait_for(lambda: min(rounds(nodes)) >= 3, 90, "three rounds on every daemon", nodes)
        memory = [rss(n) for n in nodes]
        before = [bits_per_byte(n.status()) for n in nodes]
        go(attacker)
        worst = list(before)  # each daemon's highest bits per byte while attacked
        deadline = time.monotonic() + 60 + sum(float(p.partition("=")[2]) + 15 for p in PHASES)
        while attacker.poll() is None:
            assert time.monotonic() < deadline, "the attacker did not finish its phases"
            for i, node in enumerate(nodes):
                assert node.proc.poll() is None, f"daemon exited with {node.proc.returncode}:\n{node.log()}"
                worst[i] = max(worst[i], bits_per_byte(node.status()))
            time.sleep(0.5)
        log = (tmp_path / "attacker.jsonl").read_text()
        assert attacker.returncode == 0, log
        phases = events(tmp_path / "attacker.jsonl")
        starts = {e["phase"]: e for e in phases if "start" in e}
        ends = {e["phase"]: e for e in phases if "end" in e}
        assert set(starts) == set(ends) == {"inflate", "nan"}, log
        assert all(len(e["peers"]) == 3 for e in starts.values()), log  # it joined all three
        assert all(e["sent"] > 0 for e in ends.values()), log  # and sent its models

        wait_for(
            lambda: sum(bits_per_byte(n.status()) for n in nodes) / 3 <= TARGET,
            60,
            f"the honest daemons at {TARGET} bits per byte",
            nodes,
        )
        after = [bits_per_byte(n.status()) for n in nodes]
        growth = [rss(n) - m for n, m in zip(nodes, memory, strict=True)]
        shown = [n.status() for n in nodes]
        print(json.dumps({"before": before, "worst": worst, "after": after,
                          "rss_growth_mb": [round(g / 2**20) for g in growth],
                          "penalties": [s["penalties"] for s in shown],
                          "banned": [s["banned"] for s in shown],
                          "rejected": [s["rejected"] for s in shown], "attacker": ends}))  # fmt: skip
        for b, w, a in zip(before, worst, after, strict=True):
            assert w <= b + PUSHED and a < b, (before, worst, after)
        assert max(growth) < RSS_MARGIN, growth
        nan_sender = starts["nan"]["peer"]
        assert any(nan_sender in s["penalties"] or nan_sender in s["banned"] for s in shown), shown
        assert all(s["rejected"] > 0 for s in shown), [s["rejected"] for s in shown]
        check_honest_links(nodes)
        for node in nodes:
            assert "Traceback" not in node.full_log(), node.log()
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        stop_all(nodes)
