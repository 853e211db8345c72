"""A hostile participant of a Shoal swarm, built on Shoal's own overlay: for tests/test_hostile.py.

It joins the task of the honest daemons (same ``config.toml`` and ``SHOAL_*`` task settings, so the
same task id), becomes their task peer like any node, and then runs attack phases one after the other,
each for ``--seconds`` and each under a fresh identity (identities cost nothing; an honest node bans
per peer). Prints JSON lines ``{"phase", "start", "peer", "peers"}`` once a phase's identity has
joined and ``{"phase", "end", "sent", "bytes"}`` when the phase is over.

Phases:
- ``huge``, ``far-rounds``, ``hijack``, ``garbage``: the simulator's hostile protocol
  (``simulations.hostile.Hostile``, which documents what each sends) run by the node's own driver on
  the libp2p overlay, every 0.2 s.
- ``forge:ATTACK`` (an attack of ``learning.attacks``, e.g. ``forge:sign-flip``, ``forge:noise``): a
  participant that runs the swarm's own protocol (gossip every 0.5 s, or MoDeST, where it aggregates
  and trains when sampled) and sends every model forged: well-formed, finite, within every bound.

A phase may end in ``=SECONDS``, its own length (``forge:noise=15``: MoDeST samples a newcomer once its
record has spread and the members' next model sends took it in).
- ``flood``: as many small valid messages as the node takes, from parallel senders.
- ``trickle``: several fresh identities each open frames claiming the largest allowed size, send most of
  it quickly, then one byte a second.
- ``metadata``: forged records (a record for an honest peer written by us), replays of an honest peer's
  older record, deletion of honest peers' records, and inflation with thousands of records from fresh
  identities.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace

import trio
from attacker import join, parser, run, say, task_of
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.learning.attacks import Forging, forge
from shoal.learning.integrators import Mean
from shoal.learning.learner import Learner
from shoal.learning.messages import Fetch, GossipModel, PeerMessage, Ping, Pong
from shoal.learning.node import build_protocol
from shoal.node.config import Config
from shoal.node.daemon import message_limit
from shoal.node.driver import Driver, ThreadCompute
from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import MAGIC as FRAME_MAGIC
from shoal.overlay.framing import PREFIX, Libp2pStream
from shoal.overlay.framing import VERSION as FRAME_VERSION
from shoal.overlay.metadata import Metadata
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import Message
from shoal.simulations.hostile import ATTACKS, Hostile


class Attacker:
    def __init__(self, overlay: Libp2pOverlay, learner: Learner, config: Config, args: argparse.Namespace):
        self.overlay = overlay
        self.learner = learner
        self.template = learner.initial_state()
        self.config = config
        self.args = args
        self.sent = 0
        self.rng = random.Random(1)

    def targets(self) -> list[str]:
        return self.overlay.peers()

    async def protocol(self, mode: str) -> None:
        """One of the simulator's hostile modes, through the node's own driver."""
        hostile = Hostile(
            self.overlay.peer_id,
            self.targets(),
            self.template,
            self.config.protocol.protocol,
            [mode],
            self.rng,
            period=0.2,
            config=self.config.protocol.modest,
        )
        codec = self.config.protocol.codec  # the swarm's, as its members
        await Driver(hostile, self.overlay, self.learner, ThreadCompute(), codec=codec).run()

    async def forging(self, attack: str) -> None:
        """The swarm's protocol, honest but for the models it sends (``learning.attacks.Forging``)."""
        swarm = self.config.protocol
        settings = replace(
            swarm,
            gossip=replace(swarm.gossip, period=0.5, fanout=None),
            modest=replace(swarm.modest, period=0.5),
        )
        inner = build_protocol(
            settings,
            self.overlay.peer_id,
            self.overlay.members(),
            self.template,
            self.learner.samples,
            self.rng,
            integrator=Mean(),
            joining=True,
        )
        attacker = Forging(inner, forge(attack, self.rng))
        codec = self.config.protocol.codec
        try:
            await Driver(attacker, self.overlay, self.learner, ThreadCompute(), codec=codec).run()
        finally:
            self.sent += attacker.forged

    async def flood(self) -> None:
        """Eight senders per victim, each as fast as the victim takes them: gossip fetches (each asks
        the victim to send its whole model back) and copies of a plausible model, or MoDeST pings."""
        if self.config.protocol.protocol == "gossip":
            typed: list[PeerMessage] = [Fetch(), GossipModel(0, 1, self.template)]
        else:
            typed = [Ping(1, 0), Pong(1, 0)]
        messages = [Message(m.KIND, m.body(), m.tensors) for m in typed]

        async def spam(peer: str) -> None:
            while True:
                try:
                    with trio.move_on_after(2):
                        await self.overlay.send(peer, self.rng.choice(messages))
                        self.sent += 1
                except Exception:  # refused or banned: knock again
                    await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            for peer in self.targets():
                for _ in range(8):
                    nursery.start_soon(spam, peer)

    async def trickle(self) -> None:
        """Fresh identities, each with frames that claim the largest allowed size and never finish."""
        limit = self.args.frame_limit

        async def one_identity(victims: list[str]) -> None:
            config = P2PConfig(bootstrap=tuple(self.args.bootstrap), heartbeat_interval=1.0)
            async with (
                Libp2pOverlay.start(create_new_key_pair(), self.overlay.task, config) as sybil,
                trio.open_nursery() as nursery,
            ):
                for victim in victims:
                    for _ in range(4):
                        nursery.start_soon(frame, sybil, victim)

        async def frame(sybil: Libp2pOverlay, victim: str) -> None:
            try:
                stream = await sybil._peers.open(victim, sybil._messaging.protocol)
                io = Libp2pStream(stream)
                await io.write(PREFIX.pack(FRAME_MAGIC, FRAME_VERSION, limit))
                chunk = bytes(1 << 16)
                for _ in range(int(limit * 0.9) // len(chunk)):
                    await io.write(chunk)
                self.sent += 1
                while True:
                    await io.write(b"\0")
                    await trio.sleep(1)
            except Exception:  # reset by the victim: what it should do
                return

        victims = self.targets()
        async with trio.open_nursery() as nursery:
            for _ in range(self.args.identities):
                nursery.start_soon(one_identity, victims)
            await trio.sleep_forever()

    async def metadata(self) -> None:
        meta = self.overlay.metadata
        peers = meta._peers  # the raw document: what any peer can write into its replica
        me = self.overlay.peer_id
        stale = {p: v for p, v in peers.to_py().items() if p != me}
        sybils = []
        for i in range(self.args.sybils):
            fake = Metadata(self.overlay.task, create_new_key_pair())
            fake.heartbeat(time.time(), [f"/ip4/127.0.0.1/tcp/{1 + i}"], "training")
            sybils.append(fake)
        while True:
            honest = {p: v for p, v in peers.to_py().items() if p != me}
            with meta._doc.transaction():
                for peer, value in honest.items():
                    if self.rng.random() < 0.5 and peer in stale:
                        peers[peer] = stale[peer]  # replay an older, once valid record
                    elif isinstance(value, dict):
                        forged = json.loads(json.dumps(value))
                        _tamper(forged)
                        peers[peer] = forged  # forged: content changed, signature kept
                for peer in honest:
                    if self.rng.random() < 0.3:
                        del peers[peer]
            for fake in sybils[: self.rng.randrange(len(sybils) + 1)]:
                try:
                    meta.apply(fake.diff(b"\x00"))
                except Exception:  # our own replica's bounds
                    break
            self.sent += 1
            await trio.sleep(0.5)


def _tamper(value: dict) -> None:
    """Change what a record says (state "left", another address) wherever the layout keeps it."""
    for key, inner in value.items():
        if isinstance(inner, dict):
            _tamper(inner)
        elif key == "state":
            value[key] = "left"
        elif key == "addrs":
            value[key] = ["/ip4/127.0.0.1/tcp/1"]


async def main(args: argparse.Namespace) -> None:
    task = task_of(args.config)
    learner = Learner(task.task, task.model)
    args.frame_limit = message_limit(learner.initial_state())
    for spec in args.phases:  # a fresh identity per phase: identities cost nothing, and bans are per peer
        phase, _, seconds = spec.partition("=")
        p2p = P2PConfig(bootstrap=tuple(args.bootstrap), heartbeat_interval=1.0)
        async with Libp2pOverlay.start(create_new_key_pair(), task.id, p2p) as overlay:
            attacker = Attacker(overlay, learner, task.config, args)
            await join(overlay, task.id, args.peers)
            say({"phase": phase, "start": time.time(), "peer": overlay.peer_id, "peers": overlay.peers()})
            with trio.move_on_after(float(seconds or args.seconds)):
                if phase in ATTACKS:
                    await attacker.protocol(phase)
                elif phase.startswith("forge:"):
                    await attacker.forging(phase.removeprefix("forge:"))
                else:
                    await getattr(attacker, phase)()
            sent = overlay.bytes_out.total()
            say({"phase": phase, "end": time.time(), "sent": attacker.sent, "bytes": sent})


if __name__ == "__main__":
    args = parser(__doc__.partition("\n")[0])
    args.add_argument("--peers", type=int, default=3, help="task peers to wait for before attacking")
    args.add_argument("--phases", nargs="+", required=True)
    args.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    args.add_argument("--identities", type=int, default=3, help="fresh identities in the trickle phase")
    args.add_argument("--sybils", type=int, default=2000, help="fake records in the metadata phase")
    run(main, args)
