"""Persistent identity, checked against real libp2p hosts on 127.0.0.1."""

import stat

import pytest
import trio
from libp2p import new_host
from multiaddr import Multiaddr

from shoal.overlay.identity import IdentityError, load_or_create_identity, peer_id


async def host_peer_id(key_pair) -> str:
    listen = [Multiaddr("/ip4/127.0.0.1/tcp/0")]
    host = new_host(key_pair=key_pair, listen_addrs=listen)
    with trio.fail_after(30):
        async with host.run(listen_addrs=listen):
            return host.get_id().to_base58()


async def test_identity_is_created_once_with_0600_and_survives_restarts(tmp_path):
    path = tmp_path / "home" / "identity.key"
    first, created = load_or_create_identity(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed into place
    again, created_again = load_or_create_identity(path)
    assert not created_again and peer_id(again) == peer_id(first)
    assert await host_peer_id(first) == await host_peer_id(again) == peer_id(first)


def test_a_damaged_identity_is_an_error_and_is_left_alone(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"not a key")
    with pytest.raises(IdentityError, match="is not a private key"):
        load_or_create_identity(path)
    assert path.read_bytes() == b"not a key"  # never silently replaced
