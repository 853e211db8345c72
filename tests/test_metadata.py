"""The replicated metadata document: convergence whatever the delivery order, anti-entropy, local writes,
expiry, model records, reputation, and a size that stays bounded."""

import random

import pytest

from shoal.overlay.metadata import Member, Metadata, MetadataPending, ModelRecord
from tests.metadata_replicas import exchange, key, peer_id, replicas, state


def test_concurrent_edits_converge_whatever_the_delivery_order():
    rng = random.Random(1)
    nodes = replicas(5, expiry=5.0)
    for rnd in range(4):
        for i, node in enumerate(nodes):
            if rnd == 3 and i == 4:
                continue  # peer 4 goes silent; the others expire it, and each other, concurrently
            node.heartbeat(float(rnd * 5), [f"/ip4/10.0.0.{i}/tcp/4001"], "training")
            node.record_model(rnd, f"{rnd:02d}{i:062x}", 1000 + i)
            node.set_reputation({peer_id(j): (i + j + rnd) / 10 for j in range(5) if j != i})
            if rnd == 3:
                node.expire(16.0)
        exchange(nodes, rng)
    snapshots = [node.snapshot() for node in nodes]
    assert all(s == snapshots[0] for s in snapshots[1:])
    members = nodes[0].members()
    assert set(members) == {peer_id(i) for i in range(4)}
    assert members[peer_id(2)] == Member(peer_id(2), ("/ip4/10.0.0.2/tcp/4001",), 15.0, "training")
    assert nodes[0].models()[0] == ModelRecord(3, peer_id(0), "03" + "0" * 62, 1000)
    assert len(nodes[0].models()) == 4 * 4 and all(type(r.size) is int for r in nodes[0].models())
    # rows of peers 1..3 score peer 0 (j + 3) / 10; peer 4's row went with its entry; live ones survived
    assert nodes[0].reputation()[peer_id(0)] == pytest.approx((0.4 + 0.5 + 0.6) / 3)


def test_an_update_arriving_before_its_dependencies_is_refused_without_blame_and_changes_nothing():
    """yrs would keep it pending in memory until the gap is filled (from a hostile sender: never); it is
    refused instead, not blamed, and applies once what it builds on has arrived."""
    a, b = replicas(2)
    updates = []
    for t in range(3):
        a.heartbeat(float(t), [])
        updates.append(a.take_outgoing())
    before = state(b)
    for update in (updates[2], updates[1]):
        with pytest.raises(MetadataPending) as refused:
            b.apply(update)
        assert not refused.value.hostile and state(b) == before and b.members() == {}
    for update in updates:
        b.apply(update)
    assert b.snapshot() == a.snapshot() and b.members()[peer_id(0)].seen == 2.0


def test_anti_entropy_brings_a_fresh_replica_up_to_date_and_an_in_sync_diff_is_tiny():
    nodes = replicas(10, expiry=5.0)
    rng = random.Random(2)
    for rnd in range(30):
        for i, node in enumerate(nodes):
            if i != 9 or rnd < 10:  # peer 9 leaves at round 10 and is expired: tombstones in the mix
                node.heartbeat(float(rnd), [f"/ip4/10.0.0.{i}/tcp/1"])
                node.record_model(rnd, "ab" * 32, 10)
                node.expire(float(rnd))
        exchange(nodes, rng)
    old, fresh = nodes[0], Metadata("task", key(99))
    fresh.heartbeat(30.0, ["/ip4/10.0.1.1/tcp/1"])
    reply = old.diff(fresh.state_vector())
    fresh.apply(reply)
    old.apply(fresh.diff(old.state_vector()))
    assert fresh.snapshot() == old.snapshot()
    assert len(fresh.members()) == 10 and peer_id(9) not in fresh.members()
    in_sync = old.diff(fresh.state_vector())
    # no content, only the delete set: ~10 B (client id, one range) per client that deleted (11 here)
    assert len(in_sync) <= 11 * 12 and len(in_sync) < len(reply) / 20, (len(in_sync), len(reply))
    before = state(fresh)
    fresh.apply(in_sync)
    assert state(fresh) == before


def test_take_outgoing_carries_local_writes_only():
    a, b = replicas(2)
    assert a.take_outgoing() is None
    a.heartbeat(1.0, ["/ip4/10.0.0.1/tcp/1"])
    a.record_model(1, "aa", 5)
    b.apply(a.take_outgoing())
    assert a.take_outgoing() is None and b.take_outgoing() is None  # a remote apply is not re-emitted
    b.heartbeat(2.0, [])
    only_b = Metadata("task", key(1000))
    only_b.apply(b.take_outgoing())
    assert set(only_b.snapshot()["peers"]) == {peer_id(1)}  # b's update holds none of a's content
    assert b.expire(100.0) == [peer_id(0)]
    a.apply(b.take_outgoing())  # a local delete is a local write too, and it is all a receives
    assert a.snapshot()["peers"] == {} and set(a.members()) == {peer_id(0)}  # a's own record is a's


def test_expiry_removes_a_departed_peer_everywhere_but_a_live_concurrent_heartbeat_survives():
    rng = random.Random(3)
    a, b, _ = nodes = replicas(3, expiry=10.0)
    for node in nodes:
        node.heartbeat(0.0, [])
    exchange(nodes, rng)
    # at t=20, a sees both b and c as stale; concurrently b (alive, its clock a bit behind) heartbeats
    assert a.expire(20.0) == [peer_id(1), peer_id(2)]
    b.heartbeat(19.0, [])
    exchange(nodes, rng)
    assert set(a.members()) == {peer_id(0), peer_id(1)} and a.members()[peer_id(1)].seen == 19.0
    # a's deletes reach b's doc, but b's view drops c only on its own expiry: a delete proves nothing
    assert set(b.snapshot()["peers"]) == {peer_id(0), peer_id(1)} and peer_id(2) in b.members()
    assert peer_id(2) in b.expire(20.0)
    assert a.expire(1000.0) == [peer_id(1)] and peer_id(0) in a.members()  # never itself


def test_left_and_far_future_entries_go_at_once():
    a, b, c = nodes = replicas(3, expiry=10.0)
    a.heartbeat(100.0, [])
    b.heartbeat(100.0, [], "left")
    c.heartbeat(100.0 + 11.0, [])  # more than expiry ahead: a broken or hostile clock
    exchange(nodes, random.Random(4))
    assert a.members()[peer_id(1)].state == "left"
    assert a.expire(100.0) == [peer_id(1), peer_id(2)]
    assert set(a.members()) == {peer_id(0)}


def test_model_records_keep_the_last_rounds_and_a_repeat_replaces():
    node = Metadata("task", key(0), keep_rounds=3)
    node.record_model(1, "early", 1)
    assert node.models() == []  # no entry before the first heartbeat
    node.heartbeat(0.0, [])
    assert node.models() == [ModelRecord(1, peer_id(0), "early", 1)]
    for rnd in (2, 5, 4, 7):
        node.record_model(rnd, f"d{rnd}", 2**40 + rnd)  # large sizes survive the float round trip
    node.record_model(7, "redone", 9)
    assert node.models() == [
        ModelRecord(7, peer_id(0), "redone", 9),
        ModelRecord(5, peer_id(0), "d5", 2**40 + 5),
    ]  # the window of round 7 is 5..7: rounds 1, 2 and 4 were pruned


def test_reputation_is_the_mean_over_observers_and_rows_replace_whole():
    a, b, c = nodes = replicas(3)
    for node in nodes:
        node.heartbeat(0.0, [])
    a.set_reputation({peer_id(2): 1.0, peer_id(0): 100.0})  # a's score of itself is ignored
    b.set_reputation({peer_id(2): 0.0, peer_id(0): 0.5})
    b.set_reputation({peer_id(2): 0.5})
    exchange(nodes, random.Random(5))
    assert c.reputation() == {peer_id(2): 0.75}


@pytest.mark.slow
def test_the_document_stays_bounded_over_1000_rounds_of_20_peers_with_churn():
    """Each round every peer heartbeats and records a model, every 10 rounds it rewrites its reputation
    row, and every 50 rounds one peer leaves for good and a new one takes its place. All updates go to
    one observer replica that expires peers; the others hold the same doc, since they write only their
    own keys. Measured with signed records: 21.7 kB after 10 rounds (20 live entries of ~1,090 B: two
    addresses, 5 model records with 64-hex digests, a 5-target row, counter and signature), 23.7 kB
    after 1,000 rounds: the growth is ~100 B per departed peer (its key's tombstone and its
    state-vector entry), none per round. The obvious layout of write-once ``models["%08d/peer"]`` keys
    measured 1.69 MB after 1,000 rounds, growing without end, and writing a second key per peer makes
    this test's document 1.0 MB.
    """
    observer = Metadata("task", key(1000), expiry=10.0)
    nodes = replicas(20)
    rng, next_id, departed, sizes = random.Random(6), 20, 0, []
    for rnd in range(1000):
        for i, node in enumerate(nodes):
            if rnd % 50 == 25 and i == rnd // 50:
                node.heartbeat(float(rnd), [], "left")
                observer.apply(node.take_outgoing())
                nodes[i] = node = Metadata("task", key(next_id))
                next_id, departed = next_id + 1, departed + 1
            relay = f"/ip4/1.2.3.4/tcp/4001/p2p/{peer_id(99)}/p2p-circuit"
            node.heartbeat(float(rnd), [f"/ip4/10.0.{i}.1/tcp/4001", relay])
            node.record_model(rnd, f"{rnd * 7919 + i:064x}", 400_000 + i)
            if rnd % 10 == i % 10:
                node.set_reputation({peer_id(rng.randrange(40)): rng.random() for _ in range(5)})
            observer.apply(node.take_outgoing())
        if rnd % 10 == 0:
            observer.expire(float(rnd))
        if rnd in (10, 999):
            sizes.append(len(observer.diff(b"\x00")))
    assert set(observer.members()) == {node.peer_id for node in nodes}
    assert {r.round for r in observer.models()} == set(range(995, 1000)) and len(observer.models()) == 100
    steady, final = sizes
    assert steady < 25_000 and final < steady + 150 * departed, (sizes, departed)
