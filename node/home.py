"""Where a node keeps its files (kept free of heavy imports: ``shoal status`` only needs paths)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
