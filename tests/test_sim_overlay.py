"""The simulated network: timing, bandwidth, loss, partitions, crashes, joins, counters (virtual time)."""

import math

import pytest
import torch
import trio

from shoal.overlay.interface import (
    Announced,
    Delivered,
    MembersChanged,
    PeerConnected,
    PeerDisconnected,
    PeerUnreachable,
)
from shoal.overlay.sim import SimNetwork
from shoal.overlay.wire import Message, encoded_size

MB = 10**6


def blob(nbytes: int) -> Message:
    return Message("model", {"round": 1}, {"w": torch.zeros(nbytes // 4)})


async def next_message(overlay, timeout=1000.0):
    """The next Delivered event, skipping connection events; fails instead of hanging."""
    with trio.fail_after(timeout):
        async for event in overlay.events:
            if isinstance(event, Delivered):
                return event
    raise AssertionError("event channel closed")


async def drain(overlay) -> list:
    out = []
    while True:
        try:
            out.append(overlay.events.receive_nowait())
        except trio.WouldBlock:
            return out


@pytest.fixture
async def net(nursery):
    network = SimNetwork(seed=1, latency=0.05, detection_delay=2.0)
    await nursery.start(network.run)
    return network


async def test_ten_megabytes_over_ten_megabits_take_eight_seconds(nursery, autojump_clock):
    net = SimNetwork(latency=0.0, bandwidth=10e6 / 8)
    await nursery.start(net.run)
    a, b = net.add_node("a"), net.add_node("b", neighbours=["a"])
    msg = blob(10 * MB)
    t0 = trio.current_time()
    await a.send("b", msg)
    assert trio.current_time() - t0 == pytest.approx(encoded_size(msg) * 8 / 10e6)
    await next_message(b)
    assert trio.current_time() - t0 == pytest.approx(8.0, rel=1e-4)
    # a second message queues behind the first on the uplink
    await a.send("b", msg)
    await next_message(b)
    assert trio.current_time() - t0 == pytest.approx(16.0, rel=1e-4)


async def test_the_slower_end_sets_the_pace(nursery, autojump_clock):
    net = SimNetwork(latency=0.1)
    await nursery.start(net.run)
    a = net.add_node("a", up=100 * MB)
    b = net.add_node("b", neighbours=["a"], down=1 * MB)
    t0 = trio.current_time()
    await a.send("b", blob(2 * MB))
    assert trio.current_time() - t0 < 0.1  # the fast uplink is free again at once
    await next_message(b)
    assert trio.current_time() - t0 == pytest.approx(0.1 + 2.0, rel=1e-3)
    assert net.traffic.sent["a"]["model"] == net.traffic.received["b"]["model"] > 2 * MB


async def test_latency_and_per_kind_counters(net, autojump_clock):
    a, b = net.add_node("a"), net.add_node("b", neighbours=["a"])
    t0 = trio.current_time()
    await a.send("b", Message("ping", {"n": 1}))
    event = await next_message(b)
    assert event.peer == "a" and event.message.body == {"n": 1}
    assert trio.current_time() - t0 == pytest.approx(0.05)
    await b.send("a", blob(4000))
    await next_message(a)
    assert set(net.traffic.by_kind()) == {"ping", "model"}
    assert net.traffic.total_sent("b") == net.traffic.sent["b"]["model"] > 4000
    assert net.traffic.messages == {"ping": 1, "model": 1}


async def test_message_loss_follows_the_rate(nursery, autojump_clock):
    net = SimNetwork(seed=3, latency=0.01, loss=0.2)
    await nursery.start(net.run)
    a, b = net.add_node("a"), net.add_node("b", neighbours=["a"])
    for i in range(1000):
        await a.send("b", Message("ping", {"i": i}))
    await trio.sleep(1)
    got = [e for e in await drain(b) if isinstance(e, Delivered)]
    assert 740 <= len(got) <= 860
    assert net.traffic.lost == 1000 - len(got)
    assert [e.message.body["i"] for e in got] == sorted(e.message.body["i"] for e in got)  # order kept


async def test_partition_cuts_links_and_heal_restores_them(net, autojump_clock):
    a = net.add_node("a")
    b = net.add_node("b", neighbours=["a"])
    c = net.add_node("c", neighbours=["a", "b"])
    await trio.sleep(0.1)
    await drain(a), await drain(b), await drain(c)
    net.partition([["a", "b"]])
    assert a.peers() == ["b"] and c.peers() == []
    with pytest.raises(PeerUnreachable):
        await c.send("a", Message("ping"))
    await trio.sleep(net.detection_delay + 0.1)
    assert {type(e) for e in await drain(c)} == {PeerDisconnected}
    net.heal()
    assert c.peers() == ["a", "b"]
    assert PeerConnected("a") in await drain(c)
    await c.send("a", Message("ping"))
    assert (await next_message(a)).peer == "c"
    net.cut("a", "b")
    assert a.peers() == ["c"]
    net.heal()  # healed before the failure detector fired: the stale disconnect must not arrive
    await trio.sleep(net.detection_delay + 0.1)
    assert PeerDisconnected("b") not in await drain(a) and a.peers() == ["b", "c"]


async def test_crash_loses_in_flight_messages_and_neighbours_notice(nursery, autojump_clock):
    net = SimNetwork(latency=0.0, bandwidth=1 * MB, detection_delay=3.0)
    await nursery.start(net.run)
    a, b = net.add_node("a"), net.add_node("b", neighbours=["a"])
    await trio.sleep(0.01)
    await drain(b)

    async def crash_soon():
        await trio.sleep(1.0)
        net.crash("a")

    nursery.start_soon(a.send, "b", blob(8 * MB))
    nursery.start_soon(crash_soon)
    with pytest.raises(trio.TooSlowError):  # never delivered: the sender died while it was on the wire
        await next_message(b, timeout=60)
    assert net.traffic.lost == 1 and net.traffic.received["b"]["model"] == 0
    assert await drain(b) == []  # the disconnect was delivered at t=4 and consumed by next_message
    assert b.peers() == []
    assert not net.is_alive("a") and net.alive() == ["b"]


async def test_send_to_a_crashed_or_unknown_peer_raises(net, autojump_clock):
    a, net_b = net.add_node("a"), net.add_node("b", neighbours=["a"])
    net.crash("b")
    with pytest.raises(PeerUnreachable, match="not reachable"):
        await a.send("b", Message("ping"))
    with pytest.raises(PeerUnreachable):
        await a.send("nobody", Message("ping"))
    assert net_b.events.receive_nowait() == PeerConnected("a")  # what was queued before the crash
    with pytest.raises(trio.EndOfChannel):
        await net_b.events.receive()  # then the crashed node's event channel is closed


async def test_graceful_leave_is_noticed_after_one_latency(net, autojump_clock):
    a, _b = net.add_node("a"), net.add_node("b", neighbours=["a"])
    await trio.sleep(0.01)
    await drain(a)
    t0 = trio.current_time()
    net.leave("b")
    with trio.fail_after(10):
        assert await a.events.receive() == MembersChanged(frozenset({"a"}))  # its "left", at once
        assert await a.events.receive() == PeerDisconnected("b")
    assert trio.current_time() - t0 == pytest.approx(0.05)


async def test_members_are_the_live_nodes_and_a_crashed_one_until_its_crash_is_noticed(net, autojump_clock):
    a, _b = net.add_node("a"), net.add_node("b", neighbours=["a"])
    await trio.sleep(0.01)
    assert MembersChanged(frozenset({"a", "b"})) in await drain(a)  # one notice for both arrivals
    net.crash("b")
    assert a.members() == {"a", "b"}  # its signed record outlives it until the crash is noticed
    await trio.sleep(net.detection_delay + 0.01)
    assert a.members() == {"a"} and MembersChanged(frozenset({"a"})) in await drain(a)


async def test_join_and_rejoin(net, autojump_clock):
    a = net.add_node("a")
    b = net.add_node("b", neighbours=["a"])
    assert PeerConnected("b") in await drain(a)
    net.crash("b")
    await trio.sleep(5)
    assert PeerDisconnected("b") in await drain(a)
    b2 = net.add_node("b")  # back with a fresh overlay; its old link comes back with it
    assert b2 is not b and b2.peers() == ["a"] and a.peers() == ["b"]
    assert PeerConnected("b") in await drain(a)
    c = net.add_node("c", neighbours=["b"])  # a brand-new node
    assert c.peers() == ["b"] and b2.peers() == ["a", "c"]
    with pytest.raises(ValueError, match="already up"):
        net.add_node("c")


async def test_only_neighbours_unless_dial_any(nursery, autojump_clock):
    for dial_any in (False, True):
        net = SimNetwork(dial_any=dial_any)
        await nursery.start(net.run)
        a, _b, c = net.add_node("a"), net.add_node("b", neighbours=["a"]), net.add_node("c", neighbours=["b"])
        if dial_any:
            await a.send("c", Message("ping"))
            assert (await next_message(c)).peer == "a"
        else:
            with pytest.raises(PeerUnreachable):
                await a.send("c", Message("ping"))


async def test_announcements_and_discovery(net, autojump_clock):
    a, b, c = net.add_node("a"), net.add_node("b", neighbours=["a"]), net.add_node("c", neighbours=["b"])
    b.subscribe("task/x")
    c.subscribe("task/x")
    await a.publish("task/x", b"v1")
    await trio.sleep(1)
    for node in (b, c):
        assert Announced("a", "task/x", b"v1") in await drain(node)
    assert net.traffic.sent["a"]["announce"] == 2 * (2 + 64)
    await a.provide("task/x")
    await b.provide("task/x")
    assert await c.find_providers("task/x") == ["a", "b"]
    assert await a.find_providers("task/x") == ["b"]
    net.crash("a")
    assert await c.find_providers("task/x") == ["b"]
    assert await c.find_providers("other") == []


def test_bad_settings():
    with pytest.raises(ValueError, match="loss"):
        SimNetwork(loss=1.0)
    assert SimNetwork().bandwidth == math.inf
