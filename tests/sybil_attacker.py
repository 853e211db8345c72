"""Many identities against one Shoal node, built on Shoal's own overlay: for tests/test_sybils.py.

It joins the task of the honest daemons (same ``config.toml`` and ``SHOAL_*`` task settings, so the same
task id) with ``--identities`` overlays in this one trio process, each with a fresh key pair and the
victim as its bootstrap node, as an attacker renting nothing but key pairs would. Each identity then
sends the victim a stale model every ``--period`` seconds for ``--seconds``: the task's initial model
(what any node holds before training), as a ``model`` message with a plausible body (the victim's
current round, read from its metadata record, and a typical sample count), in the swarm's codec. A
refused identity keeps trying: each send dials the victim again.

Prints JSON lines: ``{"started": n, "at"}`` once every identity has joined the swarm,
``{"peers": n, "at"}`` every few seconds (how many identities the victim holds as task peers, as they
see it) and ``{"end": sent, "at"}``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from contextlib import AsyncExitStack

import trio
from attacker import parser, run, say, task_of
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.learning.compression import Compression
from shoal.learning.learner import Learner
from shoal.learning.messages import GossipModel
from shoal.overlay.config import P2PConfig
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import Message


async def main(args: argparse.Namespace) -> None:
    task = task_of(args.config)
    learner = Learner(task.task, task.model)
    stale = learner.initial_state()
    samples = task.task.samples
    victim = args.victim
    sent = 0

    async def attack(sybil: Libp2pOverlay, compression: Compression) -> None:
        nonlocal sent
        while True:
            rounds = [m.round for m in sybil.metadata.models() if m.peer == victim]
            claim = {"round": max(rounds, default=0), "samples": samples}
            body, tensors = compression.encode(victim, claim, stale)
            with contextlib.suppress(Exception), trio.move_on_after(5):  # refused: dial again next time
                await sybil.send(victim, Message(GossipModel.KIND, dict(body), tensors))
                sent += 1
            await trio.sleep(args.period)

    async with AsyncExitStack() as stack:
        sybils = []
        for _ in range(args.identities):
            p2p = P2PConfig(bootstrap=tuple(args.bootstrap), peers_low=1, peers_high=4)
            sybil = Libp2pOverlay.start(create_new_key_pair(), task.id, p2p)
            sybils.append(await stack.enter_async_context(sybil))
        say({"started": len(sybils), "at": time.time()})
        async with trio.open_nursery() as nursery:
            for sybil in sybils:
                nursery.start_soon(attack, sybil, Compression(task.config.protocol.codec, stale))
            with trio.move_on_after(args.seconds):
                while True:
                    say({"peers": sum(victim in s.peers() for s in sybils), "at": time.time()})
                    await trio.sleep(5)
            nursery.cancel_scope.cancel()
        say({"end": sent, "at": time.time()})


if __name__ == "__main__":
    args = parser(__doc__.partition("\n")[0])
    args.add_argument("--victim", required=True, help="the victim's peer id")
    args.add_argument("--identities", type=int, default=35)
    args.add_argument("--period", type=float, default=0.5, help="seconds between one identity's models")
    args.add_argument("--seconds", type=float, default=40.0, help="length of the attack")
    run(main, args)
