"""Building the libp2p host and joining a swarm: transports, addresses, bootstrap, log noise; and two
helpers every overlay component needs (:func:`reset_stream`, :func:`serves`).

Upstream behaviours worked around here (py-libp2p 0.8.1, each measured):

- TCP + Noise + Yamux only: QUIC loses the last bytes of streams silently (§1c).
- ``ConnectionConfig(max_connections_per_peer=1)``: otherwise every dial waits out a 250 ms
  happy-eyeballs delay even after it succeeded (§8).
- A host listening on ``0.0.0.0`` advertises ``0.0.0.0`` (§6); we announce each interface's address.
- Yamux's frames, writes, reads and receive windows changed where they were slow or fragile
  (``overlay.yamuxio``), and its Noise I/O batched (``overlay.noiseio``); :func:`build_host` applies
  both, and keeps the process's freed memory for reuse (``overlay.malloc``).
- Opening a stream costs two multistream-select round trips through both event loops, seconds on a
  loaded machine: liveness sends Yamux pings instead, and anything a connection receives is a sign
  of life (``overlay.connections``).
- ``host.get_addrs`` cached for a second (:func:`_for_a_while`): pubsub calls it for every RPC.
- The swarm's AutoConnector is switched off (:func:`_without_auto_dialing`): below 50 connections it
  dialled up to 16 peers of the peerstore every 10 s (every 30 s up to 200), whatever they were: peers
  the peer set refused or let go, departed ones, anyone identify or the DHT had named. Those came back
  as connections *we* dialled, the slots no inbound newcomer may take (``overlay.peerset``). Whom to
  dial is ``overlay.membership``'s choice alone.
- The DHT, relay, pubsub and identify code log warnings for routine events (§2, pitfall 6); they are
  shown only with ``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.utils.address_validation import expand_wildcard_address

from shoal.overlay.malloc import keep_freed_memory
from shoal.overlay.noiseio import patch_noise
from shoal.overlay.yamuxio import patch_yamux

log = logging.getLogger(__name__)

WILDCARDS = ("/ip4/0.0.0.0/", "/ip6/::/")
DIAL_TIMEOUT = 5.0  # libp2p's 10 s default doubles the wait on every unreachable address in DHT lookups
ADDRS_TTL = 1.0


class BootstrapError(Exception):
    """No bootstrap address could be joined; the message names each address and why it failed."""


def quiet_libp2p_logs(verbose: bool) -> None:
    """Show libp2p's own log lines only when asked: its routine warnings read like failures to users."""
    logging.getLogger("libp2p").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    logging.getLogger("multiaddr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


async def reset_stream(stream: INetStream) -> None:
    """Reset, also from an expired deadline's scope (shielded: unshielded, no RST would go out)."""
    with trio.move_on_after(1, shield=True):
        with contextlib.suppress(Exception):
            await stream.reset()


def serves(host: IHost, peer: ID, protocol: TProtocol) -> bool:
    """Whether identify told us ``peer`` speaks ``protocol``."""
    try:
        return protocol in host.get_peerstore().get_protocols(peer)
    except Exception:  # identify has not told us yet
        return False


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:
        raise ValueError(f"{text!r} is not a multiaddr ({e}); expected e.g. /ip4/192.0.2.1/tcp/4001") from e


def parse_bootstrap(text: str) -> PeerInfo:
    """A bootstrap address must name the peer, so a wrong or replaced node is caught by the handshake."""
    addr = parse_multiaddr(text)
    try:
        return info_from_p2p_addr(addr)
    except Exception as e:
        raise ValueError(
            f"bootstrap address {text!r} has no peer id; it must end in /p2p/<peer id>, "
            "as printed by the node you join"
        ) from e


def announced(candidates: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """The addresses we tell peers: wildcards expanded to each interface's address."""
    out: list[multiaddr.Multiaddr] = []
    for addr in candidates:
        if str(addr).startswith(WILDCARDS):
            out.extend(a for a in expand_wildcard_address(addr) if not str(a).startswith(WILDCARDS))
        else:
            out.append(addr)
    unique = {str(a): a for a in out}
    return list(unique.values())


def build_host(
    key_pair: KeyPair, listen: Sequence[str], announce: Sequence[str] = (), upnp: bool = False
) -> IHost:
    """A host on TCP + Noise + Yamux. ``announce`` replaces the advertised addresses when given
    (a node behind a port forward)."""
    fixed = [parse_multiaddr(a) for a in announce]
    listening = [parse_multiaddr(a) for a in listen]
    refuse_taken_ports(listening)
    patch_yamux()
    patch_noise()
    keep_freed_memory()

    def addrs(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return announced(fixed or candidates)

    host = new_host(
        key_pair=key_pair,
        listen_addrs=listening,
        muxer_preference="YAMUX",
        enable_quic=False,
        enable_upnp=upnp,
        connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=DIAL_TIMEOUT),
        addrs_factory=addrs,
    )
    host.get_addrs = _for_a_while(host.get_addrs)  # type: ignore[method-assign]
    _without_auto_dialing(host)
    return host


def refuse_taken_ports(listen: Sequence[multiaddr.Multiaddr]) -> None:
    """Raise OSError (address in use) for a listen address whose TCP port something already listens on.
    py-libp2p listens with SO_REUSEPORT (for hole punching), so a second daemon on a taken port would
    start and share it silently, the kernel handing each incoming connection to either. A probe without
    SO_REUSEPORT cannot bind beside a listener (SO_REUSEADDR only passes over closed connections)."""
    families = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6}
    for addr in listen:
        names = [p.name for p in addr.protocols()]
        if names[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or int(addr.value_for_protocol("tcp")) == 0:
            continue
        ip = addr.protocols()[0]
        with socket.socket(families[ip.name], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((addr.value_for_protocol(ip.code), int(addr.value_for_protocol("tcp"))))


def _without_auto_dialing(host: IHost) -> None:
    """Make py-libp2p's AutoConnector a no-op (see the module doc): both its periodic task and the dial
    the swarm schedules after a disconnect call ``maybe_connect``, looked up on the instance."""
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is None:
        log.warning("py-libp2p has no AutoConnector where 0.8.1 had it: nothing to switch off")
        return

    async def never() -> None:
        return None

    connector.maybe_connect = never


def _for_a_while(
    get_addrs: Callable[[], list[multiaddr.Multiaddr]],
) -> Callable[[], list[multiaddr.Multiaddr]]:
    """``host.get_addrs``, recomputed at most every :data:`ADDRS_TTL` seconds.

    py-libp2p rebuilds every address from its sockets on each call (0.3-0.7 ms: multiaddr parsing and
    printing), and its pubsub calls it for every RPC it sends, to attach our signed peer record: 8% of
    a daemon's loop at 24 daemons on 2 cores (py-spy). Our addresses change on a reachability verdict
    or a relay reservation, seconds apart; a second late is harmless.
    """
    cached: tuple[float, list[multiaddr.Multiaddr]] | None = None

    def get() -> list[multiaddr.Multiaddr]:
        nonlocal cached
        now = time.monotonic()
        if cached is None or now - cached[0] >= ADDRS_TTL:
            cached = (now, get_addrs())
        return list(cached[1])

    return get


def explain_dial_error(error: BaseException) -> str:
    """A user-facing reason for a failed dial: libp2p's exceptions nest the cause several levels deep."""
    text = " ".join(str(e) for e in _chain(error)).lower()
    if "refused" in text:
        return "connection refused (nothing listens there: is the node running, is the port right?)"
    if "peer id" in text or "peerid" in text or "mismatch" in text:
        return "a different node answered (the /p2p/ peer id does not match: copy the address again)"
    if "unreachable" in text or "no route" in text:
        return "no route to that address (check the IP and your network)"
    if isinstance(error, trio.TooSlowError) or "timed out" in text or "timeout" in text:
        return "timed out (a firewall or NAT may drop the connection; is the address public?)"
    return f"{type(error).__name__}: {error}"


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    stack = [error]
    while stack and len(seen) < 20:
        e = stack.pop()
        seen.append(e)
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None and x not in seen)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        stack.extend(getattr(e, "errors", ()))  # libp2p's MultiError, one per address tried
    return seen


async def join(
    host: IHost, bootstrap: Sequence[PeerInfo], attempts: int = 5, timeout: float = 10.0, backoff: float = 1.0
) -> list[PeerInfo]:
    """Connect to every bootstrap peer we can, retrying each with exponential backoff.

    Returns the peers joined; raises BootstrapError naming every address and its last failure when
    none could be joined (a node that joins nobody is useless and should say so, not idle silently).
    """
    joined: list[PeerInfo] = []
    failures: dict[str, str] = {}

    async def one(info: PeerInfo) -> None:
        for attempt in range(attempts):
            # our own backoff decides when to retry, not the swarm's cache of recent failures
            host.get_network().unblock_peer(info.peer_id)
            try:
                with trio.fail_after(timeout):
                    await host.connect(info)
                joined.append(info)
                return
            except Exception as e:  # libp2p raises many unrelated types for one failed dial
                failures[_label(info)] = explain_dial_error(e)
                log.info(
                    "bootstrap %s attempt %d/%d failed: %s",
                    _label(info),
                    attempt + 1,
                    attempts,
                    failures[_label(info)],
                )
                if attempt + 1 < attempts:
                    await trio.sleep(min(backoff * 2**attempt, 30.0))

    async with trio.open_nursery() as nursery:
        for info in bootstrap:
            nursery.start_soon(one, info)
    if bootstrap and not joined:
        lines = "\n".join(f"  {addr}: {why}" for addr, why in failures.items())
        raise BootstrapError(f"could not join any bootstrap node after {attempts} attempts each:\n{lines}")
    return joined


def _label(info: PeerInfo) -> str:
    addr = info.addrs[0] if info.addrs else "?"
    return f"{addr}/p2p/{info.peer_id}"


def known_addrs(host: IHost, peer: ID) -> list[multiaddr.Multiaddr]:
    """The addresses ``host``'s peerstore holds for ``peer``; none (not an error) for a peer it never saw
    or whose record expired (py-libp2p raises for both: a starved daemon's relay's record expires)."""
    try:
        return host.get_peerstore().addrs(peer)
    except PeerStoreError:
        return []
