"""A Libp2pOverlay in its own process, for tests that kill, freeze or NAT a peer.

Prints JSON lines on stdout: ``{"peer", "addrs"}`` once joined; with ``--status``, every 0.5 s
``{"status": {"reachability", "relays", "peers": {peer: "direct"|"relayed"}}}``; ``{"received": kind,
"from": peer, "bytes": n}`` per delivered message; ``"sending"`` before each send when ``--send-mb``
is given (it then sends that many MB to every peer, over and over). With ``--publish`` it also
publishes about 500 announcements a second on topic ``x`` (spam protection off).
"""

import argparse
import json
import logging
import sys

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.overlay.config import P2PConfig
from shoal.overlay.host import quiet_libp2p_logs
from shoal.overlay.interface import Delivered
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import Message, encoded_size

KEY = "shoal/test"


def say(value: object) -> None:
    print(json.dumps(value), flush=True)


async def main(args: argparse.Namespace) -> None:
    quiet_libp2p_logs(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(relativeCreated)7d %(name)s %(message)s",
    )
    config = P2PConfig(
        listen=tuple(args.listen),
        bootstrap=tuple(args.bootstrap),
        relay_service=args.relay_service,
        heartbeat_interval=1.0,
    )
    overlay_cm = Libp2pOverlay.start(create_new_key_pair(), args.task, config)
    async with overlay_cm as overlay, trio.open_nursery() as n:
        say({"peer": overlay.peer_id, "addrs": overlay.addresses()})

        async def report() -> None:
            async for event in overlay.events:
                if isinstance(event, Delivered):
                    say(
                        {
                            "received": event.message.kind,
                            "from": event.peer,
                            "bytes": encoded_size(event.message),
                        }
                    )

        async def status() -> None:
            await overlay.provide(KEY)
            while True:
                await overlay.find_providers(KEY)
                say(
                    {
                        "status": {
                            "reachability": overlay.reachability.value,
                            "relays": [str(r) for r in overlay.relaying.relays],
                            "addrs": overlay.addresses(),
                            "peers": {p: overlay.connection_kind(p) for p in overlay.peers()},
                        }
                    }
                )
                await trio.sleep(0.5)

        async def publish() -> None:
            overlay.subscribe("x")
            overlay.router.spam_protection_enabled = False
            while True:
                await overlay.pubsub.publish(f"shoal/{args.task}/x", b"announcement")
                await trio.sleep(0.002)  # without a pause the flood starves this node's own sends

        n.start_soon(report)
        if args.status:
            n.start_soon(status)
        if args.publish:
            n.start_soon(publish)
        model = Message("model", {}, {"w": torch.ones(int(args.send_mb * 2**20) // 4)})
        while True:
            for peer in overlay.peers() if args.send_mb else []:
                say("sending")
                try:
                    await overlay.send(peer, model)
                except Exception as e:
                    say({"send_failed": str(e)})
            await trio.sleep(0.2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", required=True)
    parser.add_argument("--listen", nargs="*", default=["/ip4/127.0.0.1/tcp/0"])
    parser.add_argument("--bootstrap", nargs="*", default=[])
    parser.add_argument("--relay-service", action="store_true")
    parser.add_argument("--status", action="store_true")
    parser.add_argument("--send-mb", type=float, default=0.0)
    parser.add_argument("--publish", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="debug logs (libp2p's included) on stderr")
    try:
        trio.run(main, parser.parse_args())
    except KeyboardInterrupt:
        sys.exit(0)
