"""Freed memory kept for reuse rather than handed back to the kernel after every message (glibc malloc).

A model message passes through several buffers of its size on each end (Noise plaintexts, the joined
read, Yamux's stream buffer, the frame), each freed once the next holds the bytes. glibc hands the top
of its heap back to the kernel as soon as 128 KiB of it is free (``M_TRIM_THRESHOLD``) and maps
anything over its mmap threshold afresh, so every message faulted its memory in again, page by page,
zero-filled, on both ends: ~740 minor page faults for the buffers of one 1 MB message, 0 with the
thresholds below (tests/test_malloc.py). Keeping up to :data:`TRIM_THRESHOLD` freed bytes, and
serving buffers up to :data:`MMAP_THRESHOLD` from the heap, halved the time of a 1 MB model and
doubled a bare libp2p stream's speed for it (docs/measurements.md). Larger buffers are still
mapped afresh and returned when freed, and the heap keeps at most 64 MiB free at its top.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
# glibc's own dynamic threshold stops at 32 MiB (64-bit) and sets the trim threshold to twice it: its
# final state, from the start. At 4 MiB, raw TCP's 100 MB in benchmarks/transfer_speed.py (1 MiB reads,
# 16 MiB ones before) ran 35% slower than with glibc's defaults; at 32 MiB it does not.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def keep_freed_memory() -> bool:
    """Set the thresholds for this process; False (and nothing changed) where malloc is not glibc's."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the thresholds: malloc keeps its defaults")
    return done
