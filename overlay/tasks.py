"""The overlay's nursery as its components see it: start a task in it, or skip it once the node stops.

Why not the nursery itself: libp2p keeps calling our stream handlers while its services stop, after
the overlay's own nursery has closed (``Libp2pOverlay._running``). A handler that started a task then
would raise "Nursery is closed to new arrivals" through the swarm, so components start their tasks
through :class:`Tasks`, which skips them from the moment stopping begins.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

log = logging.getLogger("shoal.overlay")


class Tasks:
    """The nursery tasks go to while the overlay runs (:meth:`open`), and nothing once it stops."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[trio.Nursery]:
        """A nursery that takes tasks until the block exits; then it takes none and is cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield nursery
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start ``fn(*args)`` in the nursery, or skip it once we are stopping."""
        if self._nursery is None:
            log.debug("stopping: not starting %s", fn.__name__)
            return
        self._nursery.start_soon(fn, *args)
