"""The replicated metadata document: convergence, anti-entropy, expiry, bounds, hostile input."""

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.metadata import Metadata, MetadataError


def replicas(n: int, **kwargs) -> list[Metadata]:
    return [Metadata("task", f"peer{i}", **kwargs) for i in range(n)]


def exchange_shuffled(nodes: list[Metadata], seed: int = 0) -> None:
    """Every node's outgoing updates reach every other node, shuffled and duplicated."""
    rng = random.Random(seed)
    updates = [(i, u) for i, n in enumerate(nodes) if (u := n.take_outgoing()) is not None]
    for j, node in enumerate(nodes):
        incoming = [u for i, u in updates if i != j] * 2
        rng.shuffle(incoming)
        for update in incoming:
            node.apply(update)


def test_concurrent_edits_converge_in_any_order():
    nodes = replicas(5)
    for i, node in enumerate(nodes):
        node.heartbeat(100.0 + i, [f"/ip4/10.0.0.{i}/tcp/4001"], "training")
        node.record_model(3, f"{i:064x}", 1000 + i)
        node.set_reputation({f"peer{j}": i / 10 for j in range(5) if j != i})
    exchange_shuffled(nodes)
    snapshots = [n.snapshot() for n in nodes]
    assert all(s == snapshots[0] for s in snapshots)
    assert set(nodes[0].members()) == {f"peer{i}" for i in range(5)}
    assert len(nodes[0].models()) == 5
    assert nodes[0].reputation()["peer0"] == pytest.approx(sum(i / 10 for i in range(1, 5)) / 4)


def test_anti_entropy_brings_a_fresh_replica_up_to_date():
    old, fresh = replicas(2)
    for rnd in range(8):
        old.heartbeat(float(rnd), ["/ip4/10.0.0.1/tcp/1"])
        old.record_model(rnd, "ab" * 32, 10)
    assert [r.round for r in old.models()] == [7, 6, 5, 4, 3]  # keep_rounds versions, newest first
    fresh.apply(old.diff(fresh.state_vector()))
    old.apply(fresh.diff(old.state_vector()))
    assert fresh.snapshot() == old.snapshot()
    assert len(old.diff(fresh.state_vector())) < 32  # in sync: no content, only the (small) delete set


def test_remote_updates_are_not_published_again():
    a, b = replicas(2)
    a.heartbeat(1.0, [])
    b.apply(a.take_outgoing())
    assert b.take_outgoing() is None
    assert a.take_outgoing() is None


def test_expiry_removes_departed_peers_but_a_live_heartbeat_survives():
    a, b, c = replicas(3, expiry=10.0)
    for node in (a, b, c):
        node.heartbeat(0.0, [])
    exchange_shuffled([a, b, c])
    # a expires b and c at t=20; concurrently b (alive) heartbeats at t=19
    assert sorted(a.expire(20.0)) == ["peer1", "peer2"]
    b.heartbeat(19.0, [])
    exchange_shuffled([a, b, c])
    for node in (a, b, c):
        assert set(node.members()) == {"peer0", "peer1"}


def test_left_members_go_at_once_and_never_self():
    a, b = replicas(2)
    a.heartbeat(0.0, [])
    b.heartbeat(0.0, [], "left")
    exchange_shuffled([a, b])
    assert a.expire(0.0) == ["peer1"]
    assert b.expire(1000.0) == ["peer0"]  # long silent; but a node never expires itself
    assert set(b.members()) == {"peer1"}


def test_the_document_stays_bounded_over_1000_rounds_with_churn():
    nodes = replicas(20, expiry=5.0, keep_rounds=5)
    sizes = []
    for rnd in range(1000):
        now = float(rnd)
        for i, node in enumerate(nodes):
            if (rnd // 50 + i) % 4 == 0:  # a quarter of the nodes is away at any time, taking turns
                continue
            node.heartbeat(now, [f"/ip4/10.0.0.{i}/tcp/4001"])
            node.record_model(rnd, f"{rnd:064x}", 1000)
            node.expire(now)
        if rnd % 10 == 9:
            exchange_shuffled(nodes, seed=rnd)
            sizes.append(len(nodes[0].diff(b"\x00")))
    assert all(s == nodes[0].snapshot() for s in (n.snapshot() for n in nodes))
    assert len(nodes[0].models()) <= 5 * 20
    # measured: ~10 kB from the first exchanges on, not growing; growth would show as a rising tail
    assert max(sizes[-10:]) < 1.2 * max(sizes[10:20]) and max(sizes) < 50_000, sizes


@pytest.mark.parametrize("bad", [b"", b"garbage", b"\xff" * 64, bytes(range(256))])
def test_garbage_updates_are_rejected_and_change_nothing(bad):
    a, b = replicas(2)
    a.heartbeat(1.0, ["/ip4/1.2.3.4/tcp/1"])
    b.apply(a.take_outgoing())
    before = b.snapshot()
    try:
        b.apply(bad)
    except MetadataError as e:
        assert str(e)
    assert b.snapshot() == before


def test_oversized_and_mistyped_input_is_rejected():
    node = Metadata("task", "peer0", max_update=100)
    with pytest.raises(MetadataError, match="over the 100-byte limit"):
        node.apply(b"\x00" * 101)
    with pytest.raises(MetadataError, match="must be bytes"):
        node.apply("text")
    with pytest.raises(MetadataError):
        node.diff(b"\xff\xff")


def test_hostile_values_are_skipped_by_readers():
    honest, hostile = replicas(2)
    hostile._peers["peer9"] = {"addrs": "not a list", "seen": 1.0, "state": "training"}
    hostile._peers["peer8"] = {"addrs": [], "seen": float("nan"), "state": "training", "models": "x"}
    hostile._peers["peer7"] = 42
    hostile.heartbeat(1.0, [])
    hostile._peers["peer1"] = {
        **hostile._own,
        "models": [{"round": 1, "digest": 1, "size": -5}, "x"],
        "reputation": {"peer0": "high", "peer2": float("inf"), "peer3": 0.5},
    }
    honest.apply(hostile.take_outgoing())
    assert set(honest.members()) == {"peer1"}
    assert honest.models() == []
    assert honest.reputation() == {"peer3": 0.5}
    assert sorted(honest.expire(1.0)) == ["peer7", "peer8", "peer9"]  # garbage entries are cleaned up


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_metadata_error(data):
    node = Metadata("task", "peer0")
    node.heartbeat(1.0, [])
    for call in (node.apply, node.diff):
        with contextlib.suppress(MetadataError):
            call(data)
    node.members()
    node.models()
