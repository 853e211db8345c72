"""Syncing the task's metadata document (``overlay.metadata``) between peers, and our own record in it.

- Anti-entropy: a state-vector exchange in three frames on ``/shoal/<task>/meta`` (sv ->,
  <- diff + sv, diff ->), with every newly connected peer and with a random one every
  ``sync_interval``. The exchange is a sans-IO state machine (:class:`SyncSession`: given the other
  side's frame, the frame to answer with); :meth:`MetaSync.exchange` is its I/O, a few lines around it.
  Every frame carries the sender's epoch; peers in different epochs (at a boundary, within their clock
  skew) end the exchange without applying anything. Inbound exchanges are rate limited per peer.
- Gossip: local edits are published once a second on the task's topic (``overlay.announce``) as
  ``{"e": epoch, "t": wall-clock time, "u": update}``, when at most ``MAX_GOSSIP`` bytes (bigger ones
  travel by anti-entropy). A received one is judged and applied *before* gossipsub forwards it
  (:meth:`MetaSync.admit_gossip`, run by ``Announcements.gate``), so a node forwards only what it
  applied. The message's origin is authenticated (py-libp2p 0.8.1 signs and verifies pubsub messages by
  default, ``strict_signing``; the gate verifies it again before anything else), and gossip is a node's
  own local writes: an update may insert items only under its origin's key (``overlay.admission``),
  deletions allowed. Each forwarder may deliver ``FORWARD_RATE`` updates a second (the rest are
  dropped); each origin may publish ``GOSSIP_RATE`` a second (burst ``GOSSIP_BURST``) by the times it
  signed (:class:`GossipGate`: a relay that holds back an honest peer's messages and releases them at
  once cannot get it blamed); replays, reordered messages and times far ahead are dropped unblamed.
- Heartbeat: our record (addresses, state: joining, training, left) is rewritten every
  ``heartbeat_interval``, and expired records are dropped then; at each epoch boundary the document
  starts afresh (``Metadata.roll``) and our record is published into it at once.

Blame: junk (``MetadataError.hostile``) counts against its sender: the sync partner, or the gossip's
origin and its forwarder (an honest forwarder applies the same stateless rules before forwarding, so
never passes junk on); updates merely over a bound or a quota are refused without blame; updates that
build on what we have not seen are dropped quietly and repaired by a sync with their forwarder.

A successful exchange makes the other side a task peer (``overlay.peers``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from enum import Enum
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from shoal.overlay.announce import Announcements
from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import Libp2pStream, write_frame
from shoal.overlay.gossipgate import GossipGate
from shoal.overlay.guard import Guard
from shoal.overlay.host import reset_stream, serves
from shoal.overlay.metadata import Metadata, MetadataError, MetadataFull, MetadataPending
from shoal.overlay.peers import Peers
from shoal.overlay.penalties import RateLimit
from shoal.overlay.records import short
from shoal.overlay.tasks import Tasks

log = logging.getLogger("shoal.overlay")

MAX_META_FRAME = 8 * 2**20
SYNC_TIMEOUT = 10.0
MAX_GOSSIP = 64 * 1024  # an honest update is our record (<= 4 KiB) plus deletions: ~1 KiB, measured
GOSSIP_RATE, GOSSIP_BURST = 1.0, 10  # per origin: honest nodes publish at most once a loop tick (1 s)
GOSSIP_SKEW = 30.0  # seconds an origin's signed time may be ahead of ours
# per forwarder, all origins: gossipsub forwards at most 10 messages a second per topic and link, so an
# honest forwarder stays below; the excess is dropped unblamed (what many origins send through one link
# may each be within its own rate, and updates that wait for others are never blamed)
FORWARD_RATE, FORWARD_BURST = 20.0, 100
SYNC_RATE, SYNC_BURST = 1.0, 10  # inbound exchanges per peer: honest ones start ~1 in 5 s, plus repairs
REPAIR_AFTER = 5.0  # seconds between repair syncs with one peer


class _Next(Enum):
    """The frame a session waits for."""

    SV = "the initiator's state vector"
    DIFF = "the initiator's diff"
    DIFF_AND_SV = "the responder's diff and state vector"


class SyncSession:
    """One side of the three-frame exchange with ``peer``, without I/O: the initiator sends
    ``{"e": epoch, "sv": state vector}``, the responder answers ``{"e", "u": diff, "sv"}``, the initiator
    ends with ``{"e", "u": diff}``; each side applies the diff it gets. A side in another epoch answers
    or ends with ``{"e": its epoch}`` alone, and both are done without applying anything (``skipped``).

    Send :meth:`start`'s frame if any, then feed each frame from the other side to :meth:`receive` and
    send what it returns, until :attr:`done`. :meth:`receive` raises MetadataError for a frame that is
    malformed (``hostile``) or refused (not hostile); the session is then over, unfinished.
    """

    def __init__(self, metadata: Metadata, initiator: bool, peer: str | None = None) -> None:
        self.metadata, self.initiator, self.peer = metadata, initiator, peer
        self.received = 0  # bytes of the update applied from the other side
        self.sent = 0  # bytes of the diff sent to it
        self.skipped = False  # the other side was in another epoch
        self._next: _Next | None = _Next.DIFF_AND_SV if initiator else _Next.SV  # None: over

    @property
    def done(self) -> bool:
        """Whether the exchange is over: finished, skipped, or failed with MetadataError."""
        return self._next is None

    def start(self) -> bytes | None:
        """The first frame: the initiator's state vector; None for the responder, which waits."""
        return self._pack(sv=self.metadata.state_vector()) if self.initiator else None

    def receive(self, frame: bytes) -> bytes | None:
        """Apply the other side's frame; the frame to answer with, or None."""
        if self._next is None:
            raise RuntimeError("the sync session is over")
        expected, self._next = self._next, None  # over if this frame is refused
        value = _unpack(frame, "sync frame")
        try:
            epoch = value["e"]
            if not isinstance(epoch, int) or isinstance(epoch, bool):
                raise MetadataError(f"epoch of type {type(epoch).__name__}")
            if epoch != self.metadata.epoch:  # one of us is past a boundary: nothing to exchange
                self.skipped = True
                return self._pack() if expected is _Next.SV else None
            if expected is _Next.SV:  # responder: what the initiator lacks, and what we have
                diff = self.metadata.diff(value["sv"])
                self.sent, self._next = len(diff), _Next.DIFF
                return self._pack(u=diff, sv=self.metadata.state_vector())
            update = value["u"]
            self.metadata.apply(update, sender=self.peer)
            self.received = len(update)
            if expected is _Next.DIFF:  # responder: the initiator's diff ends the exchange
                return None
            diff = self.metadata.diff(value["sv"])  # initiator: what the responder lacks
            self.sent = len(diff)
            return self._pack(u=diff)
        except KeyError as e:
            raise MetadataError(f"no field {e}") from None

    def _pack(self, **fields: bytes) -> bytes:
        return msgpack.packb({"e": self.metadata.epoch, **fields})


class MetaSync:
    """Anti-entropy, gossip of local edits, and the heartbeat of our own record (see module doc)."""

    def __init__(
        self,
        host: IHost,
        task: str,
        metadata: Metadata,
        config: P2PConfig,
        *,
        guard: Guard,
        peers: Peers,
        announcements: Announcements,
        tasks: Tasks,
        addresses: Callable[[], list[str]],
        bytes_in: Counter[str],
        bytes_out: Counter[str],
    ) -> None:
        self.host, self.metadata, self.config = host, metadata, config
        self.protocol = TProtocol(f"/shoal/{task}/meta/1.0.0")
        self.topic = f"shoal/{task}/meta"
        self.state = "joining"  # in our metadata record: joining, training, left
        self._guard, self._peers, self._announcements, self._tasks = guard, peers, announcements, tasks
        self._addresses, self._bytes_in, self._bytes_out = addresses, bytes_in, bytes_out
        self.gate = GossipGate(GOSSIP_RATE, GOSSIP_BURST, GOSSIP_SKEW)
        self._syncs = RateLimit(SYNC_RATE, SYNC_BURST)
        self._forwarded = RateLimit(FORWARD_RATE, FORWARD_BURST)
        self.gossip: Counter[str] = Counter()  # what became of gossiped updates, by outcome
        self._repairs: dict[str, float] = {}  # peer: when we last synced with it to fill a gap
        announcements.gate(self.topic, self.admit_gossip, max_size=MAX_GOSSIP, refuse=self._refuse_gossip)
        metadata.roll(time.time())  # into the current epoch before any exchange
        announcements.on_malformed(  # the guard's blame for gossipsub itself: we own both ends of it here
            lambda peer, reason: guard.reject(peer, "malformed gossip", reason, wrong=True)
        )

    def heartbeat(self) -> None:
        """Rewrite our record now: our addresses or state may have changed (or the epoch did)."""
        now = time.time()
        self.metadata.roll(now)
        self.metadata.heartbeat(now, self._addresses(), self.state)

    async def run(self) -> None:
        last_heartbeat = 0.0
        while True:
            await trio.sleep(1.0)
            now = time.time()
            self.metadata.protect(self._peers.task_peers)
            if self.metadata.roll(now):
                log.debug("metadata: epoch %d, a fresh document", self.metadata.epoch)
                last_heartbeat = 0.0
            if now - last_heartbeat >= self.config.heartbeat_interval:
                last_heartbeat = now
                if self.state == "joining":
                    self.state = "training"
                self.metadata.heartbeat(now, self._addresses(), self.state)
                gone = self.metadata.expire(now)
                if gone:  # junk and Sybil records expire by the thousand: one line, a few names
                    log.info("metadata: %d expired (%s)", len(gone), ", ".join(short(p) for p in gone[:3]))
                clock = trio.current_time()
                self.gate.forget_idle(now)
                self._syncs.forget_idle(clock)
                self._forwarded.forget_idle(clock)
                self._repairs = {p: t for p, t in self._repairs.items() if clock - t < REPAIR_AFTER}
            await self.publish()
            # anti-entropy with a task peer, or with a connected one whose first sync failed
            candidates = [ID.from_base58(p) for p in self._peers.peers()] + [
                p
                for p in self.host.get_connected_peers()
                if str(p) not in self._peers.task_peers and serves(self.host, p, self.protocol)
            ]
            if candidates and random.random() < 1.0 / self.config.sync_interval:
                self._tasks.spawn(self.sync_with, random.choice(candidates))

    async def leave(self, timeout: float) -> None:
        """Tell the swarm we are leaving (state "left"), so peers need not wait for a timeout."""
        self.state = "left"  # every later heartbeat keeps saying so
        self.heartbeat()
        with trio.move_on_after(timeout):
            await self.publish()
            async with trio.open_nursery() as nursery:
                for peer in list(self._peers.task_peers):
                    nursery.start_soon(self.sync_with, ID.from_base58(peer))

    async def publish(self) -> None:
        update = self.metadata.take_outgoing()
        if update is None or len(update) > MAX_GOSSIP - 64:  # bigger ones travel by anti-entropy
            return
        envelope = msgpack.packb({"e": self.metadata.epoch, "t": time.time(), "u": update})
        await self._announcements.publish(self.topic, envelope)

    async def on_update(self, sender: str, update: bytes) -> None:
        """A gossiped update delivered to our subscription: already applied by :meth:`admit_gossip`."""

    def admit_gossip(self, forwarder: str, origin: str, data: bytes) -> bool:
        """Judge and apply a gossiped update signed by ``origin`` and delivered by ``forwarder``; True if
        applied (gossipsub then forwards it). Runs before gossipsub processes the message further."""
        outcome = self._admit_gossip(forwarder, origin, data)
        self.gossip[outcome] += 1
        return outcome == "applied"

    def _admit_gossip(self, forwarder: str, origin: str, data: bytes) -> str:
        if self._guard.banned(origin):
            return "banned"
        if not self._forwarded.allow(forwarder, trio.current_time()):
            return "over the forwarder's rate"
        try:
            envelope = _unpack(data, "gossip envelope")
            epoch, sent, update = envelope["e"], envelope["t"], envelope["u"]
            if not isinstance(epoch, int) or not isinstance(sent, float) or not isinstance(update, bytes):
                raise MetadataError("gossip envelope with fields of the wrong types")
            if not math.isfinite(sent):  # NaN compares false with everything: it would reset the rate
                raise MetadataError("gossip envelope with a time that is not finite")
        except (MetadataError, KeyError) as e:
            self._blame(
                forwarder, origin, e if isinstance(e, MetadataError) else MetadataError(f"no field {e}")
            )
            return "junk"
        if epoch != self.metadata.epoch:
            return "another epoch"  # a peer past a boundary (or not yet): its record comes again soon
        verdict = self.gate.judge(origin, sent, time.time())
        if verdict == "flood":
            rate = f"{GOSSIP_RATE:g}/s, burst {GOSSIP_BURST}"
            self._guard.reject(origin, "flood", f"metadata gossip faster than {rate}", wrong=True)
        if verdict is not None:
            return verdict
        try:
            self.metadata.apply(update, sender=forwarder, origin=origin)
        except MetadataPending as e:
            log.debug("metadata gossip from %s not applicable yet: %s", origin, e)
            self._repair(forwarder)
            return "pending"
        except MetadataError as e:
            self._blame(forwarder, origin, e)
            return "junk" if e.hostile else "refused"
        return "applied"

    def _blame(self, forwarder: str, origin: str, error: MetadataError) -> None:
        self._guard.reject(origin, _metadata_kind(error), f"metadata gossip: {error}", wrong=error.hostile)
        if error.hostile and forwarder != origin:
            reason = f"forwarded metadata gossip of {origin}: {error}"
            self._guard.reject(forwarder, _metadata_kind(error), reason, wrong=True)

    def _refuse_gossip(self, forwarder: str, reason: str) -> None:
        """Gossip on our topic that no honest forwarder passes on (oversized, badly signed)."""
        self._guard.reject(forwarder, "malformed metadata", f"metadata gossip: {reason}", wrong=True)

    def _repair(self, peer: str) -> None:
        """Sync soon with ``peer``, which holds what an update it forwarded builds on."""
        now = trio.current_time()
        if now - self._repairs.get(peer, -REPAIR_AFTER) >= REPAIR_AFTER and self._tasks.running:
            self._repairs[peer] = now
            self._tasks.spawn(self.sync_with, ID.from_base58(peer))

    async def sync_with(self, peer: ID) -> None:
        """Anti-entropy with ``peer``, on a stream we open."""
        if self._guard.banned(str(peer)):
            return
        try:
            with trio.fail_after(SYNC_TIMEOUT):
                stream = await self.host.new_stream(peer, [self.protocol])
        except Exception as e:  # not a peer of this task (no such protocol), or it went away
            log.debug("no metadata sync with %s: %s", peer, e)
            return
        await self.exchange(stream, initiator=True)

    async def on_meta_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if not self._syncs.allow(peer, trio.current_time()):
            rate = f"{SYNC_RATE:g}/s, burst {SYNC_BURST}"
            self._guard.reject(peer, "flood", f"metadata syncs faster than {rate}", wrong=True)
            await reset_stream(stream)
            return
        await self.exchange(stream, initiator=False)

    async def exchange(self, stream: INetStream, initiator: bool) -> None:
        """Run a :class:`SyncSession` on ``stream``; success makes the other side a task peer."""
        peer = str(stream.muxed_conn.peer_id)
        io, session = Libp2pStream(stream), SyncSession(self.metadata, initiator, peer)
        try:
            with trio.fail_after(SYNC_TIMEOUT), self._guard.inflight.claim(peer) as admit:
                frame = session.start()
                while True:
                    if frame is not None:
                        await write_frame(io, frame)
                    if session.done:
                        break
                    received = await self._guard.read(peer, stream, MAX_META_FRAME, admit, "metadata sync")
                    if received is None:  # the guard recorded why
                        return
                    frame = session.receive(received)
                await stream.close()
        except MetadataError as e:
            if isinstance(e, MetadataPending):  # crafted: honest diffs hold all they build on
                log.debug("metadata sync with %s: %s", peer, e)
            else:
                self._guard.reject(peer, _metadata_kind(e), f"metadata sync: {e}", wrong=e.hostile)
            await reset_stream(stream)
            return
        except Exception as e:  # timeouts and stream failures: the next sync tries again
            log.debug("metadata sync with %s failed: %s", peer, e)
            await reset_stream(stream)
            return
        self._bytes_in["meta"] += session.received
        self._bytes_out["meta"] += session.sent
        await self._peers.up(peer)


def _metadata_kind(error: MetadataError) -> str:
    if error.hostile:
        return "malformed metadata"
    if isinstance(error, MetadataFull):
        return "metadata over a bound"
    return "refused metadata"


def _unpack(frame: bytes, what: str) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(frame, max_bin_len=MAX_META_FRAME, max_array_len=16, max_map_len=16)
    except Exception as e:
        raise MetadataError(f"undecodable {what}: {str(e)[:100]}") from e
    if not isinstance(value, dict):
        raise MetadataError(f"{what} is not a map")
    return value
