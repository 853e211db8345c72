"""Work off the event loop (training, evaluation, big decodes, checkpoints), at a lower CPU priority.

A device busy training looked dead to its peers: with 24 daemons on 2 cores, each loop waited for the
CPU behind every process's training, pings went unanswered for tens of seconds and the failure
detectors cut off live peers (docs/measurements.md). So worker threads run at ``NICE`` steps
below the loop (Linux gives each thread its own nice value): whenever a loop has a ping, a message or
a metadata update to handle, it runs first, and training takes the rest. On an idle machine nothing
changes. Elsewhere than Linux, ``nice`` would lower the whole process, so there it is left alone.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import trio

log = logging.getLogger("shoal.overlay")

NICE = 10  # CFS weight 110 against the loop's 1024
T = TypeVar("T")
_thread = threading.local()


async def run_sync(fn: Callable[..., T], *args: object, abandon_on_cancel: bool = False) -> T:
    """``fn(*args)`` in one of trio's worker threads (its cache: one pool for everything), lowered."""
    return await trio.to_thread.run_sync(partial(_lowered, fn, *args), abandon_on_cancel=abandon_on_cancel)


def _lowered(fn: Callable[..., T], *args: object) -> T:
    if not getattr(_thread, "lowered", False):
        _thread.lowered = True  # once per thread: trio reuses its workers
        if sys.platform == "linux":
            tid = threading.get_native_id()
            try:
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
            except OSError as e:  # a sandbox without setpriority: the work still runs
                log.debug("worker thread keeps its priority: %s", e)
    return fn(*args)
