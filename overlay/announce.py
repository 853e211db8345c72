"""Announcements: small messages on the task's gossipsub topics, kept within what gossipsub delivers.

Gossipsub drops messages over 1 MiB and a topic's messages beyond 10 per second, silently
(py-libp2p 0.8.1, measured): announcements are capped at ``MAX_ANNOUNCEMENT`` and publishing is paced to
``ANNOUNCEMENTS_PER_SECOND`` per topic; models go over streams (``overlay.messaging``). Gossip from a
banned peer is dropped on arrival (``overlay.guard``).

A topic can be *gated* (:meth:`Announcements.gate`): each message on it from another peer is judged by
the gate before gossipsub does anything else with it, and dropped unless the gate takes it. Upstream
(py-libp2p 0.8.1, ``Pubsub.push_msg``) forwards every validly signed message to the mesh and keeps it in
its message cache before our subscription reads it, and its own topic validators cost a text dump of a
refused message (``f"...{msg}"``: 74 ms per MiB, measured) and judge nothing before the signature check.
So the gate wraps ``push_msg``: duplicates go on to pubsub (which drops them), a message over the gate's
size is refused (blamed on the peer that sent it: an honest forwarder passes on nothing its own gate
refused), then the origin's signature is checked (a bad one is blamed on the forwarder the same way),
and only then does the gate judge the message with its origin authenticated. A message the gate refuses
is not forwarded, cached or delivered.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from google.protobuf.message import DecodeError
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import signature_validator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.anyio_service.exceptions import LifecycleError

log = logging.getLogger("shoal.overlay")

Gate = Callable[[str, str, bytes], bool]  # (forwarder, origin, data): whether to go on with a message

MAX_ANNOUNCEMENT = 512 * 1024  # gossipsub silently drops messages over 1 MiB (measured)
ANNOUNCEMENTS_PER_SECOND = 8.0


class Announcements:
    """Gossipsub (router and service), paced publishing, and reading topics into a handler."""

    def __init__(
        self, host: IHost, banned: Callable[[str], bool], bytes_in: Counter[str], bytes_out: Counter[str]
    ) -> None:
        self.router = GossipSub(
            protocols=[GOSSIPSUB_PROTOCOL_ID], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1
        )
        self.pubsub = Pubsub(host, self.router)
        self.malformed: Callable[[str, str], None] = lambda peer, reason: None  # see on_malformed
        _contain_pubsub_failures(host, self.pubsub, lambda peer, reason: self.malformed(peer, reason))
        self._me = str(host.get_id())
        self._banned, self._bytes_in, self._bytes_out = banned, bytes_in, bytes_out
        self._last_publish: dict[str, float] = {}
        self._gates: dict[str, tuple[Gate, int, Callable[[str, str], None]]] = {}
        self._push = self.pubsub.push_msg
        self.pubsub.push_msg = self._gated_push  # type: ignore[method-assign]  # see the module doc

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            yield

    def on_malformed(self, report: Callable[[str, str], None]) -> None:
        """Report each peer whose gossipsub RPC does not parse to ``report(peer, reason)``."""
        self.malformed = report

    def gate(self, topic: str, admit: Gate, *, max_size: int, refuse: Callable[[str, str], None]) -> None:
        """Judge every message on ``topic`` from another peer before gossipsub forwards or delivers it:
        ``admit(forwarder, origin, data)`` (the origin's signature checked) says whether to go on;
        ``refuse(forwarder, reason)`` hears of messages over ``max_size`` or badly signed."""
        self._gates[topic] = (admit, max_size, refuse)

    async def _gated_push(self, forwarder: ID, msg: rpc_pb2.Message) -> None:
        if forwarder != self.pubsub.my_id and not self.pubsub._is_msg_seen(msg):
            for topic in msg.topicIDs:
                if topic in self._gates and not self._judge(str(forwarder), msg, *self._gates[topic]):
                    return
        await self._push(forwarder, msg)

    def _judge(
        self,
        forwarder: str,
        msg: rpc_pb2.Message,
        admit: Gate,
        max_size: int,
        refuse: Callable[[str, str], None],
    ) -> bool:
        if self._banned(forwarder):
            return False
        if len(msg.data) > max_size:
            refuse(forwarder, f"message of {len(msg.data)} bytes over the topic's {max_size}")
            return False
        try:
            signed = signature_validator(msg)
        except Exception:  # a hostile key field: its deserialisation raises
            signed = False
        if not signed:
            refuse(forwarder, "message without a valid signature of its origin")
            return False
        return admit(forwarder, str(ID(msg.from_id)), msg.data)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish under gossipsub's per-topic rate limit (it drops the excess silently)."""
        if len(data) > MAX_ANNOUNCEMENT:
            raise ValueError(f"announcement of {len(data)} bytes is over {MAX_ANNOUNCEMENT}: use send()")
        slot = max(trio.current_time(), self._last_publish.get(topic, 0.0) + 1.0 / ANNOUNCEMENTS_PER_SECOND)
        self._last_publish[topic] = slot  # taken before sleeping, so concurrent publishers queue up
        await trio.sleep_until(slot)
        await self.pubsub.publish(topic, data)
        self._bytes_out["announce"] += len(data)

    async def listen(
        self,
        topic: str,
        handle: Callable[[str, bytes], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Subscribe to ``topic`` (done at ``task_status.started``), then ``handle(sender, data)`` each
        message from another peer that is not banned."""
        subscription = await self.pubsub.subscribe(topic)
        task_status.started()
        while True:
            message = await subscription.get()
            sender = str(ID(message.from_id))
            if sender == self._me or self._banned(sender):
                continue
            self._bytes_in["announce"] += len(message.data)
            await handle(sender, message.data)


def _contain_pubsub_failures(host: IHost, pubsub: Pubsub, malformed: Callable[[str, str], None]) -> None:
    """Wrap pubsub's stream handler so that neither a peer's malformed RPC nor pubsub's shutdown race can
    fail the host (py-libp2p 0.8.1, ``Pubsub.continuously_read_stream``):

    - an RPC that protobuf cannot parse raises ``DecodeError`` out of the handler, through the swarm, out
      of ``host.run()``: six bytes on the gossipsub protocol ended any daemon (measured). It is contained
      as upstream treats its own parse errors (stream reset, the peer's pubsub state dropped) and
      reported to ``malformed(peer, reason)``: no honest peer sends one.
    - the handler runs in the swarm's nursery rather than pubsub's, and on each incoming RPC checks
      ``manager.is_running`` and then ``manager.run_task(push_msg, ...)``. While the pubsub service
      stops, its task nursery closes a few schedule points before ``is_running`` turns False, so a
      message arriving then raises ``RuntimeError: Nursery is closed to new arrivals`` (and after it,
      ``LifecycleError``): a daemon stopped under gossip traffic exited 1 with that traceback (about 1
      stop in 10 under a publish flood, measured). Only those two, raised while pubsub is no longer
      running or is stopping, are contained (logged at debug).

    Anything else still propagates.
    """
    inner = pubsub.stream_handler

    async def handler(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            await inner(stream)
        except DecodeError as e:
            log.debug("unparsable pubsub RPC from %s: %s", peer, e)
            malformed(str(peer), "gossipsub RPC that does not parse")
            with contextlib.suppress(Exception):
                await stream.reset()
            pubsub._handle_dead_peer(peer)
        except (RuntimeError, LifecycleError) as e:
            closing = isinstance(e, LifecycleError) or str(e) == "Nursery is closed to new arrivals"
            if not (closing and (pubsub.manager.is_cancelled or not pubsub.manager.is_running)):
                raise
            log.debug("pubsub stream from %s ended by its service stopping: %s", peer, e)

    for protocol in pubsub.protocols:
        host.set_stream_handler(protocol, handler)
