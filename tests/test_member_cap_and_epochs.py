"""The metadata document's member cap, shared by who delivered the records, and its epochs: a fresh
document at each boundary, members kept, and a size bounded over hours of churn and junk."""

import contextlib

import pytest

from shoal.overlay.metadata import Metadata, MetadataFull
from shoal.overlay.roster import Roster
from tests.attacker import fresh_update
from tests.metadata_replicas import key, node, peer_id, signed

# -- the member cap, shared by introducer -------------------------------------------------------------


def roster(max_entries: int, slot_bytes: int = 2048) -> Roster:
    r = Roster(
        "task", peer_id(0), expiry=60.0, max_entries=max_entries, max_entry_bytes=4096, slot_bytes=slot_bytes
    )
    r.tick(1.0)
    return r


def test_sybils_of_one_relayer_cannot_keep_out_newcomers_from_others():
    r = roster(10)
    for i in range(100, 130):  # 30 sybils from one relayer: 10 fit
        r.accept(peer_id(i), signed(i), "sybil-relay")
    assert len(r.records) == 10 and r.introducers() == {"sybil-relay": 10}
    assert not r.accept(peer_id(200), signed(200), "sybil-relay")  # more from it: refused
    assert r.accept(peer_id(1), signed(1), "honest")  # a newcomer from another relayer: evicts one
    assert r.accept(peer_id(2), signed(2), "honest-2")
    assert r.accept(peer_id(3), signed(3), "honest")
    assert r.introducers() == {"sybil-relay": 7, "honest": 2, "honest-2": 1}
    assert len(r.records) == 10 and set(r.take_evicted()) <= {peer_id(i) for i in range(100, 130)}
    for i in range(4, 20):  # honest newcomers keep coming: the relayers end up with equal shares
        r.accept(peer_id(i), signed(i), f"relay-{i % 2}")
    shares = r.introducers()
    assert max(shares.values()) - min(shares.values()) <= 2 and shares["sybil-relay"] <= 3, shares


def test_our_own_and_direct_peers_records_always_have_a_place():
    r = roster(5)
    r.accept(peer_id(1), signed(1), "a")
    for i in range(100, 110):
        r.accept(peer_id(i), signed(i), peer_id(i))  # each delivered by itself, through one relayer
    assert len(r.records) == 5
    r.protect([peer_id(1), peer_id(2)])
    assert r.accept(peer_id(2), signed(2), peer_id(100))  # a direct peer, even from the top relayer
    assert peer_id(1) in r.records and peer_id(2) in r.records
    r.protect([peer_id(1), peer_id(2), peer_id(3), peer_id(4), peer_id(5)])
    for i in (3, 4, 5):
        assert r.accept(peer_id(i), signed(i), peer_id(i))
    assert set(r.records) == {peer_id(i) for i in range(1, 6)}  # protected ones only now
    r.protect([peer_id(i) for i in range(1, 7)])
    assert not r.accept(peer_id(6), signed(6), peer_id(6))  # nothing left to evict: refused


def test_large_records_take_more_slots():
    r = roster(10, slot_bytes=512)
    big = signed(100, addrs=[f"/ip4/10.0.{j}.1/tcp/4001" for j in range(60)])
    assert r.accept(peer_id(100), big, "x") and r.slots(r.records[peer_id(100)]) >= 3
    for i in range(1, 20):
        r.accept(peer_id(i), signed(i), "y")
    assert sum(r.slots(v) for v in r.records.values()) <= 10


def test_evicted_sybils_are_deleted_from_the_document_at_expiry():
    meta = node(0, max_entries=6, junk_quota=100)
    for i in range(100, 110):
        meta.apply(fresh_update({peer_id(i): signed(i)}), sender="sybil-relay")
    assert len(meta.members()) == 6
    newcomer = node(1)
    meta.apply(newcomer.diff(b"\x00"), sender="honest")
    assert peer_id(1) in meta.members() and len(meta.members()) == 6
    meta.expire(1.0)
    assert set(meta.snapshot()["peers"]) == set(meta.members())


# -- epochs ---------------------------------------------------------------------------------------------


def test_at_an_epoch_boundary_the_document_starts_empty_and_members_stay():
    nodes = [Metadata("task", key(i), epoch_length=100.0, expiry=60.0) for i in range(3)]
    for meta in nodes:
        meta.roll(50.0)
        meta.heartbeat(50.0, [])
    for meta in nodes:
        for other in nodes:
            meta.apply(other.diff(meta.state_vector()), sender=other.peer_id)
    junk = {peer_id(100 + i): signed(100 + i, seen=50.0) for i in range(20)}
    nodes[0].apply(fresh_update(junk), sender="evil")
    nodes[0].expire(50.0)
    tombstones = nodes[0].size()
    assert nodes[0].roll(101.0) and nodes[0].epoch == 1
    assert set(nodes[0].snapshot()["peers"]) == {peer_id(0)} and nodes[0].size() < tombstones / 5
    assert {peer_id(i) for i in range(3)} <= set(nodes[0].members())  # no member flaps
    assert nodes[0].members()[peer_id(0)].seen == 101.0  # our record, rewritten into the new document
    assert not nodes[0].roll(150.0) and not nodes[0].roll(99.0)  # same epoch; never back


@pytest.mark.slow
def test_the_document_stays_bounded_over_hours_of_churn_and_junk():
    """20 peers heartbeat every 10 s (every 50 s one leaves for good and a new one joins); a sybil pusher
    brings 40 stale records signed by fresh keys every 10 s. One observer, 5-minute epochs, 90 minutes.
    Without epochs every record expired leaves its tombstone for good; with them the document at each
    epoch's end is the same size."""
    observer = Metadata("task", key(1000), expiry=60.0, epoch_length=300.0)
    nodes = [Metadata("task", key(i), epoch_length=300.0) for i in range(20)]
    next_id, sybil, sizes = 20, 10_000, []
    for t in range(0, 90 * 60, 10):
        now = float(t)
        if t % 50 == 0:
            i = (t // 50) % 20
            nodes[i].heartbeat(now, [], "left")
            observer.apply(nodes[i].take_outgoing(), sender=nodes[i].peer_id)
            nodes[i], next_id = Metadata("task", key(next_id), epoch_length=300.0), next_id + 1
        for meta in [*nodes, observer]:
            if meta.roll(now):
                meta.take_outgoing()  # published into the new epoch (this test only carries diffs)
            meta.heartbeat(now, [f"/ip4/10.0.0.1/tcp/4001/p2p/{meta.peer_id}"])
            meta.record_model(t // 10, f"{t:064x}", 400_000)
        for meta in nodes:
            meta.take_outgoing()
            with contextlib.suppress(MetadataFull):
                observer.apply(meta.diff(observer.state_vector()), sender=meta.peer_id)
        stale = {peer_id(sybil + j): signed(sybil + j, seen=now - 100.0) for j in range(40)}
        sybil += 40
        with contextlib.suppress(MetadataFull):
            observer.apply(fresh_update(stale), sender=f"sybil-{t // 60}")  # a fresh identity every minute
        observer.expire(now)
        if t % 300 == 290:
            sizes.append(observer.size())
    print("document size at each epoch's end (bytes):", sizes)
    assert len(observer.members()) == 21
    assert max(sizes) < 1.3 * min(sizes) and max(sizes) < 150_000, sizes
