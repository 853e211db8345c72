"""The replicated metadata document: convergence, anti-entropy, expiry, bounded size, hostile input,
signed records (forgery, tampering, replay, hostile deletes, other tasks) and inflation."""

import contextlib
import random
import subprocess
import sys
import time
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from pycrdt import Array, Doc, Map, Text, merge_updates

from shoal.overlay.metadata import (
    Member,
    Metadata,
    MetadataError,
    MetadataFull,
    MetadataPending,
    MetadataRefused,
    ModelRecord,
)
from shoal.overlay.records import sign_record
from shoal.overlay.yupdate import MAX_DEPTH, UpdateError, check_state_vector, check_update


@cache
def key(i: int) -> KeyPair:
    return create_new_key_pair(i.to_bytes(32, "big"))  # deterministic identities


@cache
def peer_id(i: int) -> str:
    return ID.from_pubkey(key(i).public_key).to_base58()


def replicas(n: int, **kwargs) -> list[Metadata]:
    return [Metadata("task", key(i), **kwargs) for i in range(n)]


def exchange(nodes: list[Metadata], rng: random.Random) -> None:
    """Deliver every node's outgoing update to every other node, shuffled and each one twice."""
    updates = [(i, u) for i, node in enumerate(nodes) if (u := node.take_outgoing()) is not None]
    for j, node in enumerate(nodes):
        incoming = [u for i, u in updates if i != j] * 2
        rng.shuffle(incoming)
        for update in incoming:
            node.apply(update)


def state(node: Metadata) -> tuple:
    """Everything observable about a replica, to check that a rejected input changed nothing."""
    return node.snapshot(), node.state_vector(), node.diff(b"\x00")


def synced(nodes: list[Metadata]) -> Metadata:
    """A replica that has everything ``nodes`` wrote (and nothing else)."""
    observer = Metadata("task", key(1000))
    for node in nodes:
        observer.apply(node.diff(b"\x00"))
    return observer


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


def valid_update() -> bytes:
    node = Metadata("task", key(7))
    node.heartbeat(1.0, ["/ip4/10.0.0.7/tcp/1"])
    node.record_model(3, "ab" * 32, 10)
    node.set_reputation({peer_id(1): 0.5})
    return node.take_outgoing()


def holder() -> Metadata:
    node = Metadata("task", key(0), max_update=4096, max_state=4000)
    node.heartbeat(1.0, ["/ip4/10.0.0.1/tcp/1"])
    return node


def overwrite(node: Metadata, changes: dict) -> bytes:
    """A hostile peer's update that sets (or, for None, deletes) keys on top of everything ``node`` has."""
    hostile = Doc()
    hostile.apply_update(node.diff(b"\x00"))
    peers = hostile.get("peers", type=Map)
    for peer, value in changes.items():
        if value is None:
            del peers[peer]
        else:
            peers[peer] = value
    return hostile.get_update(node.state_vector())


def record(seen: float, state: str = "training", addrs: tuple[str, ...] = ()) -> dict:
    return {"addrs": list(addrs), "seen": seen, "state": state, "models": [], "scores": {}}


def test_truncated_flipped_and_garbage_updates_are_rejected_and_change_nothing():
    update, node, rng = valid_update(), holder(), random.Random(7)
    before = state(node)
    garbage = [b"\xff" * 64, b"\x01\x01" + b"\xff" * 30, b"\x05"]  # trailing bytes are ignored by yrs
    for data in [update[:n] for n in range(len(update))] + garbage:
        with pytest.raises(MetadataError):
            node.apply(data)
        assert state(node) == before
    rejected = 0
    for _ in range(200):
        flipped = bytearray(update)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        probe = holder()
        before = state(probe)
        try:
            probe.apply(flipped)  # most flips still decode (bytes inside strings): then the signature fails
        except MetadataError:
            rejected += 1
            assert state(probe) == before
        assert set(probe.members()) <= {peer_id(0), peer_id(7)}
    assert rejected >= 20  # measured: 41 of these 200


def test_oversized_and_mistyped_input_is_refused_before_decoding():
    node = holder()
    before = state(node)
    big = Metadata("task", key(1), max_entry_bytes=100_000)
    big.heartbeat(1.0, [f"/ip4/10.0.{i // 256}.{i % 256}/tcp/1" for i in range(400)])
    with pytest.raises(MetadataError, match="exceeds the 4096-byte limit"):
        node.apply(big.take_outgoing())
    with pytest.raises(MetadataError, match="must be bytes"):
        node.apply(10**12)  # bytes(10**12) would try to allocate a terabyte
    with pytest.raises(MetadataError, match="claims 100000000 clients"):
        node.apply(b"\x80\xc2\xd7\x2f")  # yrs would preallocate for them
    with pytest.raises(MetadataError, match="exceeds"):
        node.diff(b"\x00" * 4097)
    with pytest.raises(MetadataError, match="state vector claims 2 clients"):
        node.diff(b"\x02\x01")
    with pytest.raises(MetadataError, match="malformed state vector"):
        node.diff(b"\x01\x81")
    with pytest.raises(MetadataError):
        node.diff(b"")
    assert state(node) == before


def test_hostile_entries_are_refused_whole_blamed_and_change_nothing():
    """Each shape is signed by the key its doc key names: well-formed signatures, malformed content. No
    honest replica holds any of them (every honest node refuses them), so each proves its sender wrong."""
    good = record(5.0, addrs=("/ip4/1.2.3.4/tcp/1",))
    shapes = {
        "addrs-str": {**good, "addrs": "/ip4/1.2.3.4/tcp/1"},
        "seen-bool": {**good, "seen": True},
        "state-int": {**good, "state": 3.0},
        "no-models": {k: v for k, v in good.items() if k != "models"},
        "model-negative": {**good, "models": [[1.0, "d", -5.0]]},
        "model-fraction": {**good, "models": [[1.5, "d", 5.0]]},
        "model-huge": {**good, "models": [[2.0**60, "d", 5.0]]},
        "score-str": {**good, "scores": {"x": "high"}},
        "oversized": {**good, "addrs": ["/ip4/1.2.3.4/tcp/1"] * 300},
    }
    hostile = [
        {peer_id(200 + i): sign_record("task", key(200 + i), 1, r)} for i, r in enumerate(shapes.values())
    ]
    hostile += [
        {"not-a-peer-id": sign_record("task", key(300), 1, good)},
        {peer_id(301): 42},
        {peer_id(302): {**sign_record("task", key(302), 1, good), "extra": "unsigned"}},
        {peer_id(303): Map(sign_record("task", key(303), 1, good))},  # a container, not an atomic value
    ]
    node = Metadata("task", key(0), max_update=64_000, max_state=60_000)
    node.heartbeat(5.0, [])
    before = state(node)
    for changes in hostile:
        with pytest.raises(MetadataError, match="junk update") as refused:
            node.apply(overwrite(node, changes))
        assert refused.value.hostile and state(node) == before, changes
    fine = {**good, "models": [[2.0, "d", 7.0]], "scores": {"x": 0.25}, "extra": "signed too"}
    node.apply(overwrite(node, {peer_id(299): sign_record("task", key(299), 1, fine)}))
    assert set(node.members()) == {peer_id(0), peer_id(299)}
    assert node.models() == [ModelRecord(2, peer_id(299), "d", 7)] and node.reputation() == {"x": 0.25}


def test_records_under_other_key_types_or_with_binary_fields_are_refused_as_junk_without_raising_else():
    """A secp256k1 peer id embeds a key whose ``verify`` raises on a malformed signature, and a binary
    value cannot be encoded for checking: both are junk, refused with MetadataError and nothing else."""
    from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_pair
    from libp2p.peer.id import ID

    secp = str(ID.from_pubkey(secp256k1_pair().public_key))
    good = record(5.0)
    node = Metadata("task", key(0), max_update=64_000, max_state=60_000)
    node.heartbeat(5.0, [])
    for changes in (
        {secp: {"r": good, "c": 1.0, "s": "00" * 64}},
        {peer_id(310): {**sign_record("task", key(310), 1, good), "r": {**good, "blob": b"\x00\x01"}}},
    ):
        with pytest.raises(MetadataError, match="junk update") as refused:
            node.apply(overwrite(node, changes))
        assert refused.value.hostile
    assert set(node.members()) == {peer_id(0)}


def test_an_overwritten_own_entry_is_ignored_and_restored_by_the_next_write():
    node = holder()
    old = node.snapshot()["peers"][peer_id(0)]
    node.record_model(4, "mine", 1)
    with pytest.raises(MetadataRefused, match="not a record signed"):  # an overwrite: see below
        node.apply(overwrite(node, {peer_id(0): "taken"}))
    node.apply(overwrite(node, {peer_id(0): old}))  # our own older record, replayed: validly signed
    assert node.snapshot()["peers"][peer_id(0)] == old  # causally after our write, so it wins in the doc
    assert node.models() == [ModelRecord(4, peer_id(0), "mine", 1)]  # readers never saw it
    assert node.expire(2.0) == [] and peer_id(0) in node.snapshot()["peers"]  # never deletes its own
    node.heartbeat(2.0, ["/ip4/10.0.0.1/tcp/1"])
    assert synced([node]).members()[peer_id(0)].seen == 2.0


def test_local_writes_that_peers_could_not_read_are_refused():
    node = holder()
    before = state(node)
    for write in (
        lambda: node.set_reputation({peer_id(1): float("nan")}),
        lambda: node.record_model(3, "d", -1),
        lambda: node.record_model(2**63, "d", 1),  # pycrdt panics (a BaseException) at 2**63
        lambda: node.record_model(2**53, "d", 1),  # a float64 cannot hold it exactly
        lambda: node.record_model(True, "d", 1),
        lambda: node.heartbeat(float("inf"), []),
        lambda: node.heartbeat(2.0, [b"/ip4/1.2.3.4"]),
        lambda: node.heartbeat(2.0, ["/ip4/\ud800"]),  # a lone surrogate makes pycrdt panic
        lambda: node.heartbeat(2.0, ["/ip4/1.2.3.4/tcp/1"] * 200),  # over max_entry_bytes
    ):
        with pytest.raises(ValueError, match=r"malformed entry|over 4096 bytes"):
            write()
    assert state(node) == before and node.take_outgoing() is not None  # only the holder's heartbeat
    node.record_model(2**53 - 1, "d", 2**53 - 1)
    node.heartbeat(3.0, [])
    assert synced([node]).models() == [ModelRecord(2**53 - 1, peer_id(0), "d", 2**53 - 1)]


def three(**kwargs) -> list[Metadata]:
    """Peers 0 (a), 1 (b) and 2 (c), heartbeating at t=0 and in sync."""
    nodes = replicas(3, **kwargs)
    for i, node in enumerate(nodes):
        node.heartbeat(0.0, [f"/ip4/10.0.0.{i}/tcp/1"])
    exchange(nodes, random.Random(8))
    return nodes


def test_a_record_forged_for_another_peer_is_refused_and_blamed_when_its_bytes_name_the_key():
    """A forgery set at a key (the bytes name it) is blamed. One written over the current value inherits
    its key from this replica's history, which a writer reusing a client id can make differ between
    replicas: it is refused without blame (see test_metadata_attacks.py, equivocation)."""
    a, _, c = three()
    left = record(1.0, "left")
    forged = sign_record("task", key(1), 10**12, left)  # b signs a's departure
    unsigned = {**forged, "s": "00" * 64}
    before = state(c)
    for value in (forged, unsigned):
        with pytest.raises(MetadataError, match="not a record signed by its key") as refused:
            c.apply(fresh_writer({a.peer_id: value}))
        assert refused.value.hostile and state(c) == before
        with pytest.raises(MetadataRefused, match="not a record signed by its key"):
            c.apply(overwrite(c, {a.peer_id: value}))
        assert state(c) == before
    assert c.members()[a.peer_id] == a.members()[a.peer_id]
    a.heartbeat(1.0, [], "left")  # signed by a: honoured
    c.apply(a.take_outgoing())
    assert c.members()[a.peer_id].state == "left" and c.expire(1.0) == [a.peer_id]


def test_a_tampered_field_under_a_kept_signature_is_refused():
    a, _, c = three()
    genuine = c.snapshot()["peers"][a.peer_id]
    tampered = {**genuine, "r": {**genuine["r"], "addrs": ["/ip4/6.6.6.6/tcp/1"]}}
    with pytest.raises(MetadataError, match="not a record signed by its key") as refused:
        c.apply(fresh_writer({a.peer_id: tampered}))
    assert refused.value.hostile
    with pytest.raises(MetadataRefused):
        c.apply(overwrite(c, {a.peer_id: tampered}))
    assert c.members()[a.peer_id].addrs == ("/ip4/10.0.0.0/tcp/1",)


def fresh_writer(changes: dict) -> bytes:
    """A new writer's update setting ``changes``: each key is named in the bytes."""
    doc = Doc()
    peers = doc.get("peers", type=Map)
    for k, value in changes.items():
        peers[k] = value
    return doc.get_update()


def test_a_replayed_older_record_is_ignored_and_a_departed_peer_stays_gone():
    a, _, c = three()
    old = c.snapshot()["peers"][a.peer_id]
    a.heartbeat(5.0, ["/ip4/10.0.0.100/tcp/1"])
    c.apply(a.take_outgoing())
    c.apply(overwrite(c, {a.peer_id: old}))  # someone re-writes a's older, validly signed record
    assert c.snapshot()["peers"][a.peer_id] == old
    assert c.members()[a.peer_id].seen == 5.0
    assert c.expire(5.0) == [] and a.peer_id not in c.snapshot()["peers"]  # the replay went, a stayed
    newer = a.snapshot()["peers"][a.peer_id]
    a.apply(c.diff(a.state_vector()))  # else c's doc may order a's write before the replay it missed
    a.heartbeat(6.0, [], "left")
    c.apply(a.take_outgoing())
    assert c.expire(6.0) == [a.peer_id]
    c.apply(overwrite(c, {a.peer_id: newer}))  # replaying its last record before it left
    assert a.peer_id not in c.members()


def test_a_hostile_delete_does_not_hide_a_live_peer_until_it_expires():
    a, _, c = three(expiry=10.0)
    c.apply(overwrite(c, {a.peer_id: None}))
    assert a.peer_id not in c.snapshot()["peers"] and c.members()[a.peer_id] == a.members()[a.peer_id]
    assert c.expire(9.0) == []
    a.heartbeat(9.0, [])  # its next heartbeat restores the doc copy
    c.apply(a.take_outgoing())
    assert c.snapshot()["peers"][a.peer_id]["r"]["seen"] == 9.0
    c.apply(overwrite(c, {a.peer_id: None}))
    assert a.peer_id in c.expire(19.5) and a.peer_id not in c.members()  # then only expiry removes it


def test_a_record_signed_for_another_task_is_refused_and_blamed():
    elsewhere = Metadata("other-task", key(0))
    elsewhere.heartbeat(0.0, ["/ip4/10.0.0.0/tcp/1"])
    value = elsewhere.snapshot()["peers"][elsewhere.peer_id]
    c = Metadata("task", key(2))
    c.heartbeat(0.0, [])
    with pytest.raises(MetadataError, match="for this task") as refused:
        c.apply(overwrite(c, {elsewhere.peer_id: value}))
    assert refused.value.hostile and set(c.members()) == {c.peer_id}


def test_inflation_stays_within_bounds_and_honest_replicas_keep_syncing():
    """A hostile peer pushes 1,500 records validly signed by fresh keys, 100 per update, to a; a batch
    with forged records is refused whole and blamed. The member cap holds (the sybils' relayer cannot
    evict what others introduced), the sender's quota of records readers refused ends its new keys
    (refused, not blamed), the state bound holds, a's diffs stay within every peer's update limit, and
    after expiry a, b and c sync each other again."""
    bounds = {"max_entries": 50, "max_state": 150_000, "max_update": 300_000}
    a, *_ = nodes = three(**bounds)
    padding = tuple(f"/ip4/10.9.{i}.1/tcp/4001" for i in range(10))
    refused = 0
    for batch in range(15):
        hostile = Doc()  # a fresh writer per batch, so that no batch builds on a refused one
        peers = hostile.get("peers", type=Map)
        with hostile.transaction():
            for i in range(batch * 100, batch * 100 + 100):
                peers[peer_id(10_000 + i)] = sign_record(
                    "task", key(10_000 + i), 1, record(0.5, addrs=padding)
                )
        update = hostile.get_update()
        before = state(a)
        try:
            a.apply(update, sender="evil")
        except MetadataFull as e:
            assert e.hostile is False and state(a) == before
            refused += 1
        assert len(a.members()) <= 50 and len(a.diff(b"\x00")) <= bounds["max_state"]
    assert refused >= 13 and {n.peer_id for n in nodes} <= set(a.members())
    assert len(a.members()) == 50  # the cap, filled by the first sybils; the rest are ignored
    forgery = {**sign_record("task", key(20_000), 1, record(0.5)), "s": "00" * 64}
    with pytest.raises(MetadataError, match="not a record signed") as forged:
        a.apply(overwrite(a, {peer_id(20_000): forgery}), sender="evil")
    assert forged.value.hostile
    a.expire(1.0)
    assert len(a.snapshot()["peers"]) == 50  # over-cap entries deleted
    for t in (2.0, 3.0):
        for node in nodes:
            node.heartbeat(t, [])
        exchange(nodes, random.Random(9))
        for x in nodes:
            for y in nodes:
                x.apply(y.diff(x.state_vector()))
    assert all(n.members()[m.peer_id].seen == 3.0 for n in nodes for m in nodes)


def test_verified_records_are_not_verified_again(monkeypatch):
    nodes = replicas(100)
    for node in nodes:
        node.heartbeat(0.0, [])
    calls = []
    real = Ed25519PublicKey.verify
    monkeypatch.setattr(Ed25519PublicKey, "verify", lambda self, *a: calls.append(1) or real(self, *a))
    observer = synced(nodes)
    assert len(calls) == 100 and len(observer.members()) == 100
    start = time.perf_counter()
    for _ in range(10_000):
        observer.members()
    elapsed = time.perf_counter() - start
    for node in nodes:
        observer.apply(node.diff(b"\x00"))  # re-deliveries
    observer.expire(1.0)
    assert len(calls) == 100 and elapsed < 2.0, elapsed  # measured: ~0.15 s


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_metadata_error_and_change_nothing(data):
    node = holder()
    before = state(node)
    try:
        node.apply(data)
    except MetadataError:
        assert state(node) == before
    with contextlib.suppress(MetadataError):
        node.diff(data)
    for read in (node.members, node.models, node.reputation):
        read()


# -- the update parser (overlay/yupdate.py) that runs before yrs ----------------------------------------


def nested_update(levels: int) -> bytes:
    """An update setting ``peers["x"] = {"r": [[...]]}`` with ``levels`` + 1 nested arrays (lib0 Any).

    yrs decodes Any recursively: at 40,000 levels applying it segfaults, and at 20,000 reading the value
    back does; built by splicing, since pycrdt itself would recurse as deep to encode it."""
    doc = Doc()
    value: list = []
    for _ in range(8):
        value = [value]
    doc.get("peers", type=Map)["x"] = {"r": value}
    update = doc.get_update()
    pattern = b"\x75\x01" * 8  # Any array (117) of one element
    at = update.index(pattern)
    return update[:at] + b"\x75\x01" * levels + update[at + len(pattern) :]


def test_any_nested_beyond_the_bound_is_rejected_before_yrs_sees_it():
    node = holder()
    before = state(node)
    node.max_update = 4 * 2**20  # let the 2 MB one reach the parser
    for levels in (40_000, 1_000_000):
        with pytest.raises(MetadataError, match=f"nested over {MAX_DEPTH} deep") as caught:
            node.apply(nested_update(levels))
        assert caught.value.hostile is True and state(node) == before
    check_update(
        nested_update(MAX_DEPTH - 2)
    )  # the map, MAX_DEPTH - 2 arrays and the empty one: at the bound
    with pytest.raises(UpdateError, match="nested over"):
        check_update(nested_update(MAX_DEPTH - 1))


def test_applying_the_deep_update_no_longer_kills_the_process():
    """The segfault cannot be caught, so the probe runs in a subprocess: it must exit normally."""
    probe = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from test_metadata import holder, nested_update\n"
        "from shoal.overlay.metadata import MetadataError\n"
        "node = holder(); node.max_update = 4 * 2**20\n"
        "try:\n"
        "    node.apply(nested_update(40_000))\n"
        "except MetadataError as e:\n"
        "    print('rejected:', e)\n"
        "print(sorted(node.snapshot()['peers']))\n"
    )
    here = __file__.rsplit("/", 1)[0]
    done = subprocess.run(
        [sys.executable, "-c", probe, here, here + "/.."], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "rejected: malformed update: Any values nested over" in done.stdout
    assert "'x'" not in done.stdout


def test_truncated_padded_and_absurd_updates_are_rejected_with_a_reason():
    update = valid_update()
    check_update(update)
    for n in range(len(update)):
        with pytest.raises(UpdateError, match=r"truncated|exceeds|out of range|invalid"):
            check_update(update[:n])
    with pytest.raises(UpdateError, match="trailing bytes"):
        check_update(update + b"\x00")
    item = b"\x01\x01\x01\x00\x28\x01\x01p\x01k"  # one Any item at peers["k"]; its content follows
    absurd = {
        b"\x01\xff\xff\xff\x0f\x01\x00": "struct count",  # 2**32 - 1 structs in 2 bytes
        item + b"\xff\xff\x03\x7e": "Any content count",
        item + b"\x01\x75\xff\xff\x03": "Any container count",
        item + b"\x01\x76\xff\xff\x03": "Any container count",
        item + b"\x01\x77\xff\xff\x03ab\x00": "truncated",  # string length
        b"\x01\x01\x01\x00\x28\x01\xff\xff\xff\x7fp": "truncated",  # root name length
        item + b"\x01\x7d" + b"\xff" * 11 + b"\x00": "varint over 10",
        item + b"\x01\x77\x01\xff\x00": "invalid UTF-8",
        b"\x01\x01\x01\xfe\xff\xff\xff\x0f\x00\x02\x00": "clock overflows",  # GC of 2 at clock 2**32 - 2
        b"\x01\x01\x01\x80\x80\x80\x80\x10\x00": "out of range",  # clock 2**32
        item + b"\x01\x63\x00": "unknown Any tag",
        b"\x01\x01\x01\x00\x22\x01\x01p\x01k\x01\x00\x00": "legacy JSON",
        b"\x01\x01\x01\x00\x2b\x01\x01p\x01k\x00": "content ref 11",
        b"\x01\x01\x01\x00\x38\x01\x01p\x01k\x01\x7e\x00": "struct info",
        b"\x01\x01\x01\x00\x28\x02\x01p\x01k\x01\x7e\x00": "parent info",
        b"\x01\x01\x01\x00\x27\x00\x05\x00\x01k\x01\x00": "nested shared type",
        b"\x00\xff\xff\xff\x0f": "delete set client count",
        b"\x00\x01\x05\xff\xff\xff\x0f": "delete range count",
        b"\x00\x01\x05\x01\xff\xff\xff\xff\x0f\x01": "delete range overflows",
    }
    for data, reason in absurd.items():
        with pytest.raises(UpdateError, match=reason):
            check_update(data)
    node = holder()
    before = state(node)
    for data in absurd:
        with pytest.raises(MetadataError, match=r"claims|malformed update") as caught:
            node.apply(data)
        assert caught.value.hostile is True
    assert state(node) == before


def test_state_vectors_are_validated_fully():
    node = holder()
    check_state_vector(node.state_vector())
    check_state_vector(b"\x00")
    for data, reason in {
        b"\x01\x05\x80": "truncated",
        b"\x01\x05\x80\x80\x80\x80\x10": "out of range",
        b"\x01\x05\x05\x00": "trailing",
        b"\x7f" + b"\x01" * 200: "client count",
        b"\x01" + b"\xff" * 11 + b"\x00": "varint over 10",
    }.items():
        with pytest.raises(UpdateError, match=reason):
            check_state_vector(data)
        with pytest.raises(MetadataError, match="state vector"):
            node.diff(data)


def test_a_shared_type_nested_in_another_is_rejected_but_one_under_a_root_is_not():
    doc = Doc()
    peers = doc.get("peers", type=Map)
    peers["a"] = Map({"k": 1.0})  # like the hostile container entry above: readers skip it
    check_update(doc.get_update())
    sv = doc.get_state()
    peers["a"]["inner"] = Map({"k": 2.0})  # a chain of these is what yrs deletes recursively
    with pytest.raises(UpdateError, match="nested shared type"):
        check_update(doc.get_update(sv))
    peers["a"] = Array([1.0])  # overwrites carry an origin: the parent is not named in the bytes
    with pytest.raises(UpdateError, match="nested shared type"):
        check_update(doc.get_update())


def test_generic_pycrdt_content_parses():
    doc = Doc()
    text = doc.get("t", type=Text)
    text += "héllo 😀 wörld"
    text.insert(2, "x", {"bold": True})
    text.format(0, 3, {"italic": True})
    del text[4:6]
    doc.get("a", type=Array).extend(
        [b"\x00\xff", 1.0, -7, 2**40, 2.5, None, True, "s", {"q": [1, {"z": []}]}]
    )
    peers = doc.get("peers", type=Map)
    peers["m"] = Map({"a": 1})
    del peers["m"]
    check_update(doc.get_update())
    check_state_vector(doc.get_state())


printable = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
operation = st.one_of(
    st.tuples(st.just("heartbeat"), st.integers(0, 4), st.lists(printable, max_size=3), printable),
    st.tuples(st.just("model"), st.integers(0, 4), st.integers(0, 2**53 - 1), printable),
    st.tuples(
        st.just("scores"), st.integers(0, 4), st.dictionaries(printable, st.floats(-1e9, 1e9), max_size=4)
    ),
    st.tuples(st.just("expire"), st.integers(0, 4), st.floats(0, 200)),
    st.tuples(st.just("sync"), st.integers(0, 4), st.integers(0, 4)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(operation, max_size=40), st.randoms(use_true_random=False))
def test_every_update_and_state_vector_from_honest_writes_passes_the_parser(ops, rng):
    nodes = replicas(5, max_entry_bytes=100_000)
    now = 0.0
    updates: list[bytes] = []
    vectors: list[bytes] = []
    for op, i, *args in ops:
        node, now = nodes[i], now + 1.0
        with contextlib.suppress(ValueError):  # writes the node itself refuses never reach the doc
            if op == "heartbeat":
                node.heartbeat(now, args[0], args[1] or "training")
            elif op == "model":
                node.record_model(args[0] % 50, args[1] or "d", args[0])
            elif op == "scores":
                node.set_reputation(args[0])
            elif op == "expire":
                node.expire(args[0])
            else:
                other = nodes[args[0]]
                vectors.append(node.state_vector())
                updates.append(other.diff(vectors[-1]))
                node.apply(updates[-1])
        if (update := node.take_outgoing()) is not None:
            updates.append(update)
            for other in rng.sample(nodes, 2):
                with contextlib.suppress(MetadataPending):  # gossip out of order: never blamed
                    other.apply(update)  # also checked by apply itself
    for node in nodes:
        vectors.append(node.state_vector())
        updates += [node.diff(b"\x00"), node.diff(nodes[0].state_vector())]
    if updates:
        updates.append(merge_updates(*rng.sample(updates, min(len(updates), 6))))
    for update in updates:
        check_update(update)
    for vector in vectors:
        check_state_vector(vector)
