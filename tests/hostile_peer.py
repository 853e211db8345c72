"""A hostile participant of a Shoal swarm, built on Shoal's own overlay: for tests/test_hostile.py.

It joins the task of the honest daemons (same ``config.toml`` task settings, so the same task id),
becomes their task peer like any node, and then runs attack phases one after the other, each for
``--seconds``, each under a fresh identity (identities cost nothing; an honest node bans per peer).
Every message it sends is well-formed on the wire unless the phase is about malformed input; the values
are what an adversary would choose. Prints JSON lines ``{"phase", "start", "peer", "peers"}`` once a
phase's identity has joined and ``{"phase", "end", "sent"}`` when the phase is over.

Phases:
- ``huge``: gossip ``model`` messages with the right names, shapes and dtypes, every value 1e30.
- ``rounds``: rounds and counts of 2**63 - 1, 2**53 + 1, far-future and negative, in every kind.
- ``hijack``: MoDeST ``aggregated`` / ``trained`` models with random weights for the next rounds (where
  this peer is not a plausible aggregator) and for far-future rounds.
- ``malformed``: bodies of the wrong types and shapes, unknown kinds, bad views.
- ``flood``: as many small valid messages (and ``fetch`` requests) as the node takes, from parallel tasks.
- ``trickle``: several fresh identities each open frames claiming the largest allowed size, send most of
  it quickly, then one byte a second.
- ``metadata``: forged records (a record for an honest peer written by us), replays of an honest peer's
  older record, deletion of honest peers' records, and inflation with thousands of records from fresh
  identities.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from learning.models import ParameterLayout, build_model
from learning.modest import order
from node.config import load
from node.daemon import load_data, message_limit, task_id
from overlay.host import quiet_libp2p_logs
from overlay.interface import Delivered
from overlay.metadata import Metadata
from overlay.p2p import Libp2pOverlay, P2PConfig
from overlay.transfer import MAGIC as FRAME_MAGIC
from overlay.transfer import PREFIX, Libp2pStream
from overlay.transfer import VERSION as FRAME_VERSION
from overlay.wire import Message

HUGE = 1e30


def say(value: object) -> None:
    print(json.dumps(value), flush=True)


class Attacker:
    def __init__(self, overlay: Libp2pOverlay, template: dict[str, torch.Tensor], args: argparse.Namespace):
        self.overlay = overlay
        self.template = template
        self.args = args
        self.sent = 0
        self.estimate = 0  # the swarm's round, as its pongs and models tell us
        self.rng = random.Random(1)

    def targets(self) -> list[str]:
        return self.overlay.peers()

    async def send(self, peer: str, kind: str, body: dict, tensors: dict | None = None) -> None:
        try:
            with trio.move_on_after(5):
                await self.overlay.send(peer, Message(kind, body, tensors or {}))
                self.sent += 1
        except Exception:  # a victim that bans us refuses: keep attacking the others
            pass

    async def to_all(self, kind: str, body: dict, tensors: dict | None = None) -> None:
        async with trio.open_nursery() as nursery:
            for peer in self.targets():
                nursery.start_soon(self.send, peer, kind, body, tensors)

    def random_model(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        return {n: torch.randn_like(t) * scale for n, t in self.template.items()}

    async def listen(self) -> None:
        """Learn the swarm's round from what it sends us (pongs, models)."""
        async for event in self.overlay.events:
            if isinstance(event, Delivered):
                rnd = event.message.body.get("round")
                if isinstance(rnd, int) and rnd < 2**31:
                    self.estimate = max(self.estimate, rnd)
                if event.message.kind == "ping":
                    await self.send(event.peer, "pong", {"sel": event.message.body.get("sel"), "round": 0})

    # -- phases --------------------------------------------------------------------------------

    async def huge(self) -> None:
        model = {n: torch.full_like(t, HUGE) for n, t in self.template.items()}
        while True:
            if self.args.protocol == "gossip":
                await self.to_all("model", {"round": self.estimate, "samples": 1000}, model)
            else:
                me = self.overlay.peer_id
                view = {p: [self.estimate, 1, True] for p in [me, *self.targets()]}
                for kind, rnd in (("aggregated", self.estimate), ("trained", self.estimate + 1)):
                    await self.to_all(kind, {"round": rnd, "samples": 1000, "view": view}, model)
            await trio.sleep(0.3)

    async def rounds(self) -> None:
        model = {n: t.clone() for n, t in self.template.items()}
        far = (2**63 - 1, 2**53 + 1, 2**40, self.estimate + 10**6)
        while True:
            for rnd in far:
                me = self.overlay.peer_id
                if self.args.protocol == "gossip":
                    await self.to_all("model", {"round": rnd, "samples": rnd}, model)
                    continue
                await self.to_all("ping", {"sel": rnd, "round": rnd})
                await self.to_all("advert", {"round": rnd, "index": rnd, "joined": True})
                view = {me: [rnd, 1, True], **{p: [rnd, rnd, True] for p in self.targets()}}
                await self.to_all("aggregated", {"round": rnd, "samples": 10, "view": view}, model)
                await self.to_all("trained", {"round": rnd, "samples": rnd, "view": view}, model)
            await trio.sleep(0.3)

    async def hijack(self) -> None:
        me = self.overlay.peer_id
        await self.to_all("advert", {"round": self.estimate, "index": 1, "joined": True})
        while True:
            everyone = [me, *self.targets()]
            ahead = [
                r
                for r in range(self.estimate + 1, self.estimate + 50)
                if me not in order(everyone, r)[: self.args.plausible]
            ]
            for rnd in [*ahead[:3], self.estimate + 2**20, 2**40]:
                view = {p: [rnd, 1, True] for p in everyone}
                body = {"round": rnd, "samples": 100, "view": view}
                await self.to_all("aggregated", body, self.random_model())
                await self.to_all("trained", body, self.random_model())
            await trio.sleep(0.3)

    async def malformed(self) -> None:
        names = list(self.template)
        first = self.template[names[0]]
        wrong_shape = {**self.template, names[0]: torch.zeros(first.numel() + 1)}
        bodies = [
            ("model", {"round": "x", "samples": 1}, self.template),
            ("model", {"round": -1, "samples": 1}, self.template),
            ("model", {"round": 1, "samples": -5}, self.template),
            ("model", {"round": 1.5, "samples": 1}, self.template),
            ("model", {"round": True, "samples": True}, self.template),
            ("model", {"round": 1, "samples": 1, "labels": list(range(20_000))}, self.template),
            ("model", {"round": 1, "samples": 1, "labels": "abc"}, self.template),
            ("model", {"round": 1, "samples": 1}, wrong_shape),
            ("model", {"round": 1, "samples": 1}, {"nonsense": torch.zeros(3)}),
            ("model", {"round": 1, "samples": 1}, {}),
            (
                "model",
                {"round": 1, "samples": 1, "reply": "yes"},
                {n: t.double() for n, t in self.template.items()},
            ),
            ("model", {}, self.template),
            ("fetch", {"round": [1, 2]}, {}),
            ("no-such-kind", {"round": 1}, {}),
            ("ping", {"sel": "x", "round": 1}, {}),
            ("pong", {"sel": -1, "round": 1}, {}),
            ("advert", {"round": 1, "index": "y", "joined": 3}, {}),
            ("aggregated", {"round": 1, "samples": 1, "view": "not a view"}, self.template),
            ("aggregated", {"round": 1, "samples": 1, "view": {"p": [1, 2]}}, self.template),
            ("trained", {"round": 1, "samples": 1, "view": {str(i): [1, 1, True] for i in range(9_000)}}, {}),
            ("trained", {"round": 1, "samples": 1, "view": {}}, {n: t[:0] for n, t in self.template.items()}),
        ]
        while True:
            for kind, body, tensors in bodies:
                await self.to_all(kind, body, tensors)
            await trio.sleep(0.2)

    async def flood(self) -> None:
        """Eight senders per victim, each as fast as the victim takes them: gossip fetches (each asks
        the victim to send its whole model back) and copies of a plausible model, or MoDeST pings."""
        if self.args.protocol == "gossip":
            messages = [Message("fetch", {}), Message("model", {"round": 0, "samples": 1}, self.template)]
        else:
            messages = [Message("ping", {"sel": 1, "round": 0}), Message("pong", {"sel": 1, "round": 0})]

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
                stream = await sybil._open(victim, sybil._msg_protocol)
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
    quiet_libp2p_logs(False)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    config = load(Path(args.config))
    data, _, _ = load_data(config)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    layout = ParameterLayout.of(model)
    template = layout.state(model)
    task = task_id(config, data, layout)
    args.frame_limit = message_limit(template)
    args.protocol = config.protocol
    estimate = 0
    for phase in args.phases:  # a fresh identity per phase: identities cost nothing, and bans are per peer
        p2p = P2PConfig(bootstrap=tuple(args.bootstrap), heartbeat_interval=1.0)
        async with (
            Libp2pOverlay.start(create_new_key_pair(), task, p2p) as overlay,
            trio.open_nursery() as nursery,
        ):
            attacker = Attacker(overlay, template, args)
            attacker.estimate = estimate
            nursery.start_soon(attacker.listen)
            await overlay.provide(f"shoal/{task}")
            with trio.move_on_after(60):
                while len(overlay.peers()) < args.peers:
                    await overlay.find_providers(f"shoal/{task}")
                    await trio.sleep(0.5)
            say({"phase": phase, "start": time.time(), "peer": overlay.peer_id, "peers": overlay.peers()})
            with trio.move_on_after(args.seconds):
                await getattr(attacker, phase)()
            say({"phase": phase, "end": time.time(), "sent": attacker.sent})
            estimate = attacker.estimate
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="an honest node's config.toml (for the task)")
    parser.add_argument("--bootstrap", nargs="+", required=True)
    parser.add_argument("--peers", type=int, default=3, help="task peers to wait for before attacking")
    parser.add_argument("--phases", nargs="+", required=True)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--identities", type=int, default=3, help="fresh identities in the trickle phase")
    parser.add_argument("--sybils", type=int, default=2000, help="fake records in the metadata phase")
    parser.add_argument("--plausible", type=int, default=3, help="MoDeST ranks that may aggregate")
    try:
        trio.run(main, parser.parse_args())
    except KeyboardInterrupt:
        sys.exit(0)
