"""glibc's malloc told to keep freed memory: a message's buffers are reused, not faulted in again."""

import platform
import subprocess
import sys

import pytest

# The buffers one 1 MB message passes through on a receiving node: decrypted Noise messages, the
# session's joined read, Yamux's stream buffer, the stream read's copy; then minor page faults per message.
PROGRAM = """
import os, resource, sys
if sys.argv[1] == "keep":
    from shoal.overlay.malloc import keep_freed_memory
    assert keep_freed_memory()
def message():
    parts = [os.urandom(65519) for _ in range(16)]
    joined = b"".join(parts); del parts
    buffer = bytearray(); buffer += joined; del joined
    return bytes(buffer[:-12])
for _ in range(20):
    message()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    message()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
"""


def faults_per_message(mode: str) -> float:
    run = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return float(run.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_buffers_of_a_message_are_reused_not_faulted_in_again():
    kept, default = faults_per_message("keep"), faults_per_message("default")
    assert kept < 10 < 200 < default, (kept, default)  # measured: 0 vs ~740 (a 1 MB message is 245 pages)
