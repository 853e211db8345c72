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
import json
import logging
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.learning.compression import Compression
from shoal.learning.learner import Hyperparameters, Learner
from shoal.learning.models import ParameterLayout, build_model
from shoal.node.config import load
from shoal.node.daemon import load_data, task_id
from shoal.overlay.config import P2PConfig
from shoal.overlay.host import quiet_libp2p_logs
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import Message


def say(value: object) -> None:
    print(json.dumps(value), flush=True)


async def main(args: argparse.Namespace) -> None:
    quiet_libp2p_logs(False)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    config = load(Path(args.config))
    data, x, y = load_data(config)
    model = build_model(config.task.model, data.input_shape, data.num_classes, seed=config.task.seed)
    task = task_id(config, data, ParameterLayout.of(model))
    stale = Learner(model, x, y, Hyperparameters(local_steps=1, local_epochs=None)).initial_state()
    samples = len(y)
    victim = args.victim
    sent = 0

    async def attack(sybil: Libp2pOverlay, compression: Compression) -> None:
        nonlocal sent
        while True:
            rounds = [m.round for m in sybil.metadata.models() if m.peer == victim]
            claim = {"round": max(rounds, default=0), "samples": samples}
            body, tensors = compression.encode(victim, claim, stale)
            with contextlib.suppress(Exception), trio.move_on_after(5):  # refused: dial again next time
                await sybil.send(victim, Message("model", dict(body), tensors))
                sent += 1
            await trio.sleep(args.period)

    async with AsyncExitStack() as stack:
        sybils = []
        for _ in range(args.identities):
            p2p = P2PConfig(bootstrap=(args.bootstrap,), peers_low=1, peers_high=4)
            sybil = Libp2pOverlay.start(create_new_key_pair(), task, p2p)
            sybils.append(await stack.enter_async_context(sybil))
        say({"started": len(sybils), "at": time.time()})
        async with trio.open_nursery() as nursery:
            for sybil in sybils:
                nursery.start_soon(attack, sybil, Compression(config.protocol.codec_config(), stale))
            with trio.move_on_after(args.seconds):
                while True:
                    say({"peers": sum(victim in s.peers() for s in sybils), "at": time.time()})
                    await trio.sleep(5)
            nursery.cancel_scope.cancel()
        say({"end": sent, "at": time.time()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="an honest node's config.toml (for the task)")
    parser.add_argument("--bootstrap", required=True, help="the victim's address")
    parser.add_argument("--victim", required=True, help="the victim's peer id")
    parser.add_argument("--identities", type=int, default=35)
    parser.add_argument("--period", type=float, default=0.5, help="seconds between one identity's models")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the attack")
    try:
        trio.run(main, parser.parse_args())
    except KeyboardInterrupt:
        sys.exit(0)
