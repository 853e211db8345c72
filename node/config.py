"""A node's configuration: ``config.toml`` in its home, then ``SHOAL_*`` variables, then flags.

The configuration is made of the layers' own settings, one dataclass per section of the file:
``[network]`` is the overlay's :class:`~overlay.config.P2PConfig`, ``[task]`` and ``[protocol]`` are
:class:`~learning.settings.TaskSettings` and :class:`~learning.settings.ProtocolSettings`, ``[node]`` is
:class:`NodeSettings` below. Each checks its own fields in ``__post_init__``; this module only reads the
three sources into them, key by key (each later source overrides the earlier one), so a typo stops the
daemon with one line naming the key and what is expected, before anything starts.

The sections' field metadata is the one place a setting is written: a field with a ``help`` is a key of
its section, or a sub-table of it when its type is a dataclass (``[protocol.gossip]``: the protocol's
own configuration, nested rather than copied). ``group`` is a comment line before it in the template,
``flag`` makes it a ``shoal run`` flag too, ``metavar`` names the flag's value. A key's name is its path
from its section joined by ``_`` (``fanout`` of ``[protocol.gossip]`` is ``gossip_fanout``), unique across
sections: ``SHOAL_GOSSIP_FANOUT``, ``--gossip-fanout``, ``shoal.Node(..., gossip_fanout=3)``. The
commented template ``shoal init`` writes and the flags are generated from the metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from shoal.learning.settings import ProtocolSettings, TaskSettings
from shoal.overlay.config import P2PConfig

T = TypeVar("T")


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


def settings(kind: type) -> dict[str, tuple[Field, Any]]:
    """The fields of dataclass ``kind`` that have a ``help``, with their types: its keys, and its
    sub-tables (those whose type is a dataclass)."""
    hints = get_type_hints(kind)
    return {f.name: (f, hints[f.name]) for f in fields(kind) if "help" in f.metadata}


@dataclass(frozen=True)
class Key:
    """A setting, at ``path`` from its section through sub-tables (``("gossip", "fanout")``)."""

    section: str
    path: tuple[str, ...]
    field: Field
    kind: Any  # its type

    @property
    def name(self) -> str:
        """The path joined by ``_`` (``gossip_fanout``): unique across sections, it is the key's
        ``SHOAL_<NAME>``, ``shoal run --<name>`` and ``shoal.Node`` keyword."""
        return "_".join(self.path)

    @property
    def instead(self) -> str | None:
        """The name of the key this one is an alternative to (``local_epochs``: ``local_steps``), if any."""
        other = self.field.metadata.get("instead")
        return other and "_".join((*self.path[:-1], other))

    @property
    def default(self) -> Any:
        """Its value when no source sets it: the daemon's (``listen``), not always its field's."""
        value = getattr(Config(), self.section)
        for name in self.path:
            value = getattr(value, name)
        return value

    @property
    def table(self) -> str:
        """Its table as ``config.toml`` heads it (``protocol.gossip``)."""
        return ".".join((self.section, *self.path[:-1]))


def keys(kind: type, section: str = "", path: tuple[str, ...] = ()) -> dict[str, Key]:
    """Every setting of dataclass ``kind`` and of its sub-tables, by name."""
    found: dict[str, Key] = {}
    for name, (f, hint) in settings(kind).items():
        if is_dataclass(hint):
            found |= keys(hint, section, (*path, name))
        else:
            key = Key(section, (*path, name), f, hint)
            found[key.name] = key
    return found


def updated(value: T, names: dict[str, Any], table: str = "") -> T:
    """``value`` with the fields ``names`` gives, a sub-table's named as its keys are (``gossip_fanout``
    is ``value.gossip.fanout``), settings or not: how flags, ``shoal.Node``'s and ``shoal.simulate``'s
    keywords and the scenarios' overrides reach a nested field. A field given a value unsets the one
    it is ``instead`` of, unless that is given too. A sub-table's ``ValueError`` becomes a
    :class:`ConfigError` naming it after ``table``, what ``value`` is called (``protocol.gossip: ...``)."""
    tables = [name for name, (_, hint) in settings(type(value)).items() if is_dataclass(hint)]
    own_fields = {f.name: f for f in fields(value)}
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, given in names.items():
        sub = next((t for t in tables if name.startswith(f"{t}_")), None)
        if sub is None or name in own_fields:
            own[name] = given
        else:
            nested.setdefault(sub, {})[name.removeprefix(f"{sub}_")] = given
    for name, given in list(own.items()):
        other = own_fields[name].metadata.get("instead") if name in own_fields else None
        if other and given is not None and other not in own:
            own[other] = None
    for sub, given in nested.items():
        where = f"{table}.{sub}" if table else sub
        try:
            own[sub] = updated(getattr(value, sub), given, where)
        except ConfigError:  # named by a deeper table
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return replace(value, **own)


KEYS: dict[str, Key] = {name: key for s, kind in SECTIONS.items() for name, key in keys(kind, s).items()}
FLAGS: tuple[str, ...] = tuple(name for name, key in KEYS.items() if key.field.metadata.get("flag"))

RELATIVE_TO_FILE = {"allowlist"}  # paths that, given in config.toml, are taken from its directory

HEADER = """\
# Shoal node configuration. Flags of `shoal run` and SHOAL_<KEY> environment variables
# (e.g. SHOAL_BOOTSTRAP, SHOAL_LR) override these values; a sub-table's keys are prefixed by its
# name (fanout of [protocol.gossip]: SHOAL_GOSSIP_FANOUT, --gossip-fanout).
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
    # TOML has no null: None is a default (local_epochs: unset) or for simulations (every neighbour)
    int | None: ("int", _number(int)),
    float: ("float", _number(float)),
    float | None: ("float", _number(float)),
    str: ("str", _string),
}


NUMBERS: dict[Any, type] = {int: int, int | None: int, float: float, float | None: float}  # a flag's type


def _coerce(key: Key, value: Any, where: str) -> Any:
    """``where``: the source, and the key as the user wrote it there."""
    name, parse = KINDS[key.kind]
    try:
        return parse(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be {name}, got {value!r}") from None


def _read(
    table: dict[str, Any],
    kind: type,
    section: str,
    here: tuple[str, ...],
    path: Path,
    values: dict[str, Any],
    extra: list[str],
) -> None:
    """The settings of the file's ``table``, at ``here`` in ``section`` and holding ``kind``'s, into
    ``values`` by name; the keys it does not know into ``extra``."""
    known = settings(kind)
    for name, value in table.items():
        dotted = ".".join((*here, name))  # within its section: TOML takes it so there too
        if name not in known:
            extra.append(f"{section}.{dotted}")
        elif is_dataclass(hint := known[name][1]):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {dotted} must be a table ([{section}.{dotted}]), got {value!r}")
            _read(value, hint, section, (*here, name), path, values, extra)
        else:
            key = KEYS["_".join((*here, name))]
            values[key.name] = _coerce(key, value, f"{path}: {section}.{dotted}")
            if key.name in RELATIVE_TO_FILE and values[key.name]:  # the file's, not the cwd's
                values[key.name] = str(path.parent / values[key.name])


def load(path: Path | None, env: dict[str, str] | None = None, **flags: Any) -> Config:
    """The configuration from ``path`` (if it exists), then ``env`` (default: the process environment),
    then ``flags``: any keys by name, None = unset."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    extra: list[str] = []
    if path is not None and path.exists():
        try:
            document = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for section, table in document.items():
            if section not in SECTIONS or not isinstance(table, dict):
                extra.append(f"[{section}]")
            else:
                _read(table, SECTIONS[section], section, (), path, values, extra)
    if extra:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(extra))}")
    later = (
        {n: _coerce(k, env[v], f"{v}: {n}") for n, k in KEYS.items() if (v := f"SHOAL_{n.upper()}") in env},
        {n: _coerce(KEYS[n], v, f"--{n.replace('_', '-')}: {n}") for n, v in flags.items() if v is not None},
    )
    for source in later:  # overrides the earlier ones, a key the one it is ``instead`` of too
        for name in source:
            values.pop(KEYS[name].instead, None)
        values |= source
    defaults = Config()
    try:
        return Config(
            **{
                s: updated(getattr(defaults, s), {n: v for n, v in values.items() if KEYS[n].section == s}, s)
                for s in SECTIONS
            }
        )
    except ValueError as e:  # the section's own check, which names the key
        raise ConfigError(str(e)) from None


def toml_value(value: Any) -> str:
    """``value`` as ``config.toml`` writes it (None has no TOML form: the key is left out)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return f"[{', '.join(json.dumps(v) for v in value)}]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, initial_indent="# ", subsequent_indent="# ")


def _table(name: str, value: Any) -> list[str]:
    """The lines of table ``name`` holding ``value``'s settings: its keys, then its sub-tables."""
    lines, tables = [f"[{name}]"], []
    for key, (f, hint) in settings(type(value)).items():
        if is_dataclass(hint):
            tables += [*_comment(f.metadata["help"]), *_table(f"{name}.{key}", getattr(value, key))]
            continue
        if "group" in f.metadata:
            lines += _comment(f.metadata["group"])
        default, help = getattr(value, key), f.metadata["help"]
        entry = f"# {key} =" if default is None else f"{key} = {toml_value(default)}"  # TOML has no null
        if len(entry) < COLUMN and COLUMN + 2 + len(help) <= WIDTH:
            lines.append(f"{entry:<{COLUMN}}# {help}")
        else:
            lines += [*_comment(help), entry]
    return [*lines, "", *tables]


def template() -> str:
    """The commented ``config.toml`` of ``shoal init``: every key with its default and help (a key
    unset by default commented out)."""
    defaults = Config()
    return "\n".join([HEADER, *(line for s in SECTIONS for line in _table(s, getattr(defaults, s)))])


def document(**values: Any) -> str:
    """A ``config.toml`` holding just ``values`` (keys by name), each in its table (``node.demo``)."""
    if unknown := set(values) - set(KEYS):
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    tables: dict[str, list[str]] = {}
    for name, key in KEYS.items():  # in the sections' order, so a table's lines stay together
        if name in values:
            tables.setdefault(key.table, []).append(f"{key.path[-1]} = {toml_value(values[name])}")
    return "".join(f"[{table}]\n" + "".join(f"{line}\n" for line in lines) for table, lines in tables.items())


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The ``shoal run`` flags: every key marked ``flag``, grouped by table, None when not given."""
    groups: dict[str, Any] = {}  # table -> its argument group
    for name in FLAGS:
        key = KEYS[name]
        if key.table not in groups:
            groups[key.table] = parser.add_argument_group(f"[{key.table}] settings")
        options: dict[str, Any] = {"metavar": key.field.metadata.get("metavar")}
        if key.kind == tuple[str, ...]:
            options["nargs"] = "+"
        elif key.kind is bool:
            options = {"action": "store_const", "const": True}
        elif key.kind in NUMBERS:
            options["type"] = NUMBERS[key.kind]
        help = key.field.metadata["help"].replace("%", "%%")
        groups[key.table].add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, help=help, **options
        )
