"""Connections and task peers: reaching a peer by every way we know, and which connected peers count.

A connected peer becomes a *task peer* (PeerConnected) once a metadata sync with it succeeded or it
delivered a message: peers of other tasks (or plain DHT/relay nodes) never speak this task's
protocols and stay invisible to the learner. It stops being one (PeerDisconnected) when its last
connection closes or when we cut it off (missed pings, a ban); ``gone`` then drops what other
components keep per peer.

Dialing (:meth:`Peers.connect`): direct addresses first, then each relay circuit, punching a hole
after (``overlay.nat``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee, IPeerStore
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError
from multiaddr import Multiaddr

from shoal.overlay.host import explain_dial_error
from shoal.overlay.interface import OverlayEvent, PeerConnected, PeerDisconnected, PeerUnreachable
from shoal.overlay.metadata import Metadata
from shoal.overlay.nat import Relaying, is_circuit, is_relayed
from shoal.overlay.tasks import Tasks

log = logging.getLogger("shoal.overlay")

DIRECT_DIAL_TIMEOUT = 3.0


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
    ) -> None:
        self.host, self.relaying, self.metadata = host, relaying, metadata
        self.task_peers: set[str] = set()
        self.since: dict[str, float] = {}  # when each task peer became one (time.monotonic)
        self._tasks, self._events, self._hole_punch_timeout = tasks, events, hole_punch_timeout
        self._banned, self._connected, self._gone = banned, connected, gone
        self._conn_in, self._conn_out = trio.open_memory_channel[tuple[str, ID]](4096)

    def peers(self) -> list[str]:
        return sorted(self.task_peers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow libp2p's connection events, watched from before ``task_status.started``: none is missed."""
        self.host.get_network().register_notifee(_Notifee(self._conn_in))
        task_status.started()
        async for kind, peer in self._conn_out:
            if kind == "up":
                self._tasks.spawn(self._connected, peer)
            elif not self.host.get_network().get_connections(peer):
                await self.down(str(peer))

    async def up(self, peer: str) -> None:
        """``peer`` proved it is a peer of this task (a metadata sync or a message)."""
        if peer not in self.task_peers and not self._banned(peer):
            self.task_peers.add(peer)
            self.since[peer] = time.monotonic()
            log.info("peer up: %s (%s)", peer, self.kind(peer))
            await self._events.send(PeerConnected(peer))

    async def down(self, peer: str) -> None:
        self._gone(peer)
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
        if direct and not _known_addrs(peerstore, peer):
            # given addresses (metadata, provider records) are not authenticated: used only when we
            # know none from a connection of our own (identify)
            peerstore.add_addrs(peer, direct, 600)
        circuits = [a for a in addrs if is_circuit(a)]
        errors = []
        self.host.get_network().unblock_peer(peer)  # we were asked to try now: skip the failure cache
        if _known_addrs(peerstore, peer):
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


def _known_addrs(peerstore: IPeerStore, peer: ID) -> list[Multiaddr]:
    """The addresses the peerstore holds for ``peer``; none (not an error) for a peer it never saw."""
    try:
        return peerstore.addrs(peer)
    except PeerStoreError:
        return []
