"""Atomic writes: a process killed in the middle of one leaves the previous file, whole."""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from shoal.node import checkpoint
from shoal.overlay.atomic import write_atomic

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from shoal.node import checkpoint
    path, stage = Path(sys.argv[1]), sys.argv[2]
    checkpoint.save(path, checkpoint.Checkpoint({"w": torch.ones(1000)}, 1, "task"))
    real = getattr(os, stage)
    def die(*args):
        if stage == "fsync":
            real(*args)  # the new bytes are on disk, the rename has not happened
        os.kill(os.getpid(), signal.SIGKILL)
    setattr(os, stage, die)
    checkpoint.save(path, checkpoint.Checkpoint({"w": torch.zeros(1000)}, 2, "task"))
""")


@pytest.mark.parametrize("stage", ["fchmod", "fsync", "replace"])  # temp created, data synced, renaming
def test_sigkill_during_a_checkpoint_leaves_the_previous_one(tmp_path, stage):
    path = tmp_path / "checkpoint.safetensors"
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), stage], timeout=120, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    saved = checkpoint.load(path, "task")
    assert saved.round == 1 and torch.equal(saved.state["w"], torch.ones(1000))


def test_a_finished_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "f"
    write_atomic(path, "old")
    write_atomic(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new" and (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
