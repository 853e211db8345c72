"""A language swarm small enough for daemon tests on 2 cores: ``learning.language``'s ByteGPT at width 32
on 300 kB of the standard library, with the language demo's protocol (DiLoCo outer step, top-k codec).
Daemons import it as ``--task tiny_language:make_task`` with this folder on ``PYTHONPATH`` (:data:`ENV`)."""

from pathlib import Path

from shoal.learning.language import make_task as language_task
from shoal.learning.task import Task
from shoal.node.demo import LANGUAGE

TASK = "tiny_language:make_task"
ENV = {
    **{f"SHOAL_{name.upper()}": str(value) for name, value in LANGUAGE.protocol.items()},
    "SHOAL_TASK": TASK,
    "PYTHONPATH": str(Path(__file__).parent),
}


def make_task(node: int, nodes: int) -> Task:
    """Node ``node`` of ``nodes``: test_language measures this model below 5.5 bits per byte in 5 rounds."""
    return language_task(node, nodes, width=32, max_bytes=300_000)


def bits_per_byte(status: dict | None) -> float:
    """What a daemon last measured (9, worse than a uniform guess, before its first evaluation)."""
    value = ((status or {}).get("metrics") or {}).get("bits_per_byte")
    return 9.0 if value is None else value
