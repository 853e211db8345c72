"""The Overlay on py-libp2p: one node's host, DHT, pubsub, metadata sync, transfers and liveness.

What runs where (all in one trio nursery owned by :meth:`Libp2pOverlay.start`):

- protocol messages (models included) travel on ``/shoal/<task>/msg`` streams reused per peer
  (``overlay.streams``), one frame each (``overlay.framing``: length + hash trailer), each send under
  ``send_timeout`` and each receive under ``receive_timeout``; messages over 1 MiB are decoded in a
  worker thread, into tensors that are views of the received frame;
- the task's metadata document (``overlay.metadata``) is synced by state-vector exchange on
  ``/shoal/<task>/meta`` with every new peer and with a random peer every ``sync_interval``
  (anti-entropy), and local edits are published on the task's gossipsub topic;
- a peer becomes a *task peer* (PeerConnected) once a metadata sync with it succeeded: peers of other
  tasks (or plain DHT/relay nodes) never speak that protocol and stay invisible to the learner;
- discovery is Kademlia: server mode once a dial-back proved us reachable (the first node, with no
  bootstrap, starts as server), client mode otherwise;
- a ping loop (``overlay.liveness``) declares hung peers down;
- refused input goes through one policy (``overlay.penalties``): wrong input counts against the
  sender, which is cut off for ``ban_duration`` at ``max_penalty``; slow or vanished senders are
  only counted; log lines are bounded;
- every peer's inbound streams (messages, metadata syncs, dial-back requests) are rate limited per
  peer (``message_rate``, ``message_burst``: the excess is a flood, which is wrong), and every
  incoming frame reserves its announced length from a node-wide and a per-peer budget
  (``max_inflight``, ``max_peer_inflight``) and must keep up ``min_rate`` (``overlay.framing``).

Size: still the one class issue 13 splits into per-concern components (DHT, reachability,
metadata sync, budgets); until then each concern keeps its own section below.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import msgpack
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee, ISubscriptionAPI
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht.kad_dht import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.anyio_service.exceptions import LifecycleError
from multiaddr import Multiaddr

from shoal.overlay.config import P2PConfig
from shoal.overlay.framing import (
    OFF_LOOP_BYTES,
    Inflight,
    Libp2pStream,
    Pace,
    TransferError,
    Truncated,
    read_frame,
    write_frame,
)
from shoal.overlay.host import build_host, explain_dial_error, grow_receive_window, join, parse_bootstrap
from shoal.overlay.interface import (
    Announced,
    Delivered,
    OverlayEvent,
    PeerConnected,
    PeerDisconnected,
    PeerUnreachable,
)
from shoal.overlay.liveness import FailureDetector, ping
from shoal.overlay.metadata import Metadata, MetadataError
from shoal.overlay.nat import (
    DIALBACK,
    Reachability,
    Relaying,
    ask_dialback,
    is_circuit,
    is_relayed,
    serve_dialback,
)
from shoal.overlay.penalties import Penalties, RateLimit, Rejection
from shoal.overlay.streams import RECEIVE_IDLE, StreamPool
from shoal.overlay.wire import Message, WireError, decode, encode_parts

log = logging.getLogger("shoal.overlay")

MAX_ANNOUNCEMENT = 512 * 1024  # gossipsub silently drops messages over 1 MiB (LIBP2P.md §3)
MAX_META_FRAME = 8 * 2**20
ANNOUNCEMENTS_PER_SECOND = 8.0
DIRECT_DIAL_TIMEOUT = 3.0
RECHECK = 300.0  # seconds between reachability checks (and relay reservation refreshes)
MAX_RELAYS = 2
MAX_KIND, MAX_KINDS = 32, 64  # traffic counters: per message kind only for kinds this short, this many
MAX_INBOUND_PER_PEER = 4  # message streams one peer may have open to us at once
LOOKUP_TIMEOUT = 10.0
SYNC_TIMEOUT = 10.0  # gossipsub's spam protection drops a topic's 11th message in a second


class _Notifee(INotifee):
    """Forwards libp2p's connection callbacks into a channel: callbacks must not block the swarm."""

    def __init__(self, channel: trio.MemorySendChannel[tuple[str, ID]]) -> None:
        self.channel = channel

    def _forward(self, kind: str, peer: ID) -> None:
        try:
            self.channel.send_nowait((kind, peer))
        except trio.WouldBlock:  # thousands of connections faster than we handle them: shed, not raise
            log.debug("connection event %s %s dropped: too many pending", kind, peer)
        except (trio.ClosedResourceError, trio.BrokenResourceError):  # we are stopping
            pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._forward("up", conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._forward("down", conn.muxed_conn.peer_id)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


class _Metered:
    """Counts what is read from a stream into ``counter[key]`` while it lasts: transfers' progress."""

    def __init__(self, stream: Libp2pStream, counter: Counter[str], key: str) -> None:
        self.stream, self.counter, self.key, self.count = stream, counter, key, 0

    async def read(self, max_bytes: int) -> bytes:
        data = await self.stream.read(max_bytes)
        self.counter[self.key] += len(data)
        self.count += len(data)
        return data

    def done(self) -> None:
        self.counter[self.key] -= self.count
        if self.counter[self.key] <= 0:
            del self.counter[self.key]


class Libp2pOverlay:
    """One node on a real network, implementing ``overlay.interface.Overlay`` for one task."""

    def __init__(self, key_pair: KeyPair, task: str, config: P2PConfig) -> None:
        self.config = config
        self.task = task
        self.host = build_host(key_pair, config.listen, config.announce, config.upnp)
        self._id = self.host.get_id()
        self.metadata = Metadata(task, key_pair)
        self.relaying = Relaying(self.host, serve=config.relay_service)
        self.dht = KadDHT(self.host, DHTMode.CLIENT if config.bootstrap else DHTMode.SERVER)
        self.router = GossipSub(
            protocols=[GOSSIPSUB_PROTOCOL_ID], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1
        )
        self.pubsub = Pubsub(self.host, self.router)
        _contain_pubsub_shutdown_race(self.host, self.pubsub)
        self.reachability = Reachability.UNKNOWN
        self._state = "joining"  # in our metadata record: joining, training, left
        self.policy = Penalties(config.max_penalty, config.ban_duration, log_interval=config.log_interval)
        self._streams = RateLimit(config.message_rate, config.message_burst)
        self.inflight = Inflight(config.max_inflight, config.peer_inflight)
        self._pace = Pace(config.min_rate, config.rate_window)
        self.bytes_in: Counter[str] = Counter()  # by protocol part: "msg:<kind>", "meta", "announce"
        self.bytes_out: Counter[str] = Counter()
        self.receiving: Counter[str] = Counter()  # bytes so far of messages arriving now, by sender
        self._events_in, self._events = trio.open_memory_channel[OverlayEvent](1024)
        self._conn_in, self._conn_out = trio.open_memory_channel[tuple[str, ID]](4096)
        self._task_peers: set[str] = set()
        self._inbound: Counter[str] = Counter()  # message streams open per peer
        self._outbox = StreamPool(lambda peer: self._open(peer, self._msg_protocol), _reset)
        self._provided: set[str] = set()
        self._detector = FailureDetector(config.ping_misses)
        self._last_publish: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self._msg_protocol = TProtocol(f"/shoal/{task}/msg/1.0.0")
        self._meta_protocol = TProtocol(f"/shoal/{task}/meta/1.0.0")
        self._meta_topic = f"shoal/{task}/meta"

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def start(cls, key_pair: KeyPair, task: str, config: P2PConfig) -> AsyncIterator[Libp2pOverlay]:
        """Listen, join the bootstrap peers (BootstrapError if none answers), run until the block exits."""
        self = cls(key_pair, task, config)
        try:
            async with self._running():
                yield self
        except BaseExceptionGroup as group:
            raise _single(group) from None

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        config = self.config
        listen = [Multiaddr(a) for a in config.listen]
        # Our tasks' nursery is innermost: cancelling it at exit must not reach libp2p's services, whose
        # cleanup would then raise Cancelled over (and so silently swallow) an error from the caller.
        async with (
            self.host.run(listen_addrs=listen),
            background_trio_service(self.dht),
            background_trio_service(self.pubsub),
            background_trio_service(self.router),
            self.relaying.running(),
            trio.open_nursery() as nursery,
        ):
            self._nursery = nursery
            try:
                await self.pubsub.wait_until_ready()
                self.host.get_network().register_notifee(_Notifee(self._conn_in))
                self.host.set_stream_handler(self._msg_protocol, self._handler(self._on_message_stream))
                self.host.set_stream_handler(self._meta_protocol, self._handler(self._on_meta_stream))
                self.host.set_stream_handler(DIALBACK, self._handler(serve_dialback))
                nursery.start_soon(self._connections)
                meta = await self.pubsub.subscribe(self._meta_topic)
                nursery.start_soon(self._read_topic, self._meta_topic, meta)
                bootstrap = [parse_bootstrap(a) for a in config.bootstrap]
                joined = await join(self.host, bootstrap, config.bootstrap_attempts)
                for info in joined:
                    await self.dht.add_peer(info.peer_id)
                self.metadata.heartbeat(time.time(), self.addresses(), self._state)
                for loop in (self._ping_loop, self._sync_loop, self._reachability_loop):
                    nursery.start_soon(loop)
                yield
            finally:
                # libp2p keeps calling our stream handlers while its services stop after this nursery:
                # from here on they must not spawn into it (see _spawn)
                self._nursery = None
                nursery.cancel_scope.cancel()

    async def leave(self, timeout: float = 3.0) -> None:
        """Tell the swarm we are leaving (metadata state "left"), so peers need not wait for a timeout."""
        self._state = "left"  # every later heartbeat keeps saying so
        self.metadata.heartbeat(time.time(), self.addresses(), self._state)
        with trio.move_on_after(timeout):
            await self._publish_metadata()
            async with trio.open_nursery() as nursery:
                for peer in list(self._task_peers):
                    nursery.start_soon(self._sync_with, ID.from_base58(peer))

    # -- Overlay interface -------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return str(self._id)

    @property
    def events(self) -> trio.MemoryReceiveChannel[OverlayEvent]:
        return self._events

    def peers(self) -> list[str]:
        return sorted(self._task_peers)

    def addresses(self) -> list[str]:
        """Full multiaddrs (with ``/p2p/<id>``) others can use to reach us, relay circuits included.

        The circuits are added here: ``host.get_addrs()`` never lists them and strips any we give it.
        """
        circuits = [f"{a}/p2p/{self._id}" for a in self.relaying.circuit_addrs()]
        return [str(a) for a in self.host.get_addrs()] + circuits

    async def send(self, peer: str, message: Message) -> None:
        parts = encode_parts(message)  # views of the tensors: no copy, nothing to move off the loop
        size = sum(len(p) for p in parts)

        async def write(stream: INetStream) -> None:
            await write_frame(Libp2pStream(stream), parts)

        try:
            with trio.fail_after(self.config.send_timeout):
                await self._outbox.run(peer, write)
        except PeerUnreachable:
            raise
        except trio.TooSlowError as e:
            raise PeerUnreachable(
                f"{peer} did not take {size} bytes within {self.config.send_timeout:g} s"
            ) from e
        except Exception as e:  # libp2p raises many unrelated types for a failed stream
            raise PeerUnreachable(f"{peer}: {explain_dial_error(e)}") from e
        self.bytes_out[self._kind_key(message.kind)] += size

    def subscribe(self, topic: str) -> None:
        assert self._nursery is not None, "subscribe after start()"

        async def run() -> None:
            name = self._topic(topic)
            await self._read_topic(name, await self.pubsub.subscribe(name))

        self._nursery.start_soon(run)

    async def publish(self, topic: str, data: bytes) -> None:
        if len(data) > MAX_ANNOUNCEMENT:
            raise ValueError(f"announcement of {len(data)} bytes is over {MAX_ANNOUNCEMENT}: use send()")
        await self._publish(self._topic(topic), data)

    async def provide(self, key: str) -> None:
        self._provided.add(key)
        with trio.move_on_after(LOOKUP_TIMEOUT):
            await self.dht.provide(key)

    async def find_providers(self, key: str, limit: int = 20) -> list[str]:
        """Providers of ``key`` (self excluded); we also connect to them so they become peers."""
        infos = [i for i in (await self._providers(key))[:limit] if i.peer_id != self._id]

        async def connect(info: PeerInfo) -> None:
            with trio.move_on_after(10):
                try:
                    addrs = [str(a) for a in info.addrs] + self._known_addrs(str(info.peer_id))
                    await self._connect(info.peer_id, addrs)
                except PeerUnreachable as e:
                    log.debug("provider %s: %s", info.peer_id, e)  # stale records of departed peers: often

        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(connect, info)
        return [str(i.peer_id) for i in infos]

    async def _providers(self, key: str) -> list[PeerInfo]:
        """Provider records for ``key`` from the peers closest to it, where Kademlia stores them.

        Workaround: ``KadDHT.find_providers`` (0.8.1) answers from the local store alone whenever that
        holds any record, and a provider always holds its own, so a providing node never learned of
        the others.
        """
        dht_key = _encode_key(key)
        store = self.dht.provider_store
        found = {info.peer_id: info for info in store.get_providers(dht_key)}

        async def ask(peer: ID) -> None:
            with trio.move_on_after(5):
                try:
                    providers, _ = await store._get_providers_from_peer_with_closers(peer, dht_key)
                except Exception as e:  # an unresponsive or departed DHT peer
                    log.debug("provider query to %s failed: %s", peer, e)
                    return
                for info in providers:
                    found.setdefault(info.peer_id, info)

        closest: list[ID] = []
        with trio.move_on_after(LOOKUP_TIMEOUT):
            closest = await self.dht.peer_routing.find_closest_peers_network(dht_key)
        async with trio.open_nursery() as nursery:
            for peer in closest or self.dht.routing_table.get_peer_ids():
                if peer != self._id:
                    nursery.start_soon(ask, peer)
        return list(found.values())

    def _prune_dht_clients(self) -> None:
        """Drop routing-table entries of peers that do not serve the DHT.

        Workaround: KadDHT (0.8.1) adds every peer that opens a DHT stream to its routing table, client
        mode peers included, and hands them out as closer peers; lookups then dial private nodes that
        cannot be reached and wait out the dial timeout, about 20 s per lookup behind NATs.
        """
        table = self.dht.routing_table
        for peer in table.get_peer_ids():
            try:
                protocols = self.host.get_peerstore().get_protocols(peer)
            except Exception:  # identify has not told us yet
                continue
            if protocols and KAD_PROTOCOL not in protocols:  # a peer turning server pushes identify
                table.remove_peer(peer)

    def _kind_key(self, kind: str) -> str:
        """The traffic counter of a message kind: kinds are peer input, so a new one gets its own
        counter (and Prometheus label) only while they are few and short."""
        key = f"msg:{kind}"
        if key in self.bytes_in or key in self.bytes_out:
            return key
        known = {k for k in (*self.bytes_in, *self.bytes_out) if k.startswith("msg:")}
        return key if len(kind) <= MAX_KIND and len(known) < MAX_KINDS else "msg:other"

    def penalize(self, peer: str, reason: str) -> None:
        self._reject(peer, "refused by protocol", reason, wrong=True)

    # -- status ------------------------------------------------------------------------------------

    @property
    def rejections(self) -> deque[Rejection]:
        """The latest refused inputs, with reasons (``overlay.penalties``)."""
        return self.policy.rejections

    @property
    def rejected(self) -> int:
        return self.policy.rejected

    @property
    def penalties(self) -> Counter[str]:
        return self.policy.counts()

    def banned(self, peer: str) -> bool:
        return self.policy.banned(peer, trio.current_time())

    def connection_kind(self, peer: str) -> str:
        """ "relayed" when all our connections to ``peer`` go through a relay, else "direct"."""
        return "relayed" if is_relayed(self.host, ID.from_base58(peer)) else "direct"

    # -- connections and task peers ----------------------------------------------------------------

    def _topic(self, topic: str) -> str:
        return f"shoal/{self.task}/{topic}"

    async def _open(self, peer: str, protocol: TProtocol) -> INetStream:
        peer_id = ID.from_base58(peer)
        if self.banned(peer):
            raise PeerUnreachable(f"{peer} is banned for sending wrong input")
        if not self.host.get_network().get_connections(peer_id):
            await self._connect(peer_id, self._known_addrs(peer))
        return await self.host.new_stream(peer_id, [protocol])

    def _known_addrs(self, peer: str) -> list[str]:
        member = self.metadata.members().get(peer)
        return list(member.addrs) if member else []

    async def _connect(self, peer: ID, addrs: list[str]) -> None:
        """Direct addresses first (peerstore + given), then each relay circuit, punching a hole after."""
        direct = [Multiaddr(a) for a in addrs if not is_circuit(a)]
        if direct and not self.host.get_peerstore().addrs(peer):
            # given addresses (metadata, provider records) are not authenticated: used only when we
            # know none from a connection of our own (identify)
            self.host.get_peerstore().add_addrs(peer, direct, 600)
        circuits = [a for a in addrs if is_circuit(a)]
        errors = []
        self.host.get_network().unblock_peer(peer)  # we were asked to try now: skip the failure cache
        if self.host.get_peerstore().addrs(peer):
            # behind a NAT a direct dial hangs until its timeout: keep time for the relay then
            with trio.move_on_after(DIRECT_DIAL_TIMEOUT if circuits else math.inf):
                try:
                    await self.host.connect(self.host.get_peerstore().peer_info(peer))
                    return
                except Exception as e:  # fall through to relays
                    errors.append(explain_dial_error(e))
        for circuit in circuits:
            try:
                await self.relaying.dial(peer, circuit)
            except Exception as e:
                errors.append(f"via relay: {explain_dial_error(e)}")
                continue
            self._spawn(self.relaying.upgrade, peer, self.config.hole_punch_timeout)
            return
        raise PeerUnreachable(f"cannot connect to {peer}: " + ("; ".join(errors) or "no known address"))

    async def _connections(self) -> None:
        async for kind, peer in self._conn_out:
            if kind == "up":
                self._spawn(self._sync_with, peer)
            elif not self.host.get_network().get_connections(peer):
                await self._peer_down(str(peer))

    async def _peer_up(self, peer: str) -> None:
        if peer not in self._task_peers and not self.banned(peer):
            self._task_peers.add(peer)
            log.info("peer up: %s (%s)", peer, self.connection_kind(peer))
            await self._events_in.send(PeerConnected(peer))

    async def _peer_down(self, peer: str) -> None:
        self._detector.forget(peer)
        self._outbox.forget(peer)
        if peer in self._task_peers:
            self._task_peers.discard(peer)
            log.info("peer down: %s", peer)
            await self._events_in.send(PeerDisconnected(peer))

    def _reject(self, peer: str, kind: str, reason: str, wrong: bool) -> None:
        """Refused input, under the node's policy; a peer it bans is cut off: streams, connection, and its
        gossip is dropped on arrival (``_read_topic``). Not pubsub's blacklist: py-libp2p 0.8.1 removes a
        blacklisted peer at once and then again when its connection closes, and that second removal
        raises KeyError out of pubsub's service and ended the daemon (seen in tests/test_hostile.py)."""
        if self.policy.reject(peer, kind, reason, trio.current_time(), wrong=wrong) and self._nursery:
            self._spawn(self._disconnect, peer)

    def _tick(self) -> None:
        """Once a second: end expired bans, forget idle rate-limit state, log a due summary."""
        now = trio.current_time()
        self.policy.tick(now)
        self._streams.forget_idle(now)

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start a task in our nursery, or skip it once we are stopping (handlers outlive the nursery)."""
        if self._nursery is None:
            log.debug("stopping: not starting %s", fn.__name__)
            return
        self._nursery.start_soon(fn, *args)

    def _handler(
        self, handler: Callable[[INetStream], Awaitable[None]]
    ) -> Callable[[INetStream], Awaitable[None]]:
        """The stream handler behind the checks every inbound stream passes: banned peers are reset, and
        streams over the peer's rate are a flood (wrong input). Never raising: an exception leaving a
        stream handler stops libp2p's whole swarm, so one peer's input would take the node down; a
        failure is contained to its stream (reset) and recorded, not logged per stream."""

        async def run(stream: INetStream) -> None:
            peer = str(stream.muxed_conn.peer_id)
            now = trio.current_time()
            if self.policy.banned(peer, now) or self._nursery is None:
                await _reset(stream)
                return
            if not self._streams.allow(peer, now):
                rate = f"{self.config.message_rate:g}/s, burst {self.config.message_burst}"
                self._reject(peer, "flood", f"streams faster than {rate}", wrong=True)
                await _reset(stream)
                return
            try:
                await handler(stream)
            except Exception as e:  # not the peer's fault as far as we know: not a penalty
                reason = f"{handler.__name__}: {type(e).__name__}: {e}"
                self._reject(peer, "handler failed", reason, wrong=False)
                await _reset(stream)

        return run

    async def _disconnect(self, peer: str) -> None:
        await self._peer_down(peer)
        with trio.move_on_after(2):
            await self.host.disconnect(ID.from_base58(peer))

    # -- protocol messages -------------------------------------------------------------------------

    async def _on_message_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        if self._inbound[peer] >= MAX_INBOUND_PER_PEER:
            self._reject(peer, "busy", f"more than {MAX_INBOUND_PER_PEER} messages at once", wrong=False)
            await _reset(stream)
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
        with self.inflight.claim(peer) as admit:
            payload = await self._read(peer, stream, self.config.limits.max_message, admit, "message")
            if payload is None:
                return False
            if not counted and not self._streams.allow(peer, trio.current_time()):
                rate = f"{self.config.message_rate:g}/s, burst {self.config.message_burst}"
                self._reject(peer, "flood", f"messages faster than {rate}", wrong=True)
                await _reset(stream)
                return False
            size = len(payload)
            try:
                # tensors are views into the frame's buffer, which is ours: no second copy of the model
                if size > OFF_LOOP_BYTES:
                    message = await trio.to_thread.run_sync(
                        partial(decode, payload, self.config.limits, copy=False)
                    )
                else:
                    message = decode(payload, self.config.limits, copy=False)
            except WireError as e:
                self._reject(peer, "malformed message", str(e), wrong=True)
                await _reset(stream)
                return False
            finally:
                del payload  # the message's tensors keep what they view of it alive, nothing else
        self.bytes_in[self._kind_key(message.kind)] += size
        await self._peer_up(peer)
        await self._events_in.send(Delivered(peer, message))
        return True

    async def _read(
        self, peer: str, stream: INetStream, limit: int, admit: Callable[[int], None], what: str
    ) -> memoryview | None:
        """One frame from ``peer`` under the node's bounds (size, rate, budget, ``receive_timeout``), or
        None, the stream reset, once it ended between frames or went idle (quietly) or after recording
        why its input was refused."""
        metered = _Metered(Libp2pStream(stream), self.receiving, peer)
        try:
            return await read_frame(
                metered,
                limit,
                pace=self._pace,
                admit=admit,
                idle=RECEIVE_IDLE,
                timeout=self.config.receive_timeout,
            )
        except TransferError as e:
            if isinstance(e, Truncated) and e.empty:  # ended between frames or idle: done with it
                log.debug("%s %s stream: %s", peer, what, e)
            else:
                self._reject(peer, e.kind, f"{what}: {e}", wrong=e.hostile)
        finally:
            metered.done()
        await _reset(stream)
        return None

    # -- metadata ----------------------------------------------------------------------------------

    async def _sync_with(self, peer: ID) -> None:
        """Anti-entropy with ``peer``, on a stream we open."""
        if self.banned(str(peer)):
            return
        try:
            with trio.fail_after(SYNC_TIMEOUT):
                stream = await self.host.new_stream(peer, [self._meta_protocol])
        except Exception as e:  # not a peer of this task (no such protocol), or it went away
            log.debug("no metadata sync with %s: %s", peer, e)
            return
        await self._exchange(stream, initiator=True)

    async def _on_meta_stream(self, stream: INetStream) -> None:
        await self._exchange(stream, initiator=False)

    async def _exchange(self, stream: INetStream, initiator: bool) -> None:
        """State-vector exchange in three frames (sv ->, <- diff + sv, diff ->); success makes the other
        side a task peer: nodes of other tasks never speak this task's protocol."""
        peer = str(stream.muxed_conn.peer_id)
        io, meta = Libp2pStream(stream), self.metadata

        async def read(admit: Callable[[int], None]) -> dict:
            frame = await self._read(peer, stream, MAX_META_FRAME, admit, "metadata sync")
            if frame is None:
                raise _Dropped
            return _unpack(frame)

        try:
            with trio.fail_after(SYNC_TIMEOUT), self.inflight.claim(peer) as admit:
                if initiator:
                    await write_frame(io, msgpack.packb({"sv": meta.state_vector()}))
                    reply = await read(admit)
                    meta.apply(reply["u"])
                    sent = meta.diff(reply["sv"])
                    await write_frame(io, msgpack.packb({"u": sent}))
                else:
                    request = await read(admit)
                    sent = meta.diff(request["sv"])
                    await write_frame(io, msgpack.packb({"u": sent, "sv": meta.state_vector()}))
                    reply = await read(admit)
                    meta.apply(reply["u"])
                await stream.close()
        except _Dropped:  # _read recorded why
            return
        except MetadataError as e:
            self._reject(peer, _metadata_kind(e), f"metadata sync: {e}", wrong=e.hostile)
            await _reset(stream)
            return
        except KeyError as e:
            self._reject(peer, "malformed metadata", f"metadata sync: no field {e}", wrong=True)
            await _reset(stream)
            return
        except Exception as e:  # timeouts and stream failures: the next sync tries again
            log.debug("metadata sync with %s failed: %s", peer, e)
            await _reset(stream)
            return
        self.bytes_in["meta"] += len(reply["u"])
        self.bytes_out["meta"] += len(sent)
        await self._peer_up(peer)

    async def _publish_metadata(self) -> None:
        update = self.metadata.take_outgoing()
        if update is not None and len(update) <= MAX_ANNOUNCEMENT:
            await self._publish(self._meta_topic, update)  # bigger ones travel by anti-entropy

    async def _sync_loop(self) -> None:
        last_heartbeat = 0.0
        while True:
            await trio.sleep(1.0)
            self._tick()
            self._spawn(self._outbox.close_idle)
            now = time.time()
            if now - last_heartbeat >= self.config.heartbeat_interval:
                last_heartbeat = now
                if self._state == "joining":
                    self._state = "training"
                self.metadata.heartbeat(now, self.addresses(), self._state)
                gone = self.metadata.expire(now)
                if gone:  # junk and Sybil records expire by the thousand: one line, a few names
                    log.info("metadata: %d expired (%s)", len(gone), ", ".join(gone[:3]))
            await self._publish_metadata()
            self._prune_dht_clients()
            # anti-entropy with a task peer, or with a connected one whose first sync failed
            candidates = [ID.from_base58(p) for p in self.peers()] + [
                p
                for p in self.host.get_connected_peers()
                if str(p) not in self._task_peers and self._serves(p, self._meta_protocol)
            ]
            if candidates and random.random() < 1.0 / self.config.sync_interval:
                self._spawn(self._sync_with, random.choice(candidates))

    # -- announcements -----------------------------------------------------------------------------

    async def _publish(self, topic: str, data: bytes) -> None:
        """Publish under gossipsub's per-topic rate limit (it drops the excess silently)."""
        slot = max(trio.current_time(), self._last_publish.get(topic, 0.0) + 1.0 / ANNOUNCEMENTS_PER_SECOND)
        self._last_publish[topic] = slot  # taken before sleeping, so concurrent publishers queue up
        await trio.sleep_until(slot)
        await self.pubsub.publish(topic, data)
        self.bytes_out["announce"] += len(data)

    async def _read_topic(self, topic: str, subscription: ISubscriptionAPI) -> None:
        while True:
            message = await subscription.get()
            sender = str(ID(message.from_id))
            if sender == self.peer_id or self.banned(sender):
                continue
            self.bytes_in["announce"] += len(message.data)
            if topic == self._meta_topic:
                try:
                    self.metadata.apply(message.data)
                except MetadataError as e:
                    self._reject(sender, _metadata_kind(e), f"metadata update: {e}", wrong=e.hostile)
            else:
                await self._events_in.send(
                    Announced(sender, topic.removeprefix(f"shoal/{self.task}/"), bytes(message.data))
                )

    # -- liveness and reachability -----------------------------------------------------------------

    async def _ping_loop(self) -> None:
        async def check(peer: str) -> None:
            if await ping(self.host, ID.from_base58(peer), self.config.ping_timeout) is not None:
                self._detector.answered(peer)
            elif self._detector.missed(peer):
                log.info("%s missed %d pings in a row", peer, self.config.ping_misses)
                await self._disconnect(peer)

        while True:
            async with trio.open_nursery() as nursery:
                for peer in self.peers():
                    nursery.start_soon(check, peer)
                await trio.sleep(self.config.ping_interval)

    async def _reachability_loop(self) -> None:
        """Ask up to three peers to dial us back (one "reached" is enough to be public); check again
        every ``RECHECK`` seconds, since networks change and one helper may be wrong, and keep relay
        reservations fresh while private."""
        while True:
            helpers = [p for p in self.host.get_connected_peers() if p != self._id]
            random.shuffle(helpers)
            verdicts = [await ask_dialback(self.host, h) for h in helpers[:3]]
            if True in verdicts:
                await self._became(Reachability.PUBLIC)
            elif False in verdicts:
                await self._became(Reachability.PRIVATE)
            await trio.sleep(1.0 if self.reachability is Reachability.UNKNOWN else RECHECK)

    async def _became(self, reachability: Reachability) -> None:
        if reachability is not self.reachability:
            log.info("reachability: %s", reachability)
        self.reachability = reachability
        mode = DHTMode.SERVER if reachability is Reachability.PUBLIC else DHTMode.CLIENT
        if self.dht.mode != mode:
            await self.dht.switch_mode(mode)
            # peers cache our protocols from identify: tell them we (no longer) serve the DHT, or
            # _prune_dht_clients on their side would drop us from their routing tables
            with trio.move_on_after(LOOKUP_TIMEOUT):
                await push_identify_to_peers(self.host)
        connected = set(self.host.get_connected_peers())
        self.relaying.relays = [r for r in self.relaying.relays if r in connected]  # gone: not advertised
        if reachability is Reachability.PRIVATE:
            # (re)reserve: reservations expire after an hour and RECHECK is well under that
            for relay in [p for p in connected if self._serves(p, HOP_PROTOCOL)][:MAX_RELAYS]:
                await self.relaying.reserve(relay)
        self.metadata.heartbeat(time.time(), self.addresses(), self._state)
        for key in self._provided:
            await self.provide(key)

    def _serves(self, peer: ID, protocol: TProtocol) -> bool:
        """Whether identify told us ``peer`` speaks ``protocol``."""
        try:
            return protocol in self.host.get_peerstore().get_protocols(peer)
        except Exception:  # identify has not told us yet
            return False


class _Dropped(Exception):
    """A frame that ``Libp2pOverlay._read`` refused and already recorded."""


def _metadata_kind(error: MetadataError) -> str:
    return "malformed metadata" if error.hostile else "oversized metadata"


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


async def _reset(stream: INetStream) -> None:
    """Reset, also from an expired deadline's scope (shielded: unshielded, no RST would go out)."""
    with trio.move_on_after(1, shield=True):
        with contextlib.suppress(Exception):
            await stream.reset()


def _single(error: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (libp2p's services nest nurseries), so
    callers see ``BootstrapError`` rather than a group wrapping it; real multi-errors stay groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _unpack(frame: bytes) -> dict:
    try:
        value = msgpack.unpackb(frame, max_bin_len=MAX_META_FRAME, max_array_len=16, max_map_len=16)
    except Exception as e:
        raise MetadataError(f"undecodable sync frame: {e}") from e
    if not isinstance(value, dict):
        raise MetadataError("sync frame is not a map")
    return value
