"""Real daemons on 127.0.0.1 against a hostile peer process (tests/hostile_peer.py), beside a clean swarm.

Each test runs two swarms of three `shoal run` daemons at once on the same machine: one clean, one
joined by an attacker that goes through its attack phases one after the other. Both swarms share the
CPU, so the clean one is the fair reference for accuracy and memory. For every phase the honest
daemons must stay alive and keep finishing rounds; at the end their accuracy must be within a few
points of the clean swarm's, their memory must have grown by less than a bound over the clean
swarm's growth, their logs must stay short, and their rounds must not have been moved far ahead.
Then all six daemons get SIGTERM at once, under traffic, and must exit 0 without a traceback; with
the ten daemons of tests/test_daemon.py stopped the same way that makes 22 such exits per run.

The two protocols' runs overlap (a module fixture starts both, each in a thread; each test waits for
its own run and raises what failed in it): the MoDeST swarms start once the gossip attacker is in its
last phases (CUE), so that their start-up and first rounds overlap the gossip run's end, and their
attack phases, which MoDeST's accuracy margin is sensitive to, do not overlap the gossip run's.

The gossip swarms run a user's task (examples/cnn_adamw.py: its own CNN, AdamW, data and evaluation,
through `shoal run --task`), whose models go through the same containment as the built-in task's; the
MoDeST swarms run the built-in task.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.overlay.config import P2PConfig
from tests.daemons import (
    ACCURACY,
    ENV,
    Node,
    Run,
    accuracies,
    at_once,
    go,
    sigterm_all,
    stop_all,
    swarms,
    wait_for,
)

PHASE_SECONDS = 5.0
ACCURACY_MARGIN = 0.02  # the attacked swarm's mean accuracy ends within 2 points of the clean one's
RSS_MARGIN = 100 * 2**20  # bytes of resident memory an attacked daemon may grow beyond a clean one
LOG_LINES = 400  # lines an attacked daemon may write in the whole test
# forge:sign-flip (gossip) and forge:noise (MoDeST) are participants whose every model is valid-looking
# poison: a scaled sign flip of the honest model, noise as the aggregate of the rounds it is sampled for
PHASES = {
    "gossip": ["forge:sign-flip=10", "huge", "far-rounds", "garbage", "flood", "trickle", "metadata"],
    "modest": ["forge:noise=15", "far-rounds", "hijack", "huge", "garbage", "flood"],
}
# the gossip attacker's phase from which its run has ~25 s left: about what the MoDeST swarms need to
# start and finish 3 rounds, so the MoDeST run starts then (it waits for the run before it only)
CUE = {"gossip": "garbage"}
# MoDeST: a sample of 2 of the 3 or 4 members, so that the attacker is sampled, and aggregates, often
SETTINGS = {
    "gossip": {
        "SHOAL_TASK": "cnn_adamw:make_task",
        "PYTHONPATH": str(Path(__file__).parents[1] / "examples"),
    },
    # top-k: the attacker's models, and its garbage, go through the codec as its victims' do
    "modest": {"SHOAL_PROTOCOL": "modest", "SHOAL_MODEST_SAMPLE_SIZE": "2", "SHOAL_CODEC_NAME": "topk"},
}


def rss(node: Node) -> int:
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def rounds(nodes: list[Node]) -> list[int]:
    return [(n.status() or {}).get("round", -1) for n in nodes]


def check_honest_links(nodes: list[Node]) -> None:
    """Every honest daemon still has the others as peers and holds nothing against any of them."""
    ids = {n.peer for n in nodes}
    for node in nodes:
        shown = node.status() or {}
        peers = {p["peer"] for p in shown.get("peers", [])}
        assert ids - {node.peer} <= peers, f"{node.peer} lost honest peers: {sorted(peers)}"
        blamed = ids & set(shown.get("penalties", {}))
        assert not blamed, f"{node.peer} holds penalties against honest peers {blamed}"


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    yield from at_once(request, tmp_path_factory, "test_honest_daemons_outlast_a_hostile_peer", outlast)


@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.parametrize("protocol", ["gossip", "modest"])
def test_honest_daemons_outlast_a_hostile_peer(runs, request, protocol):
    runs[request.node.callspec.id].result()


def outlast(run: Run, tmp_path: Path, protocol: str) -> None:
    if run.previous is not None:
        run.previous.cue.wait(600)
    env = SETTINGS[protocol]
    clean, attacked = swarms([tmp_path / "clean", tmp_path / "attacked"], 3, env=env)
    everyone = clean + attacked
    run.nodes += everyone
    attacker = None
    try:
        out = (tmp_path / "attacker.jsonl").open("w")
        attacker = subprocess.Popen(  # it imports while the swarms start training, then waits for the go
            [sys.executable, str(Path(__file__).with_name("hostile_peer.py")), "--config",
             str(attacked[0].home.config), "--bootstrap", attacked[0].address, "--phases",
             *PHASES[protocol], "--seconds", str(PHASE_SECONDS), "--wait-for-go"],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**ENV, **env},  # the same task as the attacked swarm's
        )  # fmt: skip
        run.procs.append(attacker)
        wait_for(lambda: min(rounds(everyone)) >= 3, 180, "both swarms training", everyone)
        memory = {id(n): rss(n) for n in everyone}
        go(attacker)
        reached: dict[str, list[int]] = {}  # phase -> rounds of the attacked daemons when it began
        deadline = time.monotonic() + 120 + len(PHASES[protocol]) * (PHASE_SECONDS + 10)

        def follow() -> None:
            """Check the honest daemons through each phase the attacker reported since the last look."""
            for line in (tmp_path / "attacker.jsonl").read_text().splitlines():
                event = json.loads(line) if line.startswith("{") else {}
                if "start" in event and event["phase"] not in reached:
                    assert len(event["peers"]) == 3, f"the attacker did not join: {event}"
                    reached[event["phase"]] = rounds(attacked)
                    if event["phase"] == CUE.get(protocol):
                        run.cue.set()
                elif "end" in event and "ended " + event["phase"] not in reached:
                    if event["phase"].startswith("forge:"):  # it took part: sampled, it sent models
                        assert event["sent"] > 0, event
                    before = reached[event["phase"]]
                    wait_for(
                        lambda b=before: all(r > s for r, s in zip(rounds(attacked), b, strict=True)),
                        30,
                        f"rounds to go on through the {event['phase']!r} attack",
                        attacked,
                    )
                    reached["ended " + event["phase"]] = rounds(attacked)
                    check_honest_links(attacked)

        while attacker.poll() is None:
            assert time.monotonic() < deadline, "the attacker did not finish its phases"
            for node in everyone:
                assert node.proc.poll() is None, f"daemon exited with {node.proc.returncode}:\n{node.log()}"
            follow()
            time.sleep(0.5)
        follow()  # the phases that ended while we waited for rounds
        log = (tmp_path / "attacker.jsonl").read_text()
        assert attacker.returncode == 0, log
        assert all(p.partition("=")[0] in reached for p in PHASES[protocol]), log

        final_clean, final_attacked = accuracies(clean), accuracies(attacked)
        mean = sum(final_clean) / 3
        growth = [rss(n) - memory[id(n)] for n in everyone]
        report = {"protocol": protocol, "rounds": reached, "accuracy": [final_clean, final_attacked],
                  "rss_growth_mb": [round(g / 2**20) for g in growth],
                  "log_lines": [len(n.full_log().splitlines()) for n in attacked]}  # fmt: skip
        run.report.append(json.dumps(report))
        assert min(final_clean) >= ACCURACY, final_clean
        assert sum(final_attacked) / 3 >= mean - ACCURACY_MARGIN, (final_clean, final_attacked)
        check_honest_links(clean)  # a clean swarm at full speed never blames its own
        check_honest_links(attacked)
        for node in clean:  # nor comes near the rate limit: far below it
            assert node.status()["peak_rate"] <= P2PConfig().message_rate / 4, node.status()
        clean_growth = max(rss(n) - memory[id(n)] for n in clean)
        for node in attacked:
            assert rss(node) - memory[id(node)] < clean_growth + RSS_MARGIN, node.log()
            assert len(node.full_log().splitlines()) < LOG_LINES, node.log()
            shown = node.status()
            assert shown["round"] < 10**6 and shown["rejected"] > 0, shown
            assert {m.peer for m in attacked} <= set(shown["members"]), shown["members"]
        sigterm_all(everyone)
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        stop_all(everyone)
