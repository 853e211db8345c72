"""The language demo's swarm (node/demo.py LANGUAGE) as real daemons: a byte-level transformer with
DiLoCo's outer step and the 2-bit top-k codec learns across 4 `shoal run` processes, and a daemon
SIGKILLed mid-run resumes from its checkpoint, outer momentum included, and catches up with the others.
The model is tests/tiny_language.py's (width 32), so the whole test fits in about 90 s on 2 cores."""

import argparse
import signal
import statistics
import time

import pytest

from shoal.node import checkpoint
from shoal.node.cli import build_parser
from shoal.node.demo import WORKLOADS
from tests.daemons import Node, stop_all, swarm, wait_for
from tests.tiny_language import ENV, bits_per_byte

TARGET = 2.9  # mean held-out bits per byte the others reach (8.2 at start)
CATCH_UP = 0.3  # the restarted daemon ends within this many bits per byte of the others' mean


def test_the_demo_help_states_each_workloads_default_target():
    """cli.py imports node.demo only when the demo runs: its help repeats the defaults, kept equal here."""
    (sub,) = (a for a in build_parser(run_flags=False)._actions if isinstance(a, argparse._SubParsersAction))
    demo = sub.choices["demo"]
    (target,) = (a for a in demo._actions if a.dest == "target")
    (task,) = (a for a in demo._actions if a.dest == "task")
    assert set(task.choices) == set(WORKLOADS)
    for name, workload in WORKLOADS.items():
        assert f"{name}: " in target.help and f"(default {workload.target:g})" in target.help


def rounds(nodes: list[Node]) -> list[int]:
    return [(n.status() or {}).get("round", -1) for n in nodes]


@pytest.mark.slow
def test_a_language_swarm_learns_and_a_killed_daemon_resumes_with_its_outer_momentum(tmp_path):
    nodes = swarm(tmp_path, 4, "checkpoint_every = 2\n", env=ENV)
    victim, others = nodes[3], nodes[:3]
    try:
        wait_for(
            lambda: min(rounds(nodes)) >= 4 and victim.home.checkpoint.exists(),
            90,
            "four rounds and the victim's checkpoint",
            nodes,
        )
        task = victim.status()["task"]
        victim.stop(signal.SIGKILL)
        saved = checkpoint.load(victim.home.checkpoint, task)
        assert saved is not None and saved.round >= 2
        # DiLoCo's momentum is saved beside the model: one buffer per floating-point tensor, same shapes
        floating = {n for n, t in saved.state.items() if t.is_floating_point()}
        assert saved.momentum and set(saved.momentum) == floating, sorted(saved.momentum)
        for name, m in saved.momentum.items():
            assert m.shape == saved.state[name].shape, name
        assert any(bool(m.abs().sum() > 0) for m in saved.momentum.values())

        victim.start()
        wait_for(lambda: victim.status() is not None, 60, "the restarted daemon's API", nodes)
        assert f"resuming from checkpoint at round {saved.round}" in victim.full_log()
        assert victim.status()["round"] >= saved.round  # resumed, not from round 0

        def caught_up() -> bool:
            mean = statistics.fmean(bits_per_byte(o.status()) for o in others)
            mine = bits_per_byte(victim.status())
            return mean <= TARGET and mine <= mean + CATCH_UP and victim.status()["round"] > saved.round + 2

        start = time.monotonic()
        what = f"the others at {TARGET} bits per byte and the victim within {CATCH_UP}"
        wait_for(caught_up, 90, what, nodes)
        print(
            f"reached after {time.monotonic() - start:.0f} s more: rounds {rounds(nodes)}, bits per byte "
            f"{[round(bits_per_byte(n.status()), 3) for n in nodes]}"
        )
        assert "Traceback" not in victim.full_log(), victim.log()
    finally:
        stop_all(nodes)
