"""The libp2p overlay against hostile peers on 127.0.0.1: malformed messages and requests, trickled
frames, floods of messages and of frames, and bans that expire."""

import contextlib
import logging
import os
from contextlib import AsyncExitStack

import msgpack
import psutil
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from shoal.overlay.framing import PREFIX, VERSION, Libp2pStream, write_frame
from shoal.overlay.interface import Delivered
from shoal.overlay.nat import DIALBACK
from shoal.overlay.wire import Limits, Message, encode
from tests.local_swarm import next_event, stranger, swarm, until


async def test_malformed_messages_are_rejected_with_reasons_and_the_sender_banned():
    async with swarm(1, max_penalty=5) as (node,):
        attacker = new_host(key_pair=create_new_key_pair())
        async with attacker.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await attacker.connect(info_from_p2p_addr(Multiaddr(node.addresses()[0])))
            target = info_from_p2p_addr(Multiaddr(node.addresses()[0])).peer_id
            payloads = [b"garbage" * 10, b"SHL\x01" + b"\xff" * 40, os.urandom(300)]
            for payload in payloads:
                stream = await attacker.new_stream(target, [node._messaging.protocol])
                await write_frame(Libp2pStream(stream), payload)
                await stream.close()
            await until(lambda: len(node.rejections) == 3, 10)
            assert all(r.kind == "malformed message" and r.wrong for r in node.rejections)
            for _ in range(2):
                stream = await attacker.new_stream(target, [node._messaging.protocol])
                await stream.write(b"not even a frame, just bytes")
                await stream.close()
            await until(lambda: node.banned(str(attacker.get_id())), 10)
            assert any("not a Shoal frame" in r.reason for r in node.rejections)


async def test_hostile_sync_and_dialback_requests_do_not_take_the_node_down():
    """Garbage on every protocol a stranger can open: each is refused, and the node keeps working."""
    async with swarm(2) as (node, friend):
        await until(lambda: len(node.peers()) == 1, 10)
        attacker = new_host(key_pair=create_new_key_pair())
        async with attacker.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            target = info_from_p2p_addr(Multiaddr(node.addresses()[0]))
            await attacker.connect(target)
            hostile = [
                (DIALBACK, msgpack.packb({"addrs": 5})),
                (DIALBACK, msgpack.packb([1, 2, 3])),
                (DIALBACK, b"\xc1 not msgpack"),
                (node._sync.protocol, msgpack.packb({"sv": 5})),
                (node._sync.protocol, msgpack.packb({"nothing": b""})),
                (node._sync.protocol, b"\x00" * 64),
            ]
            for protocol, payload in hostile:
                stream = await attacker.new_stream(target.peer_id, [protocol])
                await write_frame(Libp2pStream(stream), payload)
                with trio.move_on_after(5):
                    with contextlib.suppress(Exception):
                        await stream.read(1024)
                await stream.reset()
            oversized = await attacker.new_stream(target.peer_id, [node._messaging.protocol])
            await oversized.write(PREFIX.pack(b"SHF", VERSION, 2**40))  # claims a terabyte
            await oversized.close()
        await until(lambda: any("over the" in r.reason for r in node.rejections), 10)
        await friend.send(node.peer_id, Message("ping"))  # still alive and serving
        assert (await next_event(node, Delivered, 10)).message.kind == "ping"


async def open_frame(host, node, claimed: int):
    stream = await host.new_stream(ID.from_base58(node.peer_id), [node._messaging.protocol])
    await stream.write(PREFIX.pack(b"SHF", VERSION, claimed))
    return stream


@pytest.mark.slow
async def test_trickling_frames_from_many_identities_are_dropped_and_memory_stays_bounded():
    """Eight identities each open a frame claiming the 64 MiB maximum, feed 24 MiB fast, then 1 byte/s.

    Bound: the node holds at most ``max_inflight`` (192 MiB) of frames, so 5 of the 8 are refused at
    their prefix; the 3 admitted ones are dropped by the min-rate rule within two windows (4 s).
    Bound asserted: RSS growth under 160 MiB, while the claims add up to 512 MiB and the fed bytes to
    192 MiB (an unbounded node held all fed bytes until its receive timeout).
    """
    limits = Limits(max_message=64 * 2**20)
    config = {"limits": limits, "max_inflight": 192 * 2**20, "rate_window": 2.0, "min_rate": 64 * 1024}
    fed, chunk = 24 * 2**20, bytes(2**20)
    async with swarm(1, **config) as (node,), AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(stranger()) for _ in range(8)]
        target = info_from_p2p_addr(Multiaddr(node.addresses()[0]))
        for host in hosts:
            await host.connect(target)
        process = psutil.Process()
        base = peak = process.memory_info().rss
        trickling: list[float] = []

        async def attack(host) -> None:
            with contextlib.suppress(Exception):  # reset by the node: that is the point
                stream = await open_frame(host, node, limits.max_message)
                for _ in range(fed // len(chunk)):
                    await stream.write(chunk)
                trickling.append(trio.current_time())
                for _ in range(60):
                    await stream.write(b"x")
                    await trio.sleep(1)

        async with trio.open_nursery() as nursery:
            for host in hosts:
                nursery.start_soon(attack, host)
            with trio.fail_after(40):
                while len([r for r in node.rejections if r.kind == "slow"]) < 3:
                    peak = max(peak, process.memory_info().rss)
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        slow = [r for r in node.rejections if r.kind == "slow"]
        refused = [r for r in node.rejections if r.kind == "load"]
        assert len(slow) == 3 and len(refused) == 5, [r.reason for r in node.rejections]
        assert max(r.at for r in slow) - min(trickling) < 3 * config["rate_window"]
        assert node.penalties == {}  # slow and refused are not wrong
        await until(lambda: node.inflight.used == 0, 10)  # released as each dropped frame's handler ends
        growth = (peak - base) / 2**20
        print(f"RSS growth under the trickle attack: {growth:.0f} MiB")
        assert growth < 160, growth


# a rate this test's single flooder exceeds (the default, 200/s, is four times a clean MoDeST swarm's peak)
FLOOD = {"message_rate": 20.0, "message_burst": 50}


async def test_a_flood_of_valid_messages_bans_the_flooder_with_bounded_logs(caplog):
    async with swarm(2, **FLOOD) as (node, friend):
        await until(lambda: len(node.peers()) == 1, 10)
        payload = encode(Message("ping"))
        async with stranger() as flooder:
            await flooder.connect(info_from_p2p_addr(Multiaddr(node.addresses()[0])))
            flooder_id, target = str(flooder.get_id()), ID.from_base58(node.peer_id)
            with caplog.at_level(logging.INFO, logger="shoal"):
                sent = 0
                with trio.fail_after(20):
                    while not node.banned(flooder_id) and sent < 500:
                        with contextlib.suppress(Exception):
                            stream = await flooder.new_stream(target, [node._messaging.protocol])
                            await write_frame(Libp2pStream(stream), payload)
                            await stream.close()
                        sent += 1
            assert node.banned(flooder_id), f"not banned after {sent} streams"
            assert sent < 100  # the burst (50) and max_penalty (5) excess streams, plus stragglers
            lines = [r for r in caplog.records if r.name.startswith("shoal")]
            assert len(lines) <= 10, [r.getMessage() for r in lines]
            await friend.send(node.peer_id, Message("model", {"round": 1}))
            with trio.fail_after(10):
                async for event in node.events:
                    if isinstance(event, Delivered) and event.peer == friend.peer_id:
                        break
            assert not node.banned(friend.peer_id)


async def test_a_ban_expires_after_ban_duration():
    async with swarm(1, max_penalty=2, ban_duration=2.0) as (node,), stranger() as peer:
        target = info_from_p2p_addr(Multiaddr(node.addresses()[0]))
        await peer.connect(target)
        for _ in range(2):
            stream = await peer.new_stream(target.peer_id, [node._messaging.protocol])
            await stream.write(b"not a frame at all, just bytes")
            await stream.close()
        await until(lambda: node.banned(str(peer.get_id())), 10)
        await until(lambda: not node.banned(str(peer.get_id())), 5)
        with trio.fail_after(10):
            while True:  # we were disconnected: dial again until the node takes our message
                with contextlib.suppress(Exception):
                    await peer.connect(target)
                    stream = await peer.new_stream(target.peer_id, [node._messaging.protocol])
                    await write_frame(Libp2pStream(stream), encode(Message("hello")))
                    await stream.close()
                with trio.move_on_after(1):
                    async for event in node.events:
                        if isinstance(event, Delivered) and event.message.kind == "hello":
                            return


async def test_a_flood_of_frames_on_one_stream_is_a_flood_too():
    async with swarm(1, **FLOOD) as (node,), stranger() as flooder:
        await flooder.connect(info_from_p2p_addr(Multiaddr(node.addresses()[0])))
        payload, sent, streams = encode(Message("ping")), 0, 0
        with trio.fail_after(20):
            while not node.banned(str(flooder.get_id())) and sent < 500:
                with contextlib.suppress(Exception):  # a stream reset for flooding: open another
                    target, protocol = ID.from_base58(node.peer_id), node._messaging.protocol
                    stream = await flooder.new_stream(target, [protocol])
                    streams += 1
                    while sent < 500:
                        await write_frame(Libp2pStream(stream), payload)
                        sent += 1
                await trio.sleep(0.05)
        assert node.banned(str(flooder.get_id())), f"not banned after {sent} frames on {streams} streams"
        assert streams <= 10 and any(r.kind == "flood" for r in node.rejections)
