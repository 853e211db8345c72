"""The metadata document's input checks and signed records: malformed, oversized and hostile updates,
unreadable local writes, forgery, tampering, replay, hostile deletes, other tasks, and inflation."""

import contextlib
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.peer.id import ID
from pycrdt import Doc, Map

from shoal.overlay.metadata import Metadata, MetadataError, MetadataFull, MetadataRefused, ModelRecord
from shoal.overlay.records import sign_record
from tests.metadata_replicas import exchange, holder, key, peer_id, record, replicas, state, valid_update


def synced(nodes: list[Metadata]) -> Metadata:
    """A replica that has everything ``nodes`` wrote (and nothing else)."""
    observer = Metadata("task", key(1000))
    for node in nodes:
        observer.apply(node.diff(b"\x00"))
    return observer


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
