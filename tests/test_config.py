"""The configuration: sections from the layers' dataclasses, the template and flags from their metadata."""

import random
import subprocess
import sys
import tomllib
from dataclasses import fields
from functools import reduce

import pytest
import torch

from shoal.learning.anchor import Anchor, ClassificationProbe
from shoal.learning.clipping import Clipped
from shoal.learning.compression import CodecConfig
from shoal.learning.gossip import Gossip, GossipConfig
from shoal.learning.models import build_model
from shoal.learning.modest import Modest, ModestConfig
from shoal.learning.node import build_protocol
from shoal.learning.outer import OuterConfig
from shoal.learning.settings import ProtocolSettings
from shoal.node.cli import build_parser
from shoal.node.config import (
    FLAGS,
    KEYS,
    SECTIONS,
    Config,
    ConfigError,
    document,
    keys,
    load,
    template,
    updated,
)
from shoal.simulations.config import SimConfig

# The keys and flags of config.toml before it was generated from metadata: files written then must load,
# but for [protocol], whose protocols' and codec's keys moved to its sub-tables (NESTED).
EARLIER_KEYS = {
    "network": {"listen", "announce", "bootstrap", "relay_service", "upnp", "ban_duration"},
    "task": {
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
    },
    "protocol": {"protocol", "integrator"},
    "node": {"api", "checkpoint_every"},
}
NESTED = {  # the earlier [protocol] keys, by the name each has in its sub-table now
    "gossip_period",
    "gossip_fanout",
    "gossip_max_round_jump",
    "gossip_max_norm_ratio",
    "modest_period",
    "modest_sample_size",
    "modest_aggregators",
    "modest_success_fraction",
    "modest_aggregation_timeout",
    "modest_max_round_jump",
    "modest_max_norm_ratio",
    "modest_role_slack",
    "codec_name",
    "codec_topk_fraction",
}
EARLIER_FLAGS = {
    "listen",
    "announce",
    "bootstrap",
    "relay_service",
    "upnp",
    "dataset",
    "data",
    "shard",
    "shards",
    "partition",
    "model",
    "protocol",
    "integrator",
    "codec_name",
    "lr",
    "local_steps",
    "gossip_period",
    "modest_period",
    "gossip_fanout",
    "api",
    "checkpoint_every",
}
# a bad value for a key of each section, and the words its one-line error must hold
BAD = {
    "network": ("ban_duration", 0, "ban_duration"),
    "task": ("local_steps", 0, "local_steps must be at least 1"),
    "protocol": ("modest_success_fraction", 1.5, "protocol.modest: success_fraction must be in (0, 1]"),
    "node": ("api", "localhost", "api: expected host:port"),
}


def test_the_template_parses_back_to_the_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(template())
    assert load(path, env={}) == Config()
    assert set(tomllib.loads(template())) == set(SECTIONS) == set(EARLIER_KEYS)


ADDRESS = ("/ip4/1.2.3.4/tcp/1",)  # a sample value for a list flag


def run_flags(key: str, value: object) -> list[str]:
    flag = f"--{key.replace('_', '-')}"
    if value is True:
        return [flag]
    return [flag, *(value if isinstance(value, tuple) else [str(value)])]


def words(text: str) -> str:
    return " ".join(text.replace("#", " ").split())


def value(config: Config, name: str) -> object:
    """The value of key ``name`` in ``config``."""
    key = KEYS[name]
    return reduce(getattr, key.path, getattr(config, key.section))


def test_every_setting_is_in_the_template_with_its_help_and_a_flag_where_marked():
    text = template()
    document = tomllib.loads(text)
    defaults = Config()
    for name, key in KEYS.items():
        default = value(defaults, name)
        unset = default is None  # TOML has no null: written commented out
        assert (key.path[-1] in reduce(dict.get, key.table.split("."), document)) is not unset
        assert f"\n{'# ' * unset}{key.path[-1]} =" in text
        assert words(key.field.metadata["help"]) in words(text)
        if key.field.metadata.get("flag"):
            sample = True if isinstance(default, bool) else {(): ADDRESS, None: 1}.get(default, default)
            args = build_parser().parse_args(["run", *run_flags(name, sample)])
            assert getattr(args, name) is not None, name
    for table in ("gossip", "modest", "codec"):  # a sub-table, headed by what it is
        help = fields_by_name(ProtocolSettings)[table].metadata["help"]
        assert f"{words(help)} [protocol.{table}]" in words(text)
    assert set(FLAGS) == {name for name, key in KEYS.items() if key.field.metadata.get("flag")}


def fields_by_name(kind: type) -> dict:
    return {f.name: f for f in fields(kind)}


def test_existing_files_keys_and_flags_keep_working():
    for section, names in EARLIER_KEYS.items():
        assert names <= {name for name, key in KEYS.items() if key.section == section}, section
    assert set(KEYS) >= NESTED
    assert set(FLAGS) >= EARLIER_FLAGS


def test_the_protocol_settings_nest_the_protocols_own_configurations():
    nested = {"gossip", "modest", "outer", "codec"}
    assert fields_by_name(ProtocolSettings).keys() == {"protocol", "integrator", *nested}
    settings = ProtocolSettings()
    assert (settings.gossip, settings.modest, settings.outer, settings.codec) == (
        GossipConfig(),
        ModestConfig(),
        OuterConfig(),
        CodecConfig(),
    )
    with pytest.raises(ValueError, match="MoDeST averages"):
        ProtocolSettings(protocol="modest", outer=OuterConfig(lr=0.7, momentum=0.9))


def test_keys_are_unique_across_sections_and_leave_shoal_home_alone():
    assert len(KEYS) == sum(len(keys(kind)) for kind in SECTIONS.values())
    assert "home" not in KEYS  # SHOAL_HOME is the home directory


def test_limits_and_simulation_knobs_are_no_keys(tmp_path):
    assert "limits" not in KEYS and "gossip_synchronous" not in KEYS
    path = tmp_path / "config.toml"
    path.write_text("[network]\nlimits = 5\n[protocol.gossip]\nsynchronous = true\n[extra]\nx = 1\n")
    with pytest.raises(
        ConfigError, match=r"unknown setting\(s\): \[extra\], network.limits, protocol.gossip.synchronous$"
    ):
        load(path, env={})


def test_a_sub_table_is_a_table_of_its_own_keys(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[protocol]\nfanout = 3\ncodec = "topk"\n')  # before the sub-tables
    with pytest.raises(ConfigError, match=r"codec must be a table \(\[protocol.codec\]\), got 'topk'$"):
        load(path, env={})
    path.write_text("[protocol]\nfanout = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\): protocol.fanout$"):
        load(path, env={})
    path.write_text('[protocol.gossip]\nfanout = "two"\n')
    with pytest.raises(ConfigError, match=r"config.toml: protocol.gossip.fanout must be int, got 'two'$"):
        load(path, env={})
    with pytest.raises(ConfigError, match=r"^SHOAL_GOSSIP_FANOUT: gossip_fanout must be int, got 'two'$"):
        load(None, env={"SHOAL_GOSSIP_FANOUT": "two"})
    path.write_text(document(gossip_fanout=3, modest_period=0.5, codec_name="topk"))
    config = load(path, env={"SHOAL_MODEST_SAMPLE_SIZE": "4"}, gossip_period=0.2)
    assert config.protocol.gossip == GossipConfig(fanout=3, period=0.2)
    assert config.protocol.modest == ModestConfig(sample_size=4, period=0.5)
    assert config.protocol.codec == CodecConfig("topk")


def test_run_flags_parse_into_the_settings(tmp_path):
    changed = {"listen": ("/ip4/127.0.0.1/tcp/0",), "upnp": True, "shards": 4, "shard": 3, "lr": 0.5}
    changed |= {"protocol": "modest", "gossip_fanout": 3, "api": "127.0.0.1:0", "data": "x.npz"}
    argv = ["run", *(arg for key, value in changed.items() for arg in run_flags(key, value))]
    args = build_parser().parse_args(argv)
    config = load(tmp_path / "missing.toml", env={}, **{key: getattr(args, key) for key in FLAGS})
    for name, given in changed.items():
        assert value(config, name) == given
    assert config.network.relay_service is False  # not given: the default


def test_flags_override_the_environment_which_overrides_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[task]\nlr = 0.1\nbatch_size = 8\n[network]\nupnp = true\n")
    env = {
        "SHOAL_LR": "0.2",
        "SHOAL_BOOTSTRAP": "",
        "SHOAL_UPNP": "off",
        "SHOAL_ANNOUNCE": "/ip4/1.2.3.4/tcp/1,",
    }
    config = load(path, env=env, lr=0.3)
    assert (config.task.lr, config.task.batch_size, config.network.upnp) == (0.3, 8, False)
    assert config.network.announce == ("/ip4/1.2.3.4/tcp/1",) and config.network.bootstrap == ()


@pytest.mark.parametrize("section", list(BAD))
@pytest.mark.parametrize("source", ["file", "env", "flag"])
def test_a_bad_value_in_any_section_is_one_line_naming_the_key(tmp_path, section, source):
    key, value, words = BAD[section]
    path = tmp_path / "config.toml"
    path.write_text(document(**{key: value}) if source == "file" else "")
    env = {f"SHOAL_{key.upper()}": str(value)} if source == "env" else {}
    flags = {key: value} if source == "flag" else {}
    with pytest.raises(ConfigError) as info:
        load(path, env=env, **flags)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("source", "expected"),
    [("file", "config.toml: task.lr must be float"), ("env", "SHOAL_LR: lr must be float")],
)
def test_a_value_of_the_wrong_type_says_where_it_came_from(tmp_path, source, expected):
    path = tmp_path / "config.toml"
    path.write_text('[task]\nlr = "fast"\n' if source == "file" else "")
    with pytest.raises(ConfigError, match=expected):
        load(path, env={"SHOAL_LR": "fast"} if source == "env" else {})


def test_the_simulations_are_checked_by_the_same_rules():
    for kind in (ProtocolSettings, SimConfig):
        with pytest.raises(ValueError, match=r"^gossip: fanout must be at least 1"):
            updated(kind(), {"gossip_fanout": 0})
        with pytest.raises(ValueError, match="period must not be negative"):
            updated(kind(), {"modest_period": -1.0})
    assert {f.name for f in fields(ProtocolSettings)} <= {f.name for f in fields(SimConfig)}


def test_one_function_builds_each_protocol_from_its_settings():
    model = {}
    module = build_model("mlp", (4,), 3, seed=0)
    anchor = Anchor(module, ClassificationProbe(torch.randn(8, 4), torch.randint(0, 3, (8,))))
    settings = ProtocolSettings(protocol="modest")
    modest = build_protocol(settings, "me", ["p"], model, 10, random.Random(0), anchor=anchor)
    assert isinstance(modest, Modest) and not modest._integrator.self_centred  # an aggregator's centre
    gossip = build_protocol(
        ProtocolSettings(), "me", [], model, 10, random.Random(0), anchor=anchor, joining=True
    )
    assert isinstance(gossip, Gossip) and gossip._config.join_by_fetch  # a fresh joiner fetches first
    assert isinstance(gossip._integrator, Clipped) and gossip._integrator.self_centred  # the robust default
    with pytest.raises(ValueError, match="anchor"):
        build_protocol(ProtocolSettings(), "me", [], model, 10, random.Random(0))
    vca = ProtocolSettings(integrator="vca")
    resumed = build_protocol(vca, "me", [], model, 10, random.Random(0), joining=True, round=7)
    assert not resumed._config.join_by_fetch and resumed.round == 7
    dpsgd = SimConfig(gossip=GossipConfig(synchronous=True, round_timeout=5.0))  # once dropped by a sweep
    config = build_protocol(dpsgd, "me", [], model, 10, random.Random(0))._config
    assert config.synchronous and config.round_timeout == 5.0 and config.fanout is None


def test_status_and_help_do_not_wait_for_torch(tmp_path):
    code = (
        "import sys; from shoal.node.cli import main; "
        f"main(['status', '--home', {str(tmp_path)!r}]); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
