"""Announcements: small messages on the task's gossipsub topics, kept within what gossipsub delivers.

Gossipsub drops messages over 1 MiB and a topic's messages beyond 10 per second, silently
(../shared/LIBP2P.md §3): announcements are capped at ``MAX_ANNOUNCEMENT`` and publishing is paced to
``ANNOUNCEMENTS_PER_SECOND`` per topic; models go over streams (``overlay.messaging``). Gossip from a
banned peer is dropped on arrival (``overlay.guard``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.anyio_service.exceptions import LifecycleError

log = logging.getLogger("shoal.overlay")

MAX_ANNOUNCEMENT = 512 * 1024  # gossipsub silently drops messages over 1 MiB (LIBP2P.md §3)
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
        _contain_pubsub_shutdown_race(host, self.pubsub)
        self._me = str(host.get_id())
        self._banned, self._bytes_in, self._bytes_out = banned, bytes_in, bytes_out
        self._last_publish: dict[str, float] = {}

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            yield

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


def _contain_pubsub_shutdown_race(host: IHost, pubsub: Pubsub) -> None:
    """Wrap pubsub's stream handler so its shutdown race cannot fail the host.

    Upstream (py-libp2p 0.8.1, ``Pubsub.continuously_read_stream``): on each incoming RPC the handler,
    which runs in the swarm's nursery rather than pubsub's, checks ``manager.is_running`` and then
    ``manager.run_task(push_msg, ...)`` (also for subscriptions and stream retries). While the pubsub
    service stops, its task nursery closes a few schedule points before ``is_running`` turns False, so
    a message arriving then raises ``RuntimeError: Nursery is closed to new arrivals`` (and after it,
    ``LifecycleError``) out of the handler, through the swarm, out of ``host.run()``: a daemon
    stopped under gossip traffic exited 1 with that traceback (about 1 stop in 10 under a publish
    flood, measured). Only those two, raised while pubsub is no longer running or is stopping, are
    contained (logged at debug); anything else still propagates.
    """
    inner = pubsub.stream_handler

    async def handler(stream: INetStream) -> None:
        try:
            await inner(stream)
        except (RuntimeError, LifecycleError) as e:
            closing = isinstance(e, LifecycleError) or str(e) == "Nursery is closed to new arrivals"
            if not (closing and (pubsub.manager.is_cancelled or not pubsub.manager.is_running)):
                raise
            log.debug("pubsub stream from %s ended by its service stopping: %s", stream.muxed_conn.peer_id, e)

    for protocol in pubsub.protocols:
        host.set_stream_handler(protocol, handler)
