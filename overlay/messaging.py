"""Protocol messages (models included) on ``/shoal/<task>/msg`` streams, and their traffic counters.

One frame per message (``overlay.framing``: length-prefixed, Noise-authenticated), on streams reused per peer
(``overlay.streams``). Each send is under ``send_timeout``; each frame received is read under the
guard's bounds (``overlay.guard``) and counts against the sender's message rate; messages over
``OFF_LOOP_BYTES`` are decoded in a worker thread, into tensors that are views of the received frame.
"""

from __future__ import annotations

from collections import Counter
from functools import partial

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from shoal.overlay import offloop
from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import OFF_LOOP_BYTES, Libp2pStream, write_frame
from shoal.overlay.guard import Guard
from shoal.overlay.host import explain_dial_error, reset_stream
from shoal.overlay.interface import Delivered, OverlayEvent, PeerUnreachable
from shoal.overlay.peers import Peers
from shoal.overlay.streams import MAX_STREAMS_PER_PEER, StreamPool
from shoal.overlay.wire import Message, WireError, decode, encode_parts
from shoal.overlay.yamuxio import grow_receive_window

MAX_KIND, MAX_KINDS = 32, 64  # traffic counters: per message kind only for kinds this short, this many
# a peer's open message streams: one more than we open, since a stream closed counts until its end arrives
MAX_INBOUND_PER_PEER = MAX_STREAMS_PER_PEER + 1


class Messaging:
    """Sending messages on pooled streams, receiving them into ``events``, counting bytes per kind."""

    def __init__(
        self,
        task: str,
        config: P2PConfig,
        guard: Guard,
        peers: Peers,
        events: trio.MemorySendChannel[OverlayEvent],
        bytes_in: Counter[str],
        bytes_out: Counter[str],
    ) -> None:
        self.protocol = TProtocol(f"/shoal/{task}/msg/1.0.0")
        self.config, self._guard, self._peers, self._events = config, guard, peers, events
        self.bytes_in, self.bytes_out = bytes_in, bytes_out
        self.outbox = StreamPool(lambda peer: peers.open(peer, self.protocol), reset_stream)
        self._inbound: Counter[str] = Counter()  # message streams open per peer

    async def run(self) -> None:
        while True:
            await trio.sleep(1.0)
            await self.outbox.close_idle()

    def forget(self, peer: str) -> None:
        self.outbox.forget(peer)

    async def send(self, peer: str, message: Message) -> None:
        parts = encode_parts(message)  # views of the tensors: no copy, nothing to move off the loop
        size = sum(len(p) for p in parts)

        async def write(stream: INetStream) -> None:
            await write_frame(Libp2pStream(stream), parts)

        try:
            with trio.fail_after(self.config.send_timeout):
                await self.outbox.run(peer, write)
        except PeerUnreachable:
            raise
        except trio.TooSlowError as e:
            raise PeerUnreachable(
                f"{peer} did not take {size} bytes within {self.config.send_timeout:g} s"
            ) from e
        except Exception as e:  # libp2p raises many unrelated types for a failed stream
            raise PeerUnreachable(f"{peer}: {explain_dial_error(e)}") from e
        self.bytes_out[self._kind_key(message.kind)] += size

    async def on_message_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if self._inbound[peer] >= MAX_INBOUND_PER_PEER:
            reason = f"more than {MAX_INBOUND_PER_PEER} messages at once"
            self._guard.reject(peer, "busy", reason, wrong=False)
            await reset_stream(stream)
            return
        self._inbound[peer] += 1
        try:
            await self._receive(peer, stream)
        finally:
            self._inbound[peer] -= 1
            if self._inbound[peer] <= 0:
                del self._inbound[peer]

    async def _receive(self, peer: str, stream: INetStream) -> None:
        """Messages from ``peer`` on one stream, until the sender closes it or leaves it idle (it may send
        one per stream or reuse the stream: ``overlay.streams``). Every frame after the stream's first
        counts against the peer's message rate as a new stream would."""
        grow_receive_window(stream, self.config.limits.max_message)
        counted = True  # the stream's first frame was counted when the stream opened
        while await self._receive_one(peer, stream, counted):
            counted = False

    async def _receive_one(self, peer: str, stream: INetStream, counted: bool) -> bool:
        """Read, decode and deliver one message; False once the stream is done (ended, idle, or reset
        after refused input)."""
        # the frame's reservation is held until its payload is decoded (the tensors are views of it)
        with self._guard.inflight.claim(peer) as admit:
            payload = await self._guard.read(peer, stream, self.config.limits.max_message, admit, "message")
            if payload is None:
                return False
            if not counted and not self._guard.allow(peer, "messages"):
                await reset_stream(stream)
                return False
            size = len(payload)
            try:
                # tensors are views into the frame's buffer, which is ours: no second copy of the model
                if size > OFF_LOOP_BYTES:
                    message = await offloop.run_sync(partial(decode, payload, self.config.limits, copy=False))
                else:
                    message = decode(payload, self.config.limits, copy=False)
            except WireError as e:
                self._guard.reject(peer, "malformed message", str(e), wrong=True)
                await reset_stream(stream)
                return False
            finally:
                del payload  # the message's tensors keep what they view of it alive, nothing else
        self.bytes_in[self._kind_key(message.kind)] += size
        if not await self._peers.up(peer):  # refused a slot, or off the allowlist: not one of ours
            await reset_stream(stream)
            return False
        await self._events.send(Delivered(peer, message))
        return True

    def _kind_key(self, kind: str) -> str:
        """The traffic counter of a message kind: kinds are peer input, so a new one gets its own
        counter (and Prometheus label) only while they are few and short."""
        key = f"msg:{kind}"
        if key in self.bytes_in or key in self.bytes_out:
            return key
        known = {k for k in (*self.bytes_in, *self.bytes_out) if k.startswith("msg:")}
        return key if len(kind) <= MAX_KIND and len(known) < MAX_KINDS else "msg:other"
