"""Shoal's changes to py-libp2p's Yamux (``overlay.yamuxio``, ``overlay.host``), on real hosts on 127.0.0.1:
still in place upstream and version-guarded, window updates per half window, cancelled stream opens, and
the bounded queue of the reading loop."""

import contextlib
import logging
import os

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from multiaddr import Multiaddr

from shoal.overlay.host import quiet_libp2p_logs

quiet_libp2p_logs(verbose=False)


def test_the_yamux_settings_we_change_still_exist_upstream_and_are_version_guarded(monkeypatch, caplog):
    """Fails when py-libp2p renames what overlay.host changes (the change would silently do nothing)."""
    import inspect

    from libp2p.stream_muxer.yamux import yamux

    from shoal.overlay import yamuxio

    assert "MAX_MESSAGE_SIZE" in inspect.getsource(yamux.YamuxStream.write)
    assert "._write_frame(" in inspect.getsource(yamux.YamuxStream.write)
    yamuxio.patch_yamux()
    yamuxio.patch_yamux()
    assert "self._write_frame(" in inspect.getsource(yamux.Yamux.handle_incoming.__wrapped__)
    window_update = inspect.getsource(yamuxio._release_window.upstream)  # what _release_window replaces
    assert "target_recv_window" in window_update and "_yamux_release_on_read()" in window_update
    assert "_grow_threshold" in window_update and "_apply_autotune_epoch" in window_update
    assert yamux._yamux_release_on_read is yamuxio._release_in_batches
    assert yamux.YamuxStream._auto_tune_and_send_window_update is yamuxio._release_window
    assert yamux.MAX_MESSAGE_SIZE == yamuxio.YAMUX_FRAME and yamux.Yamux._write_frame is yamuxio._write_frame
    assert not hasattr(yamux.Yamux.handle_incoming.__wrapped__, "__wrapped__")  # wrapped once
    monkeypatch.setattr(yamux, "MAX_MESSAGE_SIZE", 64 * 1024)
    monkeypatch.setattr(yamux.Yamux, "_write_frame", None)
    monkeypatch.setattr(yamuxio.importlib.metadata, "version", lambda name: "0.9.0")
    with caplog.at_level(logging.WARNING, logger="shoal.overlay.yamuxio"):
        yamuxio.patch_yamux()
    assert yamux.MAX_MESSAGE_SIZE == 64 * 1024 and yamux.Yamux._write_frame is None
    assert "keeping its Yamux as it is" in caplog.text


@pytest.mark.parametrize("granted", [True, False])
async def test_window_updates_come_per_half_window_on_a_granted_stream_and_small_windows_still_grow(granted):
    """Forty 100 KB messages on one stream. Granted a 16 MiB window (as message streams are), the reader
    sends its updates only per half window read: 1, for the grant (upstream sent one per read). A
    stream left at 256 KiB keeps upstream's rule, which is what lets its window grow: the 4 MB arrive."""
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.stream_muxer.yamux import yamux

    from shoal.overlay.host import build_host
    from shoal.overlay.yamuxio import grow_receive_window

    proto, piece, pieces = TProtocol("/shoal-test/window/1"), 100_000, 40
    updates, got = [], trio.Event()

    async def read_all(stream) -> None:
        if granted:
            grow_receive_window(stream, yamux.MAX_WINDOW_SIZE)
        send_update = stream.muxed_stream.send_window_update

        async def counted(increment: int, skip_lock: bool = False) -> None:
            updates.append(increment)
            await send_update(increment, skip_lock)

        stream.muxed_stream.send_window_update = counted
        left = piece * pieces
        while left:
            left -= len(await stream.read(min(left, piece)))
        got.set()

    a, b = (build_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
    b.set_stream_handler(proto, read_all)
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        with trio.fail_after(20):
            stream = await a.new_stream(b.get_id(), [proto])
            for _ in range(pieces):
                await stream.write(os.urandom(piece))
            await got.wait()
    assert len(updates) == 1 if granted else len(updates) > 4, updates


async def test_cancelled_stream_opens_leave_the_connection_working():
    """``new_stream`` cancelled at any moment of its negotiation: the same connection still carries
    streams. Unpatched (a cancelled write desynchronises Noise), it broke within the 60 tries each time."""
    from libp2p.peer.peerinfo import PeerInfo

    from shoal.overlay.host import build_host

    echo = TProtocol("/shoal-test/echo/1")

    async def serve_echo(stream) -> None:
        with contextlib.suppress(Exception):
            await stream.write(await stream.read(4))
            await stream.close()

    a, b = (build_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
    b.set_stream_handler(echo, serve_echo)
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        (connection,) = a.get_network().get_connections(b.get_id())
        for i in range(60):
            with trio.move_on_after(0.0002 * (i % 20)), contextlib.suppress(Exception):
                await a.new_stream(b.get_id(), [echo])
            with trio.fail_after(10):
                stream = await a.new_stream(b.get_id(), [echo])
                await stream.write(b"ping")
                assert await stream.read(4) == b"ping", f"try {i}"
            assert a.get_network().get_connections(b.get_id()) == [connection], f"try {i}: a new connection"


async def test_the_reading_loops_queue_of_frames_is_bounded():
    """While the connection's writer is stuck (a peer reading nothing of ours), the reading loop queues
    its answers only up to MAX_QUEUED and then waits, as upstream: a peer pinging a stuck connection
    cannot grow our memory."""
    import struct

    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.stream_muxer.yamux import yamux

    from shoal.overlay import yamuxio
    from shoal.overlay.host import build_host

    a, b = (build_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        (connection,) = a.get_network().get_connections(b.get_id())
        muxed = connection.muxed_conn
        pong = struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_PING, yamux.FLAG_ACK, 0, 1)
        stuck, release = trio.Event(), trio.Event()

        async def stuck_writer() -> None:
            async with muxed._write_lock:
                stuck.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck_writer)
            await stuck.wait()
            reader, muxed._shoal_reader = muxed._shoal_reader, trio.lowlevel.current_task()
            try:
                while len(muxed._shoal_queued) < yamuxio.MAX_QUEUED:  # the real reader may have queued some
                    with trio.fail_after(1):
                        await muxed._write_frame(pong)  # queued: returns at once
                with trio.move_on_after(0.5) as waited:
                    await muxed._write_frame(pong)
                assert waited.cancelled_caught and len(muxed._shoal_queued) == yamuxio.MAX_QUEUED
            finally:
                muxed._shoal_reader = reader
                release.set()
