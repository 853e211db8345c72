"""Building the libp2p host and joining a swarm: transports, addresses, bootstrap, log noise; and two
helpers every overlay component needs (:func:`reset_stream`, :func:`serves`).

Upstream behaviours worked around here (py-libp2p 0.8.1, measured in ../shared/LIBP2P.md):

- TCP + Noise + Yamux only: QUIC loses the last bytes of streams silently (§1c).
- ``ConnectionConfig(max_connections_per_peer=1)``: otherwise every dial waits out a 250 ms
  happy-eyeballs delay even after it succeeded (§8).
- A host listening on ``0.0.0.0`` advertises ``0.0.0.0`` (§6); we announce each interface's address.
- Yamux data frames of 1 MiB instead of 64 KiB (:func:`patch_yamux`): a 64 KiB frame is 17 bytes
  over Noise's 65,519-byte message limit, so each costs two encryptions and twice the scheduling; 1 MiB
  frames move 1.8x the bytes per second (§1, second probe).
- Yamux frames written whole even when the writer is cancelled, and a reading loop that never waits
  to write (:func:`_write_frame`): a cancelled write desynchronised Noise and left a connection that
  carries nothing; two reading loops waiting to write left one that carried nothing either.
- Receive windows released in batches, not on every read (:func:`patch_yamux`, :func:`_release_window`).
- A data frame's body read in one read of the secure session (:func:`_read_data_body`), whose Noise
  I/O ``overlay.noiseio`` batches (:func:`build_host` applies both).
- Opening a stream costs two multistream-select round trips through both event loops, seconds on a
  loaded machine: liveness sends Yamux pings instead, and anything a connection receives is a sign
  of life (``overlay.connections``).
- ``host.get_addrs`` cached for a second (:func:`_for_a_while`): pubsub calls it for every RPC.
- A message stream's receive window is granted at once (:func:`grow_receive_window`): py-libp2p starts
  every stream at 256 KiB and doubles it at most once per round trip, and its writer polls every 10 ms
  for credit, so a model on a fresh stream crawled through its first megabytes.
- The DHT, relay, pubsub and identify code log warnings for routine events (§2, pitfall 6); they are
  shown only with ``--verbose``.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.stream_muxer.yamux import yamux
from libp2p.utils.address_validation import expand_wildcard_address

from shoal.overlay.malloc import keep_freed_memory
from shoal.overlay.noiseio import MEASURED_LIBP2P, patch_noise

log = logging.getLogger(__name__)

WILDCARDS = ("/ip4/0.0.0.0/", "/ip6/::/")
DIAL_TIMEOUT = 5.0  # libp2p's 10 s default doubles the wait on every unreachable address in DHT lookups
YAMUX_FRAME = 1 << 20
# A peer may stop reading for as long as the failure detector's pause (``acceptable_pause``, 30 s) before
# we give up on the connection: at 10 s, 5 connections to daemons that kept training were closed in 3
# minutes of a 24-daemon demo on 2 cores (each a "peer down" at both ends).
FRAME_WRITE_TIMEOUT = 30.0
MAX_QUEUED = 1024  # control frames (12-byte headers) the reading loop may queue per connection
ADDRS_TTL = 1.0


class BootstrapError(Exception):
    """No bootstrap address could be joined; the message names each address and why it failed."""


def quiet_libp2p_logs(verbose: bool) -> None:
    """Show libp2p's own log lines only when asked: its routine warnings read like failures to users."""
    logging.getLogger("libp2p").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    logging.getLogger("multiaddr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def patch_yamux() -> None:
    """Changes to py-libp2p's Yamux, applied only to the version they were measured on (another
    keeps its defaults and says so):

    - Data frames of up to :data:`YAMUX_FRAME` bytes (its module constant). Only the frames this process
      sends change: the Yamux spec bounds a data frame by the receive window, not by 64 KiB, and
      py-libp2p (up to its 16 MiB window) and rust-yamux (up to 1 MiB) accept them. The initial window
      stays at the spec's 256 KiB, which Go and Rust peers insist on.
    - Frame writes that a cancellation cannot cut in two (:func:`_write_frame`).
    - A reading loop that never waits to write (:func:`_write_frame`).
    - A data frame's body read in one secure-session read (:func:`_read_data_body`).
    - Receive windows released in batches of half a window, as go-yamux does: py-libp2p released them
      on every read (``PY_YAMUX_RELEASE_ON_READ``), one window-update frame (a Noise message and a
      write at both ends) per 32-byte ping or 4-byte frame prefix read; that was 10% of a daemon's loop
      at 24 daemons on 2 cores (py-spy). A kept-stream ping went from 0.55 to 0.45 ms of CPU
      (benchmarks/ping_cost.py); 100 MB transfers are unchanged (benchmarks/transfer_speed.py).
      On a stream whose window grew (message streams, :func:`grow_receive_window`), an update only
      once half the window was read (:func:`_release_window`): upstream still sent one for nearly
      every message read there.
    """
    version = importlib.metadata.version("libp2p")
    if version != MEASURED_LIBP2P:
        log.warning("py-libp2p %s: keeping its Yamux as it is (measured on %s)", version, MEASURED_LIBP2P)
        return
    yamux.MAX_MESSAGE_SIZE = YAMUX_FRAME
    if yamux.Yamux._write_frame is not _write_frame:  # once per process: every host calls this
        yamux.Yamux._write_frame = _write_frame
        yamux.Yamux.handle_incoming = _reader(yamux.Yamux.handle_incoming)
        yamux.Yamux._read_data_body = _read_data_body
        yamux._yamux_release_on_read = _release_in_batches
        _release_window.upstream = yamux.YamuxStream._auto_tune_and_send_window_update
        yamux.YamuxStream._auto_tune_and_send_window_update = _release_window


def _release_in_batches() -> bool:
    """py-libp2p's "release the window on every read?" switch, answered no (see :func:`patch_yamux`)."""
    return False


async def _release_window(self: yamux.YamuxStream, *, bytes_read: int = 0) -> None:
    """``YamuxStream._auto_tune_and_send_window_update``, as go-yamux does it on a stream whose window
    grew past the initial 256 KiB (e.g. by :func:`grow_receive_window`): a window update only once the
    bytes read since the last one reach half the window. Upstream sent one on nearly every read (an
    extra frame, write and wake-up at both ends for each message on a reused stream) and granted more
    than it was asked: on a stream still at 256 KiB that overshoot is what grows the window (its
    round-trip-time rule never fires at Python's speeds), so such a stream keeps upstream's way."""
    if self.target_recv_window <= yamux.DEFAULT_WINDOW_SIZE:
        await _release_window.upstream(self, bytes_read=bytes_read)
        return
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta < max(1, self._grow_threshold()):
            return
        self.recv_window += delta
        delta += self._apply_autotune_epoch(buffered)
    await self.send_window_update(delta, skip_lock=True)


def _reader(handle_incoming: Callable[[yamux.Yamux], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """``handle_incoming``, remembering which task reads (see :func:`_write_frame`; shown by
    ``overlay.connections.reading_loops``)."""

    @functools.wraps(handle_incoming)
    async def read(self: yamux.Yamux) -> None:
        self._shoal_reader = trio.lowlevel.current_task()
        self._shoal_queued = collections.deque()
        await handle_incoming(self)

    return read


async def _read_data_body(self: yamux.Yamux, length: int) -> bytes:
    """``Yamux._read_data_body`` in one read of the secure session (``overlay.noiseio``), not through
    ``read_exactly``, which copied the body twice more."""
    with trio.fail_after(yamux._yamux_data_read_timeout()):
        body = await self.secured_conn.read(length)
    if len(body) < length:
        raise IncompleteReadError(
            f"connection ended {len(body)} bytes into a {length}-byte frame",
            expected_bytes=length,
            received_bytes=len(body),
        )
    return body


async def _write_frame(self: yamux.Yamux, data: bytes) -> None:
    """``Yamux._write_frame`` with two differences.

    The reading loop never waits to write. It answers frames itself (window updates, ACKs, resets,
    pongs), and upstream it waited for the connection's write lock, held by a writer blocked while the
    peer's TCP buffer was full; when the peer's reading loop waited likewise, neither read again: 38
    frames stayed unwritten for over 10 s in a 5-minute 24-daemon demo on 2 cores. Its frames are
    queued instead, in order, and go out before any later frame (whoever takes the lock next writes
    them first, or a task started for them does). At :data:`MAX_QUEUED` frames (a peer that sends pings
    or opens streams while reading nothing of ours) the reading loop waits again, as upstream: the
    queue is bounded by what it holds back.

    A frame, once its turn came, is written whole. py-libp2p's Noise layer encrypts a message
    (advancing its nonce) before it awaits the socket, and splits a big frame into several messages: a
    cancellation in between (any timeout around a send, a ping or a ``new_stream``) loses a message the
    peer's nonce still counts, and the peer can decrypt nothing after it. Both ends then hold a
    connection that carries no stream until a failure detector cuts it. Measured (tests/test_p2p.py):
    unpatched, 60 ``new_stream`` calls cancelled 0-4 ms in broke the connection in each of 3 runs;
    patched, in none. A frame that cannot be written within :data:`FRAME_WRITE_TIMEOUT` (a peer that
    stopped reading) closes the connection, which the cut frame would have broken anyway.
    """
    reader = trio.lowlevel.current_task() is getattr(self, "_shoal_reader", None)
    if reader and self._nursery is not None and len(self._shoal_queued) < MAX_QUEUED:
        self._shoal_queued.append(data)
        if len(self._shoal_queued) == 1:  # else a flush is on its way
            with contextlib.suppress(RuntimeError):  # the connection's nursery closed: it is closing
                self._nursery.start_soon(_flush, self)
        return
    async with self._write_lock:
        await _write_queued(self)
        await _write_whole(self, data)
    await trio.lowlevel.checkpoint()


async def _flush(self: yamux.Yamux) -> None:
    async with self._write_lock:
        with contextlib.suppress(Exception):  # a broken connection: its reading loop finds out
            await _write_queued(self)


async def _write_queued(self: yamux.Yamux) -> None:
    queued = getattr(self, "_shoal_queued", ())
    while queued:
        await _write_whole(self, queued.popleft())


async def _write_whole(self: yamux.Yamux, data: bytes) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(FRAME_WRITE_TIMEOUT) as bound:
            await self.secured_conn.write(data)
        if bound.cancelled_caught:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await self.secured_conn.close()
            raise RawConnError(f"a Yamux frame was not written within {FRAME_WRITE_TIMEOUT:g} s")


def grow_receive_window(stream: INetStream, size: int) -> None:
    """Let the sender on ``stream`` have up to ``size`` bytes (at most Yamux's 16 MiB) unread in flight.

    Granting credit is the receiver's choice in Yamux (window updates): py-libp2p sends the update at the
    stream's next read, and its own auto-tuning reaches 16 MiB on a long transfer anyway. What a peer
    sends ahead sits in Yamux's buffer until we read it, outside ``overlay.framing.Inflight``: up to
    16 MiB per stream of an honest peer while our reader lags (a hostile one is not held to the window
    by py-libp2p 0.8.1 at all; the per-peer stream limit and the pace bound what it can make us hold).
    """
    muxed = stream.muxed_stream
    if isinstance(muxed, yamux.YamuxStream):
        muxed.target_recv_window = max(muxed.target_recv_window, min(size, yamux.MAX_WINDOW_SIZE))


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
    patch_yamux()
    patch_noise()
    keep_freed_memory()

    def addrs(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return announced(fixed or candidates)

    host = new_host(
        key_pair=key_pair,
        listen_addrs=[parse_multiaddr(a) for a in listen],
        muxer_preference="YAMUX",
        enable_quic=False,
        enable_upnp=upnp,
        connection_config=ConnectionConfig(max_connections_per_peer=1, dial_timeout=DIAL_TIMEOUT),
        addrs_factory=addrs,
    )
    host.get_addrs = _for_a_while(host.get_addrs)  # type: ignore[method-assign]
    return host


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
