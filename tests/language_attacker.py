"""A hostile peer of a language swarm (DiLoCo outer step, top-k codec): for tests/test_language_hostile.py.

Like tests/hostile_peer.py it joins the honest daemons' task (their ``config.toml`` and ``SHOAL_*``
settings), each phase under a fresh identity, and prints ``{"phase", "start", "peer", "peers"}`` and
``{"phase", "end", "sent", "bytes"}`` JSON lines. Every phase runs the swarm's own gossip (it fetches a
model, trains, averages) and its codec, so what it sends passes the codec's format:
- ``inflate``: each model it sends is the last honest model it received plus ``--scale`` (1000) times
  its own difference to it: an update, or DiLoCo pseudo-gradient, 1000 times an honest one's norm;
- ``nan``: each message honestly encoded, then one value of every floating-point wire tensor (the
  codecs' scales and grid steps) set to NaN.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import trio
from attacker import join, parser, run, say, task_of
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.learning.attacks import Forge, Forging
from shoal.learning.integrators import Mean
from shoal.learning.learner import Learner
from shoal.learning.node import build_protocol
from shoal.learning.protocol import State
from shoal.node.config import Config
from shoal.node.driver import Driver, ThreadCompute
from shoal.overlay.config import P2PConfig
from shoal.overlay.p2p import Libp2pOverlay

PHASES = ("inflate", "nan")


def inflate(scale: float) -> Forge:
    """Our model's difference to the last one we received, ``scale`` times (the model itself until then)."""

    def forged(own: State, seen: list[State]) -> State:
        if not seen:
            return own
        ref = seen[-1]
        return {k: ref[k] + scale * (v - ref[k]) if v.is_floating_point() else v for k, v in own.items()}

    return forged


class Counter:
    def __init__(self) -> None:
        self.sent = 0


def poison(driver: Driver, counter: Counter) -> None:
    """Make ``driver``'s codec put a NaN in every floating-point wire tensor it encodes."""
    honest = driver.compression.encode

    def encode(peer: str, body: Mapping[str, Any], model: State) -> tuple[Mapping[str, Any], State]:
        body, wire = honest(peer, body, model)
        out = dict(wire)
        for name, t in wire.items():
            if t.is_floating_point() and t.numel():
                out[name] = t.clone()
                out[name].view(-1)[0] = float("nan")
        counter.sent += any(out[k] is not wire[k] for k in wire)  # a message with a NaN in it
        return body, out

    driver.compression.encode = encode  # type: ignore[method-assign]


async def attack(
    phase: str, overlay: Libp2pOverlay, learner: Learner, config: Config, scale: float, counter: Counter
) -> None:
    """The swarm's gossip, every 0.5 s to every neighbour, with the phase's models or messages."""
    swarm = config.protocol
    settings = replace(swarm, gossip=replace(swarm.gossip, period=0.5, fanout=None))
    rng = random.Random(1)
    inner = build_protocol(
        settings,
        overlay.peer_id,
        overlay.members(),
        learner.initial_state(),
        learner.samples,
        rng,
        integrator=Mean(),
        joining=True,
    )
    protocol = Forging(inner, inflate(scale)) if phase == "inflate" else inner
    driver = Driver(protocol, overlay, learner, ThreadCompute(), codec=swarm.codec)
    if phase == "nan":
        poison(driver, counter)
    try:
        await driver.run()
    finally:
        if isinstance(protocol, Forging):
            counter.sent += protocol.forged


async def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    task = task_of(args.config)
    learner = Learner(task.task, task.model)
    for spec in args.phases:  # a fresh identity per phase: bans are per peer
        phase, _, seconds = spec.partition("=")
        if phase not in PHASES:
            raise SystemExit(f"unknown phase {phase!r}: use {', '.join(PHASES)}")
        p2p = P2PConfig(bootstrap=tuple(args.bootstrap), heartbeat_interval=1.0)
        async with Libp2pOverlay.start(create_new_key_pair(), task.id, p2p) as overlay:
            counter = Counter()
            await join(overlay, task.id, args.peers)
            say({"phase": phase, "start": time.time(), "peer": overlay.peer_id, "peers": overlay.peers()})
            with trio.move_on_after(float(seconds or args.seconds)):
                await attack(phase, overlay, learner, task.config, args.scale, counter)
            sent = overlay.bytes_out.total()
            say({"phase": phase, "end": time.time(), "sent": counter.sent, "bytes": sent})


if __name__ == "__main__":
    args = parser(__doc__.partition("\n")[0])
    args.add_argument("--peers", type=int, default=3, help="task peers to wait for before attacking")
    args.add_argument("--phases", nargs="+", required=True, help="inflate | nan, each =SECONDS optionally")
    args.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    args.add_argument("--scale", type=float, default=1000.0, help="inflate: times an honest difference")
    run(main, args)
    # trio abandons a cancelled training thread, which may still be in torch: an interpreter teardown
    # under it aborts the process ("terminate called without an active exception", measured)
    sys.stdout.flush()
    os._exit(0)
