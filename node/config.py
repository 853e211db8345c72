"""A node's configuration: ``config.toml`` in its home, then ``SHOAL_*`` variables, then flags.

The configuration is made of the layers' own settings, one dataclass per section of the file:
``[network]`` is the overlay's :class:`~overlay.config.P2PConfig`, ``[task]`` and ``[protocol]`` are
:class:`~learning.settings.TaskSettings` and :class:`~learning.settings.ProtocolSettings`, ``[node]`` is
:class:`NodeSettings` below. Each checks its own fields in ``__post_init__``; this module only reads the
three sources into them, key by key (each later source overrides the earlier one), so a typo stops the
daemon with one line naming the key and what is expected, before anything starts.

The sections' field metadata is the one place a setting is written: a field with a ``help`` is a key of
its section (``SHOAL_<KEY>`` too; keys are unique across sections), ``group`` is a comment line before
it in the template, ``flag`` makes it a ``shoal run --<key>`` flag too, ``metavar`` names the flag's
value. The commented template ``shoal init`` writes and the flags are generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from shoal.learning.settings import ProtocolSettings, TaskSettings
from shoal.overlay.config import P2PConfig


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class NodeSettings:
    """The daemon's own: its local API and how often it checkpoints."""

    api: str = field(
        default="127.0.0.1:5001",
        metadata={
            "help": "local status API (/status, /metrics); keep it on 127.0.0.1 (port 0: any free port)",
            "flag": True,
            "metavar": "HOST:PORT",
        },
    )
    checkpoint_every: int = field(
        default=5,
        metadata={"help": "rounds between checkpoints (and one at exit)", "flag": True, "metavar": "ROUNDS"},
    )

    def __post_init__(self) -> None:
        host, _, port = self.api.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"api: expected host:port such as 127.0.0.1:5001, got {self.api!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")


@dataclass(frozen=True)
class Config:
    """One section per field, named as in ``config.toml``."""

    # a daemon listens on every interface at a port others can be told (the overlay's default: any port)
    network: P2PConfig = field(default_factory=lambda: P2PConfig(listen=("/ip4/0.0.0.0/tcp/4001",)))
    task: TaskSettings = field(default_factory=TaskSettings)
    protocol: ProtocolSettings = field(default_factory=ProtocolSettings)
    node: NodeSettings = field(default_factory=NodeSettings)


SECTIONS: dict[str, type] = get_type_hints(Config)
SETTINGS: dict[str, dict[str, Field]] = {  # section -> key -> field
    section: {f.name: f for f in fields(kind) if "help" in f.metadata} for section, kind in SECTIONS.items()
}
KEYS: dict[str, str] = {key: section for section, keys in SETTINGS.items() for key in keys}  # key -> section
TYPES: dict[str, Any] = {key: get_type_hints(SECTIONS[section])[key] for key, section in KEYS.items()}
FLAGS: tuple[str, ...] = tuple(
    key for key, section in KEYS.items() if SETTINGS[section][key].metadata.get("flag")
)

RELATIVE_TO_FILE = {"allowlist"}  # paths that, given in config.toml, are taken from its directory

HEADER = """\
# Shoal node configuration. Flags of `shoal run` and SHOAL_<KEY> environment variables
# (e.g. SHOAL_BOOTSTRAP, SHOAL_LR) override these values.
"""
WIDTH, COLUMN = 110, 26  # a help that fits after its key = value (at COLUMN) is written on its line


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # from the environment: separated by commas or spaces
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise TypeError
    return tuple(value)


def _bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
        return value.lower() in {"1", "true", "yes", "on"}
    if not isinstance(value, bool):
        raise TypeError
    return value


def _number(kind: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise TypeError
        return kind(value)

    return parse


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


# type of a setting -> (what the error calls it, the parser of a TOML value or an environment string)
KINDS: dict[Any, tuple[str, Callable[[Any], Any]]] = {
    tuple[str, ...]: ("a list of strings", _strings),
    bool: ("bool", _bool),
    int: ("int", _number(int)),
    int | None: ("int", _number(int)),  # None (every neighbour) is for simulations: TOML has no null
    float: ("float", _number(float)),
    str: ("str", _string),
}


def _coerce(key: str, value: Any, where: str) -> Any:
    name, parse = KINDS[TYPES[key]]
    try:
        return parse(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be {name}, got {value!r}") from None


def load(path: Path | None, env: dict[str, str] | None = None, **flags: Any) -> Config:
    """The configuration from ``path`` (if it exists), then ``env`` (default: the process environment),
    then ``flags``: any keys, None = unset."""
    env = os.environ if env is None else env
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    extra: list[str] = []
    if path is not None and path.exists():
        try:
            document = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for section, table in document.items():
            if section not in SECTIONS or not isinstance(table, dict):
                extra.append(f"[{section}]")
                continue
            for key, value in table.items():
                if key in SETTINGS[section]:
                    values[section][key] = _coerce(key, value, str(path))
                    if key in RELATIVE_TO_FILE and values[section][key]:  # the file's, not the cwd's
                        values[section][key] = str(path.parent / values[section][key])
                else:
                    extra.append(f"{section}.{key}")
    if extra:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(extra))}")
    for key, section in KEYS.items():
        if (variable := f"SHOAL_{key.upper()}") in env:
            values[section][key] = _coerce(key, env[variable], variable)
    for key, value in flags.items():
        if value is not None:
            values[KEYS[key]][key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    defaults = Config()
    try:
        return Config(**{s: replace(getattr(defaults, s), **values[s]) for s in SECTIONS})
    except ValueError as e:  # the section's own check, which names the key
        raise ConfigError(str(e)) from None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return f"[{', '.join(json.dumps(v) for v in value)}]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ")


def template() -> str:
    """The commented ``config.toml`` of ``shoal init``: every key with its default and help."""
    defaults = Config()
    lines = [HEADER]
    for section, settings in SETTINGS.items():
        lines.append(f"[{section}]")
        for key, f in settings.items():
            if "group" in f.metadata:
                lines += _comment(f.metadata["group"])
            entry, help = f"{key} = {_toml(getattr(getattr(defaults, section), key))}", f.metadata["help"]
            if len(entry) < COLUMN and COLUMN + 2 + len(help) <= WIDTH:
                lines.append(f"{entry:<{COLUMN}}# {help}")
            else:
                lines += [*_comment(help), entry]
        lines.append("")
    return "\n".join(lines)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The ``shoal run`` flags: every key marked ``flag``, grouped by section, None when not given."""
    for section, settings in SETTINGS.items():
        group = parser.add_argument_group(f"[{section}] settings")
        for key, f in settings.items():
            if key not in FLAGS:
                continue
            options: dict[str, Any] = {"metavar": f.metadata.get("metavar")}
            kind = TYPES[key]
            if kind == tuple[str, ...]:
                options["nargs"] = "+"
            elif kind is bool:
                options = {"action": "store_const", "const": True}
            elif kind in (int, int | None, float):
                options["type"] = float if kind is float else int
            help = f.metadata["help"].replace("%", "%%")
            group.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, help=help, **options)
