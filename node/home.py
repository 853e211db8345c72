"""Where a node keeps its files (kept free of heavy imports: ``shoal status`` only needs paths)."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path


class HomeInUse(Exception):
    """Another daemon runs with this home: two would share one identity and corrupt its checkpoint."""


@dataclass(frozen=True)
class Home:
    """Files of one node: identity key, configuration, checkpoint, and where its API listens."""

    path: Path

    @property
    def identity(self) -> Path:
        return self.path / "identity.key"

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.safetensors"

    @property
    def api(self) -> Path:
        return self.path / "api.json"

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    def claim(self) -> int:
        """Hold this home for this process (until it exits); HomeInUse if another daemon holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HomeInUse(
                f"another shoal daemon runs with {self.path}; stop it or use another --home"
            ) from None
        return fd
