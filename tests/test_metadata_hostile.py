"""Real daemons on 127.0.0.1 against a process attacking the metadata document and the dial-back service
(tests/metadata_attacker.py), beside a clean swarm: built like tests/test_hostile.py.

Two swarms of three `shoal run` daemons run side by side, one clean and one attacked; both use 60-second
metadata epochs, so the document may start afresh while the attack goes on. The attacker's
phases: junk keys up to the old 2 MiB bound, a flood of large junk updates on the task's topic (from
several identities and 200 made-up origins), 1,200 validly signed fake members (more than the 1,000-slot
cap) followed by an honest newcomer, and a dial-back flood. Through every phase the attacked daemons must
stay alive and finish rounds, keep their two honest peers as task peers and all three honest members
(and, after the sybils, the newcomer) in /status "members"; no honest peer may be penalised, every
identity that sent wrong input must be banned (five penalties), the one that sent only valid records
not. At the end: accuracy within 2 points of the clean swarm, resident memory grown less than 100 MB
beyond the clean swarm's growth, at most 3 x 8 dial-backs at once, and all six exit 0 on SIGTERM.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.overlay.nat import MAX_DIALBACKS
from tests.daemons import ACCURACY, ENV, accuracies, go, sigterm_all, stop_all, swarms, wait_for

PHASES = ["junk-keys", "flood", "sybils", "dialback"]
WRONG = {"junk-keys", "flood", "dialback"}  # phases whose every identity sends wrong input
PHASE_SECONDS = 7.0
ACCURACY_MARGIN = 0.02
EPOCH = {"SHOAL_METADATA_EPOCH": "60"}
RSS_MARGIN = 100 * 2**20  # bytes of resident memory an attacked daemon may grow beyond a clean one


def rss(node) -> int:
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def rounds(nodes: list) -> list[int]:
    return [(n.status() or {}).get("round", -1) for n in nodes]


def status(node) -> dict:
    return node.status() or {}


@pytest.mark.slow
def test_honest_daemons_keep_their_metadata_against_a_hostile_peer(tmp_path):
    clean, attacked = swarms([tmp_path / "clean", tmp_path / "attacked"], 3, env=EPOCH)
    everyone = clean + attacked
    honest = {n.peer for n in attacked}
    attacker = None
    try:
        out = (tmp_path / "attacker.jsonl").open("w")
        attacker = subprocess.Popen(  # it imports while the swarms start training, then waits for the go
            [sys.executable, str(Path(__file__).with_name("metadata_attacker.py")), "--config",
             str(attacked[0].home.config), "--bootstrap", attacked[0].address, "--phases", *PHASES,
             "--seconds", str(PHASE_SECONDS), "--wait-for-go"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**ENV, **EPOCH},
        )  # fmt: skip
        wait_for(lambda: min(rounds(everyone)) >= 2, 180, "both swarms training", everyone)
        memory = {id(n): rss(n) for n in everyone}
        go(attacker)
        events: dict[str, dict] = {}
        reached: dict[str, list[int]] = {}
        deadline = time.monotonic() + 60 + len(PHASES) * (PHASE_SECONDS + 30)
        while attacker.poll() is None or len(events) < 2 * len(PHASES):
            assert time.monotonic() < deadline, "the attacker did not finish its phases"
            for node in everyone:
                assert node.proc.poll() is None, f"daemon exited with {node.proc.returncode}:\n{node.log()}"
            for line in (tmp_path / "attacker.jsonl").read_text().splitlines():
                event = json.loads(line) if line.startswith("{") else {}
                key = ("end " if "end" in event else "start ") + event.get("phase", "")
                if "phase" not in event or key in events:
                    continue
                events[key] = event
                if "start" in event:
                    assert len(event["peers"]) == 3, f"the attacker did not join: {event}"
                    reached[event["phase"]] = rounds(attacked)
                else:
                    check_phase(event, attacked, honest, reached[event["phase"]])
            if attacker.poll() is not None and len(events) < 2 * len(PHASES):
                break
            time.sleep(0.5)
        log = (tmp_path / "attacker.jsonl").read_text()
        assert attacker.wait() == 0, log
        assert len(events) == 2 * len(PHASES), log

        final_clean, final_attacked = accuracies(clean), accuracies(attacked)
        growth = [rss(n) - memory[id(n)] for n in everyone]
        print(json.dumps({"accuracy": [final_clean, final_attacked], "rounds": reached,
                          "rss_growth_mb": [round(g / 2**20) for g in growth],
                          "sent": {p: events["end " + p]["sent"] for p in PHASES},
                          "dialback_peak": events["end dialback"].get("peak"),
                          "log_lines": [len(n.full_log().splitlines()) for n in attacked]}))  # fmt: skip
        # the swarms' means: a node's accuracy moves by a point or two from one round to the next
        mean_clean, mean_attacked = sum(final_clean) / 3, sum(final_attacked) / 3
        assert min(final_clean + final_attacked) >= ACCURACY, (final_clean, final_attacked)
        assert mean_attacked >= mean_clean - ACCURACY_MARGIN, (final_clean, final_attacked)
        clean_growth = max(rss(n) - memory[id(n)] for n in clean)
        for node in attacked:
            assert rss(node) - memory[id(node)] < clean_growth + RSS_MARGIN, node.log()
        assert events["end dialback"].get("peak", 0) <= len(attacked) * MAX_DIALBACKS, events["end dialback"]
        for node in clean:
            assert not status(node).get("penalties"), status(node)
        sigterm_all(everyone)
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        stop_all(everyone)


def check_phase(event: dict, attacked: list, honest: set[str], before: list[int]) -> None:
    """What must hold for the attacked daemons once a phase is over."""
    phase = event["phase"]
    wait_for(
        lambda: all(r > s for r, s in zip(rounds(attacked), before, strict=True)),
        30,
        f"rounds to go on through the {phase!r} attack",
        attacked,
    )
    newcomer = event.get("newcomer")

    def settled() -> bool:
        shown = [status(node) for node in attacked]
        return all(
            honest - {node.peer} <= {p["peer"] for p in s.get("peers", [])}
            and honest <= set(s.get("members", []))
            and (newcomer is None or newcomer in s.get("members", []))
            for node, s in zip(attacked, shown, strict=True)
        )

    wait_for(settled, 30, f"honest peers and members after the {phase!r} attack", attacked)
    for node in attacked:
        penalties = status(node).get("penalties", {})
        assert not honest & set(penalties), (phase, penalties)
        if phase in WRONG:  # its first identity attacks from the start: banned (later ones may be cut short)
            assert penalties.get(event["identities"][0], 0) >= 5, (phase, event, penalties)
        else:  # valid records, within the rates: never blamed
            assert not set(event["identities"]) & set(penalties), (phase, penalties)
