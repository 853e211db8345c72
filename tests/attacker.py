"""What the attacker processes of the daemon tests share (hostile_peer.py, metadata_attacker.py,
sybil_attacker.py): the honest daemons' task read from their ``config.toml``, joining it as a task peer,
the command line and the JSON lines they report on; and two tools the metadata tests attack with too."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from pycrdt import Doc, Map
from torch import nn

import shoal
from shoal.node.config import Config, load
from shoal.node.daemon import configured_task
from shoal.overlay.host import quiet_libp2p_logs
from shoal.overlay.p2p import Libp2pOverlay


def say(value: object) -> None:
    print(json.dumps(value), flush=True)


@dataclass
class Task:
    """The honest daemons' task, as a node with their settings builds it (so the same task id): the
    built-in one or a user's (``task = "package.module:function"``)."""

    config: Config
    task: shoal.Task
    model: nn.Module
    id: str


def task_of(path: str) -> Task:
    config = load(Path(path))
    return Task(config, *configured_task(config))


async def join(overlay: Libp2pOverlay, task: str, peers: int) -> None:
    """Announce ourselves on the task and wait (at most 60 s) until ``peers`` task peers are connected."""
    await overlay.provide(f"shoal/{task}")
    with trio.move_on_after(60):
        while len(overlay.peers()) < peers:
            await overlay.find_providers(f"shoal/{task}")
            await trio.sleep(0.5)


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every attacker takes: the honest nodes' config and whom to bootstrap from."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("--config", required=True, help="an honest node's config.toml (for the task)")
    out.add_argument("--bootstrap", nargs="+", required=True)
    out.add_argument(
        "--wait-for-go",
        action="store_true",
        help="read a line from stdin before anything else (the test starts us early, so that our imports "
        "overlap its own waiting, and tells us when to begin); end if stdin closes without one",
    )
    return out


def run(main: Callable[[argparse.Namespace], Awaitable[None]], args: argparse.ArgumentParser) -> None:
    quiet_libp2p_logs(False)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    parsed = args.parse_args()
    if parsed.wait_for_go and not sys.stdin.readline():
        sys.exit("stdin closed before the go")
    try:
        trio.run(main, parsed)
    except KeyboardInterrupt:
        sys.exit(0)


def fresh_update(changes: dict) -> bytes:
    """A metadata update of a new writer setting ``changes`` and nothing else: it builds on nothing."""
    doc = Doc()
    peers = doc.get("peers", type=Map)
    with doc.transaction():
        for key, value in changes.items():
            peers[key] = value
    return doc.get_update()


class BlackHole:
    """A TCP handler that accepts and never answers (a dial to it lasts the dialer's whole timeout),
    counting the connections it holds."""

    def __init__(self) -> None:
        self.held = self.peak = 0

    async def __call__(self, stream: trio.SocketStream) -> None:
        self.held += 1
        self.peak = max(self.peak, self.held)
        try:  # held until the dialer gives up and closes
            while await stream.receive_some(64):
                pass
        except trio.BrokenResourceError:
            pass
        finally:
            self.held -= 1
