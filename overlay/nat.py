"""Getting past NATs: our own reachability check and its monitor, Circuit Relay v2 with explicit
reservations, DCUtR.

:class:`ReachabilityMonitor` asks up to three connected peers to dial us back (one "reached" is
enough to be public), every ``RECHECK`` seconds since networks change and one helper may be wrong,
and keeps relay reservations fresh while private. What depends on the verdict (the DHT's mode, our
advertised records) is told through the two callbacks it is built with.

Upstream behaviours worked around here (py-libp2p 0.8.1, each measured):

- AutoNAT v1 answers "public" whenever the asker is already connected: its dial-back reuses the
  existing connection. Our check (:func:`serve_dialback`) dials back from a *fresh* host with a new
  key, so only a real inbound connection counts, and only to addresses on the IP we see the asker
  come from (no reflecting dials at third parties). Each request costs the helper up to
  ``MAX_DIALBACK_ADDRS`` dials of up to 5 s, so :class:`DialbackServer` bounds them: per asker
  ``DIALBACK_BURST`` requests, then one per ``DIALBACK_INTERVAL`` seconds (more is a flood, blamed: the
  monitor asks one helper at most that often), and ``MAX_DIALBACKS`` at once node-wide (the rest are
  answered "busy" at once, unblamed: many identities each within their rate). Measured before: a flood
  made one node run ~250 dials at once, 1,776 in 30 s.
- ``auto_reserve`` never makes a relay reservation: :meth:`Relaying.reserve` makes it explicitly.
- ``host.get_addrs()`` never contains the ``/p2p-circuit`` address (and an address factory cannot
  add it: the host cuts addresses at their first ``/p2p/``): :meth:`Relaying.circuit_addrs` builds
  it, and the overlay advertises it in the metadata document.
- The swarm never dials ``/p2p-circuit`` addresses itself: :meth:`Relaying.dial` does.
- ``initiate_hole_punch`` can hang for more than 40 s behind a port-randomising NAT:
  :meth:`Relaying.upgrade` bounds it; the relayed connection stays in use when it fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import StrEnum

import msgpack
import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from shoal.overlay.framing import Libp2pStream, TransferError, read_frame, write_frame
from shoal.overlay.host import known_addrs, reset_stream, serves
from shoal.overlay.penalties import RateLimit

log = logging.getLogger(__name__)

DIALBACK = TProtocol("/shoal/dialback/1.0.0")
MAX_DIALBACK_ADDRS = 4
MAX_DIALBACK_FRAME = 16 * 1024
_MULTISTREAM_HELLO = b"\x13/multistream/1.0.0\n"  # varint length 19 + protocol line
RECHECK = 300.0  # seconds between reachability checks (and relay reservation refreshes)
# a private node without a reservation cannot be reached: it checks again sooner, doubling from this
# (at 24 daemons starting on 2 cores every reservation timed out at first, and RECHECK left such
# nodes unreachable from other homes for 5 minutes)
RESERVE_RETRY = 10.0
MAX_RELAYS = 2
DIALBACK_INTERVAL = 20.0  # seconds between requests of one asker to one helper, sustained
DIALBACK_BURST = 3
MAX_DIALBACKS = 8  # requests served at once, node-wide


class Reachability(StrEnum):
    UNKNOWN = "unknown"
    PUBLIC = "public"  # a fresh dial from another node reached us
    PRIVATE = "private"  # it did not: we rely on relays and hole punching


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


def _ip(addr: multiaddr.Multiaddr) -> str | None:
    for proto in ("ip4", "ip6"):
        try:
            return str(ipaddress.ip_address(addr.value_for_protocol(proto)))
        except Exception:
            continue
    return None


def _without_peer(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    text = str(addr)
    return multiaddr.Multiaddr(text.split("/p2p/")[0]) if "/p2p/" in text else addr


def dialback_candidates(claimed: list[str], observed_ip: str | None) -> list[multiaddr.Multiaddr]:
    """The claimed addresses we may dial: plain TCP addresses on the IP the request came from."""
    out = []
    for text in claimed[:32]:
        try:
            addr = _without_peer(multiaddr.Multiaddr(text))
        except Exception:
            continue
        if not is_circuit(addr) and observed_ip is not None and _ip(addr) == observed_ip:
            out.append(addr)
    return out[:MAX_DIALBACK_ADDRS]


async def serve_dialback(stream: INetStream, timeout: float = 5.0) -> None:
    """Answer a reachability request: try a fresh connection to the asker and say whether it worked."""
    asker = stream.muxed_conn.peer_id
    stream_io = Libp2pStream(stream)
    try:
        remote = stream.get_remote_address()
        observed_ip = str(ipaddress.ip_address(remote[0])) if remote else None
        with trio.fail_after(timeout):
            request = msgpack.unpackb(await read_frame(stream_io, MAX_DIALBACK_FRAME), max_array_len=64)
        claimed = request.get("addrs") if isinstance(request, dict) else None
        if not isinstance(claimed, list):
            raise ValueError("request has no list of addresses")
    except (TransferError, trio.TooSlowError, ValueError, msgpack.UnpackException) as e:
        log.debug("dial-back request from %s rejected: %s", asker, e)  # any peer can repeat it at will
        await stream.reset()
        return
    reached = None
    for addr in dialback_candidates([a for a in claimed if isinstance(a, str)], observed_ip):
        if await _dial_fresh(addr, timeout):
            reached = str(addr)
            break
    await _reply(stream, {"reached": reached, "observed": observed_ip}, timeout)


async def _reply(stream: INetStream, reply: dict[str, object], timeout: float) -> None:
    """Answer a request; an asker that went away meanwhile (a reset stream) gets nothing."""
    with trio.move_on_after(timeout), contextlib.suppress(Exception):
        await write_frame(Libp2pStream(stream), msgpack.packb(reply))
        await stream.close()


class DialbackServer:
    """:func:`serve_dialback` under bounds: a rate per asker (the excess is a flood, reported through
    ``reject(peer, kind, reason, wrong=...)``) and ``concurrent`` requests at once node-wide (the rest are
    answered ``{"busy": true}`` without a dial)."""

    def __init__(
        self,
        reject: Callable[..., None],
        *,
        interval: float = DIALBACK_INTERVAL,
        burst: int = DIALBACK_BURST,
        concurrent: int = MAX_DIALBACKS,
        timeout: float = 5.0,
    ) -> None:
        self._reject, self._timeout, self.concurrent = reject, timeout, concurrent
        self._rate = RateLimit(1.0 / interval, burst)
        self.active = 0  # requests being served now
        self.served = 0

    async def serve(self, stream: INetStream) -> None:
        asker, now = str(stream.muxed_conn.peer_id), trio.current_time()
        self._rate.forget_idle(now)
        if not self._rate.allow(asker, now):
            self._reject(asker, "flood", "dial-back requests over the rate", wrong=True)
            await reset_stream(stream)
            return
        if self.active >= self.concurrent:
            await _reply(stream, {"busy": True}, self._timeout)
            return
        self.active += 1
        try:
            await serve_dialback(stream, self._timeout)
            self.served += 1
        finally:
            self.active -= 1


async def _dial_fresh(addr: multiaddr.Multiaddr, timeout: float) -> bool:
    """Open a new TCP connection to ``addr`` and check a libp2p listener answers there.

    A new connection, never a reused one, is what makes the check honest. We stop after
    multistream-select's greeting: completing a full libp2p connection would add a short-lived peer
    to the asker's DHT routing table, and its later lookups would wait on that dead entry.
    """
    try:
        host, port = _ip(addr), int(addr.value_for_protocol("tcp"))
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(_MULTISTREAM_HELLO)
                greeting = b""
                while len(greeting) < len(_MULTISTREAM_HELLO):
                    chunk = await stream.receive_some(64)
                    if not chunk:
                        break
                    greeting += chunk
        return greeting.startswith(_MULTISTREAM_HELLO)
    except (OSError, trio.TooSlowError, ValueError, trio.BrokenResourceError) as e:
        log.debug("dial-back to %s failed: %s", addr, e)
        return False


async def ask_dialback(host: IHost, helper: ID, timeout: float = 10.0) -> bool | None:
    """Ask ``helper`` to dial us back. True/False is its verdict; None if it could not be asked."""
    addrs = [str(a) for a in host.get_addrs() if not is_circuit(a)]
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(helper, [DIALBACK])
            io = Libp2pStream(stream)
            await write_frame(io, msgpack.packb({"addrs": addrs}))
            reply = msgpack.unpackb(await read_frame(io, MAX_DIALBACK_FRAME))
            await stream.close()
    except Exception as e:  # the helper does not speak the protocol, went away, or timed out
        log.debug("dial-back request to %s failed: %s", helper, e)
        return None
    if not isinstance(reply, dict) or reply.get("busy"):
        return None
    log.info(
        "dial-back from %s: %s (it sees us at %s)",
        helper,
        "reached " + str(reply.get("reached")) if reply.get("reached") else "not reachable",
        reply.get("observed"),
    )
    return bool(reply.get("reached"))


class Relaying:
    """Circuit Relay v2 (as a relay with ``serve=True``, always as a client) and DCUtR hole punching."""

    def __init__(self, host: IHost, serve: bool) -> None:
        self.host = host
        limits = RelayLimits(duration=3600, data=1 << 34, max_circuit_conns=64, max_reservations=64)
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=serve)
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if serve else RelayRole(0))
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=roles, limits=limits))
        self.dcutr = DCUtRProtocol(host)
        self.relays: list[ID] = []  # relays holding a reservation for us

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with (
            background_trio_service(self.protocol),
            background_trio_service(self.dcutr),
        ):
            yield

    async def reserve(self, relay: ID, timeout: float = 10.0) -> bool:
        """Reserve a slot on ``relay`` so peers can reach us through it (explicitly: see module doc)."""
        discovery = self.transport.discovery
        with trio.move_on_after(timeout):
            await discovery.discover_relays()
            if await discovery.make_reservation(relay):
                if relay not in self.relays:
                    self.relays.append(relay)
                log.info("relay reservation made on %s", relay)
                return True
        log.info("relay reservation on %s failed", relay)
        return False

    def addresses(self) -> list[str]:
        """Full multiaddrs (with ``/p2p/<id>``) others can use to reach us, relay circuits included.

        The circuits are added here: ``host.get_addrs()`` never lists them and strips any we give it.
        """
        circuits = [f"{a}/p2p/{self.host.get_id()}" for a in self.circuit_addrs()]
        return [str(a) for a in self.host.get_addrs()] + circuits

    def circuit_addrs(self) -> list[multiaddr.Multiaddr]:
        """``<relay addr>/p2p/<relay>/p2p-circuit`` for each relay holding a reservation for us."""
        out = []
        for relay in self.relays:
            direct = [a for a in known_addrs(self.host, relay) if not is_circuit(a)]
            if direct:
                out.append(multiaddr.Multiaddr(f"{_without_peer(direct[0])}/p2p/{relay}/p2p-circuit"))
        return out

    async def dial(self, peer: ID, circuit: str) -> None:
        """Connect to ``peer`` through the relay named in ``circuit`` (``.../p2p-circuit[/p2p/<peer>]``)."""
        base = circuit.split("/p2p-circuit")[0]
        await self.transport.dial(multiaddr.Multiaddr(f"{base}/p2p-circuit/p2p/{peer}"))

    async def upgrade(self, peer: ID, timeout: float) -> bool:
        """Try to replace a relayed connection by a hole-punched direct one, within ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            try:
                return bool(await self.dcutr.initiate_hole_punch(peer))
            except Exception as e:  # DCUtR failures just mean we stay on the relay
                log.info("hole punch to %s failed: %s", peer, e)
        return False


def is_relayed(host: IHost, peer: ID) -> bool:
    """True when every connection to ``peer`` goes through a relay."""
    conns = host.get_network().get_connections(peer)
    if not conns:
        return False
    for conn in conns:
        try:
            addrs = conn.get_transport_addresses()
        except Exception:
            addrs = []
        if not any(is_circuit(a) for a in addrs):
            return False
    return True


class ReachabilityMonitor:
    """Whether others can dial us (:attr:`reachability`), and relay reservations while they cannot.

    ``verdict`` hears each verdict first (the DHT's mode follows it); ``readvertise`` runs after the
    relays were refreshed, since our addresses (relay circuits included) may have changed.
    """

    def __init__(
        self,
        host: IHost,
        relaying: Relaying,
        *,
        verdict: Callable[[Reachability], Awaitable[None]],
        readvertise: Callable[[], Awaitable[None]],
    ) -> None:
        self.host, self.relaying = host, relaying
        self.reachability = Reachability.UNKNOWN
        self._verdict, self._readvertise = verdict, readvertise
        self._retry = RESERVE_RETRY
        self._asked: dict[ID, float] = {}  # helper: when we last asked it (helpers bound the rate)

    async def run(self) -> None:
        me = self.host.get_id()
        while True:
            now = trio.current_time()
            self._asked = {h: t for h, t in self._asked.items() if now - t < DIALBACK_INTERVAL}
            helpers = [p for p in self.host.get_connected_peers() if p != me and p not in self._asked]
            random.shuffle(helpers)
            for helper in helpers[:3]:
                self._asked[helper] = now
            verdicts = [await ask_dialback(self.host, h) for h in helpers[:3]]
            if True in verdicts:
                await self._became(Reachability.PUBLIC)
            elif False in verdicts:
                await self._became(Reachability.PRIVATE)
            await trio.sleep(self._next_check())

    def _next_check(self) -> float:
        if self.reachability is Reachability.UNKNOWN:
            return 1.0
        if self.reachability is Reachability.PRIVATE and not self.relaying.relays:
            wait, self._retry = self._retry, min(RECHECK, 2 * self._retry)
            return wait
        self._retry = RESERVE_RETRY
        return RECHECK

    async def _became(self, reachability: Reachability) -> None:
        if reachability is not self.reachability:
            log.info("reachability: %s", reachability)
        self.reachability = reachability
        await self._verdict(reachability)
        connected = set(self.host.get_connected_peers())
        self.relaying.relays = [r for r in self.relaying.relays if r in connected]  # gone: not advertised
        if reachability is Reachability.PRIVATE:
            # (re)reserve: reservations expire after an hour and RECHECK is well under that
            for relay in [p for p in connected if serves(self.host, p, HOP_PROTOCOL)][:MAX_RELAYS]:
                await self.relaying.reserve(relay)
        await self._readvertise()
