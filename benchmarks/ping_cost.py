"""CPU per ping between two hosts in this process (both sides' work): the libp2p ping protocol on a
fresh stream per ping (Yamux SYN, multistream-select, ping, reset) and on one stream kept between
pings, against a Yamux ping on the connection (what ``overlay.liveness`` sends; the peer's reading
loop answers it). Run: ``python benchmarks/ping_cost.py [--pings N]``."""

from __future__ import annotations

import argparse
import secrets
import time

import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.ping import ID as PING
from libp2p.host.ping import PING_LENGTH
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from shoal.overlay.connections import ping_connections
from shoal.overlay.host import build_host, reset_stream


async def echo(stream: INetStream) -> bool:
    """One libp2p ping on ``stream``: whether our random payload came back intact."""
    payload = secrets.token_bytes(PING_LENGTH)
    await stream.write(payload)
    echoed = b""
    while len(echoed) < PING_LENGTH:
        chunk = await stream.read(PING_LENGTH - len(echoed))
        if not chunk:
            return False
        echoed += chunk
    return echoed == payload


async def main(pings: int) -> None:
    a, b = (build_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))

        async def fresh() -> None:
            stream = await a.new_stream(b.get_id(), [PING])
            assert await echo(stream)
            await reset_stream(stream)

        kept = await a.new_stream(b.get_id(), [PING])

        async def reused() -> None:
            assert await echo(kept)

        (conn,) = a.get_network().get_connections(b.get_id())

        async def yamux_ping() -> None:
            conn.muxed_conn._ping_event = answered = trio.Event()  # py-libp2p sets it on the answer
            await ping_connections(a, b.get_id())
            await answered.wait()

        rows = (("fresh stream per ping", fresh), ("one kept stream", reused), ("Yamux ping", yamux_ping))
        for name, one in rows:
            for _ in range(20):  # warm-up
                await one()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(pings):
                await one()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"{name:<22} {cpu / pings * 1e3:.2f} ms CPU, {wall / pings * 1e3:.2f} ms wall per ping")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pings", type=int, default=500)
    trio.run(main, parser.parse_args().pings)
