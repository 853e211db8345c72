"""A node's configuration: ``config.toml`` in its home, then ``SHOAL_*`` variables, then flags.

Each later source overrides the earlier one, key by key. Every value is checked here, so a typo
stops the daemon with one line naming the key and what is expected, before anything starts.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shoal.overlay.host import parse_bootstrap, parse_multiaddr

PROTOCOLS = ("gossip", "modest")
INTEGRATORS = ("mean", "weighted", "vca", "median", "trimmed", "krum", "bristle")
CODECS = ("fp32", "fp16", "bf16", "int8", "topk")  # learning.compression.CODECS, without importing torch


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class Config:
    # [network]
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    relay_service: bool = False
    upnp: bool = False
    ban_duration: float = 600.0
    # [task]
    dataset: str = "digits"
    data: str = ""
    shard: int = 0
    shards: int = 1
    partition: str = "iid"
    model: str = "mlp"
    seed: int = 0
    batch_size: int = 32
    lr: float = 0.05
    local_steps: int = 20
    # [protocol]
    protocol: str = "gossip"
    integrator: str = "vca"
    period: float = 1.0
    fanout: int = 2
    sample_size: int = 10
    aggregators: int = 1
    success_fraction: float = 1.0
    aggregation_timeout: float = 5.0
    max_round_jump: int = 100
    max_norm_ratio: float = 10.0
    role_slack: int = 16
    codec: str = "fp32"
    topk_fraction: float = 0.1
    # [node]
    api: str = "127.0.0.1:5001"
    checkpoint_every: int = 5
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unknown keys, for the error

    def __post_init__(self) -> None:
        check(self)


SECTIONS = {
    "network": ("listen", "announce", "bootstrap", "relay_service", "upnp", "ban_duration"),
    "task": (
        "dataset",
        "data",
        "shard",
        "shards",
        "partition",
        "model",
        "seed",
        "batch_size",
        "lr",
        "local_steps",
    ),
    "protocol": (
        "protocol",
        "integrator",
        "period",
        "fanout",
        "sample_size",
        "aggregators",
        "success_fraction",
        "aggregation_timeout",
        "max_round_jump",
        "max_norm_ratio",
        "role_slack",
        "codec",
        "topk_fraction",
    ),
    "node": ("api", "checkpoint_every"),
}
TYPES = {f.name: f.type for f in fields(Config)}
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

TEMPLATE = """\
# Shoal node configuration. Flags of `shoal run` and SHOAL_<KEY> environment variables
# (e.g. SHOAL_BOOTSTRAP, SHOAL_LR) override these values.

[network]
# Multiaddrs to listen on. 0.0.0.0 listens on every interface (each is announced by its own address).
listen = ["/ip4/0.0.0.0/tcp/4001"]
# Addresses to announce instead, e.g. the public address of a port forward. Empty: the listen ones.
announce = []
# Nodes to join, as `shoal id` prints them on those nodes: /ip4/<ip>/tcp/<port>/p2p/<peer id>.
# Empty: this node starts a swarm of its own and others join it.
bootstrap = []
# Serve as a Circuit Relay v2 relay for nodes behind NAT (only useful on a publicly reachable node).
relay_service = false
# Ask the router for a port mapping by UPnP (adds about 4 s to the start).
upnp = false
# Seconds a peer stays cut off after sending too much wrong input (malformed, implausible, floods).
ban_duration = 600.0

[task]
# Nodes train the same task only if model, input shape, classes and protocol match.
dataset = "digits"        # digits | mnist1d | fashion-mnist | path to a .npz file
data = ""                 # this node's own data (.npz: x_train, y_train, optional x_test, y_test)
shard = 0                 # without `data`: which part of `dataset` this node holds ...
shards = 1                # ... out of how many parts
partition = "iid"         # how the parts are cut: iid | dirichlet:<alpha> | shards:<k>
model = "mlp"             # mlp | cnn | frozen-cnn | head | <module>:<factory>
seed = 0
batch_size = 32
lr = 0.05
local_steps = 20          # SGD steps per round

[protocol]
protocol = "gossip"       # gossip | modest
# How received models are folded into ours: mean | weighted | vca | median | trimmed | krum | bristle
# (bristle: Byzantine-robust on non-IID data; needs model frozen-cnn or head, shares only the output layer)
integrator = "vca"
# gossip:
period = 1.0              # least seconds between the starts of two rounds
fanout = 2                # peers each model is sent to per round
# modest (each round a sample of trainers sends its models to a few aggregators):
sample_size = 10          # trainers per round; keep it at most the swarm's size, or rounds wait
aggregators = 1           # aggregators per round
success_fraction = 1.0    # share of the sample's models an aggregator waits for ...
aggregation_timeout = 5.0 # ... or at most this many seconds
# every peer is a possible adversary (README, "Hostile peers"):
max_round_jump = 100      # most rounds a peer's message may move this node's round ahead
max_norm_ratio = 10.0     # models with a layer's L2 norm over this many times ours are refused
role_slack = 16           # modest: how far past the first a (or s) candidates a sender may rank in its role
# How models travel (part of the task: peers with another codec are another swarm; README "Compressed
# updates"): fp32 | fp16 | bf16 | int8 | topk (differences to the last model sent to that peer, top
# topk_fraction of them by magnitude, whole int8 models when a peer has none)
codec = "fp32"
topk_fraction = 0.1

[node]
api = "127.0.0.1:5001"    # local status API (/status, /metrics); keep it on 127.0.0.1
checkpoint_every = 5      # rounds between checkpoints (and one at exit)
"""


def check(c: Config) -> None:
    if c.extra:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(c.extra))}")
    try:
        for addr in c.listen + c.announce:
            parse_multiaddr(addr)
        for addr in c.bootstrap:
            parse_bootstrap(addr)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not c.listen:
        raise ConfigError("listen: give at least one address, e.g. /ip4/0.0.0.0/tcp/4001")
    if c.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: {c.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if c.integrator not in INTEGRATORS:
        raise ConfigError(f"integrator: {c.integrator!r} is not one of {', '.join(INTEGRATORS)}")
    if not 0 <= c.shard < c.shards:
        raise ConfigError(f"shard must be in 0..shards-1 (shards = {c.shards}), got {c.shard}")
    for name in (
        "batch_size",
        "local_steps",
        "fanout",
        "sample_size",
        "aggregators",
        "checkpoint_every",
        "max_round_jump",
    ):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(c, name)}")
    if c.lr <= 0 or c.period < 0 or c.aggregation_timeout <= 0 or c.ban_duration <= 0:
        raise ConfigError("lr, aggregation_timeout and ban_duration must be positive and period not negative")
    if not c.max_norm_ratio >= 1 or c.role_slack < 0:
        raise ConfigError("max_norm_ratio must be at least 1 and role_slack not negative")
    if c.codec not in CODECS:
        raise ConfigError(f"codec: {c.codec!r} is not one of {', '.join(CODECS)}")
    if not 0 < c.topk_fraction <= 1:
        raise ConfigError(f"topk_fraction must be in (0, 1], got {c.topk_fraction}")
    if not 0 < c.success_fraction <= 1:
        raise ConfigError(f"success_fraction must be in (0, 1], got {c.success_fraction}")
    host, _, port = c.api.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"api: expected host:port such as 127.0.0.1:5001, got {c.api!r}")


def _coerce(key: str, value: Any, where: str) -> Any:
    """``value`` as the type of ``key``; strings (from the environment) are parsed."""
    kind = TYPES[key]
    try:
        if kind == "tuple[str, ...]":
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split() if v]
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in TRUE | FALSE:
                return value.lower() in TRUE
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "int":
            if isinstance(value, bool):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {key} must be {kind.replace('tuple[str, ...]', 'a list of strings')}, got {value!r}"
        ) from None


def load(path: Path | None, env: dict[str, str] | None = None, **flags: Any) -> Config:
    """The configuration from ``path`` (if it exists), then the environment, then ``flags`` (None = unset)."""
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if path is not None and path.exists():
        try:
            document = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        for section, table in document.items():
            if section not in SECTIONS or not isinstance(table, dict):
                extra[f"[{section}]"] = table
                continue
            for key, value in table.items():
                if key in SECTIONS[section]:
                    values[key] = _coerce(key, value, str(path))
                else:
                    extra[f"{section}.{key}"] = value
    for key in TYPES:
        variable = f"SHOAL_{key.upper()}"
        if key != "extra" and variable in (env if env is not None else os.environ):
            values[key] = _coerce(key, (env if env is not None else os.environ)[variable], variable)
    for key, value in flags.items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    try:
        return Config(**values, extra=extra)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
