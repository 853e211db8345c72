"""A hostile participant that attacks the metadata document and the dial-back service of a Shoal swarm,
built on Shoal's own overlay: for tests/test_metadata_hostile.py.

It joins the honest daemons' task (their ``config.toml`` and ``SHOAL_*`` settings give the task id and
the metadata epoch length), and runs phases one after the other, each for ``--seconds`` under a fresh
identity. Prints JSON lines ``{"phase", "start", "peer", "peers"}`` once a phase's identity has joined and
``{"phase", "end", "sent", "identities", ...}`` when it is over (``identities``: every peer id the phase
attacked with, for the test to check they were banned).

Phases:
- ``junk-keys``: keys that are not peer ids, ~2 MiB of them (the document's old bound), written into its
  own replica and pushed by anti-entropy to every victim, and small ones gossiped.
- ``flood``: large junk updates on the task's topic, from several identities at once, as fast as they
  go: 900 kB of junk (under gossipsub's 1 MiB), 60 kB envelopes holding junk keys, updates that build on
  nothing the victims hold, and the same from 200 fresh origins signed by keys it made up, all through
  its own connections.
- ``sybils``: 1,200 member records validly signed by fresh keys (more than the 1,000-slot member cap),
  pushed by anti-entropy; then an honest newcomer joins (``newcomer`` in the end line), which every
  victim must list although the cap is full.
- ``dialback``: four identities each ask every victim for 3 dial-backs at once (within the rate of one
  asker), claiming an address where a listener of ours accepts and never answers (each dial then lasts
  its whole timeout), then for 40 more; ``peak``: the most connections that listener held at once.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import AsyncExitStack
from functools import partial

import msgpack
import trio
from attacker import BlackHole, fresh_update, join, parser, run, say, task_of
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from pycrdt import Doc, Map

from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import Libp2pStream, write_frame
from shoal.overlay.nat import DIALBACK
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.records import sign_record


def pending_update(size: int) -> bytes:
    """An update that builds on an item no victim holds: yrs would keep it pending forever."""
    doc = Doc()
    peers = doc.get("peers", type=Map)
    peers["a"] = 1.0
    sv = doc.get_state()
    peers["a"] = "x" * size
    return doc.get_update(sv)


class Attacker:
    def __init__(self, args: argparse.Namespace, task: str, network: P2PConfig) -> None:
        self.args, self.task = args, task
        self.epoch_length = network.metadata_epoch
        self.sent = 0
        self.identities: list[str] = []
        self.extra: dict[str, object] = {}
        self.background: trio.Nursery | None = None  # honest newcomers live there until the last phase ends

    def config(self) -> P2PConfig:
        return P2PConfig(bootstrap=tuple(self.args.bootstrap), metadata_epoch=self.epoch_length)

    async def join(self, stack: AsyncExitStack, peers: int) -> Libp2pOverlay:
        overlay = await stack.enter_async_context(
            Libp2pOverlay.start(create_new_key_pair(), self.task, self.config())
        )
        self.identities.append(overlay.peer_id)
        await join(overlay, self.task, peers)
        return overlay

    def envelope(self, overlay: Libp2pOverlay, update: bytes) -> bytes:
        return msgpack.packb({"e": overlay.metadata.epoch, "t": time.time(), "u": update})

    async def junk_keys(self, overlay: Libp2pOverlay, stack: AsyncExitStack) -> None:
        meta = overlay.metadata
        with meta._doc.transaction():  # the raw document: what any peer can write into its replica
            for i in range(20):
                meta._peers[f"junk-{i}-" + "x" * 100_000] = "y" * 1000
        meta.take_outgoing()  # ~2 MiB: it travels by anti-entropy
        victims = overlay.peers()
        while True:
            async with trio.open_nursery() as nursery:
                for victim in victims:
                    nursery.start_soon(overlay._sync.sync_with, ID.from_base58(victim))
            small = fresh_update({"junk-" + "z" * 30_000: 1.0})
            await overlay.pubsub.publish(overlay._sync.topic, self.envelope(overlay, small))
            self.sent += len(victims) + 1
            await trio.sleep(0.5)

    async def flood(self, overlay: Libp2pOverlay, stack: AsyncExitStack) -> None:
        async def one(identity: Libp2pOverlay) -> None:
            identity.router.spam_protection_enabled = False  # its own router would drop the excess
            topic, pubsub = identity._sync.topic, identity.pubsub
            junk = fresh_update({f"junk-{i}-" + "q" * 2_000: "v" * 1_000 for i in range(20)})
            sybils = [create_new_key_pair() for _ in range(200)]
            for n in range(10**9):
                kind = n % 4
                try:
                    if kind == 0:
                        await pubsub.publish(topic, os.urandom(900_000))
                    elif kind == 1:
                        await pubsub.publish(topic, self.envelope(identity, junk))
                    elif kind == 2:
                        await pubsub.publish(topic, self.envelope(identity, pending_update(50_000)))
                    else:  # an origin made up for this message, through our connection
                        key = sybils[n % len(sybils)]
                        data = self.envelope(identity, pending_update(50_000))
                        msg = rpc_pb2.Message(
                            data=data,
                            topicIDs=[topic],
                            from_id=ID.from_pubkey(key.public_key).to_bytes(),
                            seqno=os.urandom(8),
                        )
                        msg.signature = key.private_key.sign(
                            PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString()
                        )
                        msg.key = key.public_key.serialize()
                        await pubsub.push_msg(pubsub.my_id, msg)
                    self.sent += 1
                except Exception:  # cut off: a fresh identity takes over
                    return
                if not identity.peers():
                    return
                await trio.sleep(0)

        async def relay() -> None:  # identities one after the other, while the phase lasts
            while True:
                async with AsyncExitStack() as inner:
                    await one(await self.join(inner, 1))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, overlay)
            for _ in range(2):
                nursery.start_soon(relay)

    async def sybils(self, overlay: Libp2pOverlay, stack: AsyncExitStack) -> None:
        meta = overlay.metadata
        now = time.time()
        with meta._doc.transaction():
            for i in range(self.args.sybils):
                key = create_new_key_pair()
                record = {"addrs": [f"/ip4/127.0.0.1/tcp/{1 + i}"], "seen": now, "state": "training"}
                value = sign_record(self.task, key, 1, {**record, "models": [], "scores": {}})
                meta._peers[ID.from_pubkey(key.public_key).to_base58()] = value
        meta.take_outgoing()
        victims = overlay.peers()
        newcomer = None
        while True:
            async with trio.open_nursery() as nursery:
                for victim in victims:
                    nursery.start_soon(overlay._sync.sync_with, ID.from_base58(victim))
            self.sent += len(victims)
            if newcomer is None and self.background is not None:  # honest, after the sybils: gets a place
                newcomer = await self.background.start(self.newcomer)
                self.extra["newcomer"] = newcomer
            await trio.sleep(2.0)  # within the sync rate: valid records are not wrong input

    async def newcomer(self, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """An honest node that joins and stays (until the attacker's last phase is over)."""
        async with Libp2pOverlay.start(create_new_key_pair(), self.task, self.config()) as overlay:
            task_status.started(overlay.peer_id)
            await trio.sleep_forever()

    async def dialback(self, overlay: Libp2pOverlay, stack: AsyncExitStack) -> None:
        hole = BlackHole()
        try:
            await self._dialback(overlay, hole)
        finally:
            self.extra["peak"] = hole.peak

    async def _dialback(self, overlay: Libp2pOverlay, hole: BlackHole) -> None:
        async def request(identity: Libp2pOverlay, victim: str, claim: list[str]) -> None:
            try:
                stream = await identity.host.new_stream(ID.from_base58(victim), [DIALBACK])
                await write_frame(Libp2pStream(stream), msgpack.packb({"addrs": claim}))
                self.sent += 1
                with trio.move_on_after(1.0):  # the dial goes on without us
                    await stream.read(1024)
            except Exception:  # reset: refused or banned
                return

        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(trio.serve_tcp, hole, 0, host="127.0.0.1"))
            claim = [f"/ip4/127.0.0.1/tcp/{listener.socket.getsockname()[1]}"]
            victims = overlay.peers()

            async def attack(identity: Libp2pOverlay) -> None:
                for per_victim in (3, 40, 40):  # first within an asker's rate (3 at once), then a flood
                    async with trio.open_nursery() as wave:
                        for victim in victims:
                            for _ in range(per_victim):
                                wave.start_soon(request, identity, victim, claim)
                    await trio.sleep(0.5)

            async def identity() -> None:  # each in its own task: it enters and leaves its overlay there
                async with AsyncExitStack() as own:
                    await attack(await self.join(own, 3))
                    await trio.sleep_forever()

            for _ in range(3):
                nursery.start_soon(identity)
            await attack(overlay)
            await trio.sleep_forever()


async def main(args: argparse.Namespace) -> None:
    task = task_of(args.config)
    async with trio.open_nursery() as background:
        for phase in args.phases:
            attacker = Attacker(args, task.id, task.config.network)
            attacker.background = background
            async with AsyncExitStack() as stack:
                overlay = await attacker.join(stack, args.peers)
                say({"phase": phase, "start": time.time(), "peer": overlay.peer_id, "peers": overlay.peers()})
                with trio.move_on_after(args.seconds):
                    await getattr(attacker, phase.replace("-", "_"))(overlay, stack)
                say({"phase": phase, "end": time.time(), "sent": attacker.sent,
                     "identities": attacker.identities, **attacker.extra})  # fmt: skip
        background.cancel_scope.cancel()


if __name__ == "__main__":
    args = parser(__doc__.partition("\n")[0])
    args.add_argument("--peers", type=int, default=3, help="task peers to wait for before attacking")
    args.add_argument("--phases", nargs="+", required=True)
    args.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    args.add_argument("--sybils", type=int, default=1200, help="signed fake members in the sybils phase")
    run(main, args)
