"""Where a node keeps its files (kept free of heavy imports: ``shoal status`` only needs paths)."""

from __future__ import annotations

import fcntl
import json
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
        """Written by the running daemon once it serves: its API's host:port and its libp2p addresses
        (either may be port 0 in the config; this file says which ports were bound)."""
        return self.path / "api.json"

    def running(self) -> dict | None:
        """The running daemon's ``api.json`` ({"api": ..., "addresses": [...]}), or None if none serves."""
        try:
            found = json.loads(self.api.read_text())
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) and "api" in found else None

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
