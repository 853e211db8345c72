"""The metadata sync session without a network: replicas converge through its frames, and each kind of
bad frame is refused with the error (and blame) the overlay turns into a rejection."""

import time
from functools import cache

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

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
        responder.receive(msgpack.packb({"u": b""}))  # over: a bug of ours, not the peer's


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
        (msgpack.packb({"nothing": b""}), "no field 'sv'"),
        (msgpack.packb({"sv": 5}), "must be bytes"),
        (msgpack.packb({"sv": b"\xff" * 8}), "state vector does not start with a client count"),
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
        initiator.receive(msgpack.packb({"u": b.diff(sv)}))
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
