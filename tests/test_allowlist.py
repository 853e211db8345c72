"""A closed swarm (overlay/allowlist.py): the founder's signed allowlist, its errors, and real hosts."""

import contextlib
import json
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.node.config import ConfigError, load
from shoal.overlay.allowlist import AllowlistError, load_allowlist, sign_allowlist
from shoal.overlay.config import P2PConfig
from shoal.overlay.identity import peer_id
from shoal.overlay.interface import Delivered
from shoal.overlay.p2p import Libp2pOverlay
from shoal.overlay.wire import Message
from tests.local_swarm import FAST, TASK, until


def write(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value))
    return path


def test_a_signed_allowlist_admits_its_peers_and_the_founder_and_nothing_else(tmp_path):
    founder, member = create_new_key_pair(), create_new_key_pair()
    path = write(tmp_path / "allow.json", sign_allowlist(founder, [peer_id(member)]))
    allowed = load_allowlist(path, peer_id(founder))
    assert allowed.admits(peer_id(member)) and allowed.admits(peer_id(founder))
    assert not allowed.admits(peer_id(create_new_key_pair()))
    with pytest.raises(ValueError, match="not peer ids"):
        sign_allowlist(founder, ["nonsense"])


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda v: v["peers"].append(peer_id(create_new_key_pair())), "signature is not the founder's"),
        (lambda v: v.update(founder=peer_id(create_new_key_pair())), "not by the founder"),
        (lambda v: v.update(signature="zz"), "signature is not the founder's"),
        (lambda v: v.update(peers="all"), "list of peer ids"),
        (lambda v: v.pop("signature"), "founder, peers and signature"),
    ],
)
def test_a_changed_or_foreign_allowlist_is_refused_naming_the_file(tmp_path, change, error):
    founder = create_new_key_pair()
    value = sign_allowlist(founder, [peer_id(create_new_key_pair())])
    change(value)
    path = write(tmp_path / "allow.json", value)
    with pytest.raises(AllowlistError, match=error) as raised:
        load_allowlist(path, peer_id(founder))
    assert str(path) in str(raised.value)


def test_allowlist_settings_are_checked_when_the_configuration_is_read(tmp_path):
    founder = create_new_key_pair()
    write(tmp_path / "allow.json", sign_allowlist(founder, []))
    with pytest.raises(ValueError, match="cannot read it"):
        P2PConfig(allowlist=str(tmp_path / "missing.json"), founder=peer_id(founder))
    with pytest.raises(ValueError, match="set founder"):
        P2PConfig(allowlist=str(tmp_path / "allow.json"))
    with pytest.raises(ValueError, match="founder is set but allowlist is not"):
        P2PConfig(founder=peer_id(founder))
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        P2PConfig(allowlist=str(tmp_path / "junk.json"), founder=peer_id(founder))
    # in config.toml a relative path is the config file's neighbour, wherever the daemon starts
    config = tmp_path / "config.toml"
    config.write_text(f'[network]\nallowlist = "allow.json"\nfounder = "{peer_id(founder)}"\n')
    network = load(config, env={}).network
    assert network.allowlist == str(tmp_path / "allow.json") and network.admission() is not None
    config.write_text(f'[network]\nallowlist = "other.json"\nfounder = "{peer_id(founder)}"\n')
    with pytest.raises(ConfigError, match=r"other\.json"):
        load(config, env={})


async def test_peers_off_the_allowlist_never_become_task_peers_nor_get_a_message_through(tmp_path):
    founder, member, outsider = create_new_key_pair(), create_new_key_pair(), create_new_key_pair()
    path = write(tmp_path / "allow.json", sign_allowlist(founder, [peer_id(member)]))
    closed = {"allowlist": str(path), "founder": peer_id(founder), **FAST}
    async with Libp2pOverlay.start(founder, TASK, P2PConfig(**closed)) as first:
        boot = (first.addresses()[0],)
        async with (
            Libp2pOverlay.start(member, TASK, P2PConfig(bootstrap=boot, **closed)) as second,
            Libp2pOverlay.start(outsider, TASK, P2PConfig(bootstrap=boot, **FAST)) as stranger,
        ):
            await until(lambda: first.peers() == [second.peer_id] and second.peers() == [first.peer_id], 20)
            got = []

            async def drain(node: Libp2pOverlay) -> None:
                async for event in node.events:
                    if isinstance(event, Delivered):
                        got.append((node.peer_id, event.peer))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, first)
                nursery.start_soon(drain, second)
                for _ in range(10):  # it knows both from the bootstrap's answer, or dials them itself
                    for target in (first.peer_id, second.peer_id):
                        with contextlib.suppress(Exception), trio.move_on_after(1):
                            await stranger.send(target, Message("model", {"round": 1, "samples": 1}))
                    await trio.sleep(0.3)
                await second.send(first.peer_id, Message("model", {"round": 1, "samples": 1}))
                await until(lambda: (first.peer_id, second.peer_id) in got, 10)
                nursery.cancel_scope.cancel()
            assert all(sender != stranger.peer_id for _, sender in got), got
            assert stranger.peers() == [] and first.peers() == [second.peer_id]
            assert stranger.peer_id not in first.members() + second.members()
            assert first.members() == sorted([first.peer_id, second.peer_id])
            # the stranger dialled again with each send: its last connection is closed once refused
            await until(lambda: not first.host.get_network().get_connections(stranger.host.get_id()), 10)
            assert first.penalties == {}  # not admitted is not wrong input
