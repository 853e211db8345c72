"""Syncing the task's metadata document (``overlay.metadata``) between peers, and our own record in it.

- Anti-entropy: a state-vector exchange in three frames on ``/shoal/<task>/meta`` (sv ->,
  <- diff + sv, diff ->), with every newly connected peer and with a random one every
  ``sync_interval``. The exchange is a sans-IO state machine (:class:`SyncSession`: given the other
  side's frame, the frame to answer with); :meth:`MetaSync.exchange` is its I/O, a few lines around it.
- Gossip: local edits are published once a second on the task's topic (``overlay.announce``), when
  small enough (bigger ones travel by anti-entropy); received ones are applied.
- Heartbeat: our record (addresses, state: joining, training, left) is rewritten every
  ``heartbeat_interval``, and expired records are dropped then.

A successful exchange makes the other side a task peer (``overlay.peers``): nodes of other tasks never
speak this task's protocol. Refused frames and updates count against their sender (``overlay.guard``).
Separate from ``metadata.py``, which is already long for the document and its verification alone.
"""

from __future__ import annotations

import logging
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

from shoal.overlay.announce import MAX_ANNOUNCEMENT, Announcements
from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import Libp2pStream, write_frame
from shoal.overlay.guard import Guard
from shoal.overlay.host import reset_stream, serves
from shoal.overlay.metadata import Metadata, MetadataError
from shoal.overlay.peers import Peers
from shoal.overlay.tasks import Tasks

log = logging.getLogger("shoal.overlay")

MAX_META_FRAME = 8 * 2**20
SYNC_TIMEOUT = 10.0  # gossipsub's spam protection drops a topic's 11th message in a second


class _Next(Enum):
    """The frame a session waits for."""

    SV = "the initiator's state vector"
    DIFF = "the initiator's diff"
    DIFF_AND_SV = "the responder's diff and state vector"


class SyncSession:
    """One side of the three-frame exchange with one peer, without I/O: the initiator sends
    ``{"sv": state vector}``, the responder answers ``{"u": diff, "sv": state vector}``, the initiator
    ends with ``{"u": diff}``; each side applies the diff it gets.

    Send :meth:`start`'s frame if any, then feed each frame from the other side to :meth:`receive` and
    send what it returns, until :attr:`done`. :meth:`receive` raises MetadataError for a frame that is
    malformed (``hostile``) or over a bound (not hostile); the session is then over, unfinished.
    """

    def __init__(self, metadata: Metadata, initiator: bool) -> None:
        self.metadata, self.initiator = metadata, initiator
        self.received = 0  # bytes of the update applied from the other side
        self.sent = 0  # bytes of the diff sent to it
        self._next: _Next | None = _Next.DIFF_AND_SV if initiator else _Next.SV  # None: over

    @property
    def done(self) -> bool:
        """Whether the exchange is over: finished, or failed with MetadataError."""
        return self._next is None

    def start(self) -> bytes | None:
        """The first frame: the initiator's state vector; None for the responder, which waits."""
        return _pack(sv=self.metadata.state_vector()) if self.initiator else None

    def receive(self, frame: bytes) -> bytes | None:
        """Apply the other side's frame; the frame to answer with, or None."""
        if self._next is None:
            raise RuntimeError("the sync session is over")
        expected, self._next = self._next, None  # over if this frame is refused
        value = _unpack(frame)
        try:
            if expected is _Next.SV:  # responder: what the initiator lacks, and what we have
                diff = self.metadata.diff(value["sv"])
                self.sent, self._next = len(diff), _Next.DIFF
                return _pack(u=diff, sv=self.metadata.state_vector())
            update = value["u"]
            self.metadata.apply(update)
            self.received = len(update)
            if expected is _Next.DIFF:  # responder: the initiator's diff ends the exchange
                return None
            diff = self.metadata.diff(value["sv"])  # initiator: what the responder lacks
            self.sent = len(diff)
            return _pack(u=diff)
        except KeyError as e:
            raise MetadataError(f"no field {e}") from None


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

    def heartbeat(self) -> None:
        """Rewrite our record now: our addresses or state may have changed."""
        self.metadata.heartbeat(time.time(), self._addresses(), self.state)

    async def run(self) -> None:
        last_heartbeat = 0.0
        while True:
            await trio.sleep(1.0)
            now = time.time()
            if now - last_heartbeat >= self.config.heartbeat_interval:
                last_heartbeat = now
                if self.state == "joining":
                    self.state = "training"
                self.metadata.heartbeat(now, self._addresses(), self.state)
                gone = self.metadata.expire(now)
                if gone:  # junk and Sybil records expire by the thousand: one line, a few names
                    log.info("metadata: %d expired (%s)", len(gone), ", ".join(gone[:3]))
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
        if update is not None and len(update) <= MAX_ANNOUNCEMENT:
            await self._announcements.publish(self.topic, update)  # bigger ones travel by anti-entropy

    async def on_update(self, sender: str, update: bytes) -> None:
        """An update gossiped on the task's topic."""
        try:
            self.metadata.apply(update)
        except MetadataError as e:
            self._guard.reject(sender, _metadata_kind(e), f"metadata update: {e}", wrong=e.hostile)

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
        await self.exchange(stream, initiator=False)

    async def exchange(self, stream: INetStream, initiator: bool) -> None:
        """Run a :class:`SyncSession` on ``stream``; success makes the other side a task peer."""
        peer = str(stream.muxed_conn.peer_id)
        io, session = Libp2pStream(stream), SyncSession(self.metadata, initiator)
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
    return "malformed metadata" if error.hostile else "oversized metadata"


def _pack(**fields: bytes) -> bytes:
    return msgpack.packb(fields)


def _unpack(frame: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(frame, max_bin_len=MAX_META_FRAME, max_array_len=16, max_map_len=16)
    except Exception as e:
        raise MetadataError(f"undecodable sync frame: {e}") from e
    if not isinstance(value, dict):
        raise MetadataError("sync frame is not a map")
    return value
