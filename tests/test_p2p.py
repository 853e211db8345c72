"""The libp2p overlay with real hosts on 127.0.0.1: joining, DHT discovery, metadata, transfers, faults."""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import msgpack
import psutil
import pytest
import torch
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.tools.anyio_service.exceptions import LifecycleError
from multiaddr import Multiaddr

from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import PREFIX, VERSION, Libp2pStream, write_frame
from shoal.overlay.host import BootstrapError, quiet_libp2p_logs
from shoal.overlay.interface import Announced, Delivered, PeerConnected, PeerDisconnected, PeerUnreachable
from shoal.overlay.nat import DIALBACK, Reachability
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import Limits, Message, encode

TASK = "test-task"
FAST = {"ping_interval": 0.5, "ping_timeout": 0.5, "acceptable_pause": 1.0, "heartbeat_interval": 1.0}
PEER_SCRIPT = Path(__file__).with_name("p2p_peer.py")

quiet_libp2p_logs(verbose=False)


@asynccontextmanager
async def swarm(n: int, **config):
    """``n`` overlays: the first is the bootstrap node, the others join it by its address."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            Libp2pOverlay.start(create_new_key_pair(), TASK, P2PConfig(**{**FAST, **config}))
        )
        boot = (first.addresses()[0],)
        nodes = [first]
        for _ in range(n - 1):
            cfg = P2PConfig(bootstrap=boot, **{**FAST, **config})
            node = Libp2pOverlay.start(create_new_key_pair(), TASK, cfg)
            nodes.append(await stack.enter_async_context(node))
        yield nodes


def random_peer() -> str:
    return str(ID.from_pubkey(create_new_key_pair().public_key))


async def until(predicate, timeout: float, poll: float = 0.2) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(poll)


async def next_event(overlay, kind, timeout: float):
    with trio.fail_after(timeout):
        async for event in overlay.events:
            if isinstance(event, kind):
                return event
    raise AssertionError("event channel closed")


@pytest.mark.slow
async def test_five_hosts_discover_converge_and_move_a_20mb_model():
    async with swarm(5, heartbeat_interval=1000.0) as nodes:  # no heartbeat churn: snapshots settle
        await until(lambda: all(n.reachability is Reachability.PUBLIC for n in nodes[1:]), 20)
        for node in nodes:
            await node.provide("shoal/" + TASK)
        found: dict[str, set[str]] = {}

        async def discovered() -> None:
            for node in nodes:
                found[node.peer_id] = set(await node.find_providers("shoal/" + TASK))

        with trio.fail_after(30):
            while True:
                await discovered()
                if all(len(f) == 4 for f in found.values()):
                    break
                await trio.sleep(0.5)
        ids = {n.peer_id for n in nodes}
        assert all(found[n.peer_id] == ids - {n.peer_id} for n in nodes)
        await until(lambda: all(len(n.peers()) == 4 for n in nodes), 20)

        # concurrent edits on every replica, then convergence through gossip and anti-entropy
        for i, node in enumerate(nodes):
            node.metadata.record_model(round=3, digest=f"{i:064x}", size=1000 + i)
            node.metadata.set_reputation({other.peer_id: i / 10 for other in nodes if other is not node})

        def converged() -> bool:
            snapshots = {json.dumps(n.metadata.snapshot(), sort_keys=True, default=str) for n in nodes}
            return (
                len(snapshots) == 1
                and len(nodes[0].metadata.members()) == 5
                and len(nodes[0].metadata.models()) == 5
            )

        await until(converged, 30)

        # 20 MB model between two joiners, intact
        weights = torch.randn(5 * 2**20)
        await nodes[4].send(nodes[2].peer_id, Message("model", {"round": 3}, {"w": weights}))
        with trio.fail_after(60):
            async for event in nodes[2].events:
                if isinstance(event, Delivered) and event.message.kind == "model":
                    break
        assert event.peer == nodes[4].peer_id and event.message.body == {"round": 3}
        assert torch.equal(event.message.tensors["w"], weights)


async def test_bad_bootstrap_addresses_say_why():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = f"/ip4/127.0.0.1/tcp/{port}/p2p/{random_peer()}"
    with pytest.raises(BootstrapError, match="refused"):
        async with Libp2pOverlay.start(
            create_new_key_pair(), TASK, P2PConfig(bootstrap=(closed,), bootstrap_attempts=2)
        ):
            pass
    async with swarm(1) as (node,):
        impostor = node.addresses()[0].rsplit("/p2p/", 1)[0] + f"/p2p/{random_peer()}"
        with pytest.raises(BootstrapError, match="different node"):
            async with Libp2pOverlay.start(
                create_new_key_pair(), TASK, P2PConfig(bootstrap=(impostor,), bootstrap_attempts=1)
            ):
                pass
    with pytest.raises(ValueError, match="no peer id"):
        P2PConfig(bootstrap=("/ip4/127.0.0.1/tcp/4001",))
    with pytest.raises(ValueError, match="not a multiaddr"):
        P2PConfig(bootstrap=("127.0.0.1:4001",))


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


async def test_slow_reader_cannot_block_a_sender():
    async with swarm(2, send_timeout=3.0) as (a, b):
        await until(lambda: len(a.peers()) == 1, 10)
        sleeper = new_host(key_pair=create_new_key_pair())

        async def never_reads(stream) -> None:
            await trio.sleep(60)

        sleeper.set_stream_handler(a._messaging.protocol, never_reads)
        async with sleeper.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await sleeper.connect(info_from_p2p_addr(Multiaddr(a.addresses()[0])))
            start = trio.current_time()
            with pytest.raises(PeerUnreachable):
                await a.send(str(sleeper.get_id()), Message("model", {}, {"w": torch.zeros(4 * 2**20)}))
            assert trio.current_time() - start < 10
            await a.send(b.peer_id, Message("ping"))  # the sender still works for everyone else
            assert (await next_event(b, Delivered, 10)).message.kind == "ping"


def spawn_peer(bootstrap: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, str(PEER_SCRIPT), "--task", TASK, "--bootstrap", bootstrap, *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, json.loads(proc.stdout.readline())


@pytest.mark.slow
async def test_peer_killed_mid_transfer_is_an_error_not_a_truncated_model():
    async with swarm(1) as (node,):
        proc, hello = await trio.to_thread.run_sync(spawn_peer, node.addresses()[0], "--send-mb", "200")
        try:
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert json.loads(line) == "sending"
            await until(
                lambda: node.receiving[hello["peer"]] > 20 * 2**20, 30
            )  # well into the 200 MB (the limit is 256 MiB)
            proc.send_signal(signal.SIGKILL)
            await until(lambda: any(r.peer == hello["peer"] for r in node.rejections), 20)
            reason = next(r.reason for r in node.rejections if r.peer == hello["peer"])
            assert "stream" in reason, reason
            assert node.penalties[hello["peer"]] == 0  # a crash is not an attack
            while True:  # no model was delivered: only connection events came through
                with trio.move_on_after(0.5):
                    event = await node.events.receive()
                    assert not isinstance(event, Delivered)
                    continue
                break
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.slow
async def test_hung_peer_is_declared_down_within_the_bound(caplog):
    caplog.set_level(logging.INFO, logger="shoal.overlay")
    async with swarm(1) as (node,):
        proc, hello = await trio.to_thread.run_sync(spawn_peer, node.addresses()[0])
        try:
            assert (await next_event(node, PeerConnected, 20)).peer == hello["peer"]
            proc.send_signal(signal.SIGSTOP)
            start = trio.current_time()
            assert (await next_event(node, PeerDisconnected, 15)).peer == hello["peer"]
            # bound: mean gap (0.5 s) + acceptable_pause (1 s) + ~5 std (>= 0.125 s), plus a ping round
            assert trio.current_time() - start < 5.0
            assert hello["peer"] not in node.peers()
            # the verdict says where our side of the connection was: reading, with nothing queued
            (line,) = [r.getMessage() for r in caplog.records if "is down" in r.getMessage()]
            assert "reader in " in line and "0 frames queued" in line and "streams" in line, line
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


async def test_a_peer_whose_streams_cannot_be_opened_but_whose_connection_reads_stays_up(caplog):
    """At 24 daemons on 2 cores, opening a stream (multistream-select through two loaded event loops)
    took seconds while every connection kept carrying frames; pings on fresh streams timed out, and
    live peers were cut off. Here b negotiates no stream at all: a's pings are Yamux pings, answered
    by b's reading loop, so b stays a peer, unsuspected, well past the detector's bound (< 5 s)."""
    caplog.set_level(logging.INFO, logger="shoal.overlay")
    async with swarm(2) as (a, b):
        await until(lambda: b.peer_id in a.peers() and a.peer_id in b.peers(), 20)

        async def never(*args, **kwargs):
            await trio.sleep_forever()

        b.host.multiselect.negotiate = never
        for _ in range(20):
            await trio.sleep(0.5)
            assert b.peer_id in a.peers() and b.peer_id not in a.liveness()["suspected"]
        assert a.liveness()["down"] == 0 and "is down" not in caplog.text


@pytest.mark.slow
async def test_the_peer_set_is_refilled_from_the_metadata_document_and_bounded_by_high():
    """Nodes joined through one bootstrap node know the others only from the metadata document: below
    peers_low they dial them; above peers_high a newcomer is refused (or displaces a worse peer) at
    once, and the one refused finds room elsewhere from the document."""
    async with swarm(4, peers_low=3) as nodes:
        await until(lambda: all(len(n.peers()) == 3 for n in nodes), 40)
        # the full set is kept: a peer we cut off is dialled again (a fresh backoff does not wait)
        await nodes[1]._peers.disconnect(nodes[2].peer_id)
        await until(lambda: nodes[2].peer_id in nodes[1].peers(), 30)
    async with swarm(4, peers_low=1, peers_high=2) as nodes, trio.open_nursery() as nursery:
        most = [0]

        async def watch() -> None:
            while True:
                most[0] = max(most[0], *(len(n._peers.policy.slots) for n in nodes))
                await trio.sleep(0.02)

        nursery.start_soon(watch)
        await until(lambda: all(1 <= len(n.peers()) <= 2 for n in nodes), 40)
        assert most[0] <= 2  # never over high, not even for a grace period
        assert sum(n._peers.refusals for n in nodes) >= 1  # the bootstrap node had three joiners
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def stranger():
    """A bare libp2p host on 127.0.0.1 that speaks our protocols only as far as a test makes it."""
    host = new_host(key_pair=create_new_key_pair())
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        yield host


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


@pytest.mark.slow
async def test_stopping_under_traffic_raises_nothing():
    """A peer process floods gossip and messages while a node joins it and stops, eight times over.
    Before the containment about 1 stop in 10 raised pubsub's "Nursery is closed to new arrivals"
    (measured). The peer is a process of its own: py-libp2p's writers to a stopped node can block
    in shielded cleanup, which only killing their process ends."""
    args = [sys.executable, str(PEER_SCRIPT), "--task", TASK, "--publish", "--send-mb", "0.001"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(await trio.to_thread.run_sync(proc.stdout.readline))
        async with trio.open_nursery() as nursery:  # drain its reports, or it blocks on a full pipe
            nursery.start_soon(partial(trio.to_thread.run_sync, proc.stdout.read, abandon_on_cancel=True))
            for _ in range(8):
                config = P2PConfig(bootstrap=(hello["addrs"][0],), **FAST)
                async with Libp2pOverlay.start(create_new_key_pair(), TASK, config) as node:
                    node.subscribe("x")
                    await until(lambda: len(node.peers()) == 1, 10, poll=0.05)
                    await next_event(node, Announced, 10)  # gossip flows in, and messages are on their way
                    await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    finally:
        proc.kill()
        proc.wait()


async def test_only_the_named_pubsub_shutdown_errors_are_contained(monkeypatch):
    async with swarm(1) as (node,):
        handler = node.host.get_mux().handlers[GOSSIPSUB_PROTOCOL_ID]

    class Stream:  # what the wrapper reads of a stream; pubsub's own reading is replaced below
        class muxed_conn:
            peer_id = "peer"

    def reading_raises(error: Exception) -> None:
        async def read(stream) -> None:
            raise error

        monkeypatch.setattr(node.pubsub, "continuously_read_stream", read)

    for error in (RuntimeError("Nursery is closed to new arrivals"), LifecycleError("stopped")):
        reading_raises(error)
        await handler(Stream())  # contained: the service has stopped
    for error in (RuntimeError("a bug of ours"), ValueError("not a shutdown race")):
        reading_raises(error)
        with pytest.raises(type(error)):
            await handler(Stream())


async def test_messages_to_a_peer_reuse_one_stream_and_a_dropped_stream_loses_nothing(monkeypatch):
    async with swarm(2) as (a, b):
        await until(lambda: len(a.peers()) == 1 and len(b.peers()) == 1, 10)
        streams = set()
        for i in range(5):
            await a.send(b.peer_id, Message("model", {"i": i}, {"w": torch.full((300_000,), float(i))}))
            streams.update(id(s) for s, _ in a._messaging.outbox._idle[b.peer_id])
        assert len(streams) == 1  # five models, one stream
        got = []
        with trio.fail_after(10):
            async for event in b.events:
                if isinstance(event, Delivered):
                    got.append(event.message.body["i"])
                    assert torch.equal(event.message.tensors["w"], torch.full((300_000,), float(got[-1])))
                    if len(got) == 5:
                        break
        assert got == list(range(5))
        # the receiver drops the stream (as after RECEIVE_IDLE): the next message goes on a new one
        ((stream, _),) = a._messaging.outbox._idle[b.peer_id]
        await stream.muxed_stream.reset()
        await a.send(b.peer_id, Message("model", {"i": 5}))
        event = await next_event(b, Delivered, 10)
        assert event.message.body == {"i": 5}
        assert id(a._messaging.outbox._idle[b.peer_id][0][0]) not in streams


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


def test_the_yamux_settings_we_change_still_exist_upstream_and_are_version_guarded(monkeypatch, caplog):
    """Fails when py-libp2p renames what overlay.host changes (the change would silently do nothing)."""
    import inspect

    from libp2p.stream_muxer.yamux import yamux

    from shoal.overlay import yamuxio

    assert "MAX_MESSAGE_SIZE" in inspect.getsource(yamux.YamuxStream.write)
    assert "._write_frame(" in inspect.getsource(yamux.YamuxStream.write)
    yamuxio.patch_yamux()
    yamuxio.patch_yamux()
    assert "self._write_frame(" in inspect.getsource(yamux.Yamux.handle_incoming.__wrapped__)
    window_update = inspect.getsource(yamuxio._release_window.upstream)  # what _release_window replaces
    assert "target_recv_window" in window_update and "_yamux_release_on_read()" in window_update
    assert "_grow_threshold" in window_update and "_apply_autotune_epoch" in window_update
    assert yamux._yamux_release_on_read is yamuxio._release_in_batches
    assert yamux.YamuxStream._auto_tune_and_send_window_update is yamuxio._release_window
    assert yamux.MAX_MESSAGE_SIZE == yamuxio.YAMUX_FRAME and yamux.Yamux._write_frame is yamuxio._write_frame
    assert not hasattr(yamux.Yamux.handle_incoming.__wrapped__, "__wrapped__")  # wrapped once
    monkeypatch.setattr(yamux, "MAX_MESSAGE_SIZE", 64 * 1024)
    monkeypatch.setattr(yamux.Yamux, "_write_frame", None)
    monkeypatch.setattr(yamuxio.importlib.metadata, "version", lambda name: "0.9.0")
    with caplog.at_level(logging.WARNING, logger="shoal.overlay.yamuxio"):
        yamuxio.patch_yamux()
    assert yamux.MAX_MESSAGE_SIZE == 64 * 1024 and yamux.Yamux._write_frame is None
    assert "keeping its Yamux as it is" in caplog.text


@pytest.mark.parametrize("granted", [True, False])
async def test_window_updates_come_per_half_window_on_a_granted_stream_and_small_windows_still_grow(granted):
    """Forty 100 KB messages on one stream. Granted a 16 MiB window (as message streams are), the reader
    sends its updates only per half window read: 1, for the grant (upstream sent one per read). A
    stream left at 256 KiB keeps upstream's rule, which is what lets its window grow: the 4 MB arrive."""
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.stream_muxer.yamux import yamux

    from shoal.overlay.host import build_host
    from shoal.overlay.yamuxio import grow_receive_window

    proto, piece, pieces = TProtocol("/shoal-test/window/1"), 100_000, 40
    updates, got = [], trio.Event()

    async def read_all(stream) -> None:
        if granted:
            grow_receive_window(stream, yamux.MAX_WINDOW_SIZE)
        send_update = stream.muxed_stream.send_window_update

        async def counted(increment: int, skip_lock: bool = False) -> None:
            updates.append(increment)
            await send_update(increment, skip_lock)

        stream.muxed_stream.send_window_update = counted
        left = piece * pieces
        while left:
            left -= len(await stream.read(min(left, piece)))
        got.set()

    a, b = (build_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
    b.set_stream_handler(proto, read_all)
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        with trio.fail_after(20):
            stream = await a.new_stream(b.get_id(), [proto])
            for _ in range(pieces):
                await stream.write(os.urandom(piece))
            await got.wait()
    assert len(updates) == 1 if granted else len(updates) > 4, updates


async def test_cancelled_stream_opens_leave_the_connection_working():
    """``new_stream`` cancelled at any moment of its negotiation: the same connection still carries
    streams. Unpatched (a cancelled write desynchronises Noise), it broke within the 60 tries each time."""
    from libp2p.peer.peerinfo import PeerInfo

    from shoal.overlay.host import build_host

    echo = TProtocol("/shoal-test/echo/1")

    async def serve_echo(stream) -> None:
        with contextlib.suppress(Exception):
            await stream.write(await stream.read(4))
            await stream.close()

    a, b = (build_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
    b.set_stream_handler(echo, serve_echo)
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        (connection,) = a.get_network().get_connections(b.get_id())
        for i in range(60):
            with trio.move_on_after(0.0002 * (i % 20)), contextlib.suppress(Exception):
                await a.new_stream(b.get_id(), [echo])
            with trio.fail_after(10):
                stream = await a.new_stream(b.get_id(), [echo])
                await stream.write(b"ping")
                assert await stream.read(4) == b"ping", f"try {i}"
            assert a.get_network().get_connections(b.get_id()) == [connection], f"try {i}: a new connection"


async def test_the_reading_loops_queue_of_frames_is_bounded():
    """While the connection's writer is stuck (a peer reading nothing of ours), the reading loop queues
    its answers only up to MAX_QUEUED and then waits, as upstream: a peer pinging a stuck connection
    cannot grow our memory."""
    import struct

    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.stream_muxer.yamux import yamux

    from shoal.overlay import yamuxio
    from shoal.overlay.host import build_host

    a, b = (build_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        (connection,) = a.get_network().get_connections(b.get_id())
        muxed = connection.muxed_conn
        pong = struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_PING, yamux.FLAG_ACK, 0, 1)
        stuck, release = trio.Event(), trio.Event()

        async def stuck_writer() -> None:
            async with muxed._write_lock:
                stuck.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck_writer)
            await stuck.wait()
            reader, muxed._shoal_reader = muxed._shoal_reader, trio.lowlevel.current_task()
            try:
                while len(muxed._shoal_queued) < yamuxio.MAX_QUEUED:  # the real reader may have queued some
                    with trio.fail_after(1):
                        await muxed._write_frame(pong)  # queued: returns at once
                with trio.move_on_after(0.5) as waited:
                    await muxed._write_frame(pong)
                assert waited.cancelled_caught and len(muxed._shoal_queued) == yamuxio.MAX_QUEUED
            finally:
                muxed._shoal_reader = reader
                release.set()
