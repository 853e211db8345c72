"""What a node sees of, and does on, its libp2p connections to one peer: when anything last arrived
(:func:`last_read`), a Yamux ping (:func:`ping_connections`), and where each reading loop stands
(:func:`reading_loops`), which ``overlay.liveness`` is built on; and who dialled whom from where
(:func:`connection_info`), for the peer set.

They read what ``overlay.noiseio`` (the receive clock) and ``overlay.yamuxio``'s Yamux patches (the
reading task, its queued frames) keep on each connection, and what py-libp2p 0.8.1's Yamux keeps
(streams, backlog, write lock, ping id); a connection without them reads as unknown.
"""

from __future__ import annotations

import math
import struct

import trio
from libp2p.abc import IHost, INetConn
from libp2p.network.connection.swarm_connection import Direction
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux import yamux

from shoal.overlay.nat import is_circuit


def connection_info(host: IHost, peer: ID) -> tuple[bool, str | None] | None:
    """Of our connection to ``peer`` (the first, if several): whether we dialled it, and the remote IP
    (None when relayed: that would be the relay's); None when there is no connection."""
    conns = host.get_network().get_connections(peer)
    if not conns:
        return None
    conn = conns[0]
    direction = getattr(conn, "direction", None)
    if direction in (Direction.OUTBOUND, Direction.INBOUND):
        outbound = direction is Direction.OUTBOUND
    else:  # older paths (relay circuits) leave it unknown: the muxer knows who initiated
        outbound = bool(getattr(conn.muxed_conn, "is_initiator", False))
    try:
        relayed = any(is_circuit(a) for a in conn.get_transport_addresses())
        remote = None if relayed else conn.muxed_conn.get_remote_address()
    except Exception:  # a connection closing under us
        remote = None
    return outbound, (str(remote[0]) if remote else None)


def _received_at(conn: INetConn) -> float | None:
    """When the connection's Noise reader last got bytes from the socket (``overlay.noiseio``)."""
    session = getattr(conn.muxed_conn, "secured_conn", None)
    return getattr(getattr(session, "conn", None), "_shoal_read_at", None)


def last_read(host: IHost, peer: ID) -> float | None:
    """When (``trio.current_time()``) any of our connections to ``peer`` last received bytes, if
    ever: any bytes, of any frame and protocol, are a sign that its process runs."""
    times = [_received_at(c) for c in host.get_network().get_connections(peer)]
    return max((t for t in times if t is not None), default=None)


async def ping_connections(host: IHost, peer: ID) -> None:
    """Send a Yamux ping on each connection to ``peer``. Its reading loop answers it (no stream, no
    protocol negotiation, no handler task), and the answer counts as traffic (:func:`last_read`).

    Not the libp2p ping protocol: at 24 daemons on 2 cores, opening a stream took seconds (the
    multistream-select round trips wait on two loaded event loops), so 845 of ~1,300 failed pings in a
    2-minute demo were stream openings cut by the ping timeout on connections whose frames kept
    arriving, and their peers were cut off as down. The ping's send time is noted where py-libp2p's
    own 30 s ping would note it, so the answer still measures the connection's round-trip time.
    """
    for conn in host.get_network().get_connections(peer):
        muxed = conn.muxed_conn
        if isinstance(muxed, yamux.Yamux):
            muxed._ping_id += 1
            muxed._ping_sent_time = trio.current_time()
            await muxed._write_frame(
                struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_PING, yamux.FLAG_SYN, 0, muxed._ping_id)
            )


def reading_loops(host: IHost, peer: ID) -> str:
    """Where the reading loop of each connection to ``peer`` waits, with its queued frames, streams,
    free stream slots, write lock and when it last received bytes: for the log line of a peer found
    down. A loop that waits anywhere but on its socket has stopped reading that connection, and the
    peer's frames sit unread however alive it is."""
    found = []
    for conn in host.get_network().get_connections(peer):
        muxed = conn.muxed_conn
        task = getattr(muxed, "_shoal_reader", None)
        lock = getattr(muxed, "_write_lock", None)
        received = _received_at(conn)
        found.append(
            f"reader in {_waiting_in(task.coro) if task else '?'}, "
            f"{len(getattr(muxed, '_shoal_queued', ()))} frames queued, "
            f"{len(getattr(muxed, 'streams', ()))} streams, "
            f"{getattr(getattr(muxed, 'stream_backlog_semaphore', None), 'value', '?')} backlog slots, "
            f"write lock {'held' if lock is not None and lock.locked() else 'free'}, "
            f"read {trio.current_time() - (math.nan if received is None else received):.1f} s ago"
        )
    return "; ".join(found) or "no connection"


def _waiting_in(coro: object) -> str:
    """The innermost three functions outside trio of a suspended coroutine chain, ``outer > inner:line``."""
    frames = []
    for _ in range(64):
        if coro is None:
            break
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None and "/trio/" not in frame.f_code.co_filename:
            frames.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(frames[-3:]) or "?"
