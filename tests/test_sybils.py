"""Real daemons on 127.0.0.1 against many identities at once (tests/sybil_attacker.py), beside a clean swarm.

Measured before the peer set's rules (overlay/peerset.py), with default settings: ~35 fresh identities
joining one victim's task and sending it stale models left the victim 0-1 honest peers while they held
up to 70 of its connection slots, and pushed every honest daemon's accuracy down to 0.09-0.34 while it
lasted. Here two swarms of three `shoal run` daemons share the machine, one clean, one whose first
daemon (the victim, everyone's bootstrap node) is flooded; the victim must keep both honest peers at
every poll, every honest daemon must stay alive and keep finishing rounds, memory must stay within the
bound of tests/test_hostile.py, and no honest peer may be penalised or banned for what the sybils did.
"""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.learning.settings import ProtocolSettings
from tests.daemons import ENV, Node, accuracies, go, peers_of, sigterm_all, stop_all, swarms, wait_for
from tests.test_hostile import ACCURACY_MARGIN, RSS_MARGIN, rounds, rss

IDENTITIES = 35
ATTACK_SECONDS = 15.0
# the default integrator (robust; tests/test_daemon.py's configuration names vca, to compare with the
# measurements of earlier releases), in both swarms and in the attacker's configuration alike
SETTINGS = {"SHOAL_INTEGRATOR": ProtocolSettings().integrator}
WRONG = ("flood", "malformed", "refused by protocol", "implausible")  # kinds that count as penalties


def penalised(node: Node, peers: set[str]) -> list[str]:
    """Log lines where ``node`` banned one of ``peers`` or counted wrong input against it."""
    out = []
    for line in node.full_log().splitlines():
        if any(p in line for p in peers) and (
            "banning" in line or ("rejected" in line and any(kind in line for kind in WRONG))
        ):
            out.append(line)
    return out


@pytest.mark.slow
def test_a_victim_flooded_by_sybils_keeps_its_honest_peers_and_its_swarm_keeps_learning(tmp_path):
    clean, attacked = swarms([tmp_path / "clean", tmp_path / "attacked"], 3, env=SETTINGS)
    everyone = clean + attacked
    victim, honest = attacked[0], {n.peer for n in attacked[1:]}
    attacker = None
    try:
        out = tmp_path / "attacker.jsonl"
        attacker = subprocess.Popen(  # it imports while the swarms start training, then waits for the go
            [sys.executable, str(Path(__file__).with_name("sybil_attacker.py")), "--config",
             str(victim.home.config), "--bootstrap", victim.address, "--victim", victim.peer,
             "--identities", str(IDENTITIES), "--seconds", str(ATTACK_SECONDS), "--wait-for-go"],
            stdin=subprocess.PIPE,
            stdout=out.open("w"),
            stderr=subprocess.STDOUT,
            env={**ENV, **SETTINGS},
        )  # fmt: skip
        wait_for(
            lambda: min(rounds(everyone)) >= 3 and honest <= peers_of(victim),
            180,
            "both swarms training, the victim with both honest peers",
            everyone,
        )
        memory = {id(n): rss(n) for n in everyone}
        peak = dict(memory)
        go(attacker)
        wait_for(lambda: '"started"' in out.read_text(), 90, "the sybils to join", everyone)
        before = rounds(attacked)
        lost, most, low, series, start = [], 0, {"clean": 1.0, "attacked": 1.0}, [], time.monotonic()
        deadline = time.monotonic() + ATTACK_SECONDS + 60
        while attacker.poll() is None:
            assert time.monotonic() < deadline, "the attacker did not stop"
            for node in everyone:
                assert node.proc.poll() is None, f"daemon exited with {node.proc.returncode}:\n{node.log()}"
                peak[id(node)] = max(peak[id(node)], rss(node))
            shown = victim.status() or {}
            held = {p["peer"] for p in shown.get("peers", [])}
            most = max(most, len(held))
            if not honest <= held:
                lost.append(sorted(honest - held))
            now = {"clean": accuracies(clean), "attacked": accuracies(attacked)}
            for name, values in now.items():
                low[name] = min(low[name], sum(values) / 3)
            if time.monotonic() - start >= 5 * len(series):  # victim, its honest peers, the clean swarm
                series.append([round(v, 2) for v in (*now["attacked"], *now["clean"])])
            time.sleep(0.5)
        log = out.read_text()
        assert attacker.returncode == 0, log
        events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        final = {"clean": accuracies(clean), "attacked": accuracies(attacked)}
        report = {
            "sybils held by the victim (their view, each 5 s)": [e["peers"] for e in events if "peers" in e],
            "victim's task peers at most": most,
            "models sent": next(e["end"] for e in events if "end" in e),
            "rounds during the attack": [a - b for a, b in zip(rounds(attacked), before, strict=True)],
            "lowest mean accuracy during the attack": low,
            "accuracy every 5 s (victim, its 2 honest peers, the 3 clean daemons)": series,
            "accuracy at the end": final,
            "peak rss growth MB": [round((peak[id(n)] - memory[id(n)]) / 2**20) for n in everyone],
            "victim log lines": len(victim.full_log().splitlines()),
            "victim refusals logged": len(re.findall(r"peer set: refusing", victim.full_log())),
        }
        print(json.dumps(report, indent=1))
        assert not lost, f"the victim lost honest peers during the attack: {lost[:5]}\n{victim.log()}"
        assert most <= 32  # peers_high
        mean = {name: sum(values) / 3 for name, values in final.items()}
        assert mean["attacked"] >= mean["clean"] - ACCURACY_MARGIN, final
        wait_for(
            lambda: all(r > b for r, b in zip(rounds(attacked), before, strict=True)),
            30,
            "the attacked swarm's rounds to advance",
            attacked,
        )
        clean_growth = max(peak[id(n)] - memory[id(n)] for n in clean)
        for node in attacked:
            assert peak[id(node)] - memory[id(node)] < clean_growth + RSS_MARGIN, node.log()
            assert not penalised(node, {n.peer for n in attacked} - {node.peer}), penalised(node, honest)
        sigterm_all(everyone)
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        stop_all(everyone)
