"""The Overlay on py-libp2p: one node of one task, wired from components that each own one concern.

Each component is a small object holding its own state, with an ``async run()`` where it has a loop;
:meth:`Libp2pOverlay.start` runs them all in one nursery (``overlay.tasks``: stream handlers outlive
it, so nothing starts in it once stopping). This class builds and wires them and answers the Overlay
interface (``overlay.interface``). Who owns what:

- ``overlay.host``: the libp2p host (TCP + Noise + Yamux, with ``overlay.yamuxio`` and
  ``overlay.noiseio``), addresses, bootstrap;
- ``overlay.peers``: connections (direct, then relay, then hole punch) and which peers are task peers;
- ``overlay.guard``: what every inbound stream passes (bans, rates, byte budgets, bounded frame
  reads), enforcing ``overlay.penalties``;
- ``overlay.messaging``: protocol messages on streams reused per peer; traffic counters;
- ``overlay.metasync``: syncing the metadata document (``overlay.metadata``): sans-IO exchange,
  anti-entropy, gossip of edits, our heartbeat;
- ``overlay.announce``: gossipsub topics, paced and capped;
- ``overlay.dht``: Kademlia discovery and its mode;
- ``overlay.nat``: the reachability monitor, relay reservations, dial-back, hole punching;
- ``overlay.liveness``: phi-accrual failure detection over pings and traffic; cuts off hung peers;
- ``overlay.membership``: the peer set kept between its low and high water marks, with its policy
  (``overlay.peerset``: outbound slots, per-IP limit, protection of long-lived and useful peers, credit);
- ``overlay.allowlist``: the allowlist of a closed swarm, if configured.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from shoal.overlay.announce import Announcements
from shoal.overlay.config import P2PConfig
from shoal.overlay.dht import Discovery
from shoal.overlay.framing import Inflight
from shoal.overlay.guard import Guard
from shoal.overlay.host import build_host, join, parse_bootstrap
from shoal.overlay.interface import Announced, MembersChanged, OverlayEvent
from shoal.overlay.liveness import Liveness
from shoal.overlay.membership import Membership
from shoal.overlay.messaging import Messaging
from shoal.overlay.metadata import Metadata
from shoal.overlay.metasync import MetaSync
from shoal.overlay.nat import DIALBACK, DialbackServer, Reachability, ReachabilityMonitor, Relaying
from shoal.overlay.peers import Peers
from shoal.overlay.peerset import PeerSet
from shoal.overlay.penalties import Penalties, Rejection
from shoal.overlay.tasks import Tasks
from shoal.overlay.wire import Message

MEMBERS_INTERVAL = 1.0


class Libp2pOverlay:
    """One node on a real network, implementing ``overlay.interface.Overlay`` for one task."""

    def __init__(self, key_pair: KeyPair, task: str, config: P2PConfig) -> None:
        self.config = config
        self.task = task
        self.host = build_host(key_pair, config.listen, config.announce, config.upnp)
        self.metadata = Metadata(task, key_pair, epoch_length=config.metadata_epoch)
        self.allowlist = config.admission()  # None: an open swarm
        self.relaying = Relaying(self.host, serve=config.relay_service)
        self.bytes_in: Counter[str] = Counter()  # by protocol part: "msg:<kind>", "meta", "announce"
        self.bytes_out: Counter[str] = Counter()
        self._events_in, self._events = trio.open_memory_channel[OverlayEvent](1024)
        self._tasks = Tasks()
        self._peers = Peers(
            self.host,
            self.relaying,
            self.metadata,
            self._tasks,
            self._events_in,
            hole_punch_timeout=config.hole_punch_timeout,
            banned=self.banned,
            connected=self._connected,
            gone=self._gone,
            policy=PeerSet(
                high=config.peers_high,
                outbound=min(config.peers_out, config.peers_low),
                per_ip=config.peers_per_ip,
            ),
            admitted=self.admitted,
        )
        self._guard = Guard(
            config,
            self._tasks,
            cut_off=self._peers.disconnect,
            refused=lambda peer: not self.admitted(peer) or self._peers.refused(peer),
        )
        self._dialback = DialbackServer(self._guard.reject)
        self._messaging = Messaging(
            task, config, self._guard, self._peers, self._events_in, self.bytes_in, self.bytes_out
        )
        self._announcements = Announcements(self.host, self._excluded, self.bytes_in, self.bytes_out)
        self._sync = MetaSync(
            self.host,
            task,
            self.metadata,
            config,
            guard=self._guard,
            peers=self._peers,
            announcements=self._announcements,
            tasks=self._tasks,
            addresses=self.relaying.addresses,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )
        self._discovery = Discovery(self.host, server=not config.bootstrap, connect=self._peers.connect)
        self._nat = ReachabilityMonitor(
            self.host, self.relaying, verdict=self._discovery.switch_mode, readvertise=self._readvertise
        )
        self._liveness = Liveness(
            self.host,
            interval=config.ping_interval,
            timeout=config.ping_timeout,
            suspect=config.suspect_phi,
            down=config.down_phi,
            pause=config.acceptable_pause,
            peers=self._peers,
        )
        self._membership = Membership(
            self._peers,
            self.metadata,
            low=config.peers_low,
            high=config.peers_high,
            banned=self.banned,
            lookup=self._discovery.find_our_providers,
            admitted=self.admitted,
            keep=None if config.relay_service else lambda: {str(r) for r in self.relaying.relays},
        )

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
            self._announcements.running(),
            self.relaying.running(),
            self._tasks.open() as nursery,
        ):
            await self.pubsub.wait_until_ready()
            await nursery.start(self._peers.run)
            for protocol, handler in (
                (self._messaging.protocol, self._messaging.on_message_stream),
                (self._sync.protocol, self._sync.on_meta_stream),
                (DIALBACK, self._dialback.serve),
            ):
                self.host.set_stream_handler(protocol, self._guard.handler(handler))
            await nursery.start(self._announcements.listen, self._sync.topic, self._sync.on_update)
            bootstrap = [parse_bootstrap(a) for a in config.bootstrap]
            for info in await join(self.host, bootstrap, config.bootstrap_attempts):
                await self.dht.add_peer(info.peer_id)
            self._sync.heartbeat()
            for component in (
                self._guard,
                self._messaging,
                self._sync,
                self._discovery,
                self._nat,
                self._liveness,
                self._membership,
            ):
                nursery.start_soon(component.run)
            nursery.start_soon(self._watch_members)
            yield

    async def leave(self, timeout: float = 3.0) -> None:
        """Tell the swarm we are leaving (metadata state "left"), so peers need not wait for a timeout."""
        await self._sync.leave(timeout)

    # -- wiring ------------------------------------------------------------------------------------

    async def _connected(self, peer: ID) -> None:
        """A new connection: a metadata sync tells whether it is a peer of this task."""
        await self._sync.sync_with(peer)

    def _gone(self, peer: str) -> None:
        """A peer went down or was cut off: forget what the components keep about it."""
        self._liveness.forget(peer)
        self._messaging.forget(peer)

    async def _watch_members(self) -> None:
        """Tell the driver when :meth:`members` changed (records arrive, expire or leave): checked every
        ``MEMBERS_INTERVAL`` seconds, since expiry is a matter of time, not of an event."""
        last = frozenset(self.members())
        while True:
            await trio.sleep(MEMBERS_INTERVAL)
            now = frozenset(self.members())
            if now != last:
                last = now
                await self._events_in.send(MembersChanged(now))

    async def _readvertise(self) -> None:
        """After a reachability check: our addresses may have changed, and the DHT's mode."""
        self._sync.heartbeat()
        await self._discovery.reprovide()

    # -- Overlay interface -------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    @property
    def events(self) -> trio.MemoryReceiveChannel[OverlayEvent]:
        return self._events

    def peers(self) -> list[str]:
        return self._peers.peers()

    def addresses(self) -> list[str]:
        """Full multiaddrs (with ``/p2p/<id>``) others can use to reach us, relay circuits included."""
        return self.relaying.addresses()

    async def send(self, peer: str, message: Message) -> None:
        await self._messaging.send(peer, message)

    def subscribe(self, topic: str) -> None:
        assert self._tasks.running, "subscribe after start()"

        async def announced(sender: str, data: bytes) -> None:
            await self._events_in.send(Announced(sender, topic, bytes(data)))

        self._tasks.spawn(self._announcements.listen, self._topic(topic), announced)

    async def publish(self, topic: str, data: bytes) -> None:
        await self._announcements.publish(self._topic(topic), data)

    async def provide(self, key: str) -> None:
        await self._discovery.provide(key)

    async def find_providers(self, key: str, limit: int = 20) -> list[str]:
        """Providers of ``key`` (self excluded); we also connect to them so they become peers."""
        return await self._discovery.find_providers(key, limit)

    def penalize(self, peer: str, reason: str) -> None:
        self._guard.reject(peer, "refused by protocol", reason, wrong=True)

    def credit(self, peer: str, value: float) -> None:
        """The learner's verdict on one contribution of ``peer``: 1.0 taken as it was, 0.0 refused, in
        between when clipped. Kept as a moving average per peer, which decides whom the peer set keeps
        when it is full (``overlay.peerset``)."""
        self._peers.policy.credit(peer, value, time.monotonic())

    def members(self) -> list[str]:
        """The peers of this task whose own signed metadata record we hold and is current (not "left",
        seen within the document's expiry), us included; in a closed swarm only admitted ones."""
        now = time.time()
        return sorted(
            peer
            for peer, member in self.metadata.members().items()
            if peer == self.peer_id or (member.current(now, self.metadata.expiry) and self.admitted(peer))
        )

    def _topic(self, topic: str) -> str:
        return f"shoal/{self.task}/{topic}"

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
        return self._guard.banned(peer)

    @property
    def peak_rate(self) -> int:
        """The most inbound streams and messages one peer sent in one second since start (the limit is
        ``message_rate`` sustained, ``message_burst`` at once)."""
        return self._guard.peak_rate

    def admitted(self, peer: str) -> bool:
        """Whether ``peer`` may take part: always in an open swarm, else if it is on the allowlist."""
        return self.allowlist is None or self.allowlist.admits(peer)

    def _excluded(self, peer: str) -> bool:
        """Whose gossip is dropped on arrival: banned peers, and peers off a closed swarm's allowlist."""
        return self.banned(peer) or not self.admitted(peer)

    def peer_set(self) -> dict[str, object]:
        """The peer set's state, for status: outbound and protected peers now, newcomers refused a slot
        and peers let go for better ones since start."""
        policy = self._peers.policy
        return {
            "outbound": sorted(p for p, s in policy.slots.items() if s.outbound),
            "protected": sorted(policy.protected(time.monotonic())),
            "refused": self._peers.refusals,
            "displaced": self._peers.evictions,
        }

    def connection_kind(self, peer: str) -> str:
        """ "relayed" when all our connections to ``peer`` go through a relay, else "direct"."""
        return self._peers.kind(peer)

    def liveness(self) -> dict[str, object]:
        return self._liveness.status()

    @property
    def reachability(self) -> Reachability:
        return self._nat.reachability

    @property
    def policy(self) -> Penalties:
        return self._guard.policy

    @property
    def inflight(self) -> Inflight:
        return self._guard.inflight

    @property
    def receiving(self) -> Counter[str]:
        """Bytes so far of messages arriving now, by sender."""
        return self._guard.receiving

    @property
    def dht(self) -> KadDHT:
        return self._discovery.dht

    @property
    def pubsub(self) -> Pubsub:
        return self._announcements.pubsub

    @property
    def router(self) -> GossipSub:
        return self._announcements.router


def _single(error: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (libp2p's services nest nurseries), so
    callers see ``BootstrapError`` rather than a group wrapping it; real multi-errors stay groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error
