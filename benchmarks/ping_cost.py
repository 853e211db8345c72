"""CPU per libp2p ping between two hosts in this process (both sides' work): a fresh stream per ping
(Yamux SYN, multistream-select, ping, reset) against one stream kept between pings (what
``overlay.liveness`` does). Run: ``python benchmarks/ping_cost.py [--pings N]``."""

from __future__ import annotations

import argparse
import time

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.ping import ID as PING
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from shoal.overlay.host import build_host, reset_stream
from shoal.overlay.liveness import echo


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

        for name, one in (("fresh stream per ping", fresh), ("one kept stream", reused)):
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
