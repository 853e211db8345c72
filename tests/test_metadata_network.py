"""Metadata gossip and dial-back requests from a hostile peer, on real libp2p hosts on 127.0.0.1: what
is refused, whom it is blamed on, what is forwarded, and how many dial-backs a flood can make us run."""

import contextlib
import random
import time
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import msgpack
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.pubsub.pb import rpc_pb2
from multiaddr import Multiaddr
from pycrdt import Doc, Map

from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import Libp2pStream, read_frame, write_frame
from shoal.overlay.host import quiet_libp2p_logs
from shoal.overlay.interface import Delivered
from shoal.overlay.metadata import Metadata
from shoal.overlay.metasync import MAX_GOSSIP
from shoal.overlay.nat import DIALBACK, MAX_DIALBACKS
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.records import sign_record
from shoal.overlay.wire import Message
from tests.attacker import BlackHole

TASK = "meta-net-test"
FAST = {"heartbeat_interval": 1.0}  # liveness at its defaults: a loaded test machine is no dead peer

quiet_libp2p_logs(verbose=False)


@asynccontextmanager
async def overlays(n: int, boot: str | None = None):
    async with AsyncExitStack() as stack:
        nodes = []
        for _ in range(n):
            bootstrap = (boot,) if boot else ()
            config = P2PConfig(bootstrap=bootstrap, **FAST)
            node = await stack.enter_async_context(Libp2pOverlay.start(create_new_key_pair(), TASK, config))
            boot = boot or node.addresses()[0]
            nodes.append(node)
        yield nodes


async def until(predicate, timeout: float, poll: float = 0.1) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(poll)


def reasons(node: Libp2pOverlay, peer: str) -> list[str]:
    return [r.reason for r in node.rejections if r.peer == peer]


def envelope(meta: Metadata, update: bytes, sent: float | None = None) -> bytes:
    return msgpack.packb({"e": meta.epoch, "t": time.time() if sent is None else sent, "u": update})


async def test_hostile_gossip_is_refused_blamed_on_its_origin_and_never_forwarded():
    async with overlays(2) as (a, b), overlays(1, boot=a.addresses()[0]) as (evil,):
        topic = evil._sync.topic
        await until(lambda: evil.peer_id in a.peers() and evil.peer_id in b.peers(), 20)
        # a publish goes to the publisher's mesh only, and a refused message is never forwarded: each
        # honest node must be in the hostile one's mesh, not just subscribed, or it never sees the message
        await until(lambda: {str(p) for p in evil.router.mesh.get(topic, ())} == {a.peer_id, b.peer_id}, 20)
        me = evil.peer_id
        sybil = create_new_key_pair()
        junk_doc = Doc()
        junk_doc.get("peers", type=Map)["x" * 1000] = "junk"
        foreign_doc = Doc()
        foreign_doc.get("peers", type=Map)[str(Metadata("t", sybil).peer_id)] = sign_record(
            TASK,
            sybil,
            1,
            {"addrs": [], "seen": time.time(), "state": "training", "models": [], "scores": {}},
        )
        for data, says in (
            (b"\x00" * (MAX_GOSSIP + 1), "over the topic's"),
            (envelope(evil.metadata, junk_doc.get_update()), "is not a peer id"),
            (envelope(evil.metadata, foreign_doc.get_update()), "writes the key of"),
            # NaN compares false with everything: taken, it would have reset the origin's rate for good
            (envelope(evil.metadata, b"", sent=float("nan")), "not finite"),
        ):
            await evil.pubsub.publish(topic, data)
            for node in (a, b):
                await until(lambda n=node, s=says: any(s in r for r in reasons(n, me)), 10)
        assert all(len(reasons(node, me)) == 4 for node in (a, b))  # each blamed once: nothing forwarded
        evil.router.spam_protection_enabled = False  # gossipsub's own limit would drop its excess first
        for i in range(40):  # its own record, 40 times in 0.4 s of its own clock: a flood
            evil.metadata.heartbeat(time.time(), [])
            update = evil.metadata.take_outgoing()
            await evil.pubsub.publish(topic, envelope(evil.metadata, update, sent=time.time() + i / 100))
        await until(lambda: a.banned(me) and b.banned(me), 10)
        assert any("faster than" in r for r in reasons(a, me))
        for node, other in ((a, b), (b, a)):
            assert node.penalties[other.peer_id] == 0 and not node.banned(other.peer_id)
            assert set(node.metadata.snapshot()["peers"]) <= {a.peer_id, b.peer_id, me}


async def test_dialback_requests_are_bounded_node_wide_and_a_flood_is_blamed():
    """Askers claim an address where a listener accepts and never answers, so each dial-back holds a
    connection for its whole 5 s timeout: however many ask, at most MAX_DIALBACKS run at once."""
    hole = BlackHole()

    async with overlays(1) as (node,), trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, hole, 0, host="127.0.0.1"))
        claimed = [f"/ip4/127.0.0.1/tcp/{listener.socket.getsockname()[1]}"]
        target = info_from_p2p_addr(Multiaddr(node.addresses()[0]))
        replies = []

        async def ask(host, addrs: list[str] = claimed) -> None:
            stream = await host.new_stream(target.peer_id, [DIALBACK])
            await write_frame(Libp2pStream(stream), msgpack.packb({"addrs": addrs}))
            replies.append(msgpack.unpackb(await read_frame(Libp2pStream(stream), 1024)))

        async with AsyncExitStack() as stack:
            askers = [new_host(key_pair=create_new_key_pair()) for _ in range(3 * MAX_DIALBACKS // 2)]
            for host in askers:
                await stack.enter_async_context(host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                await host.connect(target)
            async with trio.open_nursery() as asking:
                for host in askers:
                    asking.start_soon(ask, host)
            # an asker has its reply before the server's side has closed the stream and counted it
            await until(lambda: node._dialback.served == MAX_DIALBACKS, 10)
            assert hole.peak == MAX_DIALBACKS
            assert sum(1 for r in replies if r.get("busy")) == len(askers) - MAX_DIALBACKS
            flooder = askers[0]
            for _ in range(8):  # one asker, one after the other: 3 are within its rate (2 left), then floods
                with contextlib.suppress(Exception):  # reset: refused as a flood, then banned
                    await ask(flooder, [])  # nothing to dial: answered at once
            await until(lambda: node.banned(str(flooder.get_id())), 10)
            assert sum(1 for r in node.rejections if r.kind == "flood") >= 5
        nursery.cancel_scope.cancel()


async def test_gossipsub_rpcs_that_do_not_parse_or_are_mutated_never_take_the_node_down():
    """py-libp2p 0.8.1 let protobuf's DecodeError out of pubsub's stream handler and out of host.run():
    six bytes on the gossipsub protocol ended a daemon. Now such a stream is reset and its sender blamed;
    mutated RPCs that still parse go through the topic's gate like any other."""
    async with overlays(2) as (node, friend):
        await until(lambda: friend.peer_id in node.peers(), 20)
        topic = node._sync.topic
        valid = rpc_pb2.RPC(
            publish=[rpc_pb2.Message(data=b"x" * 40, topicIDs=[topic], from_id=b"y" * 38, seqno=b"z" * 8)]
        )
        raw = valid.SerializeToString()
        rng = random.Random(3)
        payloads = [b"\xff" * 5, b"\x00" * 3] + [
            bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in raw) for _ in range(40)
        ]
        target = info_from_p2p_addr(Multiaddr(node.addresses()[0]))
        for i in range(0, len(payloads), 4):  # a fresh identity for every 4: bans are per peer
            host = new_host(key_pair=create_new_key_pair())
            async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                await host.connect(target)
                for payload in payloads[i : i + 4]:
                    with contextlib.suppress(Exception):  # reset by the node: what it should do
                        stream = await host.new_stream(target.peer_id, [GOSSIPSUB_PROTOCOL_ID])
                        await stream.write(varint(len(payload)) + payload)
                        await trio.sleep(0.05)
        assert node._tasks.running
        assert any(r.kind == "malformed gossip" and r.wrong for r in node.rejections)
        await friend.send(node.peer_id, Message("ping"))  # still alive and serving
        with trio.fail_after(10):
            async for event in node.events:
                if isinstance(event, Delivered):
                    break


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes([*out, n])
