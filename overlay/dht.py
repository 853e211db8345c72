"""Discovery on Kademlia: provider records per key, the DHT's mode, and two upstream workarounds.

Mode: server once a dial-back proved us reachable (``overlay.nat``), client otherwise; the first
node, with no bootstrap, starts as server (py-libp2p 0.8.1 serves provider records only in server mode).
Our keys are provided again at every reachability verdict, so the records follow a mode switch and
are refreshed every ``overlay.nat.RECHECK`` seconds.

Upstream behaviours worked around here (py-libp2p 0.8.1): ``find_providers`` answers from the local
store alone (:meth:`Discovery._providers`), and routing tables keep client-mode peers
(:meth:`Discovery._prune_clients`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio
from libp2p.abc import IHost
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht.kad_dht import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT, _encode_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from shoal.overlay.interface import PeerUnreachable
from shoal.overlay.nat import Reachability

log = logging.getLogger("shoal.overlay")

LOOKUP_TIMEOUT = 10.0


class Discovery:
    """The KadDHT, the keys we provide, and finding (and connecting to) the providers of a key."""

    def __init__(
        self, host: IHost, *, server: bool, connect: Callable[[ID, Sequence[str]], Awaitable[None]]
    ) -> None:
        self.host = host
        self.dht = KadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT)
        self._connect = connect
        self._provided: set[str] = set()

    async def run(self) -> None:
        while True:
            await trio.sleep(1.0)
            self._prune_clients()

    async def provide(self, key: str) -> None:
        self._provided.add(key)
        with trio.move_on_after(LOOKUP_TIMEOUT):
            await self.dht.provide(key)

    async def reprovide(self) -> None:
        for key in list(self._provided):
            await self.provide(key)

    async def find_our_providers(self) -> None:
        """Connect to the providers of every key we provide: the peers of our tasks."""
        for key in list(self._provided):
            await self.find_providers(key)

    async def switch_mode(self, reachability: Reachability) -> None:
        """Serve the DHT when ``reachability`` is public, else be a client."""
        mode = DHTMode.SERVER if reachability is Reachability.PUBLIC else DHTMode.CLIENT
        if self.dht.mode != mode:
            await self.dht.switch_mode(mode)
            # peers cache our protocols from identify: tell them we (no longer) serve the DHT, or
            # _prune_clients on their side would drop us from their routing tables
            with trio.move_on_after(LOOKUP_TIMEOUT):
                await push_identify_to_peers(self.host)

    async def find_providers(self, key: str, limit: int = 20) -> list[str]:
        """Providers of ``key`` (self excluded); we also connect to them so they become peers."""
        me = self.host.get_id()
        infos = [i for i in (await self._providers(key))[:limit] if i.peer_id != me]

        async def connect(info: PeerInfo) -> None:
            with trio.move_on_after(10):
                try:
                    await self._connect(info.peer_id, [str(a) for a in info.addrs])
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
        me = self.host.get_id()
        async with trio.open_nursery() as nursery:
            for peer in closest or self.dht.routing_table.get_peer_ids():
                if peer != me:
                    nursery.start_soon(ask, peer)
        return list(found.values())

    def _prune_clients(self) -> None:
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
