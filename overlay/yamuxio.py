"""py-libp2p's Yamux (0.8.1) changed where it was slow or fragile, applied by ``overlay.host.build_host``
only on the version measured (:func:`patch_yamux`):

- Data frames of up to :data:`YAMUX_FRAME` (1 MiB) instead of 64 KiB: a 64 KiB frame is 17 bytes over
  Noise's 65,519-byte message limit, so each costs two encryptions and twice the scheduling; 1 MiB
  frames move 1.8x the bytes per second (measured on loopback). Only the frames this
  process sends change: the Yamux spec bounds a data frame by the receive window, not by 64 KiB, and
  py-libp2p (up to its 16 MiB window) and rust-yamux (up to 1 MiB) accept them. The initial window
  stays at the spec's 256 KiB, which Go and Rust peers insist on.
- Frames written whole even when the writer is cancelled, and a reading loop that never waits to
  write (:func:`_write_frame`): a cancelled write desynchronised Noise and left a connection that
  carries nothing; two reading loops waiting to write left one that carried nothing either.
- A data frame's body read in one read of the secure session (:func:`_read_data_body`), whose Noise
  I/O ``overlay.noiseio`` batches.
- A message stream's receive window granted at once (:func:`grow_receive_window`): py-libp2p starts
  every stream at 256 KiB and doubles it at most once per round trip, and its writer polls every 10 ms
  for credit, so a model on a fresh stream crawled through its first megabytes.
- Receive windows released in batches: py-libp2p released them on every read
  (``PY_YAMUX_RELEASE_ON_READ``), one window-update frame (a Noise message and a write at both ends)
  per 32-byte ping or 4-byte frame prefix read; that was 10% of a daemon's loop at 24 daemons on 2
  cores (py-spy), and a kept-stream ping went from 0.55 to 0.45 ms of CPU (benchmarks/ping_cost.py).
  On a stream whose window grew, an update only once half the window was read
  (:func:`_release_window`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.stream_muxer.yamux import yamux

from shoal.overlay.noiseio import MEASURED_LIBP2P

log = logging.getLogger(__name__)

YAMUX_FRAME = 1 << 20
# A peer may stop reading for as long as the failure detector's pause (``acceptable_pause``, 30 s) before
# we give up on the connection: at 10 s, 5 connections to daemons that kept training were closed in 3
# minutes of a 24-daemon demo on 2 cores (each a "peer down" at both ends).
FRAME_WRITE_TIMEOUT = 30.0
MAX_QUEUED = 1024  # control frames (12-byte headers) the reading loop may queue per connection


def patch_yamux() -> None:
    """This module's changes, on the py-libp2p version they were measured on; another keeps its own
    Yamux (and says so)."""
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
    """py-libp2p's "release the window on every read?" switch, answered no (see the module docstring)."""
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
    connection that carries no stream until a failure detector cuts it. Measured
    (tests/test_yamux_patches.py): unpatched, 60 ``new_stream`` calls cancelled 0-4 ms in broke the
    connection in each of 3 runs; patched, in none. A frame that cannot be written within
    :data:`FRAME_WRITE_TIMEOUT` (a peer that stopped reading) closes the connection, which the cut frame
    would have broken anyway.
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
