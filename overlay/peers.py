"""Connections and task peers: reaching a peer by every way we know, and which connected peers count.

A connected peer becomes a *task peer* (PeerConnected) once a metadata sync with it succeeded or it
delivered a message: peers of other tasks (or plain DHT/relay nodes) never speak this task's
protocols and stay invisible to the learner. It stops being one (PeerDisconnected) when its last
connection closes or when we cut it off (missed pings, a ban); ``gone`` then drops what other
components keep per peer.

Who gets a slot is the peer set's policy (``overlay.peerset``): a peer that proved itself a task peer is
admitted or refused there (per-IP limit, high-water mark; it may displace a worse peer, which is let
go). A refused or displaced peer's connection is closed and its streams are reset on arrival for
:data:`REFUSED_FOR` seconds (``overlay.guard``), so it cannot keep a slot by talking. In a closed swarm
(``overlay.allowlist``) a connection of a peer not on the allowlist is closed as soon as it is up.
Connections that never become task peers (strangers, peers of other tasks, DHT-only nodes) are capped
too: beyond ``high`` of them older than :data:`STRANGER_GRACE`, the newest of those are closed.

Dialing (:meth:`Peers.connect`): direct addresses first, then each relay circuit, punching a hole
after (``overlay.nat``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from shoal.overlay.connections import connection_info
from shoal.overlay.host import explain_dial_error, known_addrs
from shoal.overlay.interface import OverlayEvent, PeerConnected, PeerDisconnected, PeerUnreachable
from shoal.overlay.metadata import Metadata
from shoal.overlay.nat import Relaying, is_circuit, is_relayed
from shoal.overlay.peerset import PeerSet, ip_of
from shoal.overlay.tasks import Tasks

log = logging.getLogger("shoal.overlay")

DIRECT_DIAL_TIMEOUT = 3.0
REFUSED_FOR = 10.0  # seconds a refused peer's streams are reset on arrival
MAX_REFUSED = 4096  # refused peers remembered at once (identities cost nothing)
STRANGER_GRACE = 30.0  # seconds a connection may take to become a task peer (a sync takes at most 10)
LOG_LINES, LOG_INTERVAL = 10, 60.0  # peer-set decisions logged one by one per interval; the rest counted


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


class Peers:
    """The task peers, and dialing. ``connected`` runs for each new connection (to learn whether the
    peer is one of this task's), ``gone`` when a task peer goes down."""

    def __init__(
        self,
        host: IHost,
        relaying: Relaying,
        metadata: Metadata,
        tasks: Tasks,
        events: trio.MemorySendChannel[OverlayEvent],
        *,
        hole_punch_timeout: float,
        banned: Callable[[str], bool],
        connected: Callable[[ID], Awaitable[None]],
        gone: Callable[[str], None],
        policy: PeerSet,
        admitted: Callable[[str], bool] = lambda peer: True,
    ) -> None:
        self.host, self.relaying, self.metadata, self.policy = host, relaying, metadata, policy
        self.task_peers: set[str] = set()
        self.since: dict[str, float] = {}  # when each task peer became one (time.monotonic)
        self.refusals = self.evictions = 0  # newcomers refused a slot, peers displaced by better ones
        self._tasks, self._events, self._hole_punch_timeout = tasks, events, hole_punch_timeout
        self._banned, self._connected, self._gone, self._admitted = banned, connected, gone, admitted
        self._conn_in, self._conn_out = trio.open_memory_channel[tuple[str, ID]](4096)
        self._refused: dict[str, float] = {}  # peer -> until when (time.monotonic) its streams are reset
        self._connected_at: dict[str, float] = {}  # connected peers -> since when (time.monotonic)
        self._log_window, self._lines, self._unlogged = -LOG_INTERVAL, 0, 0

    def peers(self) -> list[str]:
        return sorted(self.task_peers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow libp2p's connection events, watched from before ``task_status.started``: none is missed."""
        self.host.get_network().register_notifee(_Notifee(self._conn_in))
        task_status.started()
        async for kind, peer in self._conn_out:
            if kind == "up":
                self._connected_at.setdefault(str(peer), time.monotonic())
                if not self._admitted(str(peer)):
                    self.note(f"closing the connection of {peer}: not on the allowlist")
                    self._tasks.spawn(self._close, peer)
                elif self.refused(str(peer)):  # back within its refusal: no sync, no slot
                    self._tasks.spawn(self._close, peer)
                else:
                    self._tasks.spawn(self._connected, peer)
            elif not self.host.get_network().get_connections(peer):
                self._connected_at.pop(str(peer), None)
                await self.down(str(peer))

    async def up(self, peer: str) -> bool:
        """``peer`` proved it is a peer of this task (a metadata sync or a message): whether it is one
        of ours now. It is not when banned, not admitted, or refused a slot by the peer set (then its
        connection is closed, and peers it displaced are let go)."""
        if peer in self.task_peers:
            return True
        if self._banned(peer) or self.refused(peer) or not self._admitted(peer):
            return False
        info = connection_info(self.host, ID.from_base58(peer))
        if info is None:  # gone meanwhile
            return False
        outbound, address = info
        now = time.monotonic()
        refusal, displaced = self.policy.admit(peer, outbound=outbound, ip=ip_of(address), now=now)
        for other in displaced:  # out of the set at once: the set never holds more than high
            self.evictions += 1
            self.note(f"peer set: letting {other} go (score {self.policy.score(other, now):.2f}) for {peer}")
            self.task_peers.discard(other)
            self.since.pop(other, None)
            self._refuse(other, now)  # not straight back in on its next message
            self._tasks.spawn(self._let_go, other)
        if refusal is not None:
            self.refusals += 1
            self.note(f"peer set: refusing {peer} ({'outbound' if outbound else 'inbound'}): {refusal}")
            self._refuse(peer, now)
            self._tasks.spawn(self._close, ID.from_base58(peer))
            return False
        self.task_peers.add(peer)
        self.since[peer] = now
        log.info("peer up: %s (%s)", peer, self.kind(peer))
        await self._events.send(PeerConnected(peer))
        return True

    async def _let_go(self, peer: str) -> None:
        """Tell the learner a peer the set displaced is gone, and close its connection."""
        self._gone(peer)
        log.info("peer down: %s", peer)
        await self._events.send(PeerDisconnected(peer))
        await self._close(ID.from_base58(peer))

    def refused(self, peer: str) -> bool:
        """Whether ``peer`` was refused a slot within the last :data:`REFUSED_FOR` seconds."""
        until = self._refused.get(peer)
        return until is not None and time.monotonic() < until

    def _refuse(self, peer: str, now: float) -> None:
        if len(self._refused) >= MAX_REFUSED:
            self._refused = {p: t for p, t in self._refused.items() if t > now}
            if len(self._refused) >= MAX_REFUSED:  # all current: the oldest refusal goes
                del self._refused[min(self._refused, key=self._refused.__getitem__)]
        self._refused[peer] = now + REFUSED_FOR

    async def _close(self, peer: ID) -> None:
        with trio.move_on_after(2):
            await self.host.disconnect(peer)

    def strangers(self, now: float, keep: set[str]) -> list[str]:
        """Connected peers that are not task peers (nor in ``keep``: our relays) though connected for
        :data:`STRANGER_GRACE`, beyond ``policy.high`` of them: the newest first, to be closed. Those
        still within the grace may yet become task peers and are not counted."""
        connected = {str(p) for p in self.host.get_connected_peers()}
        self._connected_at = {p: t for p, t in self._connected_at.items() if p in connected}
        old = [
            p
            for p in connected
            if p not in self.task_peers
            and p not in keep
            and now - self._connected_at.setdefault(p, now) >= STRANGER_GRACE
        ]
        over = len(old) - self.policy.high
        return sorted(old, key=lambda p: -self._connected_at[p])[: max(0, over)]

    async def close_strangers(self, keep: set[str]) -> None:
        for peer in self.strangers(time.monotonic(), keep):
            self.note(f"closing the connection of {peer}: not a task peer, over {self.policy.high} such")
            await self._close(ID.from_base58(peer))

    def note(self, line: str) -> None:
        """Log a peer-set decision: one by one up to :data:`LOG_LINES` per interval, then counted in
        one line per interval (identities cost nothing, a log must not)."""
        now = time.monotonic()
        if now - self._log_window >= LOG_INTERVAL:
            if self._unlogged:
                elapsed = now - self._log_window
                log.info("peer set: %d more decisions in the last %.0f s", self._unlogged, elapsed)
            self._log_window, self._lines, self._unlogged = now, 0, 0
        if self._lines < LOG_LINES:
            self._lines += 1
            log.info("%s", line)
        else:
            self._unlogged += 1

    async def down(self, peer: str) -> None:
        self._gone(peer)
        self.policy.remove(peer, time.monotonic())
        if peer in self.task_peers:
            self.task_peers.discard(peer)
            self.since.pop(peer, None)
            log.info("peer down: %s", peer)
            await self._events.send(PeerDisconnected(peer))

    async def disconnect(self, peer: str) -> None:
        await self.down(peer)
        with trio.move_on_after(2):
            await self.host.disconnect(ID.from_base58(peer))

    def kind(self, peer: str) -> str:
        """ "relayed" when all our connections to ``peer`` go through a relay, else "direct"."""
        return "relayed" if is_relayed(self.host, ID.from_base58(peer)) else "direct"

    async def open(self, peer: str, protocol: TProtocol) -> INetStream:
        """A new stream to ``peer`` (banned peers: PeerUnreachable), connecting first if need be."""
        peer_id = ID.from_base58(peer)
        if self._banned(peer):
            raise PeerUnreachable(f"{peer} is banned for sending wrong input")
        if not self.host.get_network().get_connections(peer_id):
            await self.connect(peer_id)
        return await self.host.new_stream(peer_id, [protocol])

    async def connect(self, peer: ID, given: Sequence[str] = ()) -> None:
        """Direct addresses first (peerstore, ``given``, then the peer's metadata record), then each
        relay circuit, punching a hole after; PeerUnreachable with every reason if nothing worked."""
        member = self.metadata.members().get(str(peer))
        addrs = [*given, *(member.addrs if member else ())]
        direct = [Multiaddr(a) for a in addrs if not is_circuit(a)]
        peerstore = self.host.get_peerstore()
        if direct and not known_addrs(self.host, peer):
            # given addresses (metadata, provider records) are not authenticated: used only when we
            # know none from a connection of our own (identify)
            peerstore.add_addrs(peer, direct, 600)
        circuits = [a for a in addrs if is_circuit(a)]
        errors = []
        self.host.get_network().unblock_peer(peer)  # we were asked to try now: skip the failure cache
        if known_addrs(self.host, peer):
            # behind a NAT a direct dial hangs until its timeout: keep time for the relay then
            with trio.move_on_after(DIRECT_DIAL_TIMEOUT if circuits else math.inf):
                try:
                    await self.host.connect(peerstore.peer_info(peer))
                    return
                except Exception as e:  # fall through to relays
                    errors.append(explain_dial_error(e))
        for circuit in circuits:
            try:
                await self.relaying.dial(peer, circuit)
            except Exception as e:
                errors.append(f"via relay: {explain_dial_error(e)}")
                continue
            self._tasks.spawn(self.relaying.upgrade, peer, self._hole_punch_timeout)
            return
        raise PeerUnreachable(f"cannot connect to {peer}: " + ("; ".join(errors) or "no known address"))
