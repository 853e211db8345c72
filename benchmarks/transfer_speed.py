"""How fast does a model move between two nodes on loopback? Shoal's transfer vs raw TCP, same run.

A receiver process and this (sender) process; for each size, each transfer is timed from the first
byte sent to a one-byte (TCP) or one-message (Shoal) acknowledgement, so both include the receiver's
work: for Shoal that is TCP + Noise + Yamux, the frame's hash check and decoding the message into
tensors. Prints the median and range of MB/s (1 MB = 10^6 bytes) over ``--repeat`` transfers.

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

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from overlay.host import quiet_libp2p_logs
from overlay.interface import Delivered
from overlay.p2p import Libp2pOverlay, P2PConfig
from overlay.wire import Message, encoded_size

TASK = "benchmark"
LENGTH = struct.Struct("<Q")


async def serve() -> None:
    """Receiver: raw TCP (length-prefixed payload, 1-byte ack) and a Shoal node that acks each model."""

    async def tcp_client(stream: trio.SocketStream) -> None:
        while True:
            header = b""
            while len(header) < LENGTH.size:
                chunk = await stream.receive_some(LENGTH.size - len(header))
                if not chunk:
                    return
                header += chunk
            (left,) = LENGTH.unpack(header)
            while left:
                chunk = await stream.receive_some(min(left, 1 << 20))
                if not chunk:
                    return
                left -= len(chunk)
            await stream.send_all(b"k")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, tcp_client, 0)
        port = listeners[0].socket.getsockname()[1]
        async with Libp2pOverlay.start(create_new_key_pair(), TASK, P2PConfig()) as node:
            print(json.dumps({"tcp": port, "shoal": node.addresses()[0]}), flush=True)
            async for event in node.events:
                if isinstance(event, Delivered):
                    await node.send(event.peer, Message("ack"))


async def tcp_seconds(port: int, payload: bytes) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        view = memoryview(payload)
        start = trio.current_time()
        await stream.send_all(LENGTH.pack(len(payload)))
        for i in range(0, len(view), 1 << 20):
            await stream.send_all(view[i : i + (1 << 20)])
        await stream.receive_some(1)
        return trio.current_time() - start


async def shoal_seconds(node: Libp2pOverlay, peer: str, message: Message) -> float:
    start = trio.current_time()
    await node.send(peer, message)
    async for event in node.events:
        if isinstance(event, Delivered) and event.message.kind == "ack":
            return trio.current_time() - start
    raise RuntimeError("receiver went away")


async def measure(args: argparse.Namespace, receiver: dict) -> None:
    config = P2PConfig(bootstrap=(receiver["shoal"],))
    async with Libp2pOverlay.start(create_new_key_pair(), TASK, config) as node:
        peer = receiver["shoal"].rsplit("/p2p/", 1)[1]
        print(f"{'size':>8} {'raw TCP MB/s':>22} {'Shoal MB/s':>22} {'ratio':>6}")
        for size_mb in args.sizes:
            message = Message("model", {}, {"w": torch.randn(int(size_mb * 1e6) // 4)})
            payload = os.urandom(encoded_size(message))
            mb = len(payload) / 1e6
            await shoal_seconds(node, peer, message)  # warm-up: Yamux's window grows in the first transfer
            tcp = [mb / await tcp_seconds(receiver["tcp"], payload) for _ in range(args.repeat)]
            shoal = [mb / await shoal_seconds(node, peer, message) for _ in range(args.repeat)]
            row = [f"{statistics.median(r):7.1f} ({min(r):.0f}–{max(r):.0f})" for r in (tcp, shoal)]
            ratio = statistics.median(tcp) / statistics.median(shoal)
            print(f"{size_mb:>6g}MB {row[0]:>22} {row[1]:>22} {ratio:>5.1f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 20, 100], help="model sizes in MB")
    parser.add_argument("--repeat", type=int, default=5, help="transfers per size and transport")
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
