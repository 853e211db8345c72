"""Real libp2p overlays on 127.0.0.1 for the tests: a swarm joined through its first node, a bare
host that speaks our protocols only as far as a test makes it, and waiting helpers."""

from contextlib import AsyncExitStack, asynccontextmanager

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from multiaddr import Multiaddr

from shoal.overlay.config import P2PConfig
from shoal.overlay.host import quiet_libp2p_logs
from shoal.overlay.p2p import Libp2pOverlay

TASK = "test-task"
FAST = {"ping_interval": 0.5, "ping_timeout": 0.5, "acceptable_pause": 1.0, "heartbeat_interval": 1.0}

quiet_libp2p_logs(verbose=False)


@asynccontextmanager
async def swarm(n: int, **config):
    """``n`` overlays: the first is the bootstrap node, the others join it by its address."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            Libp2pOverlay.start(create_new_key_pair(), TASK, P2PConfig(**{**FAST, **config}))
        )
        boot = (first.addresses()[0],)
        nodes = [first]
        for _ in range(n - 1):
            cfg = P2PConfig(bootstrap=boot, **{**FAST, **config})
            node = Libp2pOverlay.start(create_new_key_pair(), TASK, cfg)
            nodes.append(await stack.enter_async_context(node))
        yield nodes


async def until(predicate, timeout: float, poll: float = 0.2) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(poll)


async def next_event(overlay, kind, timeout: float):
    with trio.fail_after(timeout):
        async for event in overlay.events:
            if isinstance(event, kind):
                return event
    raise AssertionError("event channel closed")


@asynccontextmanager
async def stranger():
    """A bare libp2p host on 127.0.0.1 that speaks our protocols only as far as a test makes it."""
    host = new_host(key_pair=create_new_key_pair())
    async with host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        yield host
