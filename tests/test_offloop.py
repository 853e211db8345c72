"""Off-loop work runs at a lower CPU priority than the event loop (Linux: nice is per thread)."""

import os
import sys
import threading

import pytest

from shoal.overlay import offloop


def nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="nice is per thread only on Linux")
async def test_worker_threads_are_lowered_and_the_loop_is_not():
    loop = nice()
    for _ in range(3):  # trio reuses its workers: lowered once, not once per call
        assert await offloop.run_sync(nice) == min(19, loop + offloop.NICE)
    assert nice() == loop
