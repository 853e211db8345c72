"""How fast does a model move between two nodes on loopback? Shoal's transfer beside raw TCP and beside a
bare py-libp2p stream, interleaved in the same run.

A receiver process and this (sender) process; for each size, each transfer is timed from the first
byte sent to the moment the receiver holds all of it (Shoal: the model decoded and delivered), on the
machine's monotonic clock, which both processes read; the receiver sends that moment back in its
acknowledgement (8 bytes on TCP and the bare stream, a message for Shoal), and Shoal's time until
that acknowledgement is back is printed too. The bare stream is the same libp2p connection (TCP +
Noise + Yamux, Shoal's 1 MiB frames and receive window) with the bytes written and counted and
nothing else: the limit of the transport. Shoal adds its frame (length prefix and trailer), the
receiver's budgets and pace, and decoding into tensors with bounds and the finiteness check. Prints
the median and range of MB/s (1 MB = 10^6 bytes) over ``--repeat`` transfers, each median's ratio to
raw TCP, and Shoal's median time one way and with the ack back.

For reference, measured on this VM (issue 12, 100 MB, two processes on loopback): hivemind's tensor
stream 102 MB/s, lattica's (pickle) 104 MB/s, Shoal before issue 12 53-111 MB/s.

    python benchmarks/transfer_speed.py                  # 1, 20 and 100 MB, 5 transfers each
    python benchmarks/transfer_speed.py --sizes 20 --repeat 9
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import torch
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from shoal.overlay.config import P2PConfig
from shoal.overlay.host import quiet_libp2p_logs
from shoal.overlay.interface import Delivered
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import Message, encoded_size
from shoal.overlay.yamuxio import grow_receive_window

TASK = "benchmark"
LENGTH = struct.Struct("<Q")
ARRIVED = struct.Struct("<d")  # time.monotonic() at the receiver when the last byte was in
BARE = TProtocol("/shoal-benchmark/bare/1.0.0")
# the benchmark sends hundreds of messages a second to one peer, over a daemon's flood limit
CONFIG = P2PConfig(message_rate=1e6, message_burst=10**6)


async def _length_prefixed(
    read: Callable[[int], Awaitable[bytes]], ack: Callable[[bytes], Awaitable[None]]
) -> None:
    """Receive length-prefixed payloads, counting bytes only, and ack each with when it was in."""
    while True:
        header = b""
        while len(header) < LENGTH.size:
            chunk = await read(LENGTH.size - len(header))
            if not chunk:
                return
            header += chunk
        (left,) = LENGTH.unpack(header)
        while left:
            chunk = await read(min(left, 1 << 20))  # reads the size of the pieces sent
            if not chunk:
                return
            left -= len(chunk)
        await ack(ARRIVED.pack(time.monotonic()))


async def serve() -> None:
    """Receiver: raw TCP, a bare libp2p stream and a Shoal node that acks each model."""

    async def tcp_client(stream: trio.SocketStream) -> None:
        await _length_prefixed(stream.receive_some, stream.send_all)

    async def bare_stream(stream: INetStream) -> None:
        grow_receive_window(stream, CONFIG.limits.max_message)  # the window Shoal's message streams get

        async def read(n: int) -> bytes:
            try:
                return await stream.read(n)
            except StreamEOF:
                return b""

        await _length_prefixed(read, stream.write)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, tcp_client, 0)
        port = listeners[0].socket.getsockname()[1]
        async with Libp2pOverlay.start(create_new_key_pair(), TASK, CONFIG) as node:
            node.host.set_stream_handler(BARE, bare_stream)
            print(json.dumps({"tcp": port, "shoal": node.addresses()[0]}), flush=True)
            async for event in node.events:
                if isinstance(event, Delivered):
                    await node.send(event.peer, Message("ack", {"arrived": time.monotonic()}))


async def _send_length_prefixed(
    write: Callable[[bytes | memoryview], Awaitable[None]], payload: bytes
) -> None:
    view = memoryview(payload)
    await write(LENGTH.pack(len(payload)))
    for i in range(0, len(view), 1 << 20):
        await write(view[i : i + (1 << 20)])


async def _arrived(read: Callable[[int], Awaitable[bytes]]) -> float:
    ack = b""
    while len(ack) < ARRIVED.size:
        ack += await read(ARRIVED.size - len(ack))
    return ARRIVED.unpack(ack)[0]


async def tcp_seconds(stream: trio.SocketStream, payload: bytes) -> tuple[float, float]:
    """Seconds until the payload was in at the receiver, and until its ack was back."""
    start = time.monotonic()
    await _send_length_prefixed(stream.send_all, payload)
    return await _arrived(stream.receive_some) - start, time.monotonic() - start


async def bare_seconds(stream: INetStream, payload: bytes) -> tuple[float, float]:
    start = time.monotonic()
    await _send_length_prefixed(stream.write, payload)
    return await _arrived(stream.read) - start, time.monotonic() - start


async def shoal_seconds(node: Libp2pOverlay, peer: str, message: Message) -> tuple[float, float]:
    start = time.monotonic()
    await node.send(peer, message)
    async for event in node.events:
        if isinstance(event, Delivered) and event.message.kind == "ack":
            return event.message.body["arrived"] - start, time.monotonic() - start
    raise RuntimeError("receiver went away")


async def measure(args: argparse.Namespace, receiver: dict) -> None:
    config = replace(CONFIG, bootstrap=(receiver["shoal"],))
    async with (
        Libp2pOverlay.start(create_new_key_pair(), TASK, config) as node,
        await trio.open_tcp_stream("127.0.0.1", receiver["tcp"]) as tcp,
    ):
        peer = receiver["shoal"].rsplit("/p2p/", 1)[1]
        bare = await node.host.new_stream(ID.from_base58(peer), [BARE])
        columns = ("raw TCP", "bare libp2p stream", "Shoal")
        print(
            f"{'size':>8} "
            + " ".join(f"{c + ' MB/s':>22}" for c in columns)
            + "  Shoal ÷ TCP  ÷ bare  Shoal ms  with ack"
        )
        for size_mb in args.sizes:
            message = Message("model", {}, {"w": torch.randn(int(size_mb * 1e6) // 4)})
            payload = os.urandom(encoded_size(message))
            mb = len(payload) / 1e6
            # warm-up: Yamux's window grows in the first transfer, the message stream is opened
            await shoal_seconds(node, peer, message)
            await bare_seconds(bare, payload)
            runs: dict[str, list[tuple[float, float]]] = {c: [] for c in columns}
            for _ in range(args.repeat):  # interleaved, so a noisy moment hits all three alike
                runs["raw TCP"].append(await tcp_seconds(tcp, payload))
                runs["bare libp2p stream"].append(await bare_seconds(bare, payload))
                runs["Shoal"].append(await shoal_seconds(node, peer, message))
            rates = {c: [mb / one_way for one_way, _ in ts] for c, ts in runs.items()}
            median = {c: statistics.median(r) for c, r in rates.items()}
            row = " ".join(f"{f'{median[c]:7.1f} ({min(r):.0f}–{max(r):.0f})':>22}" for c, r in rates.items())
            one_way, with_ack = (1000 * statistics.median(t) for t in zip(*runs["Shoal"], strict=True))
            print(
                f"{size_mb:>6g}MB {row}  {median['Shoal'] / median['raw TCP']:>11.3f}  "
                f"{median['Shoal'] / median['bare libp2p stream']:>5.2f}  {one_way:>8.2f}  {with_ack:>8.2f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 20, 100], help="model sizes in MB")
    parser.add_argument("--repeat", type=int, default=7, help="transfers per size and transport")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_libp2p_logs(verbose=False)
    if args.serve:
        trio.run(serve)
        return
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; receiver in a second process"
    )
    receiver = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        trio.run(measure, args, json.loads(receiver.stdout.readline()))
    finally:
        receiver.kill()
        receiver.wait()


if __name__ == "__main__":
    main()
