"""The metadata sync session without a network: replicas converge through its frames, and each kind of
bad frame is refused with the error (and blame) the overlay turns into a rejection."""

import time
from functools import cache

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.overlay.gossipgate import GossipGate
from shoal.overlay.metadata import Metadata, MetadataError, MetadataFull
from shoal.overlay.metasync import SyncSession


@cache
def key(i: int):
    return create_new_key_pair(i.to_bytes(32, "big"))


def replica(i: int, **bounds) -> Metadata:
    meta = Metadata("task", key(i), **bounds)
    meta.heartbeat(time.time(), [f"/ip4/127.0.0.1/tcp/{4000 + i}"])
    meta.record_model(round=1, digest=f"{i:064x}", size=100 + i)
    return meta


def run(initiator: SyncSession, responder: SyncSession) -> int:
    """Carry frames between two sessions until both are done; the number of frames sent."""
    frames, to, frame = 0, responder, initiator.start()
    assert responder.start() is None
    while frame is not None:
        frames += 1
        frame = to.receive(frame)
        to = initiator if to is responder else responder
    return frames


def test_two_replicas_converge_in_three_frames_and_count_what_they_moved():
    a, b = replica(1), replica(2)
    assert set(a.members()) != set(b.members())
    initiator, responder = SyncSession(a, initiator=True), SyncSession(b, initiator=False)
    assert run(initiator, responder) == 3
    assert initiator.done and responder.done
    assert set(a.members()) == set(b.members()) == {a.peer_id, b.peer_id}
    assert a.snapshot() == b.snapshot()
    assert initiator.received == responder.sent > 0 and responder.received == initiator.sent > 0
    with pytest.raises(RuntimeError):
        responder.receive(msgpack.packb({"e": 0, "u": b""}))  # over: a bug of ours, not the peer's


def test_a_second_sync_moves_only_what_changed():
    a, b = replica(1), replica(2)
    run(SyncSession(a, initiator=True), SyncSession(b, initiator=False))
    b.record_model(round=2, digest="f" * 64, size=7)
    first, again = SyncSession(b, initiator=True), SyncSession(a, initiator=False)
    run(first, again)
    assert {m.round for m in a.models() if m.peer == b.peer_id} == {1, 2}
    assert 0 < first.sent < len(b.diff(b"\x00"))


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (b"\xc1 not msgpack", "undecodable sync frame"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb({"nothing": b""}), "no field 'e'"),
        (msgpack.packb({"e": 0, "nothing": b""}), "no field 'sv'"),
        (msgpack.packb({"e": "0", "sv": b"\x00"}), "epoch of type str"),
        (msgpack.packb({"e": 0, "sv": 5}), "must be bytes"),
        (msgpack.packb({"e": 0, "sv": b"\xff" * 8}), "state vector does not start with a client count"),
    ],
)
def test_a_malformed_first_frame_is_the_senders_fault(frame, says):
    session = SyncSession(replica(1), initiator=False)
    with pytest.raises(MetadataError, match=says) as refused:
        session.receive(frame)
    assert refused.value.hostile and session.done


def test_a_reply_without_the_responders_state_vector_is_malformed():
    a, b = replica(1), replica(2)
    initiator = SyncSession(a, initiator=True)
    sv = msgpack.unpackb(initiator.start())["sv"]
    with pytest.raises(MetadataError, match="no field 'sv'") as refused:
        initiator.receive(msgpack.packb({"e": 0, "u": b.diff(sv)}))
    assert refused.value.hostile and initiator.done


def test_a_diff_too_big_for_our_document_is_refused_but_not_blamed():
    small, big = replica(1, max_state=600), replica(2)
    for i in range(3):
        big.record_model(round=2 + i, digest=f"{i:064x}", size=1)
    initiator = SyncSession(small, initiator=True)
    responder = SyncSession(big, initiator=False)
    reply = responder.receive(initiator.start())
    with pytest.raises(MetadataFull) as refused:
        initiator.receive(reply)
    assert not refused.value.hostile and big.peer_id not in small.members()


def test_peers_in_different_epochs_end_the_exchange_without_applying_anything():
    a, b = replica(1, epoch_length=100.0), replica(2, epoch_length=100.0)
    later = time.time() + 100.0
    a.roll(later)  # a is past a boundary, b not yet (its clock is behind)
    initiator, responder = SyncSession(a, initiator=True), SyncSession(b, initiator=False)
    assert run(initiator, responder) == 2  # sv ->, <- {"e": b's epoch}
    assert initiator.done and responder.done and initiator.skipped and responder.skipped
    assert a.peer_id not in b.members() and b.peer_id not in a.members()
    b.roll(later)
    assert run(SyncSession(a, initiator=True), SyncSession(b, initiator=False)) == 3
    assert a.peer_id in b.members() and b.peer_id in a.members()


def test_a_sync_partner_is_the_introducer_of_what_it_delivers():
    a, b = replica(1, max_entries=2), replica(2)
    c = replica(3)
    b.apply(c.diff(b"\x00"))
    run(SyncSession(a, initiator=True, peer=b.peer_id), SyncSession(b, initiator=False, peer=a.peer_id))
    assert a.roster.introducers() == {b.peer_id: 1}  # a keeps b's own record and c's, relayed by b


def test_the_gossip_gate_counts_the_rate_on_the_origins_signed_times():
    gate = GossipGate(rate=1.0, burst=3, skew=30.0)
    assert [gate.judge("a", 100.0 + i, now=100.0) for i in range(5)] == [None] * 5  # 1/s: fine
    # a relay held back 20 s of b's messages and releases them at once: b's own times are 1 s apart
    assert [gate.judge("b", 100.0 + i, now=130.0) for i in range(20)] == [None] * 20
    assert gate.judge("b", 110.0, now=130.0) == "replay"  # an older time again: a replay, or reordered
    assert gate.judge("b", 119.0, now=130.0) == "replay"
    assert gate.judge("c", 200.0, now=100.0) == "ahead"  # signed far ahead of our clock
    flood = [gate.judge("d", 100.0 + i / 100, now=101.0) for i in range(10)]  # 100/s by its own times
    assert flood[:3] == [None] * 3 and flood[3:] == ["flood"] * 7
    gate.forget_idle(now=100.0 + 601.0)
    assert gate.judge("d", 200.0, now=200.0) is None  # forgotten after idling: a fresh bucket


def test_the_gossip_gate_keeps_a_bounded_number_of_origins():
    gate = GossipGate(rate=1.0, burst=3, skew=30.0, max_origins=100)
    for i in range(1000):
        gate.judge(f"sybil-{i}", 1.0, now=1.0)
    assert len(gate._state) == 100
